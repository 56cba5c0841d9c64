"""The fine-tuning loop: one loop for QAT, distillation and supervised task fine-tuning.

AdamW with linear warm-up then cosine decay to 10 % of the peak rate (train's schedule),
gradient clipping at 1.0, bf16 autocast with fp32 master weights where `train` uses it. With
`qat` set, every step runs inside `QuantizedWeights.active(lam)`; validation always runs at
lam = 1, the values the converted file holds, and the best validation step is the checkpoint
written to `out` (fp32 safetensors: the latent weights, which `convert` turns into exactly the
weights the forward pass used). With `distill` set, the loss is
    (1 - a) * CE(student, target) + a * T^2 * KL(softmax(teacher / T) || softmax(student / T))
over the scored positions, the teacher a frozen full-precision GPT-2 with the same vocabulary.
`--resume` continues exactly (model, optimizer, data order, best checkpoint so far).
"""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..converter.plan import Recipe
from ..errors import InputError
from ..models import check_checkpoint_out, load_gpt2_checkpoint, save_checkpoint
from ..tokenizers import hf_tokenizer
from ..train.trainer import cosine_lr, pick_device, pick_precision, plot_loss
from .qat import QuantizedWeights
from .routing import RoutingMask
from .losses import HeadLoss
from .tasks import LMTask, SpamTask

TASKS = {"lm": "language modelling on --corpus (files named by --holdout validate)",
         "spam": "SMS spam as prompt + message -> label word on --data (the split's training part)"}
# Recommended settings per task (what a run with only the required options uses).
TASK_DEFAULTS = {
    "lm": dict(tokens=2_000_000, batch_size=8, lr=5e-4, warmup_steps=20, eval_every=50, lm_weight=0.0, dropout=0.0),
    # spam: 3 epochs-worth at twice the rate with dropout 0.1 lifted stratified test F1 (answering) from
    # 0.930 (300k tokens, 5e-4, no dropout) to 0.952 on the f16 reference (README, Recovery)
    "spam": dict(tokens=900_000, batch_size=16, lr=1e-3, warmup_steps=20, eval_every=50, lm_weight=0.5, dropout=0.1),
}
# whether --qat freezes the embeddings unless told: lm runs keep them at their quantized values; spam
# trains them (fake-quantized every step): stratified test F1 answering 0.9375 against 0.9016 frozen,
# tq2_0 with q8_0 embeddings, the spam defaults, same seed (README, Recovery)
QAT_FREEZES_EMBEDDINGS = {"lm": True, "spam": False}
# settings that may change on --resume without changing what is trained
RESUMABLE_CHANGES = {"stop_at", "device", "out"}
# settings added after runs were recorded, with the value that reproduces what such runs did
LEGACY_DEFAULTS = {"lm_weight": 0.0}


def recorded_config(saved: dict) -> dict:
    """A recorded run's settings, the ones it predates filled in with what it did."""
    return {**LEGACY_DEFAULTS, **saved}


@dataclass
class FinetuneConfig:
    src: str
    out: str
    task: str = "lm"
    corpus: list[str] = field(default_factory=list)
    holdout: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    data: str | None = None
    split: str = "stratified"
    qat: str | None = None
    embed_type: str | None = None
    recipe: list[tuple[str, str]] = field(default_factory=list)
    ternary_scale: str = "tensor"
    strict: bool = False
    qat_warmup: int = 0            # steps over which lam goes 0 -> 1 (0: abrupt)
    routed: str | None = None      # a hypercube GGUF whose routing the forward pass applies
    radius: int | None = None      # its ball radius [default: the radius its router was fitted for, else 1]
    freeze_embeddings: bool | None = None  # default: frozen under lm QAT, trained otherwise
    distill: str | None = None     # teacher checkpoint
    distill_weight: float = 0.5
    temperature: float = 1.0
    tokens: int | None = None
    batch_size: int | None = None
    ctx: int | None = None
    max_tokens: int = 256          # spam: longest prompt + label
    lm_weight: float | None = None  # spam: share of the next-token loss on the messages' own tokens
    lr: float | None = None
    warmup_steps: int | None = None
    weight_decay: float = 0.0
    dropout: float | None = None   # replaces the checkpoint's dropout rates while fine-tuning (config kept)
    eval_every: int | None = None
    seed: int = 1234
    device: str = "auto"
    precision: str = "auto"
    stop_at: int | None = None

    def resolved(self) -> "FinetuneConfig":
        """A copy with the task's recommended values filled in."""
        if self.task not in TASKS:
            raise InputError(f"--task {self.task!r}; expected one of {', '.join(TASKS)}")
        d = asdict(self)
        for k, v in TASK_DEFAULTS[self.task].items():
            if d[k] is None:
                d[k] = v
        if d["freeze_embeddings"] is None:
            d["freeze_embeddings"] = self.qat is not None and QAT_FREEZES_EMBEDDINGS[self.task]
        d["recipe"] = [tuple(p) for p in d["recipe"]]
        return FinetuneConfig(**d)


