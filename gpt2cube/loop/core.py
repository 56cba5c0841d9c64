"""The training loop: one for `train`, every `finetune` mode and `baseline neural`.

What a run trains on and how it scores is a `Job` (trainer.py: language modelling from scratch;
finetune: LM or spam, with QAT's weight swap, a distillation teacher, a routing mask); the loop
owns the rest: AdamW (betas 0.9, 0.95; weight decay on matrices only), linear warm-up then cosine
decay to 10 % of the peak rate, gradient clipping at 1.0, gradient accumulation, validation and
checkpoint selection, train_log.jsonl, the loss curve and exact resume.

Batches. `batch_size` is the global batch: the items (windows, messages) of one optimizer step,
whatever the number of processes. Every rank draws the same global batch from the same seeded
generator (the global order), takes its own contiguous slice of it (`batch_size / world` items,
disjoint from every other rank's) and runs it as `micro_batch`-item forwards, accumulating
gradients. A micro-batch's loss is its share of the global batch's loss (the job weighs its
positions against the whole global batch), so the shares sum to the loss one process computes
over the whole batch; DDP averages gradients over the ranks, so each rank's share is scaled by
the world size first. N processes therefore take the same steps as one, up to the order of
float32 sums; with the same micro-batch on both, the gradient sums are the same pairwise sums and
the runs agree to the last bit on the CPU (tests/test_distributed.py).

Processes. Under torchrun the objective is wrapped in DDP (NCCL on CUDA, gloo on the CPU), or
sharded with FSDP2's `fully_shard` (blocks, then the root) with `fsdp`. Validation runs on every
rank (FSDP needs every rank in the forward) and rank 0's result decides the best checkpoint for
all. Only rank 0 writes: train_state.pt, the exported checkpoint (a plain full state dict, also
under FSDP), train_log.jsonl and loss_curve.png, each atomically, in the layout one process writes.

Resume. train_state.pt holds the model, the optimizer, the data generator, every rank's torch
generators, the step and the run's settings. The same world size continues exactly; another world
size continues the same global order of batches (only dropout's and noise's streams start anew).
"""

from __future__ import annotations

import json
import shutil
import signal
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import Gpt2cubeError, InputError
from .curve import plot_loss
from .schedule import cosine_lr
from .world import PeerFailed, RankFailed, World, all_sum, comm_error, from_main, gather


@dataclass
class LoopConfig:
    out: Path
    steps: int
    batch_size: int                 # global: items per optimizer step
    lr: float
    warmup_steps: int
    weight_decay: float
    eval_every: int
    seed: int
    record: dict = field(default_factory=dict)  # the run's settings, saved with its state
    micro_batch: int | None = None  # items per forward on one process [default: batch_size / world size]
    stop_at: int | None = None      # stop (resumably) after this step; the schedule still spans `steps`
    fsdp: bool = False
    validate_first: bool = False    # validate and export the starting point as step 0 (fine-tuning)
    keep_best: bool = False         # export the best validation so far; else the latest
    log_throughput: bool = False    # tokens_per_s in every row


class Job:
    """The task-specific part of a run. `objective` is the module the loop wraps (DDP / FSDP);
    its forward dispatches on a first `kind` argument and holds `model` as a submodule; anything it
    must not wrap or train (a teacher) it keeps out of its registered modules."""

    model = None
    objective = None
    capacity: int = 0  # distinct items a batch is drawn from
    unit: str = "items"

    def draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """The next global batch, n items, in the global order."""
        raise NotImplementedError

    def loss(self, run: Callable, items: np.ndarray, lo: int, hi: int, step: int):
        """items[lo:hi]'s share of the global batch's loss (a scalar tensor with its graph)."""
        raise NotImplementedError

    def tokens(self, items: np.ndarray) -> int:
        raise NotImplementedError

    def validate(self, run: Callable) -> dict:
        """Validation figures, with "select" (lower is better) picking the checkpoint."""
        raise NotImplementedError

    def weights(self, step: int):
        """Context in which the step's forwards and backwards run (QAT's quantized weights)."""
        return nullcontext()

    def row(self, step: int) -> dict:
        return {}

    def export(self, state: dict | None, best: dict) -> None:
        """Write the checkpoint (rank 0 only); `state` is the full state dict when the model is
        sharded, else None (the model itself holds it)."""
        raise NotImplementedError


