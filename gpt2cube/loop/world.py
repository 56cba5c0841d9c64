"""Where this process stands in a torchrun job, and the few collectives the loop needs.

torchrun (or any launcher that sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)
starts one process per device; `join` makes the process group: NCCL on CUDA, gloo on the CPU,
with a timeout so that no rank waits forever on a peer that died. A plain `gpt2cube train` is
a world of one and touches torch.distributed not at all.

Failures: checks that every rank makes before training (options, data, resume settings) are
agreed on (`agree`): every rank learns whether any failed, rank 0 prints the one line, every rank
exits non-zero. A failure during training (out of memory, a bad batch, a killed peer) cannot be
agreed on; the rank that fails raises `RankFailed`, whose line names it, and torchrun ends the rest.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

from ..errors import Gpt2cubeError, InputError


class RankFailed(Gpt2cubeError):
    """A rank of a distributed job failed; the message names it and the cause."""


class PeerFailed(Gpt2cubeError):
    """A collective failed because another rank went away (its own line says why)."""


class Agreed(Gpt2cubeError):
    """A check failed on some rank and rank 0 prints it; this rank stops without a line of its own."""

    quiet = True


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    distributed: bool = False  # launched by torchrun with a process group

    @property
    def main(self) -> bool:
        return self.rank == 0


def launched() -> bool:
    """Whether torchrun (or a launcher like it) started this process."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))


def current() -> World:
    """This process's place, from the launcher's environment (no process group needed)."""
    if not launched():
        return World()
    return World(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]), True)


def _own_gpu(world: World) -> None:
    """Bind this rank to cuda:LOCAL_RANK (before any collective: NCCL needs each rank on its own GPU)."""
    import torch

    if world.local_rank >= torch.cuda.device_count():
        raise InputError(f"LOCAL_RANK {world.local_rank}: this machine has {torch.cuda.device_count()} CUDA "
                         "devices; expected --nproc-per-node at most that")
    torch.cuda.set_device(world.local_rank)


def device_for(world: World, device: str) -> str:
    """The device of this rank: `cuda` becomes cuda:LOCAL_RANK under torchrun."""
    if world.distributed and device == "cuda":
        _own_gpu(world)
        return f"cuda:{world.local_rank}"
    return device


def join(device: str, timeout_s: float) -> World:
    """This process's World; under torchrun, after joining the process group (idempotent). On
    CUDA the rank's GPU is set first and named to the group (`device_id`, torchtitan's order), so
    that the checks agreed on before training already run each rank on its own GPU: with every
    rank on cuda:0, NCCL's first collective fails as a duplicate GPU or hangs."""
    world = current()
    if world.distributed:
        import torch.distributed as dist

        if not timeout_s > 0:
            raise InputError(f"--dist-timeout {timeout_s}; expected a positive number of seconds")
        if not dist.is_initialized():
            kw = {}
            if device.startswith("cuda"):
                import torch

                _own_gpu(world)
                kw["device_id"] = torch.device("cuda", world.local_rank)
            dist.init_process_group("nccl" if device.startswith("cuda") else "gloo",
                                    timeout=timedelta(seconds=timeout_s), **kw)
    return world


@contextmanager
def joined(device: str, timeout_s: float):
    """`join` for the length of a with-block, then `leave`: together with the other ranks when the
    block ended normally (a barrier first), at once when it raised (the peers may be gone)."""
    world = join(device, timeout_s)
    try:
        yield world
    except BaseException:
        leave(world, together=False)
        raise
    leave(world)


def agree(world: World, fn):
    """fn() on every rank; if it raises on any, every rank stops: rank 0 with the failing rank's
    line (the rank named when not all of them failed alike), the others quietly, all non-zero."""
    if not world.distributed or world.size == 1:
        return fn()
    import torch.distributed as dist

    result, mine = None, None
    try:
        result = fn()
    except Gpt2cubeError as e:
        mine = (type(e).exit_code, str(e))
    except Exception as e:  # noqa: BLE001 - reported through rank 0 as its cause
        mine = (1, f"{type(e).__name__}: {e}")
    every = [None] * world.size
    dist.all_gather_object(every, mine)
    failed = [(r, e) for r, e in enumerate(every) if e is not None]
    if not failed:
        return result
    rank, (code, msg) = failed[0]
    if not world.main:
        err = Agreed(msg)
    elif len(failed) == world.size and all(e == failed[0][1] for _, e in failed):
        err = Gpt2cubeError(msg)
    else:
        err = RankFailed(f"rank {rank}: {msg}")
    err.exit_code = code
    raise err


def all_sum(world: World, value: float) -> float:
    """The sum of `value` over the ranks (float64 on the CPU group or the device's)."""
    if not world.distributed:
        return value
    import torch
    import torch.distributed as dist

    dev = f"cuda:{world.local_rank}" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([value], dtype=torch.float64, device=dev)
    dist.all_reduce(t)
    return float(t.item())


def from_main(world: World, obj):
    """Rank 0's `obj` on every rank (decisions that must not diverge: which checkpoint is best)."""
    if not world.distributed:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(world: World, obj) -> list:
    if not world.distributed:
        return [obj]
    import torch.distributed as dist

    every = [None] * world.size
    dist.all_gather_object(every, obj)
    return every


def leave(world: World, together: bool = True) -> None:
    """Destroy the process group. `together`: after a barrier, so that no rank tears its
    connections down while rank 0 still writes its files or a peer is mid-collective, and after
    collecting garbage, so that no wrapper (DDP's reducer) keeps the group alive into interpreter
    shutdown: gloo's worker threads destroyed there abort the process ("terminate called without
    an active exception", SIGABRT) after the work itself succeeded."""
    if not world.distributed:
        return
    import gc

    import torch.distributed as dist

    if not dist.is_initialized():
        return
    if together:
        dist.barrier()
    gc.collect()
    dist.destroy_process_group()


def comm_error(e: BaseException) -> bool:
    """Whether `e` is a collective that failed because a peer went away or timed out."""
    import torch.distributed as dist

    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and any(s in text for s in ("gloo", "nccl", "connection closed", "connection reset",
                                                                    "timed out", "broken pipe"))
