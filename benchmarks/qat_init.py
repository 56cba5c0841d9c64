"""QAT from a calibrated start: held-out PPL against fine-tuning tokens, starting from round to
nearest (the shipped ternary's recipe) or from the GPTQ file (`finetune --init gptq`), with the
f16 model fine-tuned on the same tokens as the control.

    python benchmarks/qat_init.py [--workdir DIR] [--reference models/reference] [--type tq2_0]
        [--tokens 0 65536 262144 1048576 2097152] [--arms rtn gptq f16] [--calib-book pg11.txt]
        [--calib-tokens 16384] [--f16-tokens N ...] [--max-windows 40] [--threads 2]

Every point is its own fine-tune (`finetune`'s LM defaults: lr 5e-4, 20 warm-up steps, cosine to
10 % over that run's tokens, batch 8 x 512, embeddings frozen, seed 1234) on the 51 training books
(pg1661, pg768, pg1952 validate, pg35 excluded), converted by `convert` with what the checkpoint
records, and scored by llama.cpp on pg35 (held out of the reference, of every fine-tune and of
the calibration text). Arms:
  rtn:  --qat TYPE --embed-type q4_k (absmean per tensor: models/reference-ternary's recipe);
  gptq: --qat TYPE --embed-type q4_k --init gptq --calib BOOK (GPTQ act-order, row-fit scales);
  f16:  the same fine-tune without quantization (the reference is a mid-training checkpoint, so
        tokens help any model: the control says how much of a gain is not recovery).
At 0 tokens the files are the conversions themselves (the GPTQ start is `convert --method gptq
--act-order` of the reference: the same values). Fine-tunes are cached in WORKDIR. Writes
WORKDIR/qat_init.json and qat_init.png; prints JSON and the table, with, per arm, the fewest
tokens whose PPL is at or below the shipped ternary file's (117.99 on the same text and windows).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from recovery import BOOKS, DATA, EVAL_BOOK, ROOT, VALIDATION, run_finetune

SHIPPED = ROOT / "models" / "reference-ternary" / "reference-tq2_0.gguf"
EMBED = "q4_k"  # the shipped ternary's embedding type


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/gpt2cube-qat-init"))
    ap.add_argument("--reference", type=Path, default=ROOT / "models" / "reference")
    ap.add_argument("--type", default="tq2_0")
    ap.add_argument("--tokens", type=int, nargs="+", default=[0, 65_536, 262_144, 1_048_576, 2_097_152])
    ap.add_argument("--arms", nargs="+", default=["rtn", "gptq", "f16"], choices=["rtn", "gptq", "f16"])
    ap.add_argument("--calib-book", default="pg11.txt")
    ap.add_argument("--calib-tokens", type=int, default=16_384)
    ap.add_argument("--f16-tokens", type=int, nargs="+", default=None,
                    help="the control's points [default: --tokens]; fewer saves its fine-tunes")
    ap.add_argument("--max-windows", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if not DATA.is_dir():
        sys.exit(f"{DATA}: the shared data sets are needed (Gutenberg books)")
    sys.path.insert(0, str(ROOT))
    import torch

    from gpt2cube.calib.gptq import GptqOptions
    from gpt2cube.calib.sequential import GptqConvert
    from gpt2cube.converter import convert
    from gpt2cube.converter.plan import Recipe, embed_type_for, ternary_scale_for
    from gpt2cube.eval.perplexity import llama_perplexity, read_text

    torch.set_num_threads(args.threads)
    wd = args.workdir
    wd.mkdir(parents=True, exist_ok=True)
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    ref, calib = args.reference, BOOKS / args.calib_book
    lm = dict(task="lm", corpus=[str(BOOKS)], holdout=VALIDATION, exclude=[EVAL_BOOK, args.calib_book])
    text = read_text(BOOKS / EVAL_BOOK)

    def ppl(f: Path) -> float:
        return round(llama_perplexity(f, text, 512, max_windows=args.max_windows, n_threads=args.threads).ppl, 2)

    def start_file(arm: str) -> Path:
        f = wd / f"{arm}-0.gguf"
        if arm == "f16":
            convert(ref, f, "f16", force=True, progress=False, log=lambda m: None)
        elif arm == "rtn":
            convert(ref, f, Recipe(args.type, EMBED), force=True, progress=False, log=lambda m: None)
        else:
            gptq = GptqConvert(calib, args.calib_tokens, None, GptqOptions(act_order=True), None, "row-fit")
            convert(ref, f, Recipe(args.type, EMBED, ternary_scale="row-fit"), force=True, progress=False,
                    log=lambda m: None, method=gptq)
        return f

    def trained_file(arm: str, tokens: int) -> tuple[Path, dict]:
        ckpt = wd / f"{arm}-{tokens}"
        kw = dict(src=str(ref), tokens=tokens, **lm)
        if arm != "f16":
            kw.update(qat=args.type, embed_type=EMBED)
        if arm == "gptq":
            kw.update(init="gptq", calib=str(calib), calib_tokens=args.calib_tokens)
        summary = run_finetune(ckpt, log, **kw)
        f = wd / f"{arm}-{tokens}.gguf"
        t = "f16" if arm == "f16" else args.type
        recipe = Recipe(t, embed_type_for(ckpt, None), ternary_scale=ternary_scale_for(ckpt, None, log))
        convert(ckpt, f, recipe, force=True, progress=False, log=lambda m: None)
        return f, summary

    rows = []
    shipped = ppl(SHIPPED) if SHIPPED.is_file() else None
    for tokens in sorted(args.tokens):
        for arm in args.arms:
            if arm == "f16" and args.f16_tokens is not None and tokens not in args.f16_tokens:
                continue
            t0 = time.perf_counter()
            f, summary = (start_file(arm), None) if tokens == 0 else trained_file(arm, tokens)
            rows.append({"arm": arm, "tokens": summary["tokens"] if summary else 0, "ppl_pg35": ppl(f),
                         "file_mb": round(f.stat().st_size / 1e6, 2),
                         "ft_minutes": round(summary["seconds"] / 60, 1) if summary else 0,
                         "seconds": round(time.perf_counter() - t0)})
            log(json.dumps(rows[-1]))
            (wd / "qat_init.partial.json").write_text(json.dumps(rows, indent=2))
    reach = {}
    for arm in args.arms:
        hit = [r["tokens"] for r in rows if r["arm"] == arm and shipped is not None and r["ppl_pg35"] <= shipped]
        reach[arm] = min(hit) if hit else None
    meta = {"reference": str(ref), "type": args.type, "embed_type": EMBED, "eval": f"{EVAL_BOOK}, {args.max_windows} "
            "windows of 512, llama.cpp (held out of training, validation and calibration)",
            "calibration": f"{args.calib_book}, {args.calib_tokens} tokens (excluded from the fine-tunes)",
            "shipped_ternary_ppl": shipped, "fewest_tokens_at_or_below_shipped": reach, "threads": args.threads}
    report = {"meta": meta, "rows": rows}
    (wd / "qat_init.json").write_text(json.dumps(report, indent=2))
    plot(rows, shipped, wd / "qat_init.png")
    print(json.dumps(report, indent=2))
    print()
    print(table(rows, args.arms))


def table(rows: list[dict], arms: list[str]) -> str:
    tokens = sorted({r["tokens"] for r in rows})
    by = {(r["arm"], r["tokens"]): r["ppl_pg35"] for r in rows}
    lines = ["| arm | " + " | ".join(f"{t:,}" for t in tokens) + " |", "|---|" + "---|" * len(tokens)]
    for a in arms:
        lines.append(f"| {a} | " + " | ".join(str(by.get((a, t), "-")) for t in tokens) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], shipped: float | None, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for arm in dict.fromkeys(r["arm"] for r in rows):
        pts = sorted((max(r["tokens"], 1), r["ppl_pg35"]) for r in rows if r["arm"] == arm)
        ax.plot(*zip(*pts), "o-", label=arm)
    if shipped is not None:
        ax.axhline(shipped, color="gray", ls="--", label=f"shipped ternary ({shipped})")
    ax.set_xscale("symlog", linthresh=65_536)
    ax.set_yscale("log")
    ax.set_xlabel("fine-tuning tokens")
    ax.set_ylabel("PPL pg35 (llama.cpp)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