def micro_batch(cfg: LoopConfig, world: World, job: Job) -> int:
    """The per-forward batch, checked against the world size and the data."""
    B, W = cfg.batch_size, world.size
    if W > B:
        raise InputError(f"{W} processes for --batch-size {B}: the global batch gives every process at least one "
                         f"item per step; expected at most {B} processes or a --batch-size of at least {W}")
    if W > job.capacity:
        raise InputError(f"{W} processes but the training data has only {job.capacity} {job.unit}; expected at "
                         f"most {job.capacity} processes")
    m = cfg.micro_batch if cfg.micro_batch is not None else B // W
    if m <= 0:
        raise InputError(f"--micro-batch {m}; expected a positive number of items")
    if B % (W * m):
        raise InputError(f"--batch-size {B} is not divisible by {W} processes x --micro-batch {m} = {W * m}; "
                         f"expected a multiple of {W * m} (the global batch stays fixed, gradient accumulation "
                         "fills it)")
    return m


def check_launch(fsdp: bool, world: World) -> None:
    if fsdp and not world.distributed:
        raise InputError("--fsdp shards the model over the processes of a torchrun job, and this process was not "
                         "started by torchrun; expected: torchrun --nproc-per-node N -m gpt2cube ... --fsdp")


def _blocks(model) -> list:
    body = getattr(model, "transformer", None)
    return list(getattr(body, "h", [])) if body is not None else []


def _wrap(job: Job, cfg: LoopConfig, world: World, device: str):
    if cfg.fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cuda" if device.startswith("cuda") else "cpu", (world.size,))
        for blk in _blocks(job.model):
            fully_shard(blk, mesh=mesh)
        fully_shard(job.objective, mesh=mesh)
        return job.objective
    if world.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(job.objective, device_ids=[world.local_rank] if device.startswith("cuda") else None,
                   broadcast_buffers=False)  # the buffers (causal masks, fixed tables) never change
    return job.objective


@contextmanager
def _no_sync(run, cfg: LoopConfig, sync: bool):
    """Accumulate this backward's gradients locally (not the step's last micro-batch)."""
    if sync or run is None:
        yield
    elif cfg.fsdp:
        run.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            run.set_requires_gradient_sync(True)
    else:
        with run.no_sync():
            yield


def _full_state(job: Job, opt, cfg: LoopConfig) -> tuple[dict, dict | None]:
    """(model, optimizer) state dicts, whole, on rank 0 (a collective under FSDP); with `opt`
    None, the model's only. (torch's get_optimizer_state_dict of an optimizer that has not
    stepped yet initialises its state with a zero-rate step, which would shift Adam's bias
    correction by one step: the export before the first step must not ask for it.)"""
    if not cfg.fsdp:
        return job.model.state_dict(), None if opt is None else opt.state_dict()
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model = get_model_state_dict(job.model, options=opts)
    return model, None if opt is None else get_optimizer_state_dict(job.model, opt, options=opts)


def _rng_states(world: World) -> tuple[list, list | None]:
    import torch

    cpu = gather(world, torch.get_rng_state())
    # each rank's own GPU only (the current device: cuda:LOCAL_RANK under torchrun)
    cuda = gather(world, torch.cuda.get_rng_state()) if torch.cuda.is_available() else None
    return cpu, cuda


