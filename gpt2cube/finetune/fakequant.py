"""Fake quantization: a weight matrix replaced by exactly the values the converter stores.

The converter encodes each tensor in its GGUF layout (rows of ne0 weights; HF Conv1D weights
transposed first) with the type that `converter.plan.plan_types` picks: the same recipe, the
same fallbacks. Here the same matrix goes through the same rule and is decoded back to float32,
so a model trained on these values and then converted computes with bit-identical weights.

Per encoding, a registry entry (`FAKE_QUANT[name]`):
 - floats and the ternary types have torch twins (they run on the training device): ternary is
   BitNet b1.58 absmean with the scale rounded to float16 first, as `kernels.ternary` does; the
   fitted scale rule ("row-fit", what `convert --method gptq` stores) takes each row's scale from
   the converter's own search (`kernels.ternary.fitted_row_scale`, numpy on a CPU copy: exact by
   construction) and rounds on the device. A row already of the form s * {-1, 0, 1} (a GPTQ file's
   values: `finetune --init gptq`) is a fixed point of every rule, so training starts on exactly
   the stored values;
 - every other type (q8_0, q4_0, q4_k, ...) runs the converter's own numpy encoder and decoder
   (`QuantType.encode` then `dequantize`) on a CPU copy: exact by construction, slower.
Tests hold each entry against the dequantized tensors of a converted GGUF, tensor by tensor.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ..kernels import get_quant_type
from ..kernels.ternary import EPS, FITTED_SCALE_MODES, fitted_row_scale

# (matrix in GGUF layout (rows, ne0) float32 torch tensor, ternary scale mode) -> same shape
FakeQuant = Callable[["object", str], "object"]
FAKE_QUANT: dict[str, FakeQuant] = {}


def register(*names: str) -> Callable[[FakeQuant], FakeQuant]:
    def deco(fn: FakeQuant) -> FakeQuant:
        for n in names:
            FAKE_QUANT[n] = fn
        return fn

    return deco


@register("f32")
def _f32(w, mode: str):
    return w


@register("f16")
def _f16(w, mode: str):
    return w.half().float()  # round to nearest even, as numpy's astype(float16)


@register("bf16")
def _bf16(w, mode: str):
    return w.bfloat16().float()  # round to nearest even, as kernels.floats.BF16


def ternary_scale(w, mode: str):
    """BitNet absmean scale as kernels.ternary.absmean_scale computes it: (rows, 1) or (1, 1)."""
    import torch

    a = w.abs()
    dims = None if mode == "tensor" else 1
    if dims is None:
        s = a.double().mean().reshape(1, 1)
        peak = a.max().reshape(1, 1)
        nonzero_min = torch.where(a > 0, a, torch.inf).min().reshape(1, 1)
    else:
        s = a.double().mean(dim=1, keepdim=True)
        peak = a.max(dim=1, keepdim=True).values
        nonzero_min = torch.where(a > 0, a, torch.inf).min(dim=1, keepdim=True).values
    already = (peak > 0) & (nonzero_min == peak)  # an already-ternary tensor keeps its magnitude
    s = torch.where(already, peak.double(), s)
    return torch.clamp(s.float(), min=float(EPS)).half().float()


@register("tq1_0", "tq2_0")
def _ternary(w, mode: str):
    import torch

    if mode in FITTED_SCALE_MODES:
        x = np.ascontiguousarray(w.detach().float().cpu().numpy())
        s = torch.from_numpy(fitted_row_scale(x)).to(w.device)
    else:
        s = ternary_scale(w, mode)
    return torch.clamp(torch.round(w / s), -1, 1) * s


def _numpy_roundtrip(name: str) -> FakeQuant:
    qtype = get_quant_type(name)

    def fq(w, mode: str):
        import torch

        x = np.ascontiguousarray(w.detach().float().cpu().numpy())
        encoded, _ = qtype.encode(x, mode)
        back = qtype.dequantize(encoded, x.shape)
        return torch.from_numpy(np.ascontiguousarray(back, dtype=np.float32)).to(w.device)

    return fq


def fake_quant(name: str, w, mode: str = "tensor"):
    """`w` (GGUF layout, float32 torch tensor) as the converter would store it in type `name`."""
    fn = FAKE_QUANT.get(name)
    if fn is None:
        get_quant_type(name)  # an unknown name raises the registry's error
        fn = FAKE_QUANT[name] = _numpy_roundtrip(name)
    return fn(w.float(), mode)
