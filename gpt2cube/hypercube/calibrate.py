"""Router calibration on text, and the neuron permutation that makes vertex groups contiguous.

Two methods (ROUTERS): `learned` (hypercube/learn.py, the default of `convert`) and `pca`, below.
Per FFN layer (shapes: N calibration tokens, E = n_embd, F = n_ff, d = cube dimension):
- X (N, E) is the FFN input after ffn_norm (HF: ln_2's output, the MLP's input).
- Router: w_k (d, E) are the top-d principal directions of X; b_k = -median(X w_k), so each bit
  is set for half the calibration tokens, and since principal projections are uncorrelated the
  2^d vertices come out roughly balanced. A token's vertex has bit k = [w_k . x + b_k > 0].
- Neurons: A (N, F) are the post-GELU activations. For every vertex v, the mean |A| of its
  tokens scores each neuron; each neuron's scores are normalised over vertices (its preference)
  and a greedy pass over (vertex, neuron) pairs, most preferred first, fills every vertex with
  exactly g = F / 2^d neurons. Group v becomes rows [v g, (v+1) g) of ffn_up (and the same
  columns of ffn_down) through `perm`: new neuron i is old neuron perm[i]. Permuting an FFN's
  hidden units does not change what it computes, so the dense model is unchanged.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..tokenizers import tokenize_file
from .learn import contributions, learn_router
from .router import LayerRouter, fit_router, route  # noqa: F401  (LayerRouter, fit_router: also imported from here)
from .topology import Hypercube


def assign_neurons(vertex: np.ndarray, act: np.ndarray, cube: Hypercube) -> np.ndarray:
    """Equal, disjoint vertex groups covering all F neurons; returns perm (F,)."""
    n_ff = act.shape[1]
    if n_ff % cube.n_vertices:
        raise InputError(f"n_ff {n_ff} is not divisible by 2^{cube.dim} = {cube.n_vertices} vertex groups")
    g = n_ff // cube.n_vertices
    score = np.zeros((cube.n_vertices, n_ff))
    for v in range(cube.n_vertices):
        rows = act[vertex == v]
        if len(rows):
            score[v] = np.abs(rows).mean(axis=0)
    pref = score / np.maximum(score.sum(axis=0, keepdims=True), 1e-30)
    order = np.argsort(-pref, axis=None, kind="stable")  # flat (v, j) pairs, most preferred first
    owner = np.full(n_ff, -1)
    room = np.full(cube.n_vertices, g)
    for v, j in zip(*np.unravel_index(order, pref.shape)):
        if owner[j] < 0 and room[v]:
            owner[j] = v
            room[v] -= 1
    return np.concatenate([np.flatnonzero(owner == v) for v in range(cube.n_vertices)])


@dataclass
class Calibration:
    dim: int
    group_size: int
    layers: list[LayerRouter]
    n_tokens: int
    text_sha256: str
    method: str = "pca"
    radius: int | None = None  # the radius a learned router was fitted for
    compensation: np.ndarray | None = None  # (L, d, V, E): radius r, vertex v -> mean output of the skipped groups


def compensation(x: np.ndarray, act: np.ndarray, down_weight: np.ndarray, lr_: LayerRouter, cube: Hypercube) -> np.ndarray:
    """(d, V, E): for radius r < d and vertex v, sum over the neurons outside the ball of their mean
    output on the calibration tokens routed to v (FLAP's bias compensation, per vertex); the engine
    adds row [r, v] to a routed FFN's output. An empty vertex takes the all-token means."""
    V, F = cube.n_vertices, act.shape[1]
    g = F // V
    v = route(x, lr_.weight, lr_.bias)
    act = np.asarray(act, np.float64)
    means = np.stack([act[v == u].mean(axis=0) if (v == u).any() else act.mean(axis=0) for u in range(V)])  # (V, F)
    wd = np.asarray(down_weight, np.float64)[lr_.perm]          # (F, E) in file order
    m = means[:, lr_.perm].reshape(V, V, g)                     # [token vertex, group, neuron in group]
    per_group = np.einsum("vuj,uje->vue", m, wd.reshape(V, g, -1))  # (V, V, E) mean output of group u at vertex v
    dist = cube.distances()
    return np.stack([np.einsum("vu,vue->ve", (dist > r).astype(np.float64), per_group) for r in range(cube.dim)]
                    ).astype(np.float32)


def _pca_layer(x: np.ndarray, act: np.ndarray, down_weight: np.ndarray, cube: Hypercube, radius: int) -> LayerRouter:
    w, b = fit_router(x, cube.dim)
    v = route(x, w, b)
    return LayerRouter(w, b, assign_neurons(v, act, cube), np.bincount(v, minlength=cube.n_vertices))


def _learned_layer(x: np.ndarray, act: np.ndarray, down_weight: np.ndarray, cube: Hypercube, radius: int) -> LayerRouter:
    return learn_router(x, contributions(act, down_weight), cube, radius)


# --router: how each layer's hyperplanes and vertex groups are fitted (help text, fit)
ROUTERS = {
    "learned": ("trained on the dense model's own FFN activations for --router-radius (module hypercube.learn)",
                _learned_layer),
    "pca": ("top principal directions of the FFN inputs, median thresholds, groups by mean |activation|", _pca_layer),
}


def default_radius(dim: int) -> int:
    """The radius a learned router is fitted for unless told: 1, the ball of a vertex and its
    neighbours (d + 1 of 2^d groups), or 0 on Q_1 where radius 1 is the dense FFN."""
    return min(1, dim - 1)


def calibrate(model, tokens: np.ndarray, dim: int, text_sha256: str = "", method: str = "learned",
              radius: int | None = None) -> Calibration:
    """Two passes over `tokens` with a transformers GPT-2 (FFN inputs, then activations), then
    each layer's router and vertex groups by `method` (a key of ROUTERS)."""
    cube = Hypercube(dim)
    if method not in ROUTERS:
        raise InputError(f"--router {method!r}; expected one of {', '.join(ROUTERS)}")
    radius = default_radius(dim) if radius is None else radius
    if not 0 <= radius < dim:
        raise InputError(f"--router-radius {radius}; expected 0..{dim - 1} (radius {dim} is the dense FFN)")
    blocks = model.transformer.h
    n_ff = blocks[0].mlp.c_fc.weight.shape[1]
    if n_ff % cube.n_vertices:
        raise InputError(f"n_ff {n_ff} is not divisible by 2^{dim} = {cube.n_vertices}; choose a smaller --hypercube-dim")
    inputs = capture(model, tokens, lambda blk: blk.mlp, pre=True)
    acts = capture(model, tokens, lambda blk: blk.mlp.act, pre=False)
    fit = ROUTERS[method][1]
    downs = [blk.mlp.c_proj.weight.detach().float().numpy() for blk in blocks]
    layers = [fit(x, a, wd, cube, radius) for x, a, wd in zip(inputs, acts, downs)]
    comp = np.stack([compensation(x, a, wd, lr_, cube) for x, a, wd, lr_ in zip(inputs, acts, downs, layers)])
    return Calibration(dim, n_ff // cube.n_vertices, layers, int(len(tokens)), text_sha256, method,
                       radius if method != "pca" else None, comp)


def capture(model, tokens: np.ndarray, module_of, *, pre: bool) -> list[np.ndarray]:
    """Per block, the (N, width) input (pre=True) or output of `module_of(block)`."""
    import torch

    got: list[list[np.ndarray]] = [[] for _ in model.transformer.h]
    hooks = []
    for i, blk in enumerate(model.transformer.h):
        def keep(_mod, args, out=None, i=i):
            t = args[0] if pre else out
            got[i].append(t.detach().float().reshape(-1, t.shape[-1]).numpy())
        m = module_of(blk)
        hooks.append(m.register_forward_pre_hook(keep) if pre else m.register_forward_hook(keep))
    try:
        with torch.no_grad():
            for window in windows(tokens, model.config.n_positions):
                model(torch.from_numpy(window[None].astype(np.int64)))
    finally:
        for h in hooks:
            h.remove()
    return [np.concatenate(g) for g in got]


def windows(tokens: np.ndarray, ctx: int) -> list[np.ndarray]:
    return [tokens[i : i + ctx] for i in range(0, len(tokens), ctx) if len(tokens[i : i + ctx])]


def calibration_tokens(path: Path, n_tokens: int, n_vocab: int) -> tuple[np.ndarray, str]:
    """The first `n_tokens` GPT-2 tokens of a text file, and the file's sha256."""
    if not path.is_file():
        raise InputError(f"{path}: no such calibration text; expected a UTF-8 text file")
    raw = path.read_bytes()
    ids = tokenize_file(path)[:-1][:n_tokens]  # drop the <|endoftext|> tokenize_file appends
    if len(ids) < 64:
        raise InputError(f"{path}: only {len(ids)} tokens of calibration text; expected at least 64 (more is better: "
                         "a few thousand)")
    if int(ids.max()) >= n_vocab:
        raise InputError(f"{path}: token id {int(ids.max())} is outside the model's vocabulary of {n_vocab}")
    return ids.astype(np.int64), hashlib.sha256(raw).hexdigest()