def _check_numbers(cfg: FinetuneConfig) -> None:
    for name in ("tokens", "batch_size", "lr", "eval_every"):
        v = getattr(cfg, name)
        if not v > 0:
            raise InputError(f"--{name.replace('_', '-')} {v}; expected a positive number")
    for name in ("qat_warmup", "warmup_steps"):
        if getattr(cfg, name) < 0:
            raise InputError(f"--{name.replace('_', '-')} {getattr(cfg, name)}; expected 0 or more steps")
    if not 0 <= cfg.lm_weight < 1:
        raise InputError(f"--lm-weight {cfg.lm_weight}; expected a number in [0, 1) (the label keeps 1 - w)")
    if cfg.task == "lm" and cfg.lm_weight:
        raise InputError(f"--lm-weight {cfg.lm_weight} applies to --task spam; --task lm is all language modelling")
    if not 0 <= cfg.distill_weight <= 1:
        raise InputError(f"--distill-weight {cfg.distill_weight}; expected a number in [0, 1]")
    if not 0 <= cfg.dropout < 1:
        raise InputError(f"--dropout {cfg.dropout}; expected a number in [0, 1)")
    if not cfg.temperature > 0:
        raise InputError(f"--temperature {cfg.temperature}; expected a positive number")
    if cfg.ctx is not None and cfg.ctx < 2:
        raise InputError(f"--ctx {cfg.ctx}; expected at least 2")


def _tokenizer_for(src: Path):
    if (src / "vocab.json").is_file() and (src / "merges.txt").is_file():
        return hf_tokenizer(src / "vocab.json", src / "merges.txt")
    if (src / "tokenizer.json").is_file():
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast(tokenizer_file=str(src / "tokenizer.json"))
    return hf_tokenizer()


def _check_output(src: Path, out: Path, resume: bool, force: bool) -> None:
    check_checkpoint_out(src, out, replace=resume or force, markers=("model.safetensors", "train_state.pt"),
                         hint="pass --resume to continue it or --force to replace it")
    if resume and not (out / "train_state.pt").is_file():
        raise InputError(f"{out / 'train_state.pt'}: nothing to resume; run without --resume first")


def _check_teacher(teacher, student, path: Path, ctx: int) -> None:
    tv, sv = teacher.config.vocab_size, student.config.vocab_size
    if tv != sv:
        raise InputError(f"--distill {path}: the teacher's vocabulary has {tv} tokens, the student's {sv}; "
                         "distillation needs the same vocabulary")
    if teacher.config.n_positions < ctx:
        raise InputError(f"--distill {path}: the teacher has {teacher.config.n_positions} positions, fewer than the "
                         f"student's training context {ctx}; expected at least {ctx}")


