"""Running a GGUF file in llama.cpp through llama-cpp-python."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def default_threads() -> int:
    return max(1, min(os.cpu_count() or 1, 8))


# ggml type ids for the KV cache (GGML_TYPE_F32 = 0, GGML_TYPE_F16 = 1).
KV_F32, KV_F16 = 0, 1


def load_llama(path: Path, *, n_ctx: int = 512, logits_all: bool = False, n_threads: int | None = None,
               kv_f32: bool = False, embedding: bool = False):
    """A llama_cpp.Llama on `path`. `kv_f32` keeps the KV cache in f32 (llama.cpp's default is
    f16), so comparisons with transformers measure the file rather than the cache's rounding."""
    from llama_cpp import Llama

    kv = KV_F32 if kv_f32 else KV_F16
    return Llama(
        model_path=str(path), n_ctx=n_ctx, n_batch=min(n_ctx, 512), logits_all=logits_all,
        n_threads=n_threads or default_threads(), verbose=False, seed=0, type_k=kv, type_v=kv,
        embedding=embedding,
    )


def llama_logits(path: Path, tokens: list[int], *, n_threads: int | None = None, kv_f32: bool = True) -> np.ndarray:
    """Logits for every position, (n_tokens, vocab), float32."""
    llm = load_llama(path, n_ctx=max(len(tokens), 8), logits_all=True, n_threads=n_threads, kv_f32=kv_f32)
    try:
        llm.eval(tokens)
        return np.array(llm.scores[: len(tokens)], dtype=np.float32)
    finally:
        llm.close()


def llama_greedy(path: Path, tokens: list[int], n_new: int, *, n_threads: int | None = None,
                 kv_f32: bool = True) -> list[int]:
    """Greedy continuation of `tokens` by argmax, token by token. (llama-cpp-python 0.3.36 keeps
    `scores` only with logits_all, hence it here.)"""
    llm = load_llama(path, n_ctx=len(tokens) + n_new + 1, logits_all=True, n_threads=n_threads, kv_f32=kv_f32)
    try:
        out: list[int] = []
        llm.eval(tokens)
        for _ in range(n_new):
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            out.append(nxt)
            llm.eval([nxt])
        return out
    finally:
        llm.close()


def model_context(path: Path) -> int:
    """The context length a GGUF was trained with (`{arch}.context_length`)."""
    from ..converter.inspect import field_value, read_gguf

    reader = read_gguf(path)
    arch = field_value(reader, "general.architecture", "gpt2")
    return int(field_value(reader, f"{arch}.context_length", 0))
