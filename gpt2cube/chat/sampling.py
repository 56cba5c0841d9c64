"""Sampling options shared by `chat` and `serve`, their checks, and the Python sampler the routed
engine uses (llama.cpp's own sampler serves the llama.cpp backend with the same options)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InputError

PENALTY_WINDOW = 64  # last tokens the repetition penalty looks at (llama.cpp's default)


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    repeat_penalty: float = 1.1
    seed: int = 0
    max_tokens: int = 128

    def __post_init__(self) -> None:
        checks = (
            ("temperature", 0.0 <= self.temperature <= 5.0, "a number in [0, 5] (0 = greedy)"),
            ("top_k", isinstance(self.top_k, int) and self.top_k >= 0, "an integer >= 0 (0 = all tokens)"),
            ("top_p", 0.0 < self.top_p <= 1.0, "a number in (0, 1]"),
            ("repeat_penalty", 0.5 <= self.repeat_penalty <= 2.0, "a number in [0.5, 2] (1 = off)"),
            ("seed", isinstance(self.seed, int) and 0 <= self.seed < 2**31, "an integer in [0, 2^31)"),
            ("max_tokens", isinstance(self.max_tokens, int) and self.max_tokens >= 1, "an integer >= 1"),
        )
        for name, ok, want in checks:
            if not ok:
                raise InputError(f"{name} = {getattr(self, name)!r}; expected {want}")


def sample_token(logits: np.ndarray, s: Sampling, history: list[int], rng: np.random.Generator) -> int:
    """Repetition penalty over the last PENALTY_WINDOW tokens (positive logits divided, negative
    multiplied, as llama.cpp), then greedy at temperature 0, else top-k, temperature, top-p."""
    z = np.asarray(logits, dtype=np.float64).copy()
    if s.repeat_penalty != 1.0 and history:
        seen = np.unique(np.asarray(history[-PENALTY_WINDOW:]))
        z[seen] = np.where(z[seen] > 0, z[seen] / s.repeat_penalty, z[seen] * s.repeat_penalty)
    if s.temperature <= 0:
        return int(np.argmax(z))
    order = np.argsort(z)[::-1]
    if s.top_k:
        order = order[: s.top_k]
    p = np.exp((z[order] - z[order[0]]) / s.temperature)
    p /= p.sum()
    keep = int(np.searchsorted(np.cumsum(p), s.top_p) + 1)
    order, p = order[:keep], p[:keep] / p[:keep].sum()
    return int(rng.choice(order, p=p))
