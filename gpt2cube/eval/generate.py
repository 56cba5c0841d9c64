"""Generation through llama.cpp and simple sample-quality measures.

distinct-n: distinct n-grams / all n-grams over the samples' tokens (higher = more varied);
repetition rate: fraction of tokens that repeat a token within the previous 16 (a loop detector);
reference perplexity: the samples' perplexity under a reference model (a GGUF), i.e. how
plausible another model finds them.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..gguf_file import model_context
from .llama_runner import load_llama
from .perplexity import token_logprobs

DEFAULT_PROMPTS = [
    "It was a dark and stormy night, and",
    "The old man looked at the sea and said",
    "In the morning the village woke to find",
    "She opened the letter slowly. It read:",
]


def generate(model: Path, prompt: str, *, n_tokens: int = 64, temperature: float = 0.8, top_k: int = 40,
             seed: int = 0, n_threads: int | None = None) -> str:

    llm = load_llama(model, n_ctx=min(512, model_context(model)), n_threads=n_threads)
    try:
        out = llm(prompt, max_tokens=n_tokens, temperature=temperature, top_k=top_k, seed=seed)
        return out["choices"][0]["text"]
    finally:
        llm.close()


def distinct_n(token_lists: list[list[int]], n: int) -> float:
    grams = [tuple(t[i : i + n]) for t in token_lists for i in range(len(t) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repetition_rate(token_lists: list[list[int]], window: int = 16) -> float:
    rep = total = 0
    for t in token_lists:
        for i in range(1, len(t)):
            total += 1
            rep += t[i] in t[max(0, i - window) : i]
    return rep / total if total else 0.0


def reference_perplexity(reference: Path, prompts: list[str], samples: list[str], n_threads: int | None = None) -> float:
    """Perplexity of the sample tokens (not the prompts) under `reference`."""

    llm = load_llama(reference, n_ctx=min(512, model_context(reference)), logits_all=True, n_threads=n_threads)
    nll, count = 0.0, 0
    try:
        for p, s in zip(prompts, samples):
            pt = llm.tokenize(p.encode("utf-8"), add_bos=False)
            st = llm.tokenize(s.encode("utf-8"), add_bos=False)
            toks = (pt + st)[:511]
            if len(toks) <= len(pt):
                continue
            llm.reset()
            llm.eval(toks)
            lp = token_logprobs(llm.scores[len(pt) - 1 : len(toks) - 1], np.asarray(toks[len(pt):]))
            nll -= float(lp.sum())
            count += len(lp)
    finally:
        llm.close()
    return math.exp(nll / count) if count else float("nan")


def sample_quality(model: Path, prompts: list[str], *, reference: Path | None = None, n_tokens: int = 64,
                   seed: int = 0, n_threads: int | None = None) -> dict:

    samples = [generate(model, p, n_tokens=n_tokens, seed=seed + i, n_threads=n_threads) for i, p in enumerate(prompts)]
    llm = load_llama(model, n_ctx=min(512, model_context(model)), n_threads=n_threads)
    try:
        toks = [llm.tokenize(s.encode("utf-8"), add_bos=False) for s in samples]
    finally:
        llm.close()
    out = {"samples": [{"prompt": p, "text": s} for p, s in zip(prompts, samples)],
           "distinct_1": distinct_n(toks, 1), "distinct_2": distinct_n(toks, 2), "distinct_3": distinct_n(toks, 3),
           "repetition_rate": repetition_rate(toks)}
    if reference is not None:
        out["reference_ppl"] = reference_perplexity(reference, prompts, samples, n_threads)
    return out
