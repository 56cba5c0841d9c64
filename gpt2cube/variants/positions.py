"""Position schemes as torch modules, one per attention layer, registered by `POSITIONS` name.

Each transforms the per-head queries and keys (`rotate`) and/or returns an additive attention
bias (`bias`, [H, T, T], added before the causal mask); absolute schemes are tables the model adds
to the token embeddings instead (model.py).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from .spec import VariantSpec, alibi_slopes

POSITION_MODULES: dict[str, Callable[[VariantSpec, int, int], "PositionModule"]] = {}


def register_position(*names: str):
    def deco(cls):
        for n in names:
            POSITION_MODULES[n] = cls
        return cls

    return deco


class PositionModule(nn.Module):
    def __init__(self, spec: VariantSpec, n_head: int, head_dim: int) -> None:
        super().__init__()
        self.n_head, self.head_dim = n_head, head_dim

    def rotate(self, q: torch.Tensor, k: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return q, k  # q, k: [B, H, T, hd]

    def bias(self, T: int, device) -> torch.Tensor | None:
        return None


@register_position("learned", "sinusoidal", "none")
class NoAttentionPosition(PositionModule):
    """Absolute tables live in the embeddings; 'none' has no positions at all."""


def _distance(T: int, device) -> torch.Tensor:
    i = torch.arange(T, device=device)
    return (i[:, None] - i[None, :]).clamp(min=0).float()  # query minus key, 0 above the diagonal (masked)


@register_position("alibi")
class ALiBi(PositionModule):
    def __init__(self, spec: VariantSpec, n_head: int, head_dim: int) -> None:
        super().__init__(spec, n_head, head_dim)
        self.register_buffer("slopes", torch.tensor(alibi_slopes(n_head, spec.alibi_max_bias)), persistent=False)

    def bias(self, T: int, device) -> torch.Tensor:
        return -self.slopes.to(device)[:, None, None] * _distance(T, device)


@register_position("kerple")
class Kerple(PositionModule):
    """KERPLE's logarithmic kernel: bias = -r1 * log(1 + r2 * distance), r1, r2 > 0 per head."""

    def __init__(self, spec: VariantSpec, n_head: int, head_dim: int) -> None:
        super().__init__(spec, n_head, head_dim)
        self.r1 = nn.Parameter(torch.full((n_head,), math.log(math.e - 1)))  # softplus -> 1
        self.r2 = nn.Parameter(torch.full((n_head,), math.log(math.e - 1)))

    def bias(self, T: int, device) -> torch.Tensor:
        r1, r2 = nn.functional.softplus(self.r1), nn.functional.softplus(self.r2)
        return -r1[:, None, None] * torch.log1p(r2[:, None, None] * _distance(T, device))


@register_position("fire")
class FIRE(PositionModule):
    """FIRE: bias_h(i, j) = MLP(psi(i - j) / psi(max(i, L)))_h, psi(x) = log(c x + 1), with c and the
    threshold L learned (Li et al. 2023); one MLP (1 -> 32 -> H) per layer."""

    def __init__(self, spec: VariantSpec, n_head: int, head_dim: int, hidden: int = 32) -> None:
        super().__init__(spec, n_head, head_dim)
        self.mlp = nn.Sequential(nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, n_head))
        self.c = nn.Parameter(torch.tensor(0.0))  # softplus -> log 2 ... learned scale of psi
        self.threshold = nn.Parameter(torch.tensor(0.0))  # L = softplus(.) * 512

    def bias(self, T: int, device) -> torch.Tensor:
        c = nn.functional.softplus(self.c)
        psi = lambda x: torch.log1p(c * x)  # noqa: E731
        i = torch.arange(T, device=device).float()
        norm = psi(torch.maximum(i, nn.functional.softplus(self.threshold) * 512))[:, None].clamp(min=1e-6)
        rel = psi(_distance(T, device)) / norm
        return self.mlp(rel[..., None]).permute(2, 0, 1)


def _rotate_neox(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_rot: int) -> torch.Tensor:
    """NEOX pairing: dimension i with i + n_rot/2 over the first n_rot dimensions of each head."""
    half = n_rot // 2
    x1, x2, rest = x[..., :half], x[..., half:n_rot], x[..., n_rot:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)