def _restore_cuda_rng(state) -> None:
    """This rank's GPU generator from a saved state: one tensor, or (runs saved before) the list of
    every visible device's, of which the current device's entry is this rank's."""
    import torch

    if isinstance(state, (list, tuple)):
        i = torch.cuda.current_device()
        state = state[i] if i < len(state) else None
    if state is not None:
        torch.cuda.set_rng_state(state)


class _Terminated(SystemExit):
    """torchrun's SIGTERM to the ranks that outlive a failed one."""


@contextmanager
def _terminable(world: World):
    if not world.distributed:
        yield
        return

    def stop(signum, frame):
        raise _Terminated(128 + signum)

    old = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _tidy(out: Path) -> None:
    """What an interrupted write of this run leaves: the state's and the export's temporaries."""
    (out / "train_state.pt.tmp").unlink(missing_ok=True)
    shutil.rmtree(out / ".export.tmp", ignore_errors=True)


def _append(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def trim_log(path: Path, step: int) -> int:
    """On resume from `step`: keep the log's rows up to that step (the saved state), drop the rows
    a crashed run wrote after it (the resumed run logs those steps again) and a line cut short by
    the crash; rewritten atomically. Returns the rows dropped."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
            keep = isinstance(row, dict) and int(row["step"]) <= step
        except (ValueError, KeyError, TypeError):
            keep = False
        if keep:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(k + "\n" for k in kept), encoding="utf-8")
        tmp.replace(path)
    return dropped


def run(job: Job, cfg: LoopConfig, world: World, device: str, saved: dict | None = None, *,
        progress: bool = True) -> dict:
    """Train `job` for cfg.steps (or to cfg.stop_at); returns {step, tokens, seconds, best, last}.
    In a torchrun job, a failure on this rank is one line naming it (`RankFailed`)."""
    with _terminable(world):
        try:
            return _run(job, cfg, world, device, saved, progress)
        except _Terminated:
            if world.main:
                _tidy(cfg.out)
            raise
        except BaseException as e:
            if world.main:
                _tidy(cfg.out)
            if not world.distributed or isinstance(e, (Gpt2cubeError, KeyboardInterrupt)):
                raise
            if comm_error(e):  # a peer died; torchrun's SIGTERM usually ends this rank first
                time.sleep(3.0)
                raise PeerFailed(f"rank {world.rank}: stopped: another rank of the job failed "
                                 f"({str(e).splitlines()[0][:200]})") from None
            cause = str(e).splitlines()[0] if str(e) else ""
            raise RankFailed(f"rank {world.rank}: {type(e).__name__}: {cause}") from e


def _run(job: Job, cfg: LoopConfig, world: World, device: str, saved: dict | None, progress: bool) -> dict:
    import torch

    m = micro_batch(cfg, world, job)
    accum = cfg.batch_size // (world.size * m)
    model = job.model
    if saved is not None:  # before wrapping: DDP broadcasts it, FSDP shards it
        model.load_state_dict(saved["model"])
    if world.rank > 0:  # the model is built (the same on every rank); dropout and noise differ per rank
        torch.manual_seed(cfg.seed + world.rank)
    wrapped = _wrap(job, cfg, world, device)
    run_fwd = wrapped
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for p in trainable if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                             {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.95))
    rng = np.random.default_rng(cfg.seed)
    step, seen, elapsed, best = 0, 0, 0.0, None
    if saved is not None:
        if cfg.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(model, opt, saved["optim"],
                                     options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False))
        else:
            opt.load_state_dict(saved["optim"])
        rng.bit_generator.state = saved["rng"]
        step, seen, elapsed, best = saved["step"], saved["tokens_seen"], saved["seconds"], saved.get("best")
        ranks = saved.get("torch_rng_ranks") or [saved.get("torch_rng")]
        if len(ranks) == world.size and ranks[world.rank] is not None:
            torch.set_rng_state(ranks[world.rank])
            cuda = saved.get("cuda_rng_ranks") or [saved.get("cuda_rng")]
            if len(cuda) == world.size and cuda[world.rank] is not None and torch.cuda.is_available():
                _restore_cuda_rng(cuda[world.rank])

    out = cfg.out
    log_path = out / "train_log.jsonl"
    accumulate = wrapped if world.distributed else None  # one process accumulates without syncing

    def validate() -> dict:
        return from_main(world, job.validate(run_fwd))

    def export(best: dict) -> None:
        state = _full_state(job, None, cfg)[0] if cfg.fsdp else None
        if world.main:
            job.export(state, best)

    def save_state(step: int, secs: float) -> None:
        model_sd, opt_sd = _full_state(job, opt, cfg)
        cpu, cuda = _rng_states(world)
        if not world.main:
            return
        tmp = out / "train_state.pt.tmp"
        torch.save({"model": model_sd, "optim": opt_sd, "rng": rng.bit_generator.state, "torch_rng": cpu[0],
                    "cuda_rng": cuda[0] if cuda else None, "config": cfg.record, "step": step, "tokens_seen": seen,
                    "seconds": secs, "best": best, "world_size": world.size, "micro_batch": m,
                    **({"torch_rng_ranks": cpu, "cuda_rng_ranks": cuda} if world.size > 1 else {})}, tmp)
        tmp.replace(out / "train_state.pt")

    if world.main:
        out.mkdir(parents=True, exist_ok=True)
        if saved is None:
            log_path.unlink(missing_ok=True)
        else:  # rows a crash left past the saved step would be logged twice
            trim_log(log_path, step)
    if saved is None and cfg.validate_first:
        first = validate()
        best = {"step": 0, "tokens": 0, **first}
        export(best)
        if world.main:
            _append(log_path, {"step": 0, "tokens": 0, **{k: v for k, v in first.items() if k != "select"}})
    from tqdm import tqdm

    end = cfg.steps if cfg.stop_at is None else min(cfg.steps, cfg.stop_at)
    bar = tqdm(total=cfg.steps, initial=step, unit="step", file=sys.stderr,
               disable=not progress or not world.main)
    t0 = time.perf_counter()
    last: dict = {}
    mine = world.rank * (cfg.batch_size // world.size)
    while step < end:
        items = job.draw(rng, cfg.batch_size)
        lr = cosine_lr(step, cfg.lr, cfg.warmup_steps, cfg.steps)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        local = 0.0
        with job.weights(step):
            for k in range(accum):
                lo = mine + k * m
                with _no_sync(accumulate, cfg, k == accum - 1):
                    loss = job.loss(run_fwd, items, lo, lo + m, step)
                    (loss * world.size).backward()  # DDP and FSDP average over the ranks
                local += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        step += 1
        seen += job.tokens(items)
        secs = elapsed + time.perf_counter() - t0
        last = {"step": step, "tokens": seen, "loss": round(all_sum(world, local), 4), "lr": lr}
        if cfg.log_throughput:
            last["tokens_per_s"] = round(seen / secs, 1)
        last["seconds"] = round(secs, 1)
        last.update(job.row(step - 1))
        if step % cfg.eval_every == 0 or step == end:
            v = validate()
            last.update({k: x for k, x in v.items() if k != "select"})
            if not cfg.keep_best or best is None or v["select"] < best["select"]:
                best = {"step": step, "tokens": seen, **v}
                export(best)
        if world.main:  # before the state: a crash in between leaves a row that resume trims, not a gap
            _append(log_path, last)
        if step % cfg.eval_every == 0 or step == end:
            save_state(step, secs)
        bar.set_postfix(loss=f"{last['loss']:.3f}")
        bar.update(1)
    bar.close()
    if world.main:
        plot_loss(log_path, out / "loss_curve.png")
    return {"step": step, "tokens": seen, "seconds": round(elapsed + time.perf_counter() - t0, 1), "best": best,
            "last": last, "micro_batch": m, "accumulation": accum, "world_size": world.size}
