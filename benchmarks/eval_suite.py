"""The evaluation suite on the GPT-2-124M-shaped random checkpoint's f16 / q8_0 / q4_0 / q4_k /
tq2_0 files (speed and memory: `gpt2cube bench` beside llama-bench built from the vendored
llama.cpp and run on the same files in the same run), and on the reference model with the full
data sets (quality).

    python benchmarks/eval_suite.py [--workdir DIR] [--reference models/reference]
                                    [--quality-types f16 q8_0 q4_k tq2_0] [--spam-limit N]
                                    [--hellaswag-limit N] [--threads 2] [--no-llama-bench]

Prints JSON and a table; writes the compare reports under WORKDIR/speed and WORKDIR/quality.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import build_checkpoint, build_llama_bench, llama_bench  # noqa: E402

SPEED_TYPES = ["f16", "q8_0", "q4_0", "q4_k", "tq2_0"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/gpt2cube-bench"))
    ap.add_argument("--reference", type=Path, default=ROOT / "models" / "reference")
    ap.add_argument("--quality-types", nargs="+", default=["f16", "q8_0", "q4_k", "tq2_0"])
    ap.add_argument("--max-windows", type=int, default=None)
    ap.add_argument("--spam-limit", type=int, default=None)
    ap.add_argument("--hellaswag-limit", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-llama-bench", action="store_true", help="Skip building and running llama-bench.")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from gpt2cube.converter import convert
    from gpt2cube.eval.bench import bench
    from gpt2cube.eval.report import run_compare, table_rows

    args.workdir.mkdir(parents=True, exist_ok=True)
    src = build_checkpoint(args.workdir)
    exe = None if args.no_llama_bench else build_llama_bench(args.workdir)
    speed = []
    for t in SPEED_TYPES:
        f = args.workdir / f"speed-{t}.gguf"
        convert(src, f, t, force=True, progress=False, log=lambda m: None)
        # llama-bench's pp256 / tg64 shapes, so the figures compare directly
        b = bench(f, n_prompt=256, n_gen=64, repeats=args.repeats, n_threads=args.threads)
        row = {"type": t, "file_mb": round(b["file_mb"], 1), "load_s": round(b["load_s"], 3),
               "pp256_t_s": round(b["pp_tok_s"], 1), "tg64_t_s": round(b["tg_tok_s"], 1),
               "peak_rss_mb": round(b["peak_rss_mb"]), "threads": b["threads"]}
        if exe is not None:  # llama-bench on the same file, in the same run
            ref = llama_bench(exe, f, 256, 64, args.threads, args.repeats)
            pp, tg = ref["pp"][0], ref["tg"][0]
            row["llama_bench_pp256"], row["llama_bench_tg64"] = round(pp, 1), round(tg, 1)
            row["pp_ratio"], row["tg_ratio"] = round(b["pp_tok_s"] / pp, 3), round(b["tg_tok_s"] / tg, 3)
        speed.append(row)
        print(json.dumps(row), file=sys.stderr)

    quality = None
    if (args.reference / "config.json").is_file() and DATA.is_dir():
        files = []
        for t in args.quality_types:
            f = args.workdir / f"reference-{t}.gguf"
            convert(args.reference, f, t, force=True, progress=False, log=lambda m: None)
            files.append(f)
        res = run_compare(files, args.workdir / "quality", text=DATA / "wikitext-2-raw" / "wiki.test.raw",
                          hf=args.reference, spam=DATA / "sms_spam" / "SMSSpamCollection",
                          hellaswag=DATA / "hellaswag" / "hellaswag_val_full.txt", max_windows=args.max_windows,
                          spam_limit=args.spam_limit, hellaswag_limit=args.hellaswag_limit, do_bench=True,
                          n_threads=args.threads, progress=False, log=lambda m: print(m, file=sys.stderr))
        quality = {"rows": table_rows(res), "hf_reference": res.get("hf_reference")}
    print(json.dumps({"speed": speed, "quality": quality}, indent=2, default=str))
    for rows in (speed, quality["rows"] if quality else None):
        if rows:
            cols = list(dict.fromkeys(c for r in rows for c in r))
            print("| " + " | ".join(cols) + " |")
            print("|" + "---|" * len(cols))
            for r in rows:
                print("| " + " | ".join("" if r.get(c) is None else str(r.get(c)) for c in cols) + " |")
            print()


if __name__ == "__main__":
    main()
