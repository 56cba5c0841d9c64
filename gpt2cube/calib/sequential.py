"""`convert --method gptq`: GPTQ over a whole GPT-2, block by block, as the paper runs it.

The calibration windows go through the embeddings once; then for each transformer block in turn:
one pass with hooks sums x x^T over every token at the input of its four linear weights
(attn_qkv, attn_output, ffn_up, ffn_down), each weight is quantized by calib.gptq against its
Hessian, the block's weights are replaced by the values the file will store (dequantized from the
very bytes written), and a second pass gives the next block its inputs. So every block is
calibrated on the activations of the already-quantized blocks below it, as llama.cpp will run them.

It is the converter's extension (converter.convert.ConvertExtension): `prepare` runs all of it
on the planned types and hands back the encoded bytes of the weights it quantized; every other
tensor (embeddings, head, norms, biases, and linear tensors whose type has no grid, e.g. f16)
is encoded by the converter as without it.

Memory: the model in float32, the hidden states of the calibration windows (tokens x n_embd
float32, 25 MB for 8192 tokens of GPT-2 124M), one block's Hessians (float64: 3 x 768^2 + 3072^2
x 8 B = 90 MB for 124M) and the encoded linear weights until they are written (the size of the
linear part of the output file).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .. import constants as K
from ..converter.arch import GPT2
from ..errors import InputError, UnsupportedArchitecture
from .collect import linear_modules
from .gptq import GptqOptions, gptq_quantize
from .imatrix_file import Imatrix

_BLOCK = re.compile(r"blk\.(\d+)\.")


@dataclass
class GptqConvert:
    calib: Path
    calib_tokens: int = 8192
    ctx: int | None = None  # calibration window; default min(512, n_ctx)
    opts: GptqOptions = field(default_factory=GptqOptions)
    imatrix: Imatrix | None = None
    ternary_scale: str = "tensor"
    batch: int = 4  # windows per forward

    def prepare(self, ckpt, arch, planned, log: Callable[[str], None], reorder=None) -> "GptqBuild":
        """The converter's extension hook: check, calibrate and quantize; nothing is written yet.
        `reorder` (a prepared hypercube: `permute_model`, `permute_importance`) puts the FFN
        neurons in the file's order before GPTQ runs, so the bytes it hands back are already in
        that order and the converter must not permute them again (it permutes only the tensors it
        encodes itself: biases, and linear tensors without a grid)."""
        from ..models import load_hf_model

        if type(arch) is not GPT2:  # a gpt2cube variant has other blocks (and may not convert to gpt2)
            raise UnsupportedArchitecture(f"{ckpt.path}: --method gptq needs a GPT-2 (GPT2LMHeadModel); this "
                                          f"checkpoint converts to llama.cpp's {arch.gguf_arch!r} architecture")
        windows, calibration = self.windows(arch.n_ctx, arch.n_vocab)
        t0 = time.perf_counter()
        model = load_hf_model(ckpt.path)
        encoded = self.quantize_model(model, windows, planned, log, reorder)
        log(f"gptq: {len(encoded)} tensors on {len(windows)} windows of {windows.shape[1]} tokens in "
            f"{time.perf_counter() - t0:.1f} s")
        return GptqBuild(encoded, calibration, self)

    def windows(self, n_ctx: int, n_vocab: int) -> tuple[np.ndarray, dict]:
        """The calibration windows (n, ctx) and their record (tokens, sha256, file); too short a text
        (or a window outside 16 .. n_ctx) is one clear line."""
        from ..hypercube.calibrate import calibration_tokens

        ctx = min(512, n_ctx) if self.ctx is None else self.ctx
        if not 16 <= ctx <= n_ctx:
            raise InputError(f"--calib-ctx {ctx}; expected 16 .. {n_ctx} (the model's context)")
        tokens, sha = calibration_tokens(self.calib, self.calib_tokens, n_vocab)
        n_win = len(tokens) // ctx
        if n_win < 1:
            raise InputError(f"{self.calib}: {len(tokens)} calibration tokens (of --calib-tokens {self.calib_tokens}); "
                             f"--method gptq needs at least one window of {ctx} tokens")
        return tokens[: n_win * ctx].reshape(n_win, ctx), {"tokens": int(n_win * ctx), "sha256": sha,
                                                           "file": str(self.calib)}

    def quantize_model(self, model, windows: np.ndarray, planned, log: Callable[[str], None],
                       reorder=None) -> dict[str, tuple[np.ndarray, dict]]:
        """GPTQ on a float32 transformers GPT-2 in place: every planned linear weight with a grid
        ends holding the values its bytes decode to; GGUF name -> (bytes, stats)."""
        targets = {p.spec.gguf_name: p for p in planned if p.spec.role == "linear" and p.qtype.has_grid}
        importance = {}
        if self.imatrix is not None:
            importance = {n: self.imatrix.checked(n, p.spec.shape[-1]) for n, p in targets.items()}
        if reorder is not None:
            reorder.permute_model(model)
            importance = {n: reorder.permute_importance(n, imp, targets[n].spec.shape[0]) for n, imp in importance.items()}
        mods = linear_modules(model, [p.spec for p in targets.values()])
        return run_gptq(model, windows, targets, mods, importance, self, log)


def run_gptq(model, windows: np.ndarray, targets: dict, mods: dict, importance: dict, cfg: GptqConvert,
             log: Callable[[str], None]) -> dict[str, tuple[np.ndarray, dict]]:
    """Block by block: Hessians of the block's linear inputs, GPTQ, quantized weights in, next inputs."""
    import torch

    tr = model.transformer
    ids = torch.from_numpy(windows.astype(np.int64))
    with torch.no_grad():
        h = tr.wte(ids) + tr.wpe(torch.arange(ids.shape[1]))[None]
        h = tr.drop(h)
    by_block: dict[int, list[str]] = {}
    for name in targets:
        by_block.setdefault(int(_BLOCK.match(name)[1]), []).append(name)
    out: dict[str, tuple[np.ndarray, dict]] = {}

    def run_block(block, x):
        ys = []
        with torch.no_grad():
            for i in range(0, x.shape[0], cfg.batch):
                y = block(x[i : i + cfg.batch])
                ys.append(y[0] if isinstance(y, tuple) else y)
        return torch.cat(ys)

    for b, block in enumerate(tr.h):
        names = by_block.get(b, [])
        sums = {n: torch.zeros(targets[n].spec.shape[-1], targets[n].spec.shape[-1], dtype=torch.float64) for n in names}
        counts = dict.fromkeys(names, 0)

        def hook_for(n):
            def pre(_mod, args):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
                sums[n] += (x.T @ x).double()  # float32 products per batch, float64 across batches
                counts[n] += x.shape[0]
            return pre

        hooks = [mods[n].register_forward_pre_hook(hook_for(n)) for n in names]
        try:
            if names:
                run_block(block, h)
        finally:
            for hk in hooks:
                hk.remove()
        for n in names:
            p = targets[n]
            w = mods[n].weight.detach().float().numpy()
            w = w.T if p.spec.transpose else w  # GGUF layout (out, in); HF Conv1D stores (in, out)
            hess = (sums.pop(n) / max(1, counts[n])).numpy()
            res = gptq_quantize(np.ascontiguousarray(w), hess, p.qtype, name=n, opts=cfg.opts,
                                importance=importance.get(n), ternary_scale_mode=cfg.ternary_scale)
            if res.encoded.nbytes != p.nbytes:
                raise InputError(f"internal error: gptq encoded {n} into {res.encoded.nbytes} bytes; expected {p.nbytes}")
            q = p.qtype.dequantize(res.encoded, p.spec.shape)  # what llama.cpp will multiply by
            q = torch.from_numpy(np.ascontiguousarray(q.T if p.spec.transpose else q))
            with torch.no_grad():
                mods[n].weight.copy_(q.to(mods[n].weight.dtype))
            out[n] = (res.encoded, res.stats)
        if b < len(tr.h) - 1 and any(by_block.get(j) for j in range(b + 1, len(tr.h))):
            h = run_block(block, h)
        log(f"gptq: block {b} done ({len(names)} tensors)")
    return out


@dataclass
class GptqBuild:
    encoded_tensors: dict[str, tuple[np.ndarray, dict]]
    calibration: dict
    cfg: GptqConvert

    def encoded(self, gguf_name: str) -> tuple[np.ndarray, dict] | None:
        """The bytes GPTQ wrote for this tensor (handed over once), or None: the converter encodes it."""
        return self.encoded_tensors.pop(gguf_name, None)

    def write_metadata(self, writer) -> None:
        o = self.cfg.opts
        writer.add_string(K.KEY_QUANT_METHOD, "gptq")
        writer.add_float32(K.KEY_GPTQ_DAMP, float(o.damp))
        writer.add_uint32(K.KEY_GPTQ_BLOCK, int(o.block))
        writer.add_bool(K.KEY_GPTQ_ACT_ORDER, bool(o.act_order))
        writer.add_string(K.KEY_CALIB_FILE, Path(self.calibration["file"]).name)
        writer.add_string(K.KEY_CALIB_SHA256, self.calibration["sha256"])
        writer.add_uint32(K.KEY_CALIB_TOKENS, self.calibration["tokens"])
