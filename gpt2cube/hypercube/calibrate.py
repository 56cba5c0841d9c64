"""Router calibration on text, and the neuron permutation that makes vertex groups contiguous.

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
from .topology import Hypercube, vertex_of


@dataclass
class LayerRouter:
    weight: np.ndarray  # (d, E) float32 hyperplane normals
    bias: np.ndarray    # (d,) float32
    perm: np.ndarray    # (F,) old neuron index at each new position
    counts: np.ndarray  # (2^d,) calibration tokens routed to each vertex


def route(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """(N, E) FFN inputs -> (N,) vertex ids."""
    return vertex_of(np.asarray(x, np.float32) @ weight.T + bias)


def fit_router(x: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-`dim` principal directions of x (N, E) and median-balancing thresholds."""
    x = np.asarray(x, dtype=np.float64)
    if dim > x.shape[1]:
        raise InputError(f"hypercube dimension {dim} exceeds the FFN input width {x.shape[1]}")
    centred = x - x.mean(axis=0)
    evals, evecs = np.linalg.eigh(centred.T @ centred / max(1, len(x) - 1))
    w = evecs[:, np.argsort(evals)[::-1][:dim]].T  # (d, E)
    # eigenvectors have arbitrary signs: make each one's largest component positive (determinism)
    w *= np.sign(w[np.arange(dim), np.abs(w).argmax(axis=1)])[:, None]
    b = -np.median(x @ w.T, axis=0)
    return w.astype(np.float32), b.astype(np.float32)


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


def calibrate(model, tokens: np.ndarray, dim: int, text_sha256: str = "") -> Calibration:
    """Two passes over `tokens` with a transformers GPT-2: fit the routers on the FFN inputs,
    then score neurons per vertex and group them."""
    cube = Hypercube(dim)
    blocks = model.transformer.h
    n_ff = blocks[0].mlp.c_fc.weight.shape[1]
    if n_ff % cube.n_vertices:
        raise InputError(f"n_ff {n_ff} is not divisible by 2^{dim} = {cube.n_vertices}; choose a smaller --hypercube-dim")
    inputs = capture(model, tokens, lambda blk: blk.mlp, pre=True)
    routers = [fit_router(x, dim) for x in inputs]
    acts = capture(model, tokens, lambda blk: blk.mlp.act, pre=False)
    layers = []
    for x, a, (w, b) in zip(inputs, acts, routers):
        v = route(x, w, b)
        perm = assign_neurons(v, a, cube)
        layers.append(LayerRouter(w, b, perm, np.bincount(v, minlength=cube.n_vertices)))
    return Calibration(dim, n_ff // cube.n_vertices, layers, int(len(tokens)), text_sha256)


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
