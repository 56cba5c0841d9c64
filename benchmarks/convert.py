"""Conversion speed, peak memory, size and weight error on a GPT-2-124M-shaped random checkpoint.

Each conversion is a fresh `gpt2cube convert` process (imports included, as a user runs it);
wall seconds and the child's peak RSS are the median of --repeats runs. Weight RMSE is over
every quantized matrix of the file against the checkpoint, beside the RMSE of ggml's own
reference quantizer (libggml-base from the llama-cpp-python wheel) on the same tensors.
Baselines measured in the same run: copying the checkpoint (the I/O floor); llama.cpp's
quantizer (llama_model_quantize through llama-cpp-python) applied to an f16 GGUF, i.e. the
two-step pipeline "convert to f16, then llama-quantize", whose f16 step is llama.cpp's own
convert_hf_to_gguf.py from the llama.cpp tree llama-cpp-python vendors (its sdist, fetched once from
the package index into the workdir; `--llama-cpp DIR` names another tree, `--llama-cpp none` uses
our f16 file instead, a faster first step and so a stricter baseline).

    python benchmarks/convert.py [--repeats 3] [--workdir DIR] [--llama-cpp DIR|none] [--json out.json]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PY, build_checkpoint, llama_cpp_source, median_of, print_report, run_measured  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# name -> extra CLI arguments
VARIANTS: dict[str, list[str]] = {
    "f32": ["--type", "f32"],
    "f16": ["--type", "f16"],
    "bf16": ["--type", "bf16"],
    "q8_0": ["--type", "q8_0"],
    "q4_0": ["--type", "q4_0"],
    "q4_k": ["--type", "q4_k"],
    "q6_k": ["--type", "q6_k"],
    "tq2_0": ["--type", "tq2_0"],
    "tq1_0": ["--type", "tq1_0"],
    "tq2_0 + q4_k embeddings": ["--type", "tq2_0", "--embed-type", "q4_k"],
    "recipe ternary-smallest": ["--type", "tq1_0", "--recipe", str(ROOT / "recipes/ternary-smallest.toml")],
}  # (recipes/gpt2-124m-63mb.toml needs a pruned checkpoint: benchmarks/pruning.py measures it)
# our type -> llama.cpp ftype for llama_model_quantize (Q4_K -> Q4_K_M, its usual 4-bit K recipe)
LLAMA_FTYPES = {"q8_0": 7, "q4_0": 2, "q4_k": 15, "q6_k": 18, "tq2_0": 37, "tq1_0": 36}

QUANTIZE_CHILD = """
import ctypes, sys, llama_cpp
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = int(sys.argv[3]); p.nthread = {threads}
rc = llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p))
sys.exit(rc)
"""


def weight_rmse(gguf_path: Path, src: Path) -> tuple[float | None, float | None]:
    """(ours, ggml reference) RMSE over the file's quantized matrices; ggml None where it has none."""
    import gguf

    from gpt2cube.converter.arch import arch_for
    from gpt2cube.converter.checkpoint import open_checkpoint
    from gpt2cube.gguf_file import read_gguf
    from gpt2cube.kernels import QUANT_TYPES
    from gpt2cube.kernels.ggml_ref import ggml_quantize

    by_ggml = {q.ggml_type: q for q in QUANT_TYPES.values()}
    ckpt = open_checkpoint(src)
    tensors = {t.name: t for t in read_gguf(gguf_path).tensors}
    se_ours = se_ggml = 0.0
    n = 0
    for spec in arch_for(ckpt).tensor_specs():
        t = tensors[spec.gguf_name]
        qt = by_ggml[t.tensor_type]
        if qt.block_size == 1:
            continue
        w = ckpt.load(spec.src_name)
        w = np.ascontiguousarray(w.T if spec.transpose else w)
        se_ours += float(((qt.dequantize(np.asarray(t.data), spec.shape) - w) ** 2).sum())
        theirs = gguf.quants.dequantize(ggml_quantize(w, qt.ggml_type), qt.ggml_type)
        se_ggml += float(((theirs - w) ** 2).sum())
        n += w.size
    if n == 0:
        return None, None
    return float(np.sqrt(se_ours / n)), float(np.sqrt(se_ggml / n))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/gpt2cube-bench"))
    ap.add_argument("--llama-cpp", default="vendored",
                    help="llama.cpp source tree for its converter; 'vendored' (default): the one llama-cpp-python "
                         "vendors; 'none': our f16 file as the first step")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="V")
    ap.add_argument("--no-rmse", action="store_true", help="skip the weight-error columns")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    src = build_checkpoint(args.workdir)
    weights = src / "model.safetensors"

    def copy_once() -> tuple[float, float]:
        t0 = time.perf_counter()
        shutil.copyfile(weights, args.workdir / "copy.bin")
        return time.perf_counter() - t0, 0.0

    copy_s, _ = median_of(args.repeats, copy_once)
    (args.workdir / "copy.bin").unlink()
    from gpt2cube.inspect_gguf import inspect_gguf

    rows = []
    for name in args.variants:
        out = args.workdir / f"out-{name.replace(' ', '_')}.gguf"
        cmd = [PY, "-m", "gpt2cube.cli", "convert", str(src), "-o", str(out), *VARIANTS[name], "--force", "--quiet"]
        wall, rss = median_of(args.repeats, lambda: run_measured(cmd))
        rows.append({"tool": "gpt2cube", "variant": name, "seconds": round(wall, 2), "peak_rss_mb": round(rss),
                     "file_mb": round(out.stat().st_size / 1e6, 1),
                     "bits_per_weight": round(inspect_gguf(out)["bits_per_weight"], 3),
                     "rmse": None, "rmse_ggml_ref": None, "x_copy_time": round(wall / copy_s, 2), "_out": out})
    f16_in, f16_s = args.workdir / "out-f16.gguf", next((r["seconds"] for r in rows if r["variant"] == "f16"), None)
    llama_cpp = None if args.llama_cpp == "none" else (
        llama_cpp_source(args.workdir) if args.llama_cpp == "vendored" else Path(args.llama_cpp))
    if llama_cpp is not None:
        f16_in = args.workdir / "llamacpp-f16.gguf"
        cmd = [PY, str(llama_cpp / "convert_hf_to_gguf.py"), str(src), "--outfile", str(f16_in), "--outtype", "f16"]
        f16_s, rss = median_of(args.repeats, lambda: run_measured(cmd))
        rows.append({"tool": "llama.cpp convert_hf_to_gguf.py", "variant": "f16", "seconds": round(f16_s, 2),
                     "peak_rss_mb": round(rss), "file_mb": round(f16_in.stat().st_size / 1e6, 1),
                     "bits_per_weight": None, "rmse": None, "rmse_ggml_ref": None,
                     "x_copy_time": round(f16_s / copy_s, 2)})
    if f16_in.exists() and f16_s is not None:
        child = QUANTIZE_CHILD.format(threads=os.cpu_count() or 1)
        for name, ftype in LLAMA_FTYPES.items():
            if name not in args.variants:
                continue
            out = args.workdir / f"llamacpp-{name}.gguf"
            q_s, rss = median_of(args.repeats, lambda: run_measured([PY, "-c", child, str(f16_in), str(out), str(ftype)]))
            rows.append({"tool": f"f16 ({f16_in.name}) + llama-quantize", "variant": name,
                         "seconds": round(f16_s + q_s, 2), "peak_rss_mb": round(rss),
                         "file_mb": round(out.stat().st_size / 1e6, 1),
                         "bits_per_weight": round(inspect_gguf(out)["bits_per_weight"], 3), "rmse": None,
                         "rmse_ggml_ref": None, "x_copy_time": round((f16_s + q_s) / copy_s, 2)})
    # Weight errors last: they grow this process, and children inherit its size at fork.
    for row in rows:
        out = row.pop("_out", None)
        if out is not None and not args.no_rmse:
            ours, ref = weight_rmse(out, src)
            row["rmse"] = None if ours is None else float(f"{ours:.4g}")
            row["rmse_ggml_ref"] = None if ref is None else float(f"{ref:.4g}")
    meta = {"checkpoint": str(src), "checkpoint_mb": round(weights.stat().st_size / 1e6, 1),
            "shape": "12 x 768, vocab 50257, ctx 1024", "repeats": args.repeats,
            "copy_checkpoint_s": round(copy_s, 3), "machine": platform.platform(), "cpus": os.cpu_count()}
    print_report(rows, meta, args.json)


if __name__ == "__main__":
    main()
