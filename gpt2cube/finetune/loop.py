"""Fine-tuning: QAT, distillation and supervised task fine-tuning as one job of gpt2cube.loop
(one process or a torchrun job; `--batch-size` is the global batch).

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
import sys
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable


from ..calib.gptq import GPTQ_TERNARY_SCALE
from ..converter.plan import QAT_TERNARY_EMBED_TYPE, Recipe
from ..errors import InputError
from ..kernels import get_quant_type
from ..models import check_checkpoint_out, load_gpt2_checkpoint, save_checkpoint
from ..tokenizers import hf_tokenizer
from ..loop.core import Job, LoopConfig, check_launch, micro_batch, run
from ..loop.schedule import pick_device, pick_precision
from ..loop.world import agree, device_for, joined
from .init import GPTQ_INIT, check_init, file_scale_rule, start_from
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
RESUMABLE_CHANGES = {"stop_at", "device", "out", "micro_batch", "dist_timeout"}
# settings added after runs were recorded, with the value that reproduces what such runs did
LEGACY_DEFAULTS = {"lm_weight": 0.0, "micro_batch": None, "fsdp": False, "dist_timeout": 600.0, "init": None,
                   "calib": None, "calib_tokens": 16_384, "calib_ctx": None}


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
    ternary_scale: str | None = None  # default: row-fit from --init gptq, a file's own rule, else tensor
    strict: bool = False
    init: str | None = None        # where QAT starts: None (the checkpoint), "gptq", or a GGUF file (finetune.init)
    calib: str | None = None       # --init gptq: calibration text
    calib_tokens: int = 16_384
    calib_ctx: int | None = None
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
    micro_batch: int | None = None  # items per forward on one process [default: batch_size / processes]
    fsdp: bool = False              # under torchrun: shard parameters and optimizer state (FSDP2)
    dist_timeout: float = 600.0     # seconds a collective waits for a peer before the job fails

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
        if d["ternary_scale"] is None:
            d["ternary_scale"] = (GPTQ_TERNARY_SCALE if self.init == GPTQ_INIT else file_scale_rule(self.init)) or "tensor"
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
    if cfg.calib_tokens < 1:
        raise InputError(f"--calib-tokens {cfg.calib_tokens}; expected a positive number")
    check_init(cfg.init, cfg.qat, cfg.calib)


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


def _objective(head: HeadLoss):
    """The module the loop wraps: the student as its one submodule; the teacher stays outside it
    (in `head`), so DDP and FSDP never wrap, broadcast or train it."""
    import torch

    class FinetuneObjective(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = head.model

        def forward(self, kind: str, b):
            return {"loss": head.loss, "nll": head.nll, "logits": head.scored_logits}[kind](b)

    return FinetuneObjective()


class FinetuneJob(Job):
    def __init__(self, cfg: FinetuneConfig, model, task, head: HeadLoss, qw, device: str, precision: str,
                 src: Path, out: Path, start: dict | None = None) -> None:
        self.cfg, self.model, self.task, self.head, self.qw, self.start = cfg, model, task, head, qw, start
        self.device, self.precision, self.src, self.out = device, precision, src, out
        self.objective = _objective(head)
        self.capacity = task.capacity
        self.unit = "windows" if cfg.task == "lm" else "messages"

    def draw(self, rng, n):
        return self.task.draw(rng, n)

    def loss(self, run, items, lo, hi, step):
        return run("loss", self.task.micro(items, lo, hi))

    def tokens(self, items):
        return self.task.tokens(items)

    def lam(self, step: int) -> float:
        return 1.0 if self.cfg.qat_warmup == 0 else min(1.0, (step + 1) / self.cfg.qat_warmup)

    def weights(self, step):
        return self.qw.active(self.lam(step)) if self.qw else nullcontext()

    def row(self, step):
        return {"lambda": round(self.lam(step), 4)} if self.qw else {}

    def validate(self, run):
        import torch

        self.model.eval()
        try:  # at lam = 1: the values the converted file holds
            with torch.no_grad(), (self.qw.active(1.0) if self.qw else nullcontext()):
                return self.task.validate(lambda b: run("nll", b), lambda b: run("logits", b))
        finally:
            self.model.train()

    def export(self, state, best):
        model = self.model
        if state is not None:  # sharded: a plain copy holding the full state dict
            import torch

            with torch.random.fork_rng(devices=[]):
                model = type(self.model)(self.model.config)
            model.load_state_dict(state)
        _export(model, self.cfg, self.src, self.out, best, self.qw, self.start)


def finetune(cfg: FinetuneConfig, *, resume: bool = False, force: bool = False, progress: bool = True,
             log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> dict:
    """Fine-tune cfg.src; under torchrun, one rank of a data-parallel job (see gpt2cube.loop)."""
    cfg = cfg.resolved()
    device = pick_device(cfg.device)
    with joined(device, cfg.dist_timeout) as world:
        say = log if world.main else (lambda m: None)
        job, saved = agree(world, lambda: _setup(cfg, resume, force, world, device, say))
        loop_cfg = LoopConfig(out=job.out, steps=max(1, int(cfg.tokens / job.task.tokens_per_batch)),
                              batch_size=cfg.batch_size, lr=cfg.lr, warmup_steps=cfg.warmup_steps,
                              weight_decay=cfg.weight_decay, eval_every=cfg.eval_every, seed=cfg.seed,
                              record=asdict(cfg), micro_batch=cfg.micro_batch, stop_at=cfg.stop_at, fsdp=cfg.fsdp,
                              validate_first=True, keep_best=True)
        res = run(job, loop_cfg, world, job.device, saved, progress=progress)
    best = res["best"]
    summary = {"out": str(job.out), "device": job.device, "precision": job.precision, "steps": res["step"],
               "planned_steps": loop_cfg.steps, "tokens": res["tokens"], "seconds": res["seconds"], "task": cfg.task,
               "qat": cfg.qat, "world_size": world.size, "micro_batch": res["micro_batch"], **job.task.sizes,
               "best": {k: v for k, v in best.items() if k != "select"}}
    if job.qw or cfg.routed:
        summary["convert"] = _convert_hint(cfg, job.out)
    say(f"fine-tuned {res['step']} steps, {res['tokens']:,} tokens; best validation at step {best['step']}: "
        + ", ".join(f"{k} {v}" for k, v in best.items() if k.startswith("val_")))
    return summary


def _setup(cfg: FinetuneConfig, resume: bool, force: bool, world, device: str, log) -> tuple[FinetuneJob, dict | None]:
    """Everything checked and loaded before the first step, on every rank: (job, saved state)."""
    import torch

    _check_numbers(cfg)
    check_launch(cfg.fsdp, world)
    if cfg.fsdp and cfg.qat:
        raise InputError(f"--fsdp with --qat {cfg.qat}: the fake quantization needs each weight whole and FSDP2 "
                         "holds it in shards; expected QAT without --fsdp (DDP: every process holds the model)")
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
                             "resume with the same settings (only --stop-at, --device, --micro-batch and "
                             "--dist-timeout may change)")

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
    embed = cfg.embed_type
    if embed is None and cfg.qat and get_quant_type(cfg.qat).is_ternary:
        embed = QAT_TERNARY_EMBED_TYPE
    recipe = Recipe(linear=cfg.qat, embed=embed, patterns=list(cfg.recipe),
                    ternary_scale=cfg.ternary_scale, strict=cfg.strict) if cfg.qat else None
    start = None
    if cfg.init and not resume:  # a resumed run has its weights from train_state.pt
        start = start_from(model, recipe, cfg.init, calib=cfg.calib, calib_tokens=cfg.calib_tokens,
                           calib_ctx=cfg.calib_ctx, log=log)

    device = device_for(world, device)
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
    head = HeadLoss(model, teacher, cfg.distill_weight if teacher is not None else 0.0, cfg.temperature, device,
                    precision == "bf16")
    job = FinetuneJob(cfg, model, task, head, qw, device, precision, src, out, start)
    micro_batch(LoopConfig(out=out, steps=1, batch_size=cfg.batch_size, lr=cfg.lr, warmup_steps=0, weight_decay=0.0,
                           eval_every=1, seed=cfg.seed, micro_batch=cfg.micro_batch), world, job)
    return job, saved


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


def _export(model, cfg: FinetuneConfig, src: Path, out: Path, best: dict, qw, start: dict | None = None) -> None:
    """The checkpoint as a standard HF directory (fp32 latent weights), swapped in atomically
    file by file from a complete temporary export."""
    record = {"source": str(src), "config": asdict(cfg), "best": {k: v for k, v in best.items() if k != "select"}}
    if start is not None:
        record["start"] = start
    if qw:
        record["qat_tensor_types"] = qw.types()
    if qw or cfg.routed:
        record["convert"] = _convert_hint(cfg, out)
    save_checkpoint(model, src, out, {"finetune.json": json.dumps(record, indent=2) + "\n"})
