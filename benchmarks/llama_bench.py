"""`gpt2cube bench` beside llama.cpp's own llama-bench on the same files, in the same run: pp and
tg tokens per second for each type on the 124M shape (random weights: speed does not depend on
them), the ratio of the two, and whether they agree within 5 %.

llama-bench is built from the llama.cpp source that llama-cpp-python 0.3.36 vendors (the
package index's sdist, cached in --workdir; a few minutes the first time).

    python benchmarks/llama_bench.py [--types f16 q8_0 q4_0 q4_k tq2_0] [--threads 2] [--rounds 3]
                                     [--n-prompt 256 --n-gen 64 --repeats 5] [--workdir DIR]

Prints JSON and a table. Run it on an otherwise idle machine: ggml's threads spin.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import build_checkpoint, build_llama_bench, llama_bench, print_report  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--types", nargs="+", default=["f16", "q8_0", "q4_0", "q4_k", "tq2_0"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-prompt", type=int, default=256)
    ap.add_argument("--n-gen", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3,
                    help="Alternate the two tools this many times per file; the medians of the rounds are compared "
                         "(a shared machine's speed drifts by more than 5 %% between runs)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/gpt2cube-llama-bench"))
    ap.add_argument("--json", type=Path, default=None, help="Also write the report here.")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from gpt2cube.converter import convert
    from gpt2cube.eval.bench import bench

    exe = build_llama_bench(args.workdir)
    src = build_checkpoint(args.workdir)
    rows = []
    for t in args.types:
        f = args.workdir / f"gpt2-124m-{t}.gguf"
        if not f.is_file():
            convert(src, f, t, force=True, progress=False, log=lambda m: None)
        runs = {"ref_pp": [], "ref_tg": [], "pp": [], "tg": []}
        for _ in range(args.rounds):  # alternated, so both see the same drift of the machine
            ref = llama_bench(exe, f, args.n_prompt, args.n_gen, args.threads, args.repeats)
            ours = bench(f, n_prompt=args.n_prompt, n_gen=args.n_gen, repeats=args.repeats, n_threads=args.threads)
            runs["ref_pp"].append(ref["pp"][0])
            runs["ref_tg"].append(ref["tg"][0])
            runs["pp"].append(ours["pp_tok_s"])
            runs["tg"].append(ours["tg_tok_s"])
        m = {k: statistics.median(v) for k, v in runs.items()}
        row = {"type": t,
               f"llama-bench pp{args.n_prompt}": round(m["ref_pp"], 1), f"gpt2cube pp{args.n_prompt}": round(m["pp"], 1),
               "pp ratio": round(m["pp"] / m["ref_pp"], 3),
               f"llama-bench tg{args.n_gen}": round(m["ref_tg"], 1), f"gpt2cube tg{args.n_gen}": round(m["tg"], 1),
               "tg ratio": round(m["tg"] / m["ref_tg"], 3)}
        row["within 5 %"] = abs(row["pp ratio"] - 1) <= 0.05 and abs(row["tg ratio"] - 1) <= 0.05
        rows.append(row)
        print(row, file=sys.stderr)
    meta = {"shape": "124M (12 x 768, n_ff 3072, vocab 50257)", "threads": args.threads, "repeats": args.repeats,
            "llama_bench": str(exe), "rounds": args.rounds,
            "statistic": "median over alternated rounds of each tool's mean per-run tokens/s (llama-bench's avg_ts)"}
    print_report(rows, meta, args.json)


if __name__ == "__main__":
    main()
