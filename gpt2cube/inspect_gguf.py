"""`inspect`: what a GGUF file holds, read with gguf-py's reader (memory-mapped, no tensor data
is read). Long metadata arrays are summarised (length, element type, first few values)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader, GGUFValueType

from .gguf_file import quant_type_of, read_gguf
from .hypercube.metadata import has_hypercube, read_hypercube
from .kernels import QUANT_TYPES

ARRAY_PREVIEW = 4


def _summarise(field) -> Any:
    value = field.contents()
    if field.types and field.types[0] == GGUFValueType.ARRAY and len(value) > ARRAY_PREVIEW:
        sub = field.types[-1].name.lower()
        return {"array": sub, "length": len(value), "first": value[:ARRAY_PREVIEW]}
    return value


def ternary_stats(tensor) -> dict[str, float]:
    """Decoded from the file itself: fraction of zero weights and the (mean) block scale."""
    qt = quant_type_of(tensor)
    raw = np.asarray(tensor.data).reshape(-1, qt.type_size)
    codes = qt._unpack_codes(raw[:, :-2])
    scales = raw[:, -2:].copy().view(np.float16).astype(np.float32)
    return {"sparsity": float((codes == 1).mean()), "scale": float(scales.mean()),
            "distinct_scales": int(np.unique(scales).size)}


def inspect_gguf(path: Path) -> dict[str, Any]:
    reader = read_gguf(path)
    ternary = {q.ggml_type for q in QUANT_TYPES.values() if q.is_ternary}
    metadata = {name: _summarise(f) for name, f in reader.fields.items() if not name.startswith("GGUF.")}
    arch = metadata.get("general.architecture", "?")
    tensors = [
        {
            "name": t.name,
            "type": t.tensor_type.name,
            "shape": [int(d) for d in t.shape],  # ggml order: ne0 (row length) first
            "bytes": int(t.n_bytes),
            "elements": int(t.n_elements),
            **(ternary_stats(t) if t.tensor_type in ternary else {}),
        }
        for t in reader.tensors
    ]
    hypercube = _hypercube_summary(reader, path)
    n_bytes = sum(t["bytes"] for t in tensors)
    n_elems = sum(t["elements"] for t in tensors)
    return {
        "file": str(path),
        "file_bytes": path.stat().st_size,
        "architecture": arch,
        "hparams": {k[len(arch) + 1:]: v for k, v in metadata.items() if k.startswith(f"{arch}.")},
        "tensor_bytes": n_bytes,
        "parameters": n_elems,
        "bits_per_weight": round(8 * n_bytes / n_elems, 4) if n_elems else 0.0,
        "tensors": tensors,
        "metadata": metadata,
        **({"hypercube": hypercube} if hypercube else {}),
    }


def _hypercube_summary(reader: GGUFReader, path: Path) -> dict[str, Any] | None:
    if not has_hypercube(reader):
        return None
    info = read_hypercube(reader, path)  # validates: a corrupt hypercube is an error, not a summary
    counts = info.vertex_counts
    return {
        "schema_version": info.version, "router": info.router_method, "router_radius": info.router_radius,
        "compensation": info.compensation is not None,
        "dim": info.dim, "vertices": info.n_vertices, "group_size": info.group_size,
        "layers": int(len(info.router_weight)), "calibration_tokens": info.calib_tokens,
        "calibration_sha256": info.calib_sha256,
        "calibration_tokens_per_vertex": {"min": int(counts.min()), "max": int(counts.max())},
        "concepts": ({"layer": info.concepts.layer, "names": info.concepts.names,
                      "vertices": info.concepts.vertices[:, info.concepts.layer].tolist()} if info.concepts else None),
    }


def format_report(info: dict[str, Any]) -> str:
    lines = [
        f"file: {info['file']} ({info['file_bytes'] / 1e6:.2f} MB)",
        f"architecture: {info['architecture']}",
        "hyper-parameters: " + ", ".join(f"{k}={v}" for k, v in info["hparams"].items()),
        f"parameters: {info['parameters']:,}  tensor bytes: {info['tensor_bytes']:,}  "
        f"bits per weight: {info['bits_per_weight']:.3f}",
        "",
        f"{'tensor':<28} {'type':<6} {'shape':>16} {'bytes':>12}  notes",
    ]
    for t in info["tensors"]:
        shape = "x".join(map(str, t["shape"]))
        notes = f"  sparsity {t['sparsity']:.3f}, scale {t['scale']:.5g}" if "sparsity" in t else ""
        lines.append(f"{t['name']:<28} {t['type']:<6} {shape:>16} {t['bytes']:>12,}{notes}")
    hc = info.get("hypercube")
    if hc:
        bal = hc["calibration_tokens_per_vertex"]
        lines += ["", f"hypercube: Q_{hc['dim']} ({hc['vertices']} vertices), {hc['layers']} layers x {hc['vertices']} FFN groups "
                      f"of {hc['group_size']} neurons; {hc['router']} routers"
                      + (f" (fitted for radius {hc['router_radius']})" if hc["router_radius"] is not None else "")
                      + f" calibrated on {hc['calibration_tokens']} tokens ({bal['min']}..{bal['max']} per vertex); "
                      + ("skipped groups' mean output added back" if hc["compensation"] else "no compensation")
                      + f"; schema {hc['schema_version']}"]
        if hc["concepts"]:
            c = hc["concepts"]
            lines.append(f"  concepts at layer {c['layer']}: " + ", ".join(
                f"{n} -> {v:0{hc['dim']}b}" for n, v in zip(c["names"], c["vertices"])))
    lines += ["", "metadata:"]
    for k, v in info["metadata"].items():
        lines.append(f"  {k} = {v}")
    return "\n".join(lines)
