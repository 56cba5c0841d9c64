"""Structured FFN pruning of the reference model: what each importance measure costs at each
sparsity, with and without recovery, every figure from the converted GGUF run by llama.cpp.

    python benchmarks/pruning.py [--workdir DIR] [--reference models/reference]
        [--fractions 0.1 0.25 0.5] [--measures activation taylor magnitude random]
        [--recover activation] [--recover-tokens 409600] [--type f16] [--max-windows 40]
        [--spam-limit N] [--calib-tokens 65536] [--threads 2] [--repeats 3]

Rows: the unpruned file, then fraction x measure (bias compensation on, calibration: 65,536
tokens of the training books, pg35 and the validation books excluded), then, for the measures
named by --recover, the pruned model after `finetune --distill` from the unpruned reference
(--recover-tokens on the training books).
Columns: held-out PPL (pg35, llama.cpp, 40 windows of 512), spam F1 (the model answering, label
likelihood with the calibrated threshold, deduplicated stratified test split), parameters, file
MB, pp384 / tg128 t/s (`gpt2cube bench`, median of --repeats) and their ratios to the unpruned
file measured in the same run.
Writes WORKDIR/pruning.json, pruning.md, pruning.png; prints JSON and the table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
BOOKS = DATA / "gutenberg" / "books"
EVAL_BOOK = "pg35.txt"
VALIDATION = ["pg1661.txt", "pg768.txt", "pg1952.txt"]
SPAM = DATA / "sms_spam" / "SMSSpamCollection"


def calibration_files() -> list[Path]:
    held = {EVAL_BOOK, *VALIDATION}
    return sorted(p for p in BOOKS.glob("*.txt") if p.name not in held)


def params_of(ckpt: Path) -> int:
    import numpy as np
    from safetensors import safe_open

    with safe_open(str(ckpt / "model.safetensors"), "np") as f:  # a tied head is stored once
        return sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys() if not k.endswith(("attn.bias", "masked_bias")))


def measure(gguf: Path, args) -> dict:
    from gpt2cube.eval.bench import bench
    from gpt2cube.eval.perplexity import llama_perplexity, read_text
    from gpt2cube.eval.spam import evaluate_spam

    r = llama_perplexity(gguf, read_text(BOOKS / EVAL_BOOK), 512, max_windows=args.max_windows, n_threads=args.threads)
    s = evaluate_spam(gguf, SPAM, split="stratified", limit=args.spam_limit, n_threads=args.threads, probe=False)
    b = bench(gguf, n_prompt=384, n_gen=128, repeats=args.repeats, n_threads=args.threads)
    return {"ppl_pg35": round(r.ppl, 2), "spam_f1": round(s["label_likelihood"]["f1"], 4),
            "spam_f1_answer": round(s["label_likelihood"]["answer"]["f1"], 4),
            "file_mb": round(gguf.stat().st_size / 1e6, 2), "pp_t_s": round(b["pp_tok_s_median"], 1), "tg_t_s": round(b["tg_tok_s_median"], 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/gpt2cube-pruning"))
    ap.add_argument("--reference", type=Path, default=ROOT / "models" / "reference")
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.25, 0.5])
    ap.add_argument("--measures", nargs="+", default=["activation", "taylor", "magnitude", "random"])
    ap.add_argument("--recover", nargs="*", default=["activation"], help="measures whose pruned models are recovered")
    ap.add_argument("--recover-tokens", type=int, default=409_600)
    ap.add_argument("--type", default="f16", help="encoding of every file (convert --type)")
    ap.add_argument("--calib-tokens", type=int, default=65_536)
    ap.add_argument("--max-windows", type=int, default=40)
    ap.add_argument("--spam-limit", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if not DATA.is_dir():
        sys.exit(f"{DATA}: the shared data sets are needed (Gutenberg books, SMS spam)")
    sys.path.insert(0, str(ROOT))
    import torch

    from gpt2cube.converter import convert
    from gpt2cube.finetune.loop import FinetuneConfig, finetune
    from gpt2cube.prune import PruneConfig, prune

    torch.set_num_threads(args.threads)
    wd = args.workdir
    wd.mkdir(parents=True, exist_ok=True)
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    calib = [str(p) for p in calibration_files()]

    def gguf_of(ckpt: Path, name: str) -> Path:
        f = wd / f"{name}.gguf"
        convert(ckpt, f, args.type, force=True, progress=False, log=lambda m: None)
        return f

    rows = []

    def add(row: dict) -> None:
        rows.append(row)
        log(json.dumps(row))
        (wd / "pruning.partial.json").write_text(json.dumps(rows, indent=2))

    base = {"fraction": 0.0, "importance": "none", "recovered": False, "params": params_of(args.reference),
            **measure(gguf_of(args.reference, "unpruned"), args)}
    add(base)
    for frac in args.fractions:
        for imp in args.measures:
            out = wd / f"{imp}-{frac:g}"
            t0 = time.perf_counter()
            s = prune(PruneConfig(src=str(args.reference), out=str(out), ffn=frac, importance=imp, calib=calib,
                                  calib_tokens=args.calib_tokens), force=True, log=log)
            add({"fraction": frac, "importance": imp, "recovered": False, "kept_ffn": s["kept_per_layer"],
                 "params": params_of(out), "prune_seconds": round(time.perf_counter() - t0, 1),
                 **measure(gguf_of(out, out.name), args)})
            if imp in args.recover:
                rec = wd / f"{out.name}-recovered"
                ft = finetune(FinetuneConfig(src=str(out), out=str(rec), corpus=[str(BOOKS)], holdout=VALIDATION,
                                             exclude=[EVAL_BOOK], tokens=args.recover_tokens, distill=str(args.reference),
                                             distill_weight=0.5), force=True, progress=False, log=log)
                add({"fraction": frac, "importance": imp, "recovered": True, "kept_ffn": s["kept_per_layer"],
                     "params": params_of(rec), "ft_tokens": ft["tokens"], "ft_minutes": round(ft["seconds"] / 60, 1),
                     **measure(gguf_of(rec, rec.name), args)})
    for r in rows:
        r["pp_ratio"] = round(r["pp_t_s"] / base["pp_t_s"], 3)
        r["tg_ratio"] = round(r["tg_t_s"] / base["tg_t_s"], 3)
        r["ppl_ratio"] = round(r["ppl_pg35"] / base["ppl_pg35"], 3)
    report = {"meta": {"reference": str(args.reference), "type": args.type, "eval_text": f"{EVAL_BOOK}, {args.max_windows} "
                       "windows of 512 (held out of the reference, the calibration text and every recovery)",
                       "calibration": f"{args.calib_tokens} tokens of the training books", "spam": "deduplicated stratified "
                       "test split, model answering (calibrated threshold; answer = threshold 0)",
                       "recovery": f"finetune --distill reference --distill-weight 0.5, {args.recover_tokens} tokens",
                       "threads": args.threads, "repeats": args.repeats}, "rows": rows}
    (wd / "pruning.json").write_text(json.dumps(report, indent=2))
    md = table(rows)
    (wd / "pruning.md").write_text(md)
    plot(rows, wd / "pruning.png")
    print(json.dumps(report, indent=2))
    print()
    print(md)


def table(rows: list[dict]) -> str:
    cols = ["fraction", "importance", "recovered", "ppl_pg35", "ppl_ratio", "spam_f1", "spam_f1_answer", "params",
            "file_mb", "pp_t_s", "pp_ratio", "tg_t_s", "tg_ratio"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    base = rows[0]["ppl_pg35"]
    for imp in dict.fromkeys(r["importance"] for r in rows[1:]):
        for rec in (False, True):
            pts = sorted((r["fraction"], r["ppl_pg35"]) for r in rows if r["importance"] == imp and r["recovered"] == rec)
            if pts:
                ax.plot([0] + [p[0] for p in pts], [base] + [p[1] for p in pts], "o-" if not rec else "s--",
                        label=f"{imp}{' + recovery' if rec else ''}")
    ax.set_yscale("log")
    ax.set_xlabel("fraction of FFN neurons removed (every layer)")
    ax.set_ylabel("held-out PPL (pg35, llama.cpp)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


if __name__ == "__main__":
    main()
