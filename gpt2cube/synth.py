"""Random GPT-2 checkpoints in every layout transformers writes (no weights are ever
downloaded): the fixture factory of the tests and benchmarks, and the demo's stand-in when the
reference model is absent. Nothing else in the package imports it.

Every parameter is random, norms and biases included (a freshly initialised model has unit norm
weights and zero biases, which would hide a mis-mapped bias), and `init_std` can be raised so
logits have enough spread for comparisons to mean something.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .tokenizers import bundled_gpt2_files, hf_tokenizer


def make_random_gpt2(
    out_dir: Path,
    *,
    n_layer: int = 2,
    n_embd: int = 256,
    n_head: int = 4,
    n_positions: int = 256,
    vocab_size: int = 50257,
    n_inner: int | None = None,
    tied: bool = True,
    seed: int = 0,
    init_std: float = 0.02,
    weights: str = "safetensors",  # safetensors | bin | sharded
    tokenizer: str | None = "files",  # files (vocab.json+merges.txt) | json (tokenizer.json) | None
    write_n_ctx: bool = False,
    legacy_names: bool = False,  # original OpenAI checkpoints: no "transformer." prefix
):
    """Builds, saves and returns (out_dir, model)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=n_positions, vocab_size=vocab_size,
        n_inner=n_inner, initializer_range=init_std, tie_word_embeddings=tied,
        bos_token_id=min(50256, vocab_size - 1), eos_token_id=min(50256, vocab_size - 1),
    )
    model = GPT2LMHeadModel(cfg).eval()
    _randomize_norms_and_biases(model, init_std, seed + 1)
    out_dir.mkdir(parents=True, exist_ok=True)
    if weights == "bin":
        _save_legacy_bin(model, out_dir, legacy_names)
        cfg.save_pretrained(out_dir)
    else:
        model.save_pretrained(out_dir, max_shard_size="2MB" if weights == "sharded" else "50GB")
    if write_n_ctx:
        _patch_config(out_dir / "config.json", n_ctx=n_positions)
    _write_tokenizer(out_dir, tokenizer)
    return out_dir, model


def _randomize_norms_and_biases(model, init_std: float, seed: int) -> None:
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith((".bias", ".dd_baseline")):  # drift-diffusion's baseline is a per-head offset
                p.copy_(init_std * torch.randn(p.shape, generator=gen))


def make_random_variant(out_dir: Path, variant, *, n_layer: int = 2, n_embd: int = 128, n_head: int = 4,
                        n_positions: int = 128, n_inner: int | None = None, tied: bool = True, seed: int = 0,
                        init_std: float = 0.02):
    """A random gpt2cube variant checkpoint (variants.spec.VariantSpec `variant`): (out_dir, model)."""
    import torch

    from .variants.model import VariantConfig, VariantLM

    torch.manual_seed(seed)
    cfg = VariantConfig(n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=n_positions, n_inner=n_inner,
                        vocab_size=variant.vocab_size,
                        tie_word_embeddings=tied, initializer_range=init_std, variant=variant)
    model = VariantLM(cfg).eval()
    _randomize_norms_and_biases(model, init_std, seed + 1)
    model.save_pretrained(out_dir)
    _write_tokenizer(out_dir, "files")
    return out_dir, model


def _save_legacy_bin(model, out_dir: Path, legacy_names: bool) -> None:
    """pytorch_model.bin as old checkpoints were saved, with the causal-mask buffers."""
    import torch

    state = {}
    for k, v in model.state_dict().items():
        if k == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        state[k.removeprefix("transformer.") if legacy_names else k] = v.clone()
    n = model.config.n_positions
    prefix = "" if legacy_names else "transformer."
    for i in range(model.config.n_layer):
        state[f"{prefix}h.{i}.attn.bias"] = torch.tril(torch.ones(n, n, dtype=torch.uint8)).view(1, 1, n, n)
        state[f"{prefix}h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(state, out_dir / "pytorch_model.bin")


def _patch_config(path: Path, **updates: object) -> None:
    cfg = json.loads(path.read_text())
    cfg.update(updates)
    path.write_text(json.dumps(cfg, indent=2))


def _write_tokenizer(out_dir: Path, kind: str | None) -> None:
    if kind is None:
        return
    encoder, bpe = bundled_gpt2_files()
    if kind == "files":
        shutil.copyfile(encoder, out_dir / "vocab.json")
        shutil.copyfile(bpe, out_dir / "merges.txt")
    elif kind == "json":
        hf_tokenizer(encoder, bpe).backend_tokenizer.save(str(out_dir / "tokenizer.json"))
    else:
        raise ValueError(f"tokenizer kind {kind!r}; expected 'files', 'json' or None")
