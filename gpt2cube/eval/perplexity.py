"""Perplexity as llama.cpp's `llama-perplexity` computes it, so figures are comparable with it.

The token stream is cut into non-overlapping windows of `ctx` tokens (the tail that does not
fill a window is dropped); in each window the model sees all `ctx` tokens and only the second
half is scored: the logits at positions first .. ctx-2 (first = ctx // 2) predict tokens
first+1 .. ctx-1, so every scored token has at least ctx/2 tokens of context. Over the N scored
tokens: PPL = exp(mean nll), reported with llama.cpp's uncertainty PPL * sqrt(var(nll) / (N-1)).
Any scorer that returns per-token negative log-likelihoods for these positions (llama.cpp,
transformers, the n-gram baselines) plugs into the same definition.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import InputError
from ..gguf_file import has_position_table, model_context
from ..models import load_hf_model
from ..variants.spec import own_architecture
from ..tokenizers import checkpoint_tokenizer, encode_text
from .llama_runner import load_llama


@dataclass
class PerplexityResult:
    ppl: float
    ppl_stderr: float
    nll: float
    tokens_scored: int
    windows: int
    ctx: int
    seconds: float
    engine: str
    text_tokens: int = 0  # tokens of the whole text, before windowing: equal across engines on one text

    def as_json(self) -> dict:
        return asdict(self)


def window_starts(n_tokens: int, ctx: int, max_windows: int | None = None) -> list[int]:
    if ctx < 4:
        raise InputError(f"--ctx {ctx} is too small; expected at least 4")
    n = n_tokens // ctx
    if n < 1:
        raise InputError(f"the text has {n_tokens} tokens, fewer than one window of --ctx {ctx}")
    if max_windows:
        n = min(n, max_windows)
    return [i * ctx for i in range(n)]


def token_logprobs(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """log softmax(logits[i])[targets[i]] for each row i, in float64."""
    lg = np.asarray(logits, dtype=np.float64)
    m = lg.max(axis=1, keepdims=True)
    logz = m[:, 0] + np.log(np.exp(lg - m).sum(axis=1))
    return lg[np.arange(len(lg)), targets] - logz


def scored_nll(logits: np.ndarray, window: np.ndarray) -> np.ndarray:
    """Negative log-likelihoods of tokens first+1 .. ctx-1 from logits (ctx or more rows, V)."""
    ctx = len(window)
    first = ctx // 2
    return -token_logprobs(logits[first : ctx - 1], window[first + 1 :])


def summarise(nlls: np.ndarray, windows: int, ctx: int, seconds: float, engine: str, text_tokens: int = 0) -> PerplexityResult:
    n = len(nlls)
    mean = float(nlls.mean())
    var = float((nlls**2).mean() - mean**2)
    ppl = math.exp(mean)
    err = ppl * math.sqrt(var / (n - 1)) if n > 1 and var > 0 else 0.0
    return PerplexityResult(ppl, err, mean, n, windows, ctx, seconds, engine, text_tokens)


def perplexity(tokens: np.ndarray, ctx: int, window_logits: Callable[[np.ndarray], np.ndarray] | None, engine: str,
               max_windows: int | None = None, progress: bool = False,
               scorer: Callable[[np.ndarray], np.ndarray] | None = None) -> PerplexityResult:
    """`window_logits` gives a window's logits (ctx, V); or `scorer` gives the scored tokens'
    negative log-likelihoods directly (the n-gram models)."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    starts = window_starts(len(tokens), ctx, max_windows)
    nlls = []
    for s in tqdm(starts, desc=f"perplexity ({engine})", unit="window", disable=not progress):
        window = np.asarray(tokens[s : s + ctx])
        nlls.append(scorer(window) if scorer else scored_nll(window_logits(window), window))
    return summarise(np.concatenate(nlls), len(starts), ctx, time.perf_counter() - t0, engine, len(tokens))


def read_text(path: Path) -> str:
    if not path.is_file():
        raise InputError(f"{path}: no such file; expected a UTF-8 text file")
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise InputError(f"{path}: the text is empty")
    return text


def llama_perplexity(model: Path, text: str, ctx: int = 512, *, max_windows: int | None = None,
                     n_threads: int | None = None, progress: bool = False) -> PerplexityResult:

    n_train = model_context(model)
    if ctx > n_train and has_position_table(model):  # RoPE / ALiBi / no-position files run past it
        raise InputError(f"--ctx {ctx} is longer than the model's context length {n_train} ({model})")
    llm = load_llama(model, n_ctx=ctx, logits_all=True, n_threads=n_threads)
    try:
        tokens = np.array(llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))

        def logits(window: np.ndarray) -> np.ndarray:
            llm.reset()
            llm.eval(window.tolist())
            return np.asarray(llm.scores[: len(window)])

        return perplexity(tokens, ctx, logits, "llama.cpp", max_windows, progress)
    finally:
        llm.close()


def hf_perplexity(model_dir: Path, text: str, ctx: int = 512, *, max_windows: int | None = None,
                  progress: bool = False) -> PerplexityResult:
    import torch

    tok = checkpoint_tokenizer(model_dir)
    model = load_hf_model(model_dir)
    if ctx > model.config.n_positions and not getattr(model, "extrapolates", False):
        raise InputError(f"--ctx {ctx} is longer than the model's context length {model.config.n_positions} ({model_dir})")
    tokens = np.array(encode_text(tok, text))

    def logits(window: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(window[None].astype(np.int64))).logits[0].numpy()

    return perplexity(tokens, ctx, logits, "pytorch" if own_architecture(model_dir) else "transformers", max_windows,
                      progress)