def finetune(cfg: FinetuneConfig, *, resume: bool = False, force: bool = False, progress: bool = True,
             log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> dict:
    import torch

    cfg = cfg.resolved()
    _check_numbers(cfg)
    src, out = Path(cfg.src), Path(cfg.out)
    _check_output(src, out, resume, force)
    saved = None
    if resume:
        saved = torch.load(out / "train_state.pt", map_location="cpu", weights_only=False)
        old, new = recorded_config(saved["config"]), asdict(cfg)
        new["recipe"] = [list(p) for p in new["recipe"]]
        old["recipe"] = [list(p) for p in old["recipe"]]
        diff = [k for k in new if k not in RESUMABLE_CHANGES and new[k] != old.get(k)]
        if diff:
            k = diff[0]
            raise InputError(f"--resume: {k} = {new[k]!r} but the run in {out} was started with {old.get(k)!r}; "
                             "resume with the same settings (only --stop-at and --device may change)")

    model, arch = load_gpt2_checkpoint(src, "student")
    ctx = min(cfg.ctx or 512, model.config.n_positions)
    tokenizer = _tokenizer_for(src)
    if cfg.task == "lm":
        if not cfg.corpus:
            raise InputError("--task lm needs --corpus FILE_OR_DIR (text to fine-tune on)")
        task = LMTask([Path(p) for p in cfg.corpus], [Path(h) for h in cfg.holdout], ctx, cfg.batch_size,
                      exclude=[Path(e) for e in cfg.exclude])
    else:
        if not cfg.data:
            raise InputError("--task spam needs --data SMSSpamCollection")
        task = SpamTask(Path(cfg.data), tokenizer, cfg.split, cfg.batch_size, min(cfg.max_tokens, ctx),
                        lm_weight=cfg.lm_weight)
    teacher = None
    if cfg.distill:
        teacher, _ = load_gpt2_checkpoint(Path(cfg.distill), "teacher")
        _check_teacher(teacher, model, Path(cfg.distill), ctx)
    recipe = Recipe(linear=cfg.qat, embed=cfg.embed_type, patterns=list(cfg.recipe), ternary_scale=cfg.ternary_scale,
                    strict=cfg.strict) if cfg.qat else None

    device = pick_device(cfg.device)
    precision = pick_precision(cfg.precision, device)
    torch.manual_seed(cfg.seed)
    model.to(device).train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = cfg.dropout
    if cfg.freeze_embeddings:
        for p in (model.transformer.wte.weight, model.transformer.wpe.weight):
            p.requires_grad_(False)
    qw = QuantizedWeights(model, recipe) if recipe else None
    if cfg.routed:
        routing = RoutingMask(model, Path(cfg.routed), cfg.radius)
        log(f"routing-aware: every FFN routed as {cfg.routed} at radius {routing.radius} of {routing.info.dim}")
    if qw:
        for w in qw.warnings:
            log(f"warning: {w}")
    if teacher is not None:
        teacher.to(device).eval().requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for p in trainable if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                             {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.95))
    rng = np.random.default_rng(cfg.seed)
    step, seen, elapsed, best = 0, 0, 0.0, None
    if saved is not None:
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optim"])
        rng.bit_generator.state = saved["rng"]
        step, seen, elapsed, best = saved["step"], saved["tokens_seen"], saved["seconds"], saved["best"]
        torch.set_rng_state(saved["torch_rng"])  # dropout, when the checkpoint's config has it
        if saved.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(saved["cuda_rng"])
    steps = max(1, int(cfg.tokens / task.tokens_per_batch))

    head = HeadLoss(model, teacher, cfg.distill_weight if teacher is not None else 0.0, cfg.temperature, device,
                    precision == "bf16")

    def validate() -> dict:
        model.eval()
        with torch.no_grad(), (qw.active(1.0) if qw else nullcontext()):
            v = task.validate(head.nll, head.scored_logits)
        model.train()
        return v

    def lam_at(s: int) -> float:
        return 1.0 if cfg.qat_warmup == 0 else min(1.0, (s + 1) / cfg.qat_warmup)

    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "train_log.jsonl"
    if saved is None:
        log_path.unlink(missing_ok=True)
        first = validate()  # the starting point: the model as converted (QAT) or as given
        best = {"step": 0, "tokens": 0, **first}
        _export(model, cfg, src, out, best, qw)
        _append(log_path, {"step": 0, "tokens": 0, **{k: v for k, v in first.items() if k != "select"}})
    from tqdm import tqdm

    bar = tqdm(total=steps, initial=step, unit="step", file=sys.stderr, disable=not progress)
    t0 = time.perf_counter()
    end = min(steps, steps if cfg.stop_at is None else cfg.stop_at)
    while step < end:
        b = task.batch(rng)
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, cfg.lr, cfg.warmup_steps, steps)
        lam = lam_at(step) if qw else None
        opt.zero_grad(set_to_none=True)
        with qw.active(lam) if qw else nullcontext():
            loss = head.backward(b)
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        step += 1
        seen += b.tokens
        secs = elapsed + time.perf_counter() - t0
        row = {"step": step, "tokens": seen, "loss": round(loss, 4),
               "lr": cosine_lr(step - 1, cfg.lr, cfg.warmup_steps, steps), "seconds": round(secs, 1)}
        if lam is not None:
            row["lambda"] = round(lam, 4)
        if step % cfg.eval_every == 0 or step == end:
            v = validate()
            row.update({k: x for k, x in v.items() if k != "select"})
            if v["select"] < best["select"]:
                best = {"step": step, "tokens": seen, **v}
                _export(model, cfg, src, out, best, qw)
            _save_state(model, opt, rng, cfg, step, seen, secs, best, out)
        _append(log_path, row)
        bar.set_postfix(loss=f"{row['loss']:.3f}")
        bar.update(1)
    bar.close()
    plot_loss(log_path, out / "loss_curve.png")
    summary = {"out": str(out), "device": device, "precision": precision, "steps": step, "planned_steps": steps,
               "tokens": seen, "seconds": round(elapsed + time.perf_counter() - t0, 1), "task": cfg.task,
               "qat": cfg.qat, **task.sizes, "best": {k: v for k, v in best.items() if k != "select"}}
    if qw or cfg.routed:
        summary["convert"] = _convert_hint(cfg, out)
    log(f"fine-tuned {step} steps, {seen:,} tokens; best validation at step {best['step']}: "
        + ", ".join(f"{k} {v}" for k, v in best.items() if k.startswith("val_")))
    return summary


