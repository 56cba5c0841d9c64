"""Which vertex a text routes to in each layer of a hypercube GGUF, and the nearest concepts of
its map (`gpt2cube concepts`): the file's own tokenizer and dequantized weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import InputError
from ..gguf_file import read_gguf
from ..models import model_from_gguf
from ..tokenizers import GGUFTokenizer
from .calibrate import capture
from .concepts import nearest, text_margins
from .metadata import has_hypercube, read_hypercube
from .topology import vertex_of


def text_routes(model_path: Path, text: str, k: int = 3) -> dict:
    """Per layer: the vertex a text's mean FFN input routes to and its nearest concepts."""
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
