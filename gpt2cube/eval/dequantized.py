"""A transformers model carrying exactly the weights a GGUF file stores (dequantized), so that
llama.cpp's output on the file can be compared with a reference that has the same weight error:
what remains is the runtime's own arithmetic, which isolates packing, layout and transposes."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..converter.arch import arch_for
from ..converter.checkpoint import open_checkpoint
from ..converter.inspect import read_gguf
from ..errors import GGUFFormatError
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


def model_from_gguf(gguf_path: Path):
    """A transformers GPT-2 built from a GGUF file alone: shape from its gpt2.* keys, weights
    dequantized (so the hidden states are those of the weights the file stores)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from ..converter.arch import GPT2
    from ..converter.inspect import field_value

    reader = read_gguf(gguf_path)
    hp = {k: field_value(reader, f"gpt2.{k}") for k in (
        "block_count", "embedding_length", "feed_forward_length", "context_length", "attention.head_count",
        "attention.layer_norm_epsilon")}
    if field_value(reader, "general.architecture") != "gpt2" or None in hp.values():
        raise GGUFFormatError(f"{gguf_path}: not a GPT-2 GGUF (general.architecture and gpt2.* keys expected)")
    by_ggml = {q.ggml_type: q for q in QUANT_TYPES.values()}
    tensors = {t.name: t for t in reader.tensors}
    n_vocab = int(tensors["token_embd.weight"].shape[1])
    tied = "output.weight" not in tensors
    cfg = GPT2Config(n_layer=int(hp["block_count"]), n_embd=int(hp["embedding_length"]),
                     n_inner=int(hp["feed_forward_length"]), n_positions=int(hp["context_length"]),
                     n_head=int(hp["attention.head_count"]), layer_norm_epsilon=float(hp["attention.layer_norm_epsilon"]),
                     vocab_size=n_vocab, tie_word_embeddings=tied)
    model = GPT2LMHeadModel(cfg).eval()
    params = dict(model.named_parameters())
    specs = GPT2.specs_for(cfg.n_layer, cfg.n_embd, cfg.n_inner, n_vocab, cfg.n_positions, tied)
    with torch.no_grad():
        for spec in specs:
            t = tensors.get(spec.gguf_name)
            if t is None or t.tensor_type not in by_ggml:
                raise GGUFFormatError(f"{gguf_path}: tensor {spec.gguf_name} is missing or of a type gpt2cube cannot read")
            w = by_ggml[t.tensor_type].dequantize(np.asarray(t.data), spec.shape)
            params[spec.src_name].copy_(torch.from_numpy(np.ascontiguousarray(w.T if spec.transpose else w)))
    return model
