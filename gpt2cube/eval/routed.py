"""Evaluation and generation on the C++ routed engine (cpp/): perplexity with the same window
definition as llama.cpp's, sampling, and which vertices a text visits."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..gguf_file import model_context
from ..tokenizers import GGUFTokenizer
from .llama_runner import default_threads
from .perplexity import PerplexityResult, perplexity


def _engine(model: Path, n_ctx: int, n_threads: int | None, device: str):
    from ..engine.binding import RoutedModel

    return RoutedModel(model, n_ctx=n_ctx, n_threads=n_threads or default_threads(), device=device)


def engine_label(radius: int | None, dim: int) -> str:
    return "routed engine, dense" if radius is None or radius >= dim else f"routed engine, radius {radius} of {dim}"


def routed_perplexity(model: Path, text: str, ctx: int = 512, radius: int | None = None, *,
                      max_windows: int | None = None, n_threads: int | None = None, device: str = "cpu",
                      progress: bool = False) -> PerplexityResult:
    _check_radius(radius)
    n_train = model_context(model)
    if ctx > n_train:
        raise InputError(f"--ctx {ctx} is longer than the model's context length {n_train} ({model})")
    tok = GGUFTokenizer(model)
    try:
        tokens = np.array(tok.encode(text))
    finally:
        tok.close()
    with _engine(model, ctx, n_threads, device) as eng:

        def logits(window: np.ndarray) -> np.ndarray:
            eng.reset()
            return eng.eval(window, radius)[0]

        return perplexity(tokens, ctx, logits, engine_label(radius, eng.dim), max_windows, progress)


def _check_radius(radius: int | None) -> None:
    """The engine reads a negative radius as dense; from the command line it is a mistake. (A file
    without hypercube metadata is refused by the engine itself.)"""
    if radius is not None and radius < 0:
        raise InputError(f"--radius {radius}; expected 0..d (the cube dimension)")


def routed_generate(model: Path, prompt: str, n_tokens: int, radius: int | None = None, *, temperature: float = 0.0,
                    top_k: int = 40, seed: int = 0, n_threads: int | None = None, device: str = "cpu") -> dict:
    """Sampled (or greedy, temperature 0) continuation; also each generated token's vertex per layer."""
    _check_radius(radius)
    tok = GGUFTokenizer(model)
    try:
        ids = tok.encode(prompt)
        if not ids:
            raise InputError("the prompt is empty")
        n_ctx = model_context(model)
        if len(ids) + n_tokens > n_ctx:
            raise InputError(f"prompt ({len(ids)} tokens) + {n_tokens} new tokens exceed the context of {n_ctx}")
        rng = np.random.default_rng(seed)
        with _engine(model, len(ids) + n_tokens, n_threads, device) as eng:
            routed = eng.dim > 0 and radius is not None and radius < eng.dim
            t0 = time.perf_counter()
            logits, verts = eng.eval(ids, radius, want_vertices=routed, all_logits=False)
            t_prompt = time.perf_counter() - t0
            out: list[int] = []
            path: list[list[int]] = []
            t0 = time.perf_counter()
            for _ in range(n_tokens):
                nxt = _sample(logits[-1], temperature, top_k, rng)
                out.append(nxt)
                logits, verts = eng.eval([nxt], radius, want_vertices=routed, all_logits=False)
                if routed:
                    path.append(verts[:, 0].tolist())
            t_gen = time.perf_counter() - t0
            backend = eng.backend
        return {"prompt": prompt, "text": tok.decode(out), "tokens": out, "radius": radius,
                "prompt_tokens_per_s": len(ids) / t_prompt, "gen_tokens_per_s": n_tokens / t_gen if n_tokens else 0.0,
                "vertices": path, "backend": backend}
    finally:
        tok.close()


def _sample(logits: np.ndarray, temperature: float, top_k: int, rng: np.random.Generator) -> int:
    if temperature <= 0:
        return int(np.argmax(logits))
    top = np.argsort(logits)[::-1][: max(1, top_k)]
    z = logits[top].astype(np.float64) / temperature
    p = np.exp(z - z.max())
    return int(rng.choice(top, p=p / p.sum()))
