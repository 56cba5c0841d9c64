"""`convert`: HF checkpoint directory -> GGUF file, streamed tensor by tensor.

The header (metadata and tensor table) is computed from shapes alone, so each tensor is read,
transposed, encoded and written before the next one is touched: peak memory is about the
largest tensor, not the model. Output goes to a temporary file beside the target and is renamed
into place only when complete; on any failure the temporary file is removed. The same input and
options give a byte-identical file (no timestamps; metadata in a fixed order).
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
from gguf import GGUFWriter

from .. import __version__
from .. import constants as K
from ..atomic import temp_beside
from ..errors import Gpt2cubeError, OutputError, ShapeMismatch
from ..kernels import get_quant_type
from .arch import Architecture, arch_for
from .checkpoint import Checkpoint, open_checkpoint
from .plan import PlannedTensor, Recipe, plan_types
from .tokenizer import load_vocab
from .writer import ArrayPackingWriter


class PreparedExtension(Protocol):
    def permute(self, gguf_name: str, data: np.ndarray) -> np.ndarray: ...
    def write_metadata(self, writer: GGUFWriter) -> None: ...


class PreparedEncoding(Protocol):
    """Tensors encoded before writing (calib.sequential's GPTQ): `encoded(name)` gives a tensor's
    bytes and statistics, or None for the converter to encode it as usual."""

    def encoded(self, gguf_name: str) -> tuple[np.ndarray, dict] | None: ...
    def write_metadata(self, writer: GGUFWriter) -> None: ...


class ConvertExtension(Protocol):
    """Something computed from the checkpoint and stored in the file (the hypercube): `prepare`
    checks its options against the model and the planned types, then does its work."""

    def prepare(self, ckpt: Checkpoint, arch: Architecture, planned: list[PlannedTensor],
                log: Callable[[str], None]) -> PreparedExtension: ...


@dataclass
class ConvertResult:
    output: Path
    out_type: str
    bytes: int
    seconds: float
    tensor_types: dict[str, int]
    warnings: list[str] = field(default_factory=list)
    ternary: dict[str, dict] = field(default_factory=dict)  # tensor -> sparsity, scale

    def as_json(self) -> dict:
        return {
            "output": str(self.output),
            "type": self.out_type,
            "bytes": self.bytes,
            "seconds": round(self.seconds, 3),
            "tensor_types": self.tensor_types,
            "warnings": self.warnings,
            "ternary": self.ternary,
        }


def check_output(out: Path, force: bool, inputs: list[Path]) -> None:
    if out.is_dir():
        raise OutputError(f"{out}: is a directory; expected a file path for the GGUF output")
    if out.exists() and not force:
        raise OutputError(f"{out}: already exists; pass --force to overwrite it")
    parent = out.parent
    if not parent.exists():
        raise OutputError(f"{out}: directory {parent} does not exist; create it first")
    if not parent.is_dir():
        raise OutputError(f"{out}: {parent} is not a directory")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"{out}: directory {parent} is not writable")
    resolved = out.resolve()
    if any(resolved == p.resolve() for p in inputs):
        raise OutputError(f"{out}: is one of the input files; the input is never overwritten")


def sha256_file(path: Path, chunk: int = 1 << 23) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def convert(
    src: Path,
    out: Path,
    recipe: Recipe | str = "f16",
    *,
    force: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    hypercube: ConvertExtension | None = None,
    imatrix=None,
    method: ConvertExtension | None = None,
) -> ConvertResult:
    """`hypercube` (hypercube.build.HypercubeOptions, or any ConvertExtension) is prepared on the
    checkpoint before anything is written: it may reorder tensors and adds metadata. `imatrix`
    (calib.imatrix_file.Imatrix) weights the quantization of every linear tensor whose type
    takes importance weights (q4_0, q4_k, q6_k), as llama-quantize --imatrix does; it is checked
    against the model (names, columns, values) before anything is written. `method` (e.g.
    calib.sequential.GptqConvert) is prepared like `hypercube` and encodes the tensors it takes
    (PreparedEncoding) before the file is opened."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    t0 = time.perf_counter()
    ckpt = open_checkpoint(src)
    check_output(out, force, ckpt.files + [src / "config.json"])
    arch = arch_for(ckpt)
    specs = arch.tensor_specs()
    recipe = Recipe(linear=recipe) if isinstance(recipe, str) else recipe
    planned, plan_warnings = plan_types(specs, recipe)
    vocab, vocab_warnings = load_vocab(src, ckpt.config, arch.n_vocab)
    warnings = arch.warnings + vocab_warnings + plan_warnings
    for w in warnings:
        log(f"warning: {w}")
    cube = hypercube.prepare(ckpt, arch, planned, log) if hypercube is not None else None
    importance = _importance_for(imatrix, planned) if imatrix is not None else {}
    # the hypercube's neuron order is decided first (on the unquantized model); a method then
    # quantizes the reordered model, so what it encodes is already in the file's order
    pre = None
    if method is not None:
        pre = method.prepare(ckpt, arch, planned, log, reorder=cube) if cube is not None else \
            method.prepare(ckpt, arch, planned, log)

    writer = ArrayPackingWriter(path=None, arch=arch.gguf_arch)
    _write_metadata(writer, ckpt, arch, vocab, planned, recipe)
    if cube is not None:
        cube.write_metadata(writer)
    if pre is not None:
        pre.write_metadata(writer)
    if imatrix is not None:  # the keys llama-quantize --imatrix writes
        writer.add_string("quantize.imatrix.file", str(imatrix.path or ""))
        if imatrix.datasets:
            writer.add_string("quantize.imatrix.dataset", imatrix.datasets[-1])
        writer.add_int32("quantize.imatrix.entries_count", len(importance))
        writer.add_int32("quantize.imatrix.chunks_count", int(imatrix.chunk_count))
    for p in planned:
        writer.add_tensor_info(p.spec.gguf_name, p.spec.shape, np.dtype(np.float32), p.nbytes, raw_dtype=p.qtype.ggml_type)

    fd, tmp_name = temp_beside(out)
    tmp = Path(tmp_name)
    try:
        os.close(fd)
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        ternary = _write_tensors(writer, arch, planned, recipe, progress, cube.permute if cube else None, importance,
                                 pre.encoded if pre is not None else None)
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    counts = Counter(p.qtype.name for p in planned)
    return ConvertResult(out, recipe.linear, out.stat().st_size, time.perf_counter() - t0,
                         dict(sorted(counts.items())), warnings, ternary)


def _write_metadata(writer: GGUFWriter, ckpt: Checkpoint, arch, vocab, planned: list[PlannedTensor],
                    recipe: Recipe) -> None:
    writer.add_name(ckpt.path.resolve().name)
    writer.add_file_type(int(get_quant_type(recipe.linear).file_type))
    if any(p.qtype.block_size > 1 for p in planned):
        writer.add_quantization_version(2)  # GGML_QNT_VERSION
    arch.write_hparams(writer)
    vocab.write(writer)
    writer.add_string(K.KEY_VERSION, __version__)
    writer.add_string(K.KEY_OUTPUT_TYPE, recipe.linear)
    writer.add_string(K.KEY_EMBED_TYPE, recipe.embed_type)
    if recipe.patterns:
        writer.add_array(K.KEY_RECIPE, [f"{p}={t}" for p, t in recipe.patterns])
    if any(p.qtype.is_ternary for p in planned):
        writer.add_string(K.KEY_TERNARY_SCALE, recipe.ternary_scale)
    writer.add_array(K.KEY_SOURCE_FILES, [f.name for f in ckpt.files])
    writer.add_array(K.KEY_SOURCE_SHA256, [sha256_file(f) for f in ckpt.files])
    writer.add_array(K.KEY_TENSOR_NAMES, [p.spec.gguf_name for p in planned])
    writer.add_array(K.KEY_TENSOR_TYPES, [p.qtype.name for p in planned])


def _importance_for(imatrix, planned: list[PlannedTensor]) -> dict[str, np.ndarray]:
    """GGUF name -> checked importance for each linear tensor whose type takes it; an entry for a
    tensor this model does not have is an error too (a matrix made for another model)."""
    linear = {p.spec.gguf_name: p for p in planned if p.spec.role == "linear"}
    extra = sorted(set(imatrix.sums) - set(linear))
    if extra:
        raise ShapeMismatch(f"{imatrix.where}: entry {extra[0]} ({len(extra)} in all) names no linear tensor of this "
                            f"model; expected entries for {next(iter(linear), 'none')} ... (made for another model?)")
    return {name: imatrix.checked(name, p.spec.shape[-1]) for name, p in linear.items() if p.qtype.takes_importance}


def _write_tensors(writer: GGUFWriter, arch: Architecture, planned: list[PlannedTensor], recipe: Recipe,
                   progress: bool, transform: Callable[[str, np.ndarray], np.ndarray] | None = None,
                   importance: dict[str, np.ndarray] | None = None,
                   encoded_by: Callable[[str], tuple[np.ndarray, dict] | None] | None = None) -> dict[str, dict]:
    """Streams every tensor; returns the statistics the encoders report (ternary sparsity).
    `transform(gguf_name, array)` may reorder a tensor (in GGUF layout) before it is encoded (its
    importance columns move with it); `encoded_by(gguf_name)` may hand over a tensor's bytes."""
    importance = importance or {}
    from tqdm import tqdm

    stats: dict[str, dict] = {}
    total = sum(p.nbytes for p in planned)
    with tqdm(total=total, unit="B", unit_scale=True, desc="convert", file=sys.stderr, disable=not progress) as bar:
        for p in planned:
            done = encoded_by(p.spec.gguf_name) if encoded_by is not None else None
            if done is not None:
                encoded, info = done
                _check_size(p, encoded)
                writer.write_tensor_data(encoded)
                if p.qtype.is_ternary:
                    stats[p.spec.gguf_name] = info
                bar.update(p.nbytes)
                continue
            data = arch.load(p.spec)
            if p.spec.transpose:
                data = data.T
            if transform is not None:
                data = transform(p.spec.gguf_name, data)
            if data.shape != p.spec.shape:
                raise ShapeMismatch(f"{arch.ckpt.path}: tensor {p.spec.src_name} has shape {list(data.shape)} after loading; "
                                    f"expected {list(p.spec.shape)}")
            imp = importance.get(p.spec.gguf_name)
            if imp is not None and transform is not None:
                imp = transform(p.spec.gguf_name, np.ascontiguousarray(np.broadcast_to(imp, p.spec.shape)))[0]
            extra = {"importance": imp} if imp is not None else {}
            encoded, info = p.qtype.encode(np.ascontiguousarray(data, dtype=np.float32), recipe.ternary_scale, **extra)
            _check_size(p, encoded)
            writer.write_tensor_data(encoded)
            if info:
                stats[p.spec.gguf_name] = info
            bar.update(p.nbytes)
            del data, encoded
    return stats


def _check_size(p: PlannedTensor, encoded: np.ndarray) -> None:
    if encoded.nbytes != p.nbytes:  # the header already promised p.nbytes: never write a shifted file
        raise Gpt2cubeError(f"internal error: {p.qtype.name} encoded {p.spec.gguf_name} {list(p.spec.shape)} "
                            f"into {encoded.nbytes} bytes; the GGUF header promised {p.nbytes}; no file written")
