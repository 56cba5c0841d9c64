"""One layer's hypercube router: d hyperplanes on the FFN input and the neuron permutation that
makes vertex groups contiguous, and the PCA fit (the starting point of the learned one)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from .topology import vertex_of


@dataclass
class LayerRouter:
    weight: np.ndarray  # (d, E) float32 hyperplane normals
    bias: np.ndarray    # (d,) float32
    perm: np.ndarray    # (F,) old neuron index at each new position
    counts: np.ndarray  # (2^d,) calibration tokens routed to each vertex


def group_of(perm: np.ndarray, n_vertices: int) -> np.ndarray:
    """(F,) vertex group of each source neuron: file position p holds neuron perm[p], in group
    p // (F / 2^d)."""
    perm = np.asarray(perm)
    out = np.empty(len(perm), np.int64)
    out[perm] = np.arange(len(perm)) // (len(perm) // n_vertices)
    return out


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


