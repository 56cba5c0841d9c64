"""Training GPT2LMHeadModel from scratch on a token stream.

The loop is gpt2cube.loop's (AdamW, linear warm-up then cosine decay to 10 % of the peak rate,
gradient clipping at 1.0, gradient accumulation, one process or a torchrun job); this module is
the task: no dropout, batches of random windows drawn by a seeded numpy generator whose state is
saved with the model and optimizer, so `--resume` continues exactly as an uninterrupted run would.
The output directory is a standard Hugging Face checkpoint (config, fp16 safetensors, GPT-2
tokenizer files) plus train_log.jsonl, loss_curve.png and train_state.pt (for resuming).
"""

from __future__ import annotations

import math
import os
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import InputError
from ..loop.core import Job, LoopConfig, check_launch, micro_batch, run
from ..loop.curve import plot_loss  # noqa: F401 - re-exported (scripts/training_report.py)
from ..loop.schedule import cosine_lr, fast_bf16, pick_device, pick_precision  # noqa: F401 - re-exported
from ..loop.world import agree, device_for, joined
from ..tokenizers import bundled_gpt2_files
from .data import corpus_files, load_tokens, split_holdout

# name -> (n_layer, n_embd, n_head, ctx)
PRESETS: dict[str, tuple[int, int, int, int]] = {
    "tiny": (2, 64, 2, 64),          # tests and smoke runs
    "reference": (6, 256, 4, 512),   # the shipped reference model: head size 64, ~35 MB fp16
    "gpt2-124m": (12, 768, 12, 1024),
}


