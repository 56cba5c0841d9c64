"""Conversion speed, peak memory and size on a GPT-2-124M-shaped random checkpoint.

Each conversion is a fresh `gpt2cube convert` process (imports included, as a user runs it);
wall seconds and the child's peak RSS are the median of --repeats runs. Baselines measured in
the same run: copying the checkpoint file (the I/O floor), and llama.cpp's own
convert_hf_to_gguf.py when --llama-cpp points at a llama.cpp source tree (f16; it needs n_ctx
in config.json, which this checkpoint carries).

    python benchmarks/convert.py [--repeats 3] [--workdir DIR] [--llama-cpp DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import platform
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PY, median_of, print_report, run_measured  # noqa: E402

from gpt2cube.converter.inspect import inspect_gguf  # noqa: E402  (light: gguf + numpy only)

TYPES = ["f32", "f16", "bf16", "q8_0"]


def build_checkpoint(workdir: Path) -> Path:
    """Built in a child process: a child's peak RSS includes its parent's image at fork time, so
    the parent must not load torch and a 124M model before timing conversions."""
    src = workdir / "gpt2-124m-random"
    if not (src / "model.safetensors").exists():
        code = ("from pathlib import Path; from gpt2cube.synth import make_random_gpt2; "
                f"make_random_gpt2(Path({str(src)!r}), n_layer=12, n_embd=768, n_head=12, n_positions=1024, "
                "vocab_size=50257, write_n_ctx=True)")
        run_measured([PY, "-c", code])
    return src


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/gpt2cube-bench"))
    ap.add_argument("--llama-cpp", type=Path, default=None, help="llama.cpp source tree (for its converter)")
    ap.add_argument("--types", nargs="+", default=TYPES)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    src = build_checkpoint(args.workdir)
    weights = src / "model.safetensors"
    ckpt_mb = weights.stat().st_size / 1e6

    def copy_once() -> tuple[float, float]:
        t0 = time.perf_counter()
        shutil.copyfile(weights, args.workdir / "copy.bin")
        return time.perf_counter() - t0, 0.0

    copy_s, _ = median_of(args.repeats, copy_once)
    (args.workdir / "copy.bin").unlink()
    rows = []
    for t in args.types:
        out = args.workdir / f"out-{t}.gguf"
        cmd = [PY, "-m", "gpt2cube.cli", "convert", str(src), "-o", str(out), "--type", t, "--force", "--quiet"]
        wall, rss = median_of(args.repeats, lambda: run_measured(cmd))
        size = out.stat().st_size
        rows.append({"tool": "gpt2cube", "type": t, "seconds": round(wall, 2), "peak_rss_mb": round(rss),
                     "file_mb": round(size / 1e6, 1), "bits_per_weight": inspect_gguf(out)["bits_per_weight"],
                     "x_copy_time": round(wall / copy_s, 2)})
    if args.llama_cpp:
        script = args.llama_cpp / "convert_hf_to_gguf.py"
        out = args.workdir / "llamacpp-f16.gguf"
        cmd = [PY, str(script), str(src), "--outfile", str(out), "--outtype", "f16"]
        wall, rss = median_of(args.repeats, lambda: run_measured(cmd))
        rows.append({"tool": "llama.cpp convert_hf_to_gguf.py", "type": "f16", "seconds": round(wall, 2),
                     "peak_rss_mb": round(rss), "file_mb": round(out.stat().st_size / 1e6, 1),
                     "bits_per_weight": None, "x_copy_time": round(wall / copy_s, 2)})
    meta = {"checkpoint": str(src), "checkpoint_mb": round(ckpt_mb, 1), "shape": "12 x 768, vocab 50257, ctx 1024",
            "repeats": args.repeats, "copy_checkpoint_s": round(copy_s, 3), "machine": platform.platform(),
            "cpus": __import__("os").cpu_count()}
    print_report(rows, meta, args.json)


if __name__ == "__main__":
    main()
