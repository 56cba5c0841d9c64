"""The hypercube as GGUF metadata: written by `convert`, read (and validated) by `inspect`,
`concepts` and the tests. Keys and array shapes are named once, in gpt2cube/constants.py.
The C++ engine (cpp/gpt2cube_engine.cpp) validates the same keys on its own."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGUFReader, GGUFValueType, GGUFWriter

from .. import constants as K
from ..errors import GGUFFormatError, InputError
from ..gguf_file import read_gguf
from .calibrate import Calibration
from .concepts import ConceptMap
from .topology import Hypercube


def write_hypercube(writer: GGUFWriter, cal: Calibration, concepts: ConceptMap | None) -> None:
    cube = Hypercube(cal.dim)
    u32, f32 = GGUFValueType.UINT32, GGUFValueType.FLOAT32

    def arr(key: str, values: np.ndarray, sub: GGUFValueType) -> None:
        writer.add_key_value(key, np.asarray(values).ravel().tolist(), GGUFValueType.ARRAY, sub_type=sub)

    writer.add_uint32(K.KEY_HC_VERSION, K.HC_SCHEMA_VERSION)
    writer.add_uint32(K.KEY_HC_DIM, cal.dim)
    writer.add_uint32(K.KEY_HC_VERTEX_COUNT, cube.n_vertices)
    writer.add_uint32(K.KEY_HC_GROUP_SIZE, cal.group_size)
    writer.add_uint32(K.KEY_HC_LAYER_COUNT, len(cal.layers))
    arr(K.KEY_HC_VERTEX_IDS, cube.vertex_ids(), u32)
    arr(K.KEY_HC_ROUTING_TABLE, cube.routing_table(), u32)
    arr(K.KEY_HC_ROUTER_WEIGHT, np.stack([lr.weight for lr in cal.layers]), f32)
    arr(K.KEY_HC_ROUTER_BIAS, np.stack([lr.bias for lr in cal.layers]), f32)
    writer.add_string(K.KEY_HC_ROUTER_METHOD, cal.method)
    if cal.radius is not None:
        writer.add_uint32(K.KEY_HC_ROUTER_RADIUS, cal.radius)
    if cal.compensation is not None:
        arr(K.KEY_HC_COMPENSATION, cal.compensation, f32)
    arr(K.KEY_HC_PERMUTATION, np.stack([lr.perm for lr in cal.layers]), u32)
    arr(K.KEY_HC_CALIB_COUNTS, np.stack([lr.counts for lr in cal.layers]), u32)
    writer.add_uint32(K.KEY_HC_CALIB_TOKENS, cal.n_tokens)
    writer.add_string(K.KEY_HC_CALIB_SHA256, cal.text_sha256)
    if concepts is not None:
        writer.add_uint32(K.KEY_HC_CONCEPT_LAYER, concepts.layer)
        writer.add_array(K.KEY_HC_CONCEPT_NAMES, concepts.names)
        arr(K.KEY_HC_CONCEPT_VERTICES, concepts.vertices, u32)
        arr(K.KEY_HC_CONCEPT_CODES, concepts.codes, f32)


@dataclass
class HypercubeInfo:
    """What a file's hypercube metadata holds, checked for consistency."""

    dim: int
    group_size: int
    routing_table: np.ndarray    # (V, d)
    router_weight: np.ndarray    # (L, d, E)
    router_bias: np.ndarray      # (L, d)
    permutation: np.ndarray      # (L, F)
    vertex_counts: np.ndarray    # (L, V)
    calib_tokens: int
    calib_sha256: str
    concepts: ConceptMap | None
    router_method: str = "pca"        # files written before the key existed were all PCA
    router_radius: int | None = None
    compensation: np.ndarray | None = None  # (L, d, V, E); None: nothing added (version 1 files)
    version: int = 1

    @property
    def n_vertices(self) -> int:
        return 1 << self.dim


def has_hypercube(reader: GGUFReader) -> bool:
    return K.KEY_HC_DIM in reader.fields


