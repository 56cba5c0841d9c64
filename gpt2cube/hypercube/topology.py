"""Q_d, the d-dimensional hypercube: 2^d vertices with d-bit ids, an edge between ids at
Hamming distance 1.

The bit-transition routing table has one row per vertex v: its neighbours v ^ (1 << k) for
k = 0..d-1, so column k says where flipping bit k leads. The ball of radius r around v holds
every vertex within Hamming distance r: sum_{i<=r} C(d, i) of them, the same count for every v,
which is what lets the routed engine give each token a fixed number of FFN groups.
"""

from __future__ import annotations

from math import comb

import numpy as np

MAX_DIM = 10  # 1024 groups; beyond that a group of a GPT-2 FFN is a handful of neurons


def popcount(x: np.ndarray) -> np.ndarray:
    return np.bitwise_count(np.asarray(x, dtype=np.uint32)).astype(np.int64)


def vertex_of(margins: np.ndarray) -> np.ndarray:
    """(..., d) router margins -> (...) vertex ids: bit k is set where margin k > 0."""
    return ((np.asarray(margins) > 0).astype(np.int64) << np.arange(np.shape(margins)[-1])).sum(axis=-1)


class Hypercube:
    def __init__(self, dim: int) -> None:
        if not isinstance(dim, (int, np.integer)) or not 1 <= dim <= MAX_DIM:
            raise ValueError(f"hypercube dimension {dim!r}; expected an integer in 1..{MAX_DIM}")
        self.dim = int(dim)
        self.n_vertices = 1 << self.dim

    def vertex_ids(self) -> np.ndarray:
        return np.arange(self.n_vertices, dtype=np.uint32)

    def hamming(self, a, b) -> np.ndarray:
        return popcount(np.bitwise_xor(np.asarray(a, dtype=np.uint32), np.asarray(b, dtype=np.uint32)))

    def distances(self) -> np.ndarray:
        """(2^d, 2^d) Hamming distance between every pair of vertices."""
        v = self.vertex_ids()
        return self.hamming(v[:, None], v[None, :])

    def routing_table(self) -> np.ndarray:
        """(2^d, d) uint32: entry [v, k] = v ^ (1 << k), the neighbour across bit k."""
        v = self.vertex_ids()[:, None]
        return np.bitwise_xor(v, (np.uint32(1) << np.arange(self.dim, dtype=np.uint32))[None, :])

    def ball_size(self, radius: int) -> int:
        r = min(max(radius, 0), self.dim)
        return sum(comb(self.dim, i) for i in range(r + 1))

    def ball(self, vertex: int, radius: int) -> np.ndarray:
        """Vertices within Hamming distance `radius` of `vertex`, ascending."""
        if not 0 <= vertex < self.n_vertices:
            raise ValueError(f"vertex {vertex}; expected 0..{self.n_vertices - 1}")
        v = self.vertex_ids()
        return v[self.hamming(v, vertex) <= radius]

    def ball_table(self, radius: int) -> np.ndarray:
        """(2^d, ball_size) uint32: row v lists the ball around v, ascending."""
        return np.stack([self.ball(v, radius) for v in range(self.n_vertices)])
