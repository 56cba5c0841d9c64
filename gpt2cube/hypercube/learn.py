"""Routers learned from the dense model (MoEfication / Deja Vu style), in the hypercube's form.

Per FFN layer, on calibration tokens: X (N, E) the FFN inputs, and C (N, F) each neuron's
contribution |a_tj - mean_t a_tj| * ||W_down[j]|| (what skipping neuron j for token t takes out of
the layer's output, to first order, once the skipped neurons' mean output is added back -- the
compensation the file stores). A token routed to vertex v computes the groups in the ball B_r(v),
so the mass it keeps is sum_{u in B_r(v)} G_t[u], G_t[u] = sum_{j in group u} C_tj. Starting from
the PCA router (router.fit_router), each of `rounds` rounds
 1. groups: given each token's vertex, places every neuron at the vertex whose ball covers the
    most of its mass (coverage S[u, j] = its mass over the tokens routed within r of u), filling
    every vertex with exactly F / 2^d neurons (greedy over (vertex, neuron) pairs, largest first):
    co-activated neurons end up in the same or neighbouring groups;
 2. router: trains the d hyperplanes (Adam, full batch, standardised inputs) to maximise the
    expected covered share of each token's mass for those groups, E_{v ~ p(v|x)} [cover_t(v)] with
    p(v|x) = prod_k sigmoid(+-(w_k.x + b_k)), so a near miss (a neighbouring vertex, whose ball
    overlaps) costs less than a far one; then re-routes the tokens.
The groups returned are those the final router was trained for. The result is still d hyperplanes
and a permutation: the engine's routing and stock llama.cpp's view of the file do not change, only
how much of what each token needs its ball computes.
"""

from __future__ import annotations

import numpy as np

from .router import LayerRouter, fit_router, group_of, route
from .topology import Hypercube


def contributions(act: np.ndarray, down_weight: np.ndarray) -> np.ndarray:
    """(N, F) |a_tj - mean_t a_tj| * ||W_down[j]||, with W_down (F, E) (transformers' Conv1D
    layout): what skipping neuron j takes out of token t's output once the skipped neurons' mean
    output is added back (the compensation the file stores)."""
    act = np.asarray(act, np.float32)
    return np.abs(act - act.mean(axis=0)) * np.linalg.norm(np.asarray(down_weight, np.float64), axis=1).astype(np.float32)


def _groups(vertex: np.ndarray, contrib: np.ndarray, ball: np.ndarray, cube: Hypercube) -> np.ndarray:
    """owner (F,) vertex of each neuron: balanced groups maximising the mass their balls cover."""
    V, F = cube.n_vertices, contrib.shape[1]
    mass = _onehot(vertex, V).T @ contrib  # (V, F): each vertex's tokens' mass per neuron
    cover = ball @ mass  # (V, F): mass of neuron j computed if it sits at u
    order = np.argsort(-cover, axis=None, kind="stable")
    owner = np.full(F, -1)
    room = np.full(V, F // V)
    for u, j in zip(*np.unravel_index(order, cover.shape)):
        if owner[j] < 0 and room[u]:
            owner[j] = u
            room[u] -= 1
    return owner


def _onehot(index: np.ndarray, n: int) -> np.ndarray:
    out = np.zeros((len(index), n), np.float32)
    out[np.arange(len(index)), index] = 1
    return out


def _group_mass(contrib: np.ndarray, owner: np.ndarray, n_vertices: int) -> np.ndarray:
    """(N, V) each token's mass in each group."""
    return contrib @ _onehot(owner, n_vertices)


def learn_router(x: np.ndarray, contrib: np.ndarray, cube: Hypercube, radius: int, *, rounds: int = 4,
                 steps: int = 150, lr: float = 0.05) -> LayerRouter:
    """One layer's learned router and groups; see the module docstring. Deterministic: the start is
    PCA's, the steps are full-batch."""
    import torch
    import torch.nn.functional as F

    V, d = cube.n_vertices, cube.dim
    ball = (cube.distances() <= min(radius, d)).astype(np.float32)  # (V, V), symmetric
    w0, b0 = fit_router(x, d)
    vertex = route(x, w0, b0)
    xt = torch.from_numpy(np.asarray(x, np.float32))
    mu, sd = xt.mean(0), xt.std(0) + 1e-6
    xs = (xt - mu) / sd  # standardised inputs: one learning rate suits every feature
    w = (torch.from_numpy(w0) * sd).clone().requires_grad_(True)
    b = (torch.from_numpy(b0) + torch.from_numpy(w0) @ mu).clone().requires_grad_(True)
    bits = torch.from_numpy(((np.arange(V)[:, None] >> np.arange(d)[None]) & 1).astype(np.float32))  # (V, d)
    for _ in range(rounds):
        owner = _groups(vertex, contrib, ball, cube)
        mass = _group_mass(contrib, owner, V)
        cover = torch.from_numpy(mass @ ball)  # (N, V): mass kept if the token sits at v
        cover = cover / cover.sum(1, keepdim=True).clamp_min(1e-30)
        opt = torch.optim.Adam([w, b], lr=lr)
        for _ in range(steps):
            z = xs @ w.T + b
            logp = F.logsigmoid(z) @ bits.T + F.logsigmoid(-z) @ (1 - bits).T  # (N, V)
            loss = -(logp.exp() * cover).sum(1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            weight = (w / sd).numpy().astype(np.float32)
            bias = (b - (w / sd) @ mu).numpy().astype(np.float32)
        vertex = route(x, weight, bias)
    perm = np.concatenate([np.flatnonzero(owner == u) for u in range(V)])
    return LayerRouter(weight, bias, perm, np.bincount(vertex, minlength=V))


def covered_share(x: np.ndarray, contrib: np.ndarray, lr_: LayerRouter, cube: Hypercube, radius: int) -> float:
    """Share of the calibration tokens' FFN mass that the routed ball computes."""
    ball = (cube.distances() <= min(radius, cube.dim)).astype(np.float32)
    mass = _group_mass(contrib, group_of(lr_.perm, cube.n_vertices), cube.n_vertices)
    v = route(x, lr_.weight, lr_.bias)
    return float((mass @ ball)[np.arange(len(v)), v].sum() / max(mass.sum(), 1e-30))
