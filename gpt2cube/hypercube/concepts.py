"""The concept map: named texts embedded with the model's own hidden states and placed on the cube.

A concept's embedding at layer l is the mean, over its tokens, of that layer's FFN input (after
ffn_norm); the layer's router turns it into margins m = W x + b (d,) and a vertex (bits m > 0).
The map keeps, per concept and layer, the vertex and the margins; the nearest concepts to a text
are those with the smallest Hamming distance to its vertex, ties broken by the Euclidean distance
between margins.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from .calibrate import capture
from .topology import popcount, vertex_of


@dataclass
class ConceptMap:
    names: list[str]
    vertices: np.ndarray  # (C, L) uint32
    codes: np.ndarray     # (C, L, d) float32
    layer: int            # the layer the map is read at by default


def read_concepts(path: Path) -> list[tuple[str, str]]:
    """`name: text` per line (a line without ':' is its own name); blank lines and #-comments skipped."""
    if not path.is_file():
        raise InputError(f"{path}: no such concepts file; expected lines of 'name: text'")
    out: list[tuple[str, str]] = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, text = line.partition(":")
        name, text = name.strip(), (text.strip() if sep else name.strip())
        if not name or not text:
            raise InputError(f"{path}:{n}: {line!r}; expected 'name: text' with both parts non-empty")
        if name in {c[0] for c in out}:
            raise InputError(f"{path}:{n}: concept {name!r} is named twice")
        out.append((name, text))
    if not out:
        raise InputError(f"{path}: holds no concepts; expected lines of 'name: text'")
    return out


def text_margins(ffn_inputs: list[np.ndarray], weights: list[np.ndarray], biases: list[np.ndarray]) -> np.ndarray:
    """Per-layer FFN inputs of one text [(T, E)] -> router margins of its mean (L, d)."""
    return np.stack([w @ x.mean(axis=0) + b for x, w, b in zip(ffn_inputs, weights, biases)]).astype(np.float32)


def build_concept_map(model, tokenize, concepts: list[tuple[str, str]], weights, biases, layer: int) -> ConceptMap:
    codes = []
    for name, text in concepts:
        ids = np.asarray(tokenize(text), dtype=np.int64)
        if not len(ids):
            raise InputError(f"concept {name!r}: its text tokenizes to nothing")
        codes.append(text_margins(capture(model, ids, lambda blk: blk.mlp, pre=True), weights, biases))
    codes_arr = np.stack(codes)
    return ConceptMap([c[0] for c in concepts], vertex_of(codes_arr).astype(np.uint32), codes_arr, layer)


def nearest(cmap: ConceptMap, margins: np.ndarray, layer: int, k: int = 3) -> list[tuple[str, int, float]]:
    """The k concepts nearest to a text's margins (d,) at `layer`: (name, hamming, margin distance)."""
    v = int(vertex_of(margins))
    ham = popcount(np.bitwise_xor(cmap.vertices[:, layer].astype(np.uint32), np.uint32(v)))
    dist = np.linalg.norm(cmap.codes[:, layer] - margins[None], axis=1)
    order = np.lexsort((dist, ham))[:k]
    return [(cmap.names[i], int(ham[i]), float(dist[i])) for i in order]
