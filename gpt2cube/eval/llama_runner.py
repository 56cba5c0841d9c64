"""Running a GGUF file in llama.cpp through llama-cpp-python."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..errors import GGUFFormatError, Gpt2cubeError


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
    with llama_load_errors(path):
        return Llama(
            model_path=str(path), n_ctx=n_ctx, n_batch=min(n_ctx, 512), logits_all=logits_all,
            n_threads=n_threads or default_threads(), verbose=False, seed=0, type_k=kv, type_v=kv,
            embedding=embedding,
        )


@contextmanager
def llama_load_errors(path: Path):
    """llama-cpp-python's ValueError on a file llama.cpp refuses, as one line naming the file."""
    if not Path(path).is_file():
        raise GGUFFormatError(f"{path}: no such model file; expected a GGUF file")
    try:
        yield
    except ValueError as e:
        raise GGUFFormatError(f"{path}: llama.cpp could not load it ({e}); expected a GGUF file of an architecture "
                              "llama.cpp runs (check it with `gpt2cube inspect`)") from None


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


def llama_logits_no_repack(path: Path, tokens: list[int], *, n_threads: int | None = None,
                           kv_type: str = "f32") -> np.ndarray:
    """Like `llama_logits` (f32 KV cache unless kv_type="f16", every position) but with llama.cpp's CPU weight repacking
    off (`use_extra_bufts = false`): Q4_0/Q4_K weights then run the same ggml kernels as in any
    other ggml program, instead of interleaved 8x8 copies whose activation rounding differs
    (measured 0.015-0.025 x std(logits) apart on a random 2 x 256 model)."""
    import llama_cpp
    from llama_cpp._utils import suppress_stdout_stderr

    n = len(tokens)
    with suppress_stdout_stderr(disable=False):
        mp = llama_cpp.llama_model_default_params()
        mp.use_extra_bufts = False
        model = llama_cpp.llama_model_load_from_file(str(path).encode(), mp)
        if not model:
            raise GGUFFormatError(f"{path}: llama.cpp could not load the model")
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx = cp.n_batch = cp.n_ubatch = max(8, n)
        cp.type_k = cp.type_v = {"f32": KV_F32, "f16": KV_F16}[kv_type]
        cp.flash_attn_type = 0  # disabled, as llama-cpp-python's Llama does by default
        cp.n_threads = cp.n_threads_batch = n_threads or default_threads()
        ctx = llama_cpp.llama_init_from_model(model, cp)
    batch = llama_cpp.llama_batch_init(n, 0, 1)
    try:
        batch.n_tokens = n
        for i, t in enumerate(tokens):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = t, i, 1, 1
            batch.seq_id[i][0] = 0
        if llama_cpp.llama_decode(ctx, batch) != 0:
            raise Gpt2cubeError(f"{path}: llama.cpp's decode of {n} tokens failed")
        n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
        return np.array([np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, i), shape=(n_vocab,))
                         for i in range(n)], dtype=np.float32)
    finally:
        with suppress_stdout_stderr(disable=False):
            llama_cpp.llama_batch_free(batch)
            llama_cpp.llama_free(ctx)
            llama_cpp.llama_model_free(model)
