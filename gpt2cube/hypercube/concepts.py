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
    from .calibrate import capture

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


def text_routes(model_path: Path, text: str, k: int = 3) -> dict:
    """Per layer: the vertex a text's mean FFN input routes to and its nearest concepts."""
    from ..converter.inspect import read_gguf
    from ..eval.dequantized import model_from_gguf
    from ..eval.llama_runner import GGUFTokenizer
    from .calibrate import capture
    from .metadata import has_hypercube, read_hypercube

    reader = read_gguf(model_path)
    if not has_hypercube(reader):
        raise InputError(f"{model_path}: has no hypercube metadata; convert with --hypercube-dim D --calib TEXT")
    info = read_hypercube(reader, model_path)
    tok = GGUFTokenizer(model_path)
    try:
        ids = np.asarray(tok.encode(text), dtype=np.int64)
    finally:
        tok.close()
    if not len(ids):
        raise InputError("the text is empty")
    model = model_from_gguf(model_path)
    margins = text_margins(capture(model, ids, lambda blk: blk.mlp, pre=True),
                           list(info.router_weight), list(info.router_bias))
    layers = []
    for layer, m in enumerate(margins):
        entry = {"layer": layer, "vertex": int(vertex_of(m)), "margins": [round(float(x), 4) for x in m]}
        if info.concepts is not None:
            entry["nearest"] = [{"concept": n, "hamming": h, "distance": round(dist, 4)}
                                for n, h, dist in nearest(info.concepts, m, layer, k)]
        layers.append(entry)
    return {"text": text, "tokens": int(len(ids)), "dim": info.dim,
            "concept_layer": info.concepts.layer if info.concepts else None, "layers": layers}