@register_position("rope", "rope-spread")
class Rotary(PositionModule):
    """theta(pos, i) = pos * base^(-2i / n_rot), i < n_rot / 2 (ggml_rope_ext in NEOX mode); the
    'rope-spread' variant scales head h's frequencies by 2^(-8h / H), so heads see different wavelengths."""

    def __init__(self, spec: VariantSpec, n_head: int, head_dim: int) -> None:
        super().__init__(spec, n_head, head_dim)
        self.n_rot = spec.rotary_dims(head_dim)
        inv = spec.rope_base ** (-torch.arange(0, self.n_rot, 2, dtype=torch.float64) / self.n_rot)
        per_head = torch.ones(n_head, dtype=torch.float64)
        if spec.pos == "rope-spread":
            per_head = 2.0 ** (-8.0 * torch.arange(n_head, dtype=torch.float64) / n_head)
        self.register_buffer("inv_freq", (per_head[:, None] * inv[None, :]).float(), persistent=False)  # [H, n_rot/2]

    def rotate(self, q, k, pos):
        ang = pos.float()[None, :, None] * self.inv_freq[:, None, :]  # [H, T, n_rot/2]
        cos, sin = ang.cos(), ang.sin()
        return _rotate_neox(q, cos, sin, self.n_rot), _rotate_neox(k, cos, sin, self.n_rot)


@register_position("rotating")
class RotatingHeads(PositionModule):
    """The seed's rotating heads (with the model's learned position table): every head rotates its
    query and key over interleaved pairs (2i, 2i + 1), angle pos * f[h, i], i < D/2, with its own
    frequencies f [H, D/2] per layer: 'lr' learned, initialised N(0, 1); 'gp' fixed,
    10^(-h/(H-1)) * 10000^(-2i/D). --rotating-norm passes f through a LayerNorm over each head's D/2
    frequencies (learned affine) before use. The seed's GP-norm sized that LayerNorm D, not D/2, and
    fails on its first forward; here both kinds normalise the D/2 frequencies they have."""

    def __init__(self, spec: VariantSpec, n_head: int, head_dim: int) -> None:
        super().__init__(spec, n_head, head_dim)
        half = head_dim // 2
        if spec.rotating_freqs == "lr":
            self.freqs = nn.Parameter(torch.randn(n_head, half))
        else:
            self.register_buffer("freqs", gp_frequencies(n_head, head_dim), persistent=False)
        if spec.rotating_norm:
            self.norm = nn.LayerNorm(half)

    def frequencies(self) -> torch.Tensor:
        return self.norm(self.freqs) if hasattr(self, "norm") else self.freqs

    def rotate(self, q, k, pos):
        ang = pos.float()[None, :, None] * self.frequencies()[:, None, :]  # [H, T, D/2]
        cos, sin = ang.cos(), ang.sin()
        return _rotate_pairs(q, cos, sin), _rotate_pairs(k, cos, sin)


def gp_frequencies(n_head: int, head_dim: int, base: float = 10000.0) -> torch.Tensor:
    """[H, D/2]: 10^(-h/(H-1)) * base^(-2i/D) (head scales from 1 down to 1/10; one head: 1)."""
    h = torch.arange(n_head, dtype=torch.float64)
    scale = 10.0 ** (-h / (n_head - 1)) if n_head > 1 else torch.ones(1, dtype=torch.float64)
    inv = base ** (-torch.arange(0, head_dim // 2 * 2, 2, dtype=torch.float64) / head_dim)
    return (scale[:, None] * inv[None, :]).float()


def _rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Interleaved pairing (GPT-J): dimensions 2i and 2i + 1 rotate together."""
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)


def sinusoid_table(n_positions: int, n_embd: int, amplitude: float = 1.0) -> torch.Tensor:
    """PE[p, 2i] = a sin(p / 10000^(2i/E)), PE[p, 2i+1] = a cos(p / 10000^(2i/E))."""
    p = torch.arange(n_positions, dtype=torch.float64)[:, None]
    inv = 10000.0 ** (-torch.arange(0, n_embd, 2, dtype=torch.float64) / n_embd)
    table = torch.zeros(n_positions, n_embd, dtype=torch.float64)
    table[:, 0::2] = torch.sin(p * inv)
    table[:, 1::2] = torch.cos(p * inv)[:, : n_embd // 2]
    return (amplitude * table).float()