@dataclass
class TrainConfig:
    corpus: list[str]
    out: str
    n_layer: int = 6
    n_embd: int = 256
    n_head: int = 4
    ctx: int = 512
    tokens: int = 1_000_000
    batch_size: int = 8
    lr: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.1
    eval_every: int = 100
    eval_batches: int = 8
    holdout: list[str] = field(default_factory=list)
    seed: int = 1234
    device: str = "auto"
    stop_at: int | None = None  # stop (resumably) after this step; the schedule still spans `tokens`
    precision: str = "auto"  # auto | fp32 | bf16 (autocast; master weights and optimizer stay fp32)
    variant: dict = field(default_factory=dict)  # variants.spec.VariantSpec fields; {} = plain GPT-2
    neural: dict = field(default_factory=dict)  # variants.neural.NeuralConfig fields: a pre-transformer LM instead
    micro_batch: int | None = None  # windows per forward on one process [default: batch_size / processes]
    fsdp: bool = False              # under torchrun: shard parameters and optimizer state (FSDP2)
    dist_timeout: float = 600.0     # seconds a collective waits for a peer before the job fails

    @property
    def steps(self) -> int:
        return max(1, self.tokens // (self.batch_size * self.ctx))


def lr_at(step: int, cfg: TrainConfig) -> float:
    return cosine_lr(step, cfg.lr, cfg.warmup_steps, cfg.steps)


def _windows(tokens: np.ndarray, starts: np.ndarray, ctx: int):
    import torch

    idx = starts[:, None] + np.arange(ctx + 1)[None, :]
    return torch.from_numpy(tokens[idx].astype(np.int64))


def evaluate(run, val: np.ndarray, cfg: TrainConfig, device: str) -> float:
    """Mean next-token loss over fixed, evenly spaced validation windows; `run(xy)` is the loss
    of a batch of windows (the objective, wrapped or not)."""
    import torch

    n = min(cfg.eval_batches * cfg.batch_size, max(1, (len(val) - 1) // cfg.ctx))
    starts = (np.arange(n) * ((len(val) - cfg.ctx - 1) // max(1, n))).astype(np.int64)
    losses = []
    with torch.no_grad():
        for i in range(0, n, cfg.batch_size):
            xy = _windows(val, starts[i : i + cfg.batch_size], cfg.ctx).to(device)
            losses.append(float(run(xy)))
    return float(np.mean(losses))


def _loss(model, xy, precision: str = "fp32", step: int = 0):
    import torch
    import torch.nn.functional as F

    inputs, targets, extra = xy[:, :-1], xy[:, 1:], {}
    if model.training and hasattr(model, "training_inputs"):  # a variant that trains on other sequences
        inputs, targets, extra = model.training_inputs(xy, step)
    with torch.autocast(xy.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        logits = model(inputs, **extra).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=-100)


def _check(cfg: TrainConfig, n_train: int, n_val: int) -> None:
    if cfg.n_embd % cfg.n_head:
        raise InputError(f"n_embd {cfg.n_embd} is not divisible by n_head {cfg.n_head}")
    if n_train < cfg.ctx + 2:
        raise InputError(f"the training corpus has {n_train} tokens, fewer than one window of --ctx {cfg.ctx} + 1")
    if n_val and n_val < cfg.ctx + 2:
        raise InputError(f"the held-out text has {n_val} tokens, fewer than one window of --ctx {cfg.ctx} + 1")


def build_model(cfg: TrainConfig):
    """transformers' GPT2LMHeadModel for plain GPT-2, else the variant family's torch model (or a
    neural baseline)."""
    from ..variants.spec import VariantSpec

    if cfg.neural:
        from ..variants.neural import NeuralConfig, NeuralLM

        return NeuralLM(NeuralConfig(**{**cfg.neural, "n_positions": cfg.ctx}))
    spec = VariantSpec(**cfg.variant)
    if spec.is_plain_gpt2:
        from transformers import GPT2Config, GPT2LMHeadModel

        return GPT2LMHeadModel(GPT2Config(n_layer=cfg.n_layer, n_embd=cfg.n_embd, n_head=cfg.n_head,
                                          n_positions=cfg.ctx, vocab_size=50257, resid_pdrop=0.0, embd_pdrop=0.0,
                                          attn_pdrop=0.0, bos_token_id=50256, eos_token_id=50256))
    from ..variants.model import VariantConfig, VariantLM

    return VariantLM(VariantConfig(n_layer=cfg.n_layer, n_embd=cfg.n_embd, n_head=cfg.n_head, n_positions=cfg.ctx,
                                   vocab_size=spec.vocab_size, variant=spec))


def _objective(model, precision: str):
    import torch

    class TrainObjective(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, xy, step: int = 0):
            return _loss(self.model, xy, precision, step)

    return TrainObjective()


class TrainJob(Job):
    """Language modelling from scratch: random windows of the training tokens, mean next-token CE."""

    unit = "windows"

    def __init__(self, cfg: TrainConfig, model, train_tok: np.ndarray, val_tok: np.ndarray, device: str,
                 precision: str) -> None:
        self.cfg, self.model, self.train, self.val = cfg, model, train_tok, val_tok
        self.device, self.precision = device, precision
        self.objective = _objective(model, precision)
        self.capacity = len(train_tok) - cfg.ctx - 1

    def draw(self, rng, n):
        return rng.integers(0, len(self.train) - self.cfg.ctx - 1, size=n)

    def loss(self, run, items, lo, hi, step):
        xy = _windows(self.train, items[lo:hi], self.cfg.ctx).to(self.device)
        share = (hi - lo) / len(items)  # every window has ctx positions: the mean over the global batch
        loss = run(xy, step)
        return loss if share == 1 else loss * share

    def tokens(self, items):
        return len(items) * self.cfg.ctx

    def validate(self, run):
        self.model.eval()
        try:
            loss = round(evaluate(run, self.val, self.cfg, self.device), 4)
        finally:
            self.model.train()
        return {"val_loss": loss, "val_ppl": round(math.exp(loss), 2), "select": loss}

    def export(self, state, best):
        _export(self.model, state, Path(self.cfg.out))


# settings a resumed run must share with the run it continues (the rest may change: --stop-at, --device)
RESUME_KEYS = {"n_layer": None, "n_embd": None, "n_head": None, "ctx": None, "variant": {}, "neural": {},
               "batch_size": None, "seed": None, "fsdp": False}


def _check_resume(cfg: TrainConfig, saved: dict, out: Path) -> None:
    old = saved["config"]
    for key, legacy in RESUME_KEYS.items():
        if getattr(cfg, key) != old.get(key, legacy):
            raise InputError(f"--resume: {key} = {getattr(cfg, key)} but the checkpoint in {out} has "
                             f"{old.get(key, legacy)}; resume with the same settings")


def train(cfg: TrainConfig, *, resume: bool = False, progress: bool = True,
          log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> dict:
    """Train cfg's model; under torchrun, one rank of a data-parallel job (see gpt2cube.loop)."""
    device = pick_device(cfg.device)
    with joined(device, cfg.dist_timeout) as world:
        job, saved = agree(world, lambda: _setup(cfg, resume, world, device))
        device = job.device
        res = run(job, _loop_config(cfg), world, device, saved, progress=progress)
    last = res["last"]
    summary = {"out": str(cfg.out), "device": device, "precision": job.precision,
               **({"neural": cfg.neural} if cfg.neural else {"variant": cfg.variant or {"pos": "learned"}}),
               "parameters": sum(p.numel() for p in job.model.parameters()), "train_tokens": int(len(job.train)),
               "val_tokens": int(len(job.val)), "world_size": world.size, "micro_batch": res["micro_batch"], **last}
    if world.main:
        log(f"trained {res['step']} steps, {res['tokens']:,} tokens; held-out loss {last.get('val_loss')} "
            f"(ppl {last.get('val_ppl')})")
    return summary


def _loop_config(cfg: TrainConfig) -> LoopConfig:
    return LoopConfig(out=Path(cfg.out), steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr,
                      warmup_steps=cfg.warmup_steps, weight_decay=cfg.weight_decay, eval_every=cfg.eval_every,
                      seed=cfg.seed, record=asdict(cfg), micro_batch=cfg.micro_batch, stop_at=cfg.stop_at,
                      fsdp=cfg.fsdp, log_throughput=True)


def _setup(cfg: TrainConfig, resume: bool, world, device: str):
    """Everything checked and loaded before the first step, on every rank: (job, saved state)."""
    import torch

    check_launch(cfg.fsdp, world)
    out = Path(cfg.out)
    state_path = out / "train_state.pt"
    saved = None
    if resume:
        if not state_path.is_file():
            raise InputError(f"{state_path}: nothing to resume; run without --resume first")
        saved = torch.load(state_path, map_location="cpu", weights_only=False)
        _check_resume(cfg, saved, out)
    files = corpus_files([Path(p) for p in cfg.corpus])
    train_files, val_files = split_holdout(files, [Path(h) for h in cfg.holdout])
    train_tok = load_tokens(train_files)
    val_tok = load_tokens(val_files) if val_files else train_tok[-max(cfg.ctx * 64, len(train_tok) // 20):]
    if not val_files:
        train_tok = train_tok[: len(train_tok) - len(val_tok)]
    _check(cfg, len(train_tok), len(val_tok))
    device = device_for(world, device)
    precision = pick_precision(cfg.precision, device)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg).to(device)
    model.train()
    job = TrainJob(cfg, model, train_tok, val_tok, device, precision)
    micro_batch(_loop_config(cfg), world, job)  # the batch checks, before anything is written
    return job, saved


def _export(model, state: dict | None, out: Path) -> None:
    """A ready-to-convert HF checkpoint (fp16 safetensors), swapped in file by file from a complete
    temporary export."""
    import torch

    export = out / ".export.tmp"
    shutil.rmtree(export, ignore_errors=True)
    with torch.random.fork_rng(devices=[]):  # building the copy draws init weights; training's stream must not move
        half = type(model)(model.config)
    half.load_state_dict(model.state_dict() if state is None else state)
    half.half().save_pretrained(export)
    enc, bpe = bundled_gpt2_files()
    shutil.copyfile(enc, export / "vocab.json")
    shutil.copyfile(bpe, export / "merges.txt")
    for f in export.iterdir():
        os.replace(f, out / f.name)
    export.rmdir()
