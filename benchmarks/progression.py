"""From n-grams to GPT on the same tokens: perplexity of unigram, modified Kneser-Ney 2..5-gram
(the headline baseline, as KenLM's lmplz), interpolated KN 5-gram and the backoff 5-gram trained on the Gutenberg training books, then the reference GPT-2 in
each GGUF type run by llama.cpp, all scored with one definition (llama-perplexity's windows,
second half scored) on the held-out books and on WikiText-2 test.

    python benchmarks/progression.py [--model models/reference] [--ctx 512] [--max-windows N]
                                     [--types f16 q8_0 q4_k tq2_0] [--out DIR]

Writes DIR/progression.json, DIR/progression.md and DIR/progression.png; prints JSON and a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
HELD_OUT = ["pg1661.txt", "pg768.txt", "pg35.txt", "pg1952.txt"]  # as PROVENANCE.md suggests


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "reference")
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--max-windows", type=int, default=None)
    ap.add_argument("--types", nargs="+", default=["f16", "q8_0", "q4_k", "tq2_0"])
    ap.add_argument("--out", type=Path, default=Path("/tmp/gpt2cube-progression"))
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from gpt2cube.converter import convert
    from gpt2cube.eval.perplexity import llama_perplexity
    from gpt2cube.tokenizers import encode_text, hf_tokenizer
    from gpt2cube.train.data import corpus_files, load_tokens, split_holdout
    from gpt2cube.train.ngram import NGramModel, ngram_perplexity

    books = args.data / "gutenberg" / "books"
    if not books.is_dir():
        sys.exit(f"{books}: not found; the progression needs ../shared/data")
    train_files, held = split_holdout(corpus_files([books]), [Path(h) for h in HELD_OUT])
    tests = {"held-out books": "\n".join(f.read_text(encoding="utf-8") for f in held),
             "wikitext-2 test": (args.data / "wikitext-2-raw" / "wiki.test.raw").read_text(encoding="utf-8")}
    tok = hf_tokenizer()
    test_tokens = {k: np.array(encode_text(tok, v)) for k, v in tests.items()}
    train_tokens = load_tokens(train_files)
    args.out.mkdir(parents=True, exist_ok=True)

    rows = []
    for label, order, method in [("unigram", 1, "mkn"), ("modified KN 2-gram", 2, "mkn"), ("modified KN 3-gram", 3, "mkn"),
                                 ("modified KN 4-gram", 4, "mkn"), ("modified KN 5-gram", 5, "mkn"),
                                 ("KN 5-gram (one discount)", 5, "kn"), ("backoff 5-gram", 5, "backoff")]:
        t0 = time.perf_counter()
        model = NGramModel(order, method).fit(train_tokens)
        fit = time.perf_counter() - t0
        row = {"model": label, "params_or_ngrams": int(sum(len(o.gram_keys) for o in model.orders.values())),
               "file_mb": None, "fit_s": round(fit, 1)}
        for name, toks in test_tokens.items():
            r = ngram_perplexity(model, toks, args.ctx, args.max_windows)
            row[name] = round(r.ppl, 2)
            row[f"{name} ±"] = round(r.ppl_stderr, 2)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
        del model
    if (args.model / "config.json").is_file():
        for t in args.types:
            gguf_path = args.out / f"reference-{t}.gguf"
            convert(args.model, gguf_path, t, force=True, progress=False, log=lambda m: None)
            row = {"model": f"reference GPT-2 ({t})", "params_or_ngrams": None,
                   "file_mb": round(gguf_path.stat().st_size / 1e6, 1), "fit_s": None}
            for name, text in tests.items():
                r = llama_perplexity(gguf_path, text, args.ctx, max_windows=args.max_windows)
                row[name] = round(r.ppl, 2)
                row[f"{name} ±"] = round(r.ppl_stderr, 2)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    else:
        print(f"{args.model}: no checkpoint; n-gram rows only", file=sys.stderr)

    meta = {"train_tokens": int(len(train_tokens)), "held_out": HELD_OUT, "ctx": args.ctx,
            "max_windows": args.max_windows, "test_tokens": {k: int(len(v)) for k, v in test_tokens.items()}}
    best_ngram = min(r["held-out books"] for r in rows if "gram" in r["model"])
    mkn5 = next(r for r in rows if r["model"] == "modified KN 5-gram")
    gpt = [r for r in rows if r["model"].startswith("reference")]
    if gpt:
        meta["reference_vs_best_ngram_held_out"] = round(gpt[0]["held-out books"] / best_ngram, 4)
        meta["reference_vs_modified_kn5_held_out"] = round(gpt[0]["held-out books"] / mkn5["held-out books"], 4)
    (args.out / "progression.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    cols = list(rows[0])
    table = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    table += ["| " + " | ".join("" if r[c] is None else str(r[c]) for c in cols) + " |" for r in rows]
    (args.out / "progression.md").write_text("\n".join(table) + "\n")
    _plot(rows, list(tests), args.out / "progression.png")
    print(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print("\n".join(table))


def _plot(rows: list[dict], sets: list[str], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    x = np.arange(len(rows))
    for i, s in enumerate(sets):
        ax.bar(x + (i - 0.5) * 0.38, [r[s] for r in rows], 0.38, label=s)
    ax.set_xticks(x, [r["model"] for r in rows], rotation=30, ha="right")
    ax.set_yscale("log")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title("From n-grams to GPT-2 on the same GPT-2 tokens")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
