"""A transformers model carrying exactly the weights a GGUF file stores (dequantized), so that
llama.cpp's output on the file can be compared with a reference that has the same weight error:
what remains is the runtime's own arithmetic, which isolates packing, layout and transposes."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..converter.arch import arch_for
from ..converter.checkpoint import open_checkpoint
from ..converter.inspect import read_gguf
from ..kernels import QUANT_TYPES


def dequantized_state(gguf_path: Path, src: Path) -> dict[str, np.ndarray]:
    """HF state-dict entries (source names and layouts) holding the file's dequantized weights."""
    by_ggml = {q.ggml_type: q for q in QUANT_TYPES.values()}
    tensors = {t.name: t for t in read_gguf(gguf_path).tensors}
    state = {}
    for spec in arch_for(open_checkpoint(src)).tensor_specs():
        t = tensors[spec.gguf_name]
        w = by_ggml[t.tensor_type].dequantize(np.asarray(t.data), spec.shape)
        state[spec.src_name] = w.T if spec.transpose else w
    return state


def dequantized_model(gguf_path: Path, src: Path):
    import torch
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(src, dtype=torch.float32).eval()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, w in dequantized_state(gguf_path, src).items():
            params[name].copy_(torch.from_numpy(np.ascontiguousarray(w)))
    return model
