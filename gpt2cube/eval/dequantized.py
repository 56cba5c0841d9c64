"""A transformers model carrying exactly the weights a GGUF file stores (dequantized), so that
llama.cpp's output on the file can be compared with a reference that has the same weight error:
what remains is the runtime's own arithmetic, which isolates packing, layout and transposes."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from ..converter.arch import TensorSpec, arch_for
from ..converter.checkpoint import open_checkpoint
from ..converter.inspect import read_gguf
from ..errors import GGUFFormatError
from ..kernels import QUANT_TYPES

_BY_GGML = {q.ggml_type: q for q in QUANT_TYPES.values()}


def _file_weight(tensor, spec: TensorSpec) -> np.ndarray:
    """A GGUF tensor dequantized into the HF layout of `spec`'s source tensor."""
    w = _BY_GGML[tensor.tensor_type].dequantize(np.asarray(tensor.data), spec.shape)
    return w.T if spec.transpose else w


def hf_gpt2(config: dict, specs: list[TensorSpec], weight_of: Callable[[TensorSpec], np.ndarray]):
    """A transformers GPT-2 (GPT2Config keywords `config`) whose parameters are `weight_of(spec)`
    (HF layout) for each spec; source names with or without the `transformer.` prefix."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(**config)).eval()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for spec in specs:
            name = spec.src_name if spec.src_name.startswith(("transformer.", "lm_head.")) else f"transformer.{spec.src_name}"
            params[name].copy_(torch.from_numpy(np.ascontiguousarray(weight_of(spec), dtype=np.float32)))
    return model


def dequantized_state(gguf_path: Path, src: Path) -> dict[str, np.ndarray]:
    """HF state-dict entries (source names and layouts) holding the file's dequantized weights."""
    tensors = {t.name: t for t in read_gguf(gguf_path).tensors}
    return {spec.src_name: _file_weight(tensors[spec.gguf_name], spec)
            for spec in arch_for(open_checkpoint(src)).tensor_specs()}


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
    from ..converter.arch import GPT2
    from ..converter.inspect import field_value

    reader = read_gguf(gguf_path)
    hp = {k: field_value(reader, f"gpt2.{k}") for k in (
        "block_count", "embedding_length", "feed_forward_length", "context_length", "attention.head_count",
        "attention.layer_norm_epsilon")}
    if field_value(reader, "general.architecture") != "gpt2" or None in hp.values():
        raise GGUFFormatError(f"{gguf_path}: not a GPT-2 GGUF (general.architecture and gpt2.* keys expected)")
    tensors = {t.name: t for t in reader.tensors}
    n_vocab = int(tensors["token_embd.weight"].shape[1])
    tied = "output.weight" not in tensors
    config = dict(n_layer=int(hp["block_count"]), n_embd=int(hp["embedding_length"]),
                  n_inner=int(hp["feed_forward_length"]), n_positions=int(hp["context_length"]),
                  n_head=int(hp["attention.head_count"]), layer_norm_epsilon=float(hp["attention.layer_norm_epsilon"]),
                  vocab_size=n_vocab, tie_word_embeddings=tied)
    specs = GPT2.specs_for(config["n_layer"], config["n_embd"], config["n_inner"], n_vocab, config["n_positions"], tied)
    for spec in specs:
        t = tensors.get(spec.gguf_name)
        if t is None or t.tensor_type not in _BY_GGML:
            raise GGUFFormatError(f"{gguf_path}: tensor {spec.gguf_name} is missing or of a type gpt2cube cannot read")
    return hf_gpt2(config, specs, lambda spec: _file_weight(tensors[spec.gguf_name], spec))
