"""Building transformers GPT-2 models: from a checkpoint read by gpt2cube's own loader (every
layout `convert` takes), or from a GGUF file's dequantized weights, so that llama.cpp's output on
a file can be compared with a reference holding the same weight error (what remains is the
runtime's own arithmetic: packing, layout and transposes)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np

from .converter.arch import GPT2, Architecture, TensorSpec, arch_for
from .converter.checkpoint import Checkpoint, open_checkpoint
from .atomic import write_text
from .errors import GGUFFormatError, InputError, OutputError
from .gguf_file import dequantize_tensor, field_value, quant_type_of, read_gguf
from .tokenizers import bundled_gpt2_files
from .variants.spec import OWN_ARCHITECTURES, is_variant_dir, own_architecture

TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def load_gpt2_checkpoint(path: Path, role: str = "input"):
    """A float32 transformers GPT-2 to train or edit, from a checkpoint the converter accepts
    (its checks first, so a checkpoint that is not GPT-2 gets the converter's clear error)."""
    import torch
    from transformers import GPT2LMHeadModel

    arch = arch_for(open_checkpoint(path))
    if is_variant_dir(path):
        raise InputError(f"{path}: a gpt2cube variant ({arch.spec.describe()}); this command takes GPT-2 "
                         f"checkpoints (as trained with `train --pos learned`) only")
    try:
        model = GPT2LMHeadModel.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: transformers cannot load this {role} checkpoint ({str(e).splitlines()[0]})") from None
    return model, arch


def check_checkpoint_out(src: Path, out: Path, *, replace: bool, markers: tuple[str, ...] = ("model.safetensors",),
                         hint: str = "pass --force to replace it") -> None:
    """--out for a command that writes a checkpoint directory: never the input, a directory, and
    not one already holding a checkpoint (one of `markers`) unless `replace`."""
    if out.resolve() == src.resolve():
        raise OutputError(f"--out {out} is the input checkpoint; the input is never modified, choose another directory")
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out}: exists and is not a directory")
    if not replace and out.is_dir() and any((out / n).exists() for n in markers):
        raise OutputError(f"--out {out}: already holds a checkpoint; {hint}")


def save_checkpoint(model, src: Path, out: Path, records: dict[str, str]) -> None:
    """`model` as a standard HF directory in `out` (safetensors, config, src's tokenizer files,
    plus `records`: file name -> text), swapped in file by file from a complete temporary export."""
    import shutil

    out.mkdir(parents=True, exist_ok=True)
    export = out / ".export.tmp"
    shutil.rmtree(export, ignore_errors=True)
    model.save_pretrained(export, safe_serialization=True)
    copy_tokenizer_files(src, export)
    for name, text in records.items():
        write_text(export / name, text)
    for f in export.iterdir():
        os.replace(f, out / f.name)
    export.rmdir()


def copy_tokenizer_files(src: Path, dst: Path) -> None:
    """The source checkpoint's tokenizer files into dst, or GPT-2's bundled ones if it has none."""
    import shutil

    copied = False
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            copied = True
    if not copied:
        enc, bpe = bundled_gpt2_files()
        shutil.copyfile(enc, dst / "vocab.json")
        shutil.copyfile(bpe, dst / "merges.txt")


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


def checkpoint_model(ckpt: Checkpoint, arch: Architecture):
    """A transformers GPT-2 holding exactly the checkpoint's weights."""
    config = dict(n_layer=arch.n_layer, n_embd=arch.n_embd, n_head=arch.n_head, n_positions=arch.n_ctx,
                  n_inner=arch.n_ff, vocab_size=arch.n_vocab, layer_norm_epsilon=arch.eps,
                  activation_function=ckpt.config.get("activation_function", "gelu_new"), tie_word_embeddings=arch.tied)
    return hf_gpt2(config, arch.tensor_specs(), arch.load)


def load_hf_model(model_dir: Path):
    """transformers' own loading of an HF checkpoint directory in float32, for inference; a gpt2cube
    variant (train --pos ...) or neural baseline (baseline neural) loads as its torch model, which
    returns logits the same way."""
    import torch
    from transformers import GPT2LMHeadModel

    own = own_architecture(model_dir)
    if own is not None:
        from .variants.model import VariantLM
        from .variants.neural import NeuralLM

        return dict(zip(OWN_ARCHITECTURES, (VariantLM, NeuralLM)))[own].from_pretrained(model_dir).eval()
    return GPT2LMHeadModel.from_pretrained(model_dir, dtype=torch.float32).eval()


def file_weight(tensor, spec: TensorSpec, path: Path) -> np.ndarray:
    """A GGUF tensor dequantized into the HF layout of `spec`'s source tensor."""
    w = dequantize_tensor(tensor, spec.shape, path)
    return w.T if spec.transpose else w


def dequantized_state(gguf_path: Path, src: Path) -> dict[str, np.ndarray]:
    """HF state-dict entries (source names and layouts) holding the file's dequantized weights."""
    tensors = {t.name: t for t in read_gguf(gguf_path).tensors}
    return {spec.src_name: file_weight(tensors[spec.gguf_name], spec, gguf_path)
            for spec in arch_for(open_checkpoint(src)).tensor_specs()}


def dequantized_model(gguf_path: Path, src: Path):
    """The checkpoint `src` as transformers loads it, with the weights `gguf_path` stores."""
    import torch

    model = load_hf_model(src)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, w in dequantized_state(gguf_path, src).items():
            params[name].copy_(torch.from_numpy(np.ascontiguousarray(w)))
    return model


def model_from_gguf(gguf_path: Path):
    """A transformers GPT-2 built from a GGUF file alone: shape from its gpt2.* keys, weights
    dequantized (so the hidden states are those of the weights the file stores)."""
    reader = read_gguf(gguf_path)
    hp = {k: field_value(reader, f"gpt2.{k}") for k in (
        "block_count", "embedding_length", "feed_forward_length", "context_length", "attention.head_count",
        "attention.layer_norm_epsilon")}
    if field_value(reader, "general.architecture") != "gpt2" or None in hp.values():
        raise GGUFFormatError(f"{gguf_path}: not a GPT-2 GGUF (general.architecture and gpt2.* keys expected)")
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise GGUFFormatError(f"{gguf_path}: tensor token_embd.weight is missing")
    n_vocab = int(tensors["token_embd.weight"].shape[1])
    tied = "output.weight" not in tensors
    config = dict(n_layer=int(hp["block_count"]), n_embd=int(hp["embedding_length"]),
                  n_inner=int(hp["feed_forward_length"]), n_positions=int(hp["context_length"]),
                  n_head=int(hp["attention.head_count"]), layer_norm_epsilon=float(hp["attention.layer_norm_epsilon"]),
                  vocab_size=n_vocab, tie_word_embeddings=tied)
    specs = GPT2.specs_for(config["n_layer"], config["n_embd"], config["n_inner"], n_vocab, config["n_positions"], tied)
    for spec in specs:
        t = tensors.get(spec.gguf_name)
        if t is None:
            raise GGUFFormatError(f"{gguf_path}: tensor {spec.gguf_name} is missing")
        quant_type_of(t, gguf_path)
    return hf_gpt2(config, specs, lambda spec: file_weight(tensors[spec.gguf_name], spec, gguf_path))


def hf_logits(model, tokens: list[int]) -> np.ndarray:
    """fp32 transformers logits, (n_tokens, vocab)."""
    import torch

    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float().numpy()