def _append(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def _convert_hint(cfg: FinetuneConfig, out: Path) -> str:
    name = "-".join(p for p in (cfg.qat, "routed" if cfg.routed else None) if p)
    parts = [f"gpt2cube convert {out} -o model-{name}.gguf"]
    if cfg.qat:
        parts.append(f"--type {cfg.qat}")
    if cfg.routed:
        parts.append(f"--hypercube-from {cfg.routed}")
    if cfg.embed_type:
        parts.append(f"--embed-type {cfg.embed_type}")
    if cfg.ternary_scale != "tensor":
        parts.append(f"--ternary-scale {cfg.ternary_scale}")
    if cfg.recipe:
        parts.append("--recipe FILE (the same patterns)")
    if cfg.strict:
        parts.append("--strict")
    return " ".join(parts)


def _save_state(model, opt, rng, cfg: FinetuneConfig, step: int, seen: int, secs: float, best: dict, out: Path) -> None:
    import torch

    tmp = out / "train_state.pt.tmp"
    torch.save({"model": model.state_dict(), "optim": opt.state_dict(), "rng": rng.bit_generator.state,
                "config": asdict(cfg), "step": step, "tokens_seen": seen, "seconds": secs, "best": best,
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}, tmp)
    os.replace(tmp, out / "train_state.pt")


def _export(model, cfg: FinetuneConfig, src: Path, out: Path, best: dict, qw) -> None:
    """The checkpoint as a standard HF directory (fp32 latent weights), swapped in atomically
    file by file from a complete temporary export."""
    record = {"source": str(src), "config": asdict(cfg), "best": {k: v for k, v in best.items() if k != "select"}}
    if qw:
        record["qat_tensor_types"] = qw.types()
    if qw or cfg.routed:
        record["convert"] = _convert_hint(cfg, out)
    save_checkpoint(model, src, out, {"finetune.json": json.dumps(record, indent=2) + "\n"})