def read_hypercube(reader: GGUFReader, path: Path) -> HypercubeInfo:
    """Every length and range is checked against the model's shape; a mismatch names the key."""
    where = f"{path}: hypercube metadata"

    def get(key: str, required: bool = True):
        f = reader.fields.get(key)
        if f is None:
            if required:
                raise GGUFFormatError(f"{where}: key {key} is missing")
            return None
        return f.contents()

    def integer(key: str) -> int:
        v = get(key)
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise GGUFFormatError(f"{where}: {key} = {v!r}; expected an integer")
        return int(v)

    def array(key: str, shape: tuple[int, ...], dtype, required: bool = True) -> np.ndarray | None:
        v = get(key, required)
        if v is None:
            return None
        try:
            if isinstance(v, (str, bytes)) or any(isinstance(x, (str, bytes)) for x in v):
                raise TypeError("text")
            a = np.asarray(v, dtype=dtype)
        except (TypeError, ValueError):
            raise GGUFFormatError(f"{where}: {key} is not an array of numbers") from None
        if a.size != int(np.prod(shape)):
            raise GGUFFormatError(f"{where}: {key} has {a.size} values; expected {int(np.prod(shape))} "
                                  f"(shape {'x'.join(map(str, shape))})")
        return a.reshape(shape)

    arch = get("general.architecture")
    n_layer, n_embd, n_ff = (integer(f"{arch}.{k}") for k in ("block_count", "embedding_length", "feed_forward_length"))
    version = integer(K.KEY_HC_VERSION) if get(K.KEY_HC_VERSION, required=False) is not None else 1
    if not 1 <= version <= K.HC_SCHEMA_VERSION:
        raise GGUFFormatError(f"{where}: {K.KEY_HC_VERSION} = {version}; this gpt2cube reads versions 1..{K.HC_SCHEMA_VERSION} "
                              "(a newer gpt2cube wrote the file)")
    dim = integer(K.KEY_HC_DIM)
    if not 1 <= dim <= 10:
        raise GGUFFormatError(f"{where}: {K.KEY_HC_DIM} = {dim}; expected 1..10")
    cube = Hypercube(dim)
    for key, want in ((K.KEY_HC_VERTEX_COUNT, cube.n_vertices), (K.KEY_HC_LAYER_COUNT, n_layer),
                      (K.KEY_HC_GROUP_SIZE, n_ff // cube.n_vertices)):
        if integer(key) != want:
            raise GGUFFormatError(f"{where}: {key} = {get(key)}; expected {want} (dim {dim}, {n_layer} layers, n_ff {n_ff})")
    if n_ff % cube.n_vertices:
        raise GGUFFormatError(f"{where}: n_ff {n_ff} is not divisible by 2^{dim}")
    table = array(K.KEY_HC_ROUTING_TABLE, (cube.n_vertices, dim), np.int64)
    if not np.array_equal(table, cube.routing_table()):
        raise GGUFFormatError(f"{where}: {K.KEY_HC_ROUTING_TABLE} is not Q_{dim}'s bit-transition table")
    w = array(K.KEY_HC_ROUTER_WEIGHT, (n_layer, dim, n_embd), np.float32)
    b = array(K.KEY_HC_ROUTER_BIAS, (n_layer, dim), np.float32)
    if not (np.isfinite(w).all() and np.isfinite(b).all()):
        raise GGUFFormatError(f"{where}: router weights or biases hold NaN or infinity")
    perm = array(K.KEY_HC_PERMUTATION, (n_layer, n_ff), np.int64)
    for layer, p in enumerate(perm):
        if not np.array_equal(np.sort(p), np.arange(n_ff)):
            raise GGUFFormatError(f"{where}: {K.KEY_HC_PERMUTATION} of layer {layer} is not a permutation of 0..{n_ff - 1}")
    counts = array(K.KEY_HC_CALIB_COUNTS, (n_layer, cube.n_vertices), np.int64)
    method = get(K.KEY_HC_ROUTER_METHOD, required=False)
    if method is not None and not isinstance(method, str):
        raise GGUFFormatError(f"{where}: {K.KEY_HC_ROUTER_METHOD} = {method!r}; expected a string")
    radius = None
    if get(K.KEY_HC_ROUTER_RADIUS, required=False) is not None:
        radius = integer(K.KEY_HC_ROUTER_RADIUS)
        if not 0 <= radius <= dim:
            raise GGUFFormatError(f"{where}: {K.KEY_HC_ROUTER_RADIUS} = {radius}; expected 0..{dim}")
    comp = array(K.KEY_HC_COMPENSATION, (n_layer, dim, cube.n_vertices, n_embd), np.float32, required=False)
    if comp is not None and not np.isfinite(comp).all():
        raise GGUFFormatError(f"{where}: {K.KEY_HC_COMPENSATION} holds NaN or infinity")
    concepts = None
    names = get(K.KEY_HC_CONCEPT_NAMES, required=False)
    if names is not None:
        c = len(names)
        if isinstance(names, (str, bytes)) or not all(isinstance(n, str) for n in names):
            raise GGUFFormatError(f"{where}: {K.KEY_HC_CONCEPT_NAMES} is not an array of strings")
        layer = integer(K.KEY_HC_CONCEPT_LAYER)
        if not 0 <= layer < n_layer:
            raise GGUFFormatError(f"{where}: {K.KEY_HC_CONCEPT_LAYER} = {layer}; expected 0..{n_layer - 1}")
        verts = array(K.KEY_HC_CONCEPT_VERTICES, (c, n_layer), np.int64)
        if verts.min(initial=0) < 0 or verts.max(initial=0) >= cube.n_vertices:
            raise GGUFFormatError(f"{where}: {K.KEY_HC_CONCEPT_VERTICES} holds a vertex outside 0..{cube.n_vertices - 1}")
        codes = array(K.KEY_HC_CONCEPT_CODES, (c, n_layer, dim), np.float32)
        concepts = ConceptMap(list(names), verts.astype(np.uint32), codes, layer)
    return HypercubeInfo(dim, n_ff // cube.n_vertices, table, w, b, perm, counts,
                         integer(K.KEY_HC_CALIB_TOKENS), str(get(K.KEY_HC_CALIB_SHA256)), concepts,
                         method or "pca", radius, comp, version)


def read_routing_file(path: Path, n_layer: int, n_embd: int, n_ff: int, option: str) -> HypercubeInfo:
    """A hypercube file's metadata for reuse with another checkpoint (`convert --hypercube-from`,
    `finetune --routed`), checked against that checkpoint's shape; errors name `option`."""
    if not Path(path).is_file():
        raise InputError(f"{option} {path}: no such file; expected a GGUF written by convert --hypercube-dim")
    reader = read_gguf(Path(path))
    if not has_hypercube(reader):
        raise InputError(f"{option} {path}: the file has no hypercube metadata; expected one written by "
                         "convert --hypercube-dim")
    info = read_hypercube(reader, Path(path))
    got = (info.router_weight.shape[0], info.router_weight.shape[2], info.permutation.shape[1])
    if got != (n_layer, n_embd, n_ff):
        raise InputError(f"{option} {path}: its hypercube is for {got[0]} layers x n_embd {got[1]} x n_ff {got[2]}; "
                         f"the checkpoint is {n_layer} x {n_embd} x {n_ff}")
    return info
