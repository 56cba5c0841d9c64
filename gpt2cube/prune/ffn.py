"""Structured FFN pruning: the same number of neurons removed from every layer, chosen by an
importance measure on calibration text, their mean contribution folded into c_proj's bias, and
the result written as a standard Hugging Face GPT-2 checkpoint with a smaller `n_inner`.

Why one width for every layer: llama.cpp's GPT-2 graph reads one `feed_forward_length` and
sizes every layer's ffn_up / ffn_down by it, so a file with per-layer widths does not load.
Why FFN and not attention heads (yet): the same graph requires attn_qkv to be
n_embd + 2 * head_size * kv_heads wide and attn_output n_embd x n_embd, i.e. the query and
output projections keep all n_embd columns whatever the head count (checked: a GPT-2 GGUF with
2 of 4 heads' columns is refused, "check_tensor_dims: tensor 'blk.0.attn_qkv.weight' has wrong
shape; expected 64, 128, got 64, 96"), so a pruned head can only be stored as zeros in GPT-2's
layout: no smaller file, no faster run.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..models import check_checkpoint_out, load_gpt2_checkpoint, save_checkpoint
from ..train.data import load_tokens
from .importance import MEASURES, WEIGHT_ONLY, calibrate


@dataclass
class PruneConfig:
    src: str
    out: str
    ffn: float                      # < 1: fraction of each layer's neurons removed; >= 1: count removed
    importance: str = "activation"
    calib: list[str] = field(default_factory=list)
    calib_tokens: int = 65_536
    ctx: int = 512
    multiple_of: int = 32           # the kept width is rounded down to this (256 for K-quants)
    compensate: bool = True
    seed: int = 0


def kept_width(n_ff: int, ffn: float, multiple_of: int) -> int:
    """How many neurons each layer keeps, with the errors a user should see."""
    if multiple_of < 1:
        raise InputError(f"--multiple-of {multiple_of}; expected a positive integer")
    if ffn < 0:
        raise InputError(f"--ffn {ffn}; expected a fraction in [0, 1) or a count of neurons to remove")
    remove = int(round(ffn * n_ff)) if ffn < 1 else int(ffn)
    if ffn >= 1 and ffn != int(ffn):
        raise InputError(f"--ffn {ffn}; a count of neurons must be a whole number (or give a fraction below 1)")
    keep = (n_ff - remove) // multiple_of * multiple_of
    if remove >= n_ff or keep < 1:
        raise InputError(f"--ffn {ffn} leaves {max(0, n_ff - remove)} of {n_ff} neurons per layer"
                         + (f", {keep} after rounding down to a multiple of {multiple_of}" if remove < n_ff else "")
                         + "; expected at least one")
    return keep


def _layer_weights(block) -> dict:
    return {"up": block.mlp.c_fc.weight.detach().numpy(), "down": block.mlp.c_proj.weight.detach().numpy()}


def _windows(tokens: np.ndarray, ctx: int, n_tokens: int, seed: int) -> np.ndarray:
    if len(tokens) < ctx + 1:
        raise InputError(f"the calibration text has {len(tokens)} tokens, fewer than one window of --ctx {ctx} + 1")
    n = max(1, min(n_tokens // ctx, (len(tokens) - 1) // ctx))
    starts = np.sort(np.random.default_rng(seed).choice(len(tokens) - ctx, size=n, replace=False))
    return tokens[starts[:, None] + np.arange(ctx + 1)[None, :]]


def prune_model(model, cal, keep: int, importance: str, compensate: bool, seed: int) -> dict:
    """Prune `model` in place to `keep` neurons per layer; returns what was kept and removed."""
    import torch

    from transformers.pytorch_utils import Conv1D

    _, score = MEASURES[importance]
    rng = np.random.default_rng(seed)
    record = {"kept": [], "removed_share_of_importance": []}
    for i, block in enumerate(model.transformer.h):
        w = _layer_weights(block)
        s = score(w, cal, i, compensate, rng)
        order = np.argsort(-s, kind="stable")
        kept = np.sort(order[:keep])
        removed = np.sort(order[keep:])
        total = float(s.sum())
        record["kept"].append(kept.tolist())
        record["removed_share_of_importance"].append(round(float(s[removed].sum()) / total, 6) if total > 0 else 0.0)
        fc, proj = block.mlp.c_fc, block.mlp.c_proj
        with torch.no_grad():
            bias = proj.bias.detach().clone()
            if compensate and len(removed):  # FLAP: the removed neurons' mean output, into the bias
                mean = torch.from_numpy(cal.mean[i][removed]).to(proj.weight.dtype)
                bias += mean @ proj.weight[torch.from_numpy(removed)]
            k = torch.from_numpy(kept)
            new_fc = Conv1D(keep, fc.weight.shape[0])
            new_fc.weight.copy_(fc.weight[:, k])
            new_fc.bias.copy_(fc.bias[k])
            new_proj = Conv1D(proj.weight.shape[1], keep)
            new_proj.weight.copy_(proj.weight[k, :])
            new_proj.bias.copy_(bias)
        block.mlp.c_fc, block.mlp.c_proj = new_fc, new_proj
    model.config.n_inner = keep
    return record


def prune(cfg: PruneConfig, *, force: bool = False, log=print) -> dict:
    import torch

    src, out = Path(cfg.src), Path(cfg.out)
    if cfg.importance not in MEASURES:
        raise InputError(f"--importance {cfg.importance!r}; expected one of {', '.join(MEASURES)}")
    check_checkpoint_out(src, out, replace=force)
    model, _arch = load_gpt2_checkpoint(src, "input")
    n_ff = model.transformer.h[0].mlp.c_fc.nf
    keep = kept_width(n_ff, cfg.ffn, cfg.multiple_of)
    needs_grad, _ = MEASURES[cfg.importance]
    needs_text = cfg.compensate or cfg.importance not in WEIGHT_ONLY  # the means, or the measure itself
    t0 = time.perf_counter()
    if needs_text:
        if not cfg.calib:
            raise InputError(f"--importance {cfg.importance}" + (" with bias compensation" if cfg.compensate else "")
                             + " needs --calib TEXT (files or directories of .txt)")
        ctx = min(cfg.ctx, model.config.n_positions)
        windows = _windows(load_tokens([Path(p) for p in cfg.calib]), ctx, cfg.calib_tokens, cfg.seed)
        torch.manual_seed(cfg.seed)
        cal = calibrate(model, windows, gradients=needs_grad)
    else:
        cal = None
    record = prune_model(model, cal, keep, cfg.importance, cfg.compensate, cfg.seed)
    summary = {"source": str(src), "config": asdict(cfg), "n_ff": n_ff, "kept_per_layer": keep,
               "removed_per_layer": n_ff - keep, "calibration_tokens": cal.tokens if cal else 0,
               "seconds": round(time.perf_counter() - t0, 1),
               "removed_share_of_importance": record["removed_share_of_importance"], "kept": record["kept"]}
    save_checkpoint(model, src, out, {"prune.json": json.dumps(summary, indent=1) + "\n"})
    log(f"pruned {n_ff - keep} of {n_ff} FFN neurons per layer ({cfg.importance}"
        + (", bias-compensated" if cfg.compensate else "") + f"); wrote {out}")
    return {k: v for k, v in summary.items() if k != "kept"}
