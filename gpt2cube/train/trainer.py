"""Training GPT2LMHeadModel from scratch on a token stream.

AdamW, linear warm-up then cosine decay to 10 % of the peak rate, gradient clipping at 1.0,
no dropout. Batches are random windows drawn by a seeded numpy generator whose state is saved
with the model and optimizer, so `--resume` continues exactly as an uninterrupted run would.
The output directory is a standard Hugging Face checkpoint (config, fp16 safetensors, GPT-2
tokenizer files) plus train_log.jsonl, loss_curve.png and train_state.pt (for resuming).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..atomic import write_with
from ..errors import InputError
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

    @property
    def steps(self) -> int:
        return max(1, self.tokens // (self.batch_size * self.ctx))


def pick_device(name: str = "auto") -> str:
    import torch

    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def fast_bf16(device: str) -> bool:
    """Whether bf16 matrix products are native on `device`: CUDA GPUs that report bf16, CPUs with
    AVX512-BF16 or AMX (oneDNN's bf16 kernels). Elsewhere torch emulates bf16 on the CPU: measured
    on an AVX2-only AMD EPYC, a 512x256x1024 product under bf16 autocast took 31x the fp32 time."""
    import torch

    if device.startswith("cuda"):
        return bool(torch.cuda.is_bf16_supported())
    if device == "cpu":
        probes = [getattr(torch.cpu, n, None) for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
        return any(p is not None and p() for p in probes)
    return False  # mps: fp32


def pick_precision(name: str, device: str) -> str:
    """bf16 autocast where it is native and fast (see `fast_bf16`), else fp32; an explicit choice is kept."""
    if name != "auto":
        return name
    return "bf16" if fast_bf16(device) else "fp32"


def cosine_lr(step: int, peak: float, warmup: int, total: int) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to 10 % of `peak` at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def lr_at(step: int, cfg: TrainConfig) -> float:
    return cosine_lr(step, cfg.lr, cfg.warmup_steps, cfg.steps)


def _windows(tokens: np.ndarray, starts: np.ndarray, ctx: int):
    import torch

    idx = starts[:, None] + np.arange(ctx + 1)[None, :]
    return torch.from_numpy(tokens[idx].astype(np.int64))


def evaluate(model, val: np.ndarray, cfg: TrainConfig, device: str, precision: str = "fp32") -> float:
    """Mean next-token loss over fixed, evenly spaced validation windows."""
    import torch

    n = min(cfg.eval_batches * cfg.batch_size, max(1, (len(val) - 1) // cfg.ctx))
    starts = (np.arange(n) * ((len(val) - cfg.ctx - 1) // max(1, n))).astype(np.int64)
    model.eval()
    losses = []
    with torch.no_grad():
        for i in range(0, n, cfg.batch_size):
            xy = _windows(val, starts[i : i + cfg.batch_size], cfg.ctx).to(device)
            losses.append(float(_loss(model, xy, precision)))
    model.train()
    return float(np.mean(losses))


def _loss(model, xy, precision: str = "fp32", step: int = 0):
    import torch
    import torch.nn.functional as F

    extra = {}
    if model.training and hasattr(model, "training_inputs"):  # a variant that trains on other windows (duo-predict)
        xy, extra = model.training_inputs(xy, step)
    with torch.autocast(xy.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        logits = model(xy[:, :-1], **extra).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), xy[:, 1:].reshape(-1))


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
                                   variant=spec))


def train(cfg: TrainConfig, *, resume: bool = False, progress: bool = True,
          log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> dict:
    import torch


    out = Path(cfg.out)
    state_path = out / "train_state.pt"
    if resume:
        if not state_path.is_file():
            raise InputError(f"{state_path}: nothing to resume; run without --resume first")
        saved = torch.load(state_path, map_location="cpu", weights_only=False)
        old = saved["config"]
        for key in ("n_layer", "n_embd", "n_head", "ctx", "variant", "neural"):
            if getattr(cfg, key) != old.get(key, {}):
                raise InputError(f"--resume: {key} = {getattr(cfg, key)} but the checkpoint in {out} has {old.get(key, {})}")
    files = corpus_files([Path(p) for p in cfg.corpus])
    train_files, val_files = split_holdout(files, [Path(h) for h in cfg.holdout])
    train_tok = load_tokens(train_files)
    val_tok = load_tokens(val_files) if val_files else train_tok[-max(cfg.ctx * 64, len(train_tok) // 20):]
    if not val_files:
        train_tok = train_tok[: len(train_tok) - len(val_tok)]
    _check(cfg, len(train_tok), len(val_tok))

    device = pick_device(cfg.device)
    precision = pick_precision(cfg.precision, device)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg).to(device)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    rng = np.random.default_rng(cfg.seed)
    step, seen, elapsed = 0, 0, 0.0
    if resume:
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optim"])
        rng.bit_generator.state = saved["rng"]
        if "torch_rng" in saved:  # drift-diffusion's noise continues where it stopped
            torch.random.set_rng_state(saved["torch_rng"])
        step, seen, elapsed = saved["step"], saved["tokens_seen"], saved["seconds"]
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "train_log.jsonl"
    if not resume and log_path.exists():
        log_path.unlink()
    model.train()
    from tqdm import tqdm

    bar = tqdm(total=cfg.steps, initial=step, unit="step", file=sys.stderr, disable=not progress)
    t0 = time.perf_counter()
    last = {}
    while step < min(cfg.steps, cfg.stop_at or cfg.steps):
        starts = rng.integers(0, len(train_tok) - cfg.ctx - 1, size=cfg.batch_size)
        xy = _windows(train_tok, starts, cfg.ctx).to(device)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        loss = _loss(model, xy, precision, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        seen += cfg.batch_size * cfg.ctx
        secs = elapsed + time.perf_counter() - t0
        last = {"step": step, "tokens": seen, "loss": round(float(loss.detach()), 4), "lr": lr_at(step - 1, cfg),
                "tokens_per_s": round(seen / secs, 1), "seconds": round(secs, 1)}
        if step % cfg.eval_every == 0 or step == cfg.steps or step == cfg.stop_at:
            last["val_loss"] = round(evaluate(model, val_tok, cfg, device, precision), 4)
            last["val_ppl"] = round(math.exp(last["val_loss"]), 2)
            _save(model, opt, rng, cfg, step, seen, secs, out)
        with open(log_path, "a") as f:
            f.write(json.dumps(last) + "\n")
        bar.set_postfix(loss=f"{last['loss']:.3f}", tok_s=f"{last['tokens_per_s']:.0f}")
        bar.update(1)
    bar.close()
    plot_loss(log_path, out / "loss_curve.png")
    summary = {"out": str(out), "device": device, "precision": precision, 
               **({"neural": cfg.neural} if cfg.neural else {"variant": cfg.variant or {"pos": "learned"}}),
               "parameters": sum(p.numel() for p in model.parameters()), "train_tokens": int(len(train_tok)),
               "val_tokens": int(len(val_tok)), **last}
    log(f"trained {step} steps, {seen:,} tokens; held-out loss {last.get('val_loss')} (ppl {last.get('val_ppl')})")
    return summary


def _save(model, opt, rng, cfg: TrainConfig, step: int, seen: int, secs: float, out: Path) -> None:
    """Resumable state plus a ready-to-convert HF checkpoint (fp16 safetensors), both atomic."""
    import torch

    tmp = out / "train_state.pt.tmp"
    torch.save({"model": model.state_dict(), "optim": opt.state_dict(), "rng": rng.bit_generator.state,
                "torch_rng": torch.random.get_rng_state(), "config": asdict(cfg), "step": step, "tokens_seen": seen, "seconds": secs}, tmp)
    os.replace(tmp, out / "train_state.pt")
    export = out / ".export.tmp"
    shutil.rmtree(export, ignore_errors=True)
    with torch.random.fork_rng(devices=[]):  # building the copy draws init weights; training's stream must not move
        half = type(model)(model.config)
    half.load_state_dict(model.state_dict())
    half.half().save_pretrained(export)
    enc, bpe = bundled_gpt2_files()
    shutil.copyfile(enc, export / "vocab.json")
    shutil.copyfile(bpe, export / "merges.txt")
    for f in export.iterdir():
        os.replace(f, out / f.name)
    export.rmdir()


def plot_loss(log_path: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    tr = [r for r in rows if "loss" in r]  # a fine-tune's step-0 row holds only the starting validation
    ax.plot([r["tokens"] for r in tr], [r["loss"] for r in tr], lw=0.8, label="train loss")
    ev = [r for r in rows if "val_loss" in r]
    if ev:
        ax.plot([r["tokens"] for r in ev], [r["val_loss"] for r in ev], "o-", label="held-out loss")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("cross-entropy (nats)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    write_with(png, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
