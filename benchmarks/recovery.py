"""Recovery: what fine-tuning gives back to the compressed reference model, every figure from the
converted GGUF run by llama.cpp.

    python benchmarks/recovery.py [--workdir DIR] [--reference models/reference]
        [--lm-tokens 2000000] [--q4k-tokens 500000] [--spam-tokens N] [--max-windows 40]
        [--hellaswag-limit 200] [--spam-limit N] [--sweep-tokens 122880] [--sweep 5e-4:0 5e-4:20 1e-3:0]
        [--no-sweep] [--distill-weight 0] [--threads 2] [--only TEXT ...] [--speed-only]

Rows: f16, q4_k, tq2_0, tq1_0 linear layers (ternary rows with Q4_K embeddings, the shipped
reference-ternary's choice) x {as converted; QAT on the books (LM; --distill-weight adds KL
distillation from the f16 model) and, for f16, the same fine-tune without quantization (the
control: the reference is a mid-training checkpoint, so more tokens help any model; a second
control with q4_k's smaller budget, --q4k-tokens); spam
fine-tuned, with QAT for the compressed types, from the f16 reference with `finetune`'s default
settings}. tq1_0 files are converted from the tq2_0 checkpoints: the same ternary values, so the
same figures (its spam row is left out).
Columns: held-out PPL (pg35, excluded from every fine-tune; llama.cpp), spam by the model
answering on the deduplicated stratified test split and on the balanced split's test part (each
spam fine-tune trained on that split's training part only): calibrated (threshold fitted on 300
training messages, as `eval spam` does for any model) and the answer itself (threshold 0), HellaSwag (seeded subset), file MB,
tg t/s and peak RSS (`gpt2cube bench`, median of --repeats, every file back to back once the
fine-tunes and evaluations are over; `--speed-only` re-measures them for the rows already in
WORKDIR), fine-tuning tokens and minutes.
The sweep (tq2_0, LM): learning rate x QAT warm-up at --sweep-tokens each; its plot is the
validation PPL during training (torch on exactly the quantized weights, validation books
pg1661/pg768/pg1952) against tokens, with each run's llama.cpp PPL on pg35 at the end.
Fine-tuned checkpoints are cached in WORKDIR (a finished run with the same settings is reused).
Writes WORKDIR/recovery.json, recovery.md, recovery.png, sweep.png; prints JSON and the table.
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
VALIDATION = ["pg1661.txt", "pg768.txt", "pg1952.txt"]  # held out of the reference's training too
EVAL_BOOK = "pg35.txt"
SPAM = DATA / "sms_spam" / "SMSSpamCollection"
HELLASWAG = DATA / "hellaswag" / "hellaswag_val_full.txt"


def run_finetune(out: Path, log, **kw) -> dict:
    """A fine-tune, or the cached result of the same one."""
    from dataclasses import asdict

    from gpt2cube.finetune.loop import FinetuneConfig, finetune, recorded_config

    cfg = FinetuneConfig(out=str(out), **kw).resolved()
    done = out / "finetune.json"
    if done.is_file() and (out / "summary.json").is_file():
        rec = json.loads(done.read_text())
        if recorded_config(rec["config"]) == json.loads(json.dumps(asdict(cfg))):
            return json.loads((out / "summary.json").read_text())
    log(f"fine-tuning {out.name} ...")
    summary = finetune(cfg, force=True, progress=False, log=log)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def measure(gguf: Path, args, spam_split: str | None, spam_only: bool = False) -> dict:
    """llama.cpp figures of one file. `spam_split`: which split(s) this file may be scored on."""
    from gpt2cube.eval.hellaswag import evaluate_hellaswag
    from gpt2cube.eval.perplexity import llama_perplexity, read_text
    from gpt2cube.eval.spam import evaluate_spam

    row: dict = {}
    for split in (["stratified", "balanced"] if spam_split is None else [spam_split]):
        s = evaluate_spam(gguf, SPAM, split=split, limit=args.spam_limit, n_threads=args.threads, probe=False)
        m = s["label_likelihood"]
        row[f"spam_{split}"] = {k: round(m[k], 4) for k in ("accuracy", "precision", "recall", "f1")}
        row[f"spam_{split}"]["test_messages"] = s["test"]
        row[f"spam_{split}"]["answer"] = {k: round(m["answer"][k], 4) for k in ("accuracy", "precision", "recall", "f1")}
    if spam_only:
        return row
    row["file_mb"] = round(gguf.stat().st_size / 1e6, 2)
    r = llama_perplexity(gguf, read_text(BOOKS / EVAL_BOOK), 512, max_windows=args.max_windows, n_threads=args.threads)
    row["ppl_pg35"] = round(r.ppl, 2)
    if args.hellaswag_limit:
        h = evaluate_hellaswag(gguf, HELLASWAG, limit=args.hellaswag_limit, seed=0, n_threads=args.threads)
        row["hellaswag"] = round(h["accuracy"], 4)
    row["gguf"] = str(gguf)
    return row


def measure_speed(rows: list[dict], args, log) -> None:
    """tg t/s and peak RSS of every row's file, one after another once nothing else runs (no
    fine-tune or evaluation in between): median of --repeats runs each."""
    from gpt2cube.eval.bench import bench

    for r in rows:
        b = bench(Path(r["gguf"]), n_prompt=128, n_gen=64, repeats=args.repeats, n_threads=args.threads)
        r["tg_t_s"], r["peak_rss_mb"] = round(b["tg_tok_s_median"], 1), round(b["peak_rss_mb"])
        log(f"{Path(r['gguf']).name}: tg {r['tg_t_s']} t/s, peak RSS {r['peak_rss_mb']} MB")


def gguf_name(row: dict) -> str:
    """The file a row was measured on (rows written before rows named their file)."""
    stage = row["stage"]
    kind = "plain" if stage == "as converted" else "spam-stratified" if stage.startswith("spam") else "lm"
    return f"{row['type']}-{kind}.gguf"


def write_report(wd: Path, meta: dict, rows: list[dict], sweep: list[dict]) -> str:
    report = {"meta": meta, "rows": rows, "sweep": sweep}
    (wd / "recovery.json").write_text(json.dumps(report, indent=2))
    md = table(rows)
    (wd / "recovery.md").write_text(md)
    plot_rows(rows, wd / "recovery.png")
    print(json.dumps(report, indent=2))
    print()
    print(md)
    return md


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/gpt2cube-recovery"))
    ap.add_argument("--reference", type=Path, default=ROOT / "models" / "reference")
    ap.add_argument("--lm-tokens", type=int, default=2_000_000)
    ap.add_argument("--q4k-tokens", type=int, default=500_000)
    ap.add_argument("--distill-weight", type=float, default=0.0,
                    help="LM QAT with KL distillation from the reference (0: cross-entropy only)")
    ap.add_argument("--spam-tokens", type=int, default=None, help="spam fine-tunes' tokens [default: finetune's own]")
    ap.add_argument("--max-windows", type=int, default=40)
    ap.add_argument("--hellaswag-limit", type=int, default=200)
    ap.add_argument("--spam-limit", type=int, default=None)
    ap.add_argument("--sweep-tokens", type=int, default=122_880)
    ap.add_argument("--sweep", type=lambda v: (float(v.split(":")[0]), int(v.split(":")[1])), nargs="+",
                    default=[(5e-4, 0), (5e-4, 20), (1e-3, 0)], help="LR:QAT_WARMUP pairs")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", nargs="+", default=None, metavar="TEXT",
                    help="measure only the rows whose 'type stage' contains one of these; the other rows (and the "
                         "sweep) are kept from WORKDIR/recovery.json; speed is re-measured for all")
    ap.add_argument("--speed-only", action="store_true",
                    help="re-measure tg and RSS of the rows already in WORKDIR (recovery.json or recovery.partial.json)")
    args = ap.parse_args()
    if not DATA.is_dir():
        sys.exit(f"{DATA}: the shared data sets are needed (Gutenberg books, SMS spam, HellaSwag)")
    sys.path.insert(0, str(ROOT))
    import torch

    from gpt2cube.converter import convert
    from gpt2cube.converter.plan import Recipe, ternary_scale_for
    from gpt2cube.finetune.loop import TASK_DEFAULTS

    torch.set_num_threads(args.threads)
    wd = args.workdir
    wd.mkdir(parents=True, exist_ok=True)
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    if args.speed_only:
        done = json.loads((wd / "recovery.json").read_text()) if (wd / "recovery.json").is_file() else \
            {"meta": {}, "rows": json.loads((wd / "recovery.partial.json").read_text()), "sweep": []}
        for r in done["rows"]:
            r.setdefault("gguf", str(wd / gguf_name(r)))
        measure_speed(done["rows"], args, log)
        done["meta"]["speed"] = f"tg64 after a 128-token prompt, median of {args.repeats}, measured back to back (--speed-only)"
        write_report(wd, done["meta"], done["rows"], done["sweep"])
        return
    ref = args.reference
    lm = dict(task="lm", corpus=[str(BOOKS)], holdout=VALIDATION, exclude=[EVAL_BOOK])
    if args.distill_weight > 0:
        lm.update(distill=str(ref), distill_weight=args.distill_weight)
    embed = {"f16": None, "q4_k": None, "tq2_0": "q4_k"}

    # fine-tunes, run when a row first needs them (cached in WORKDIR)
    def spec(key: tuple[str, str, str | None]) -> tuple[Path, dict]:
        t, kind, split = key
        if kind == "lm-short":  # the f16 control with q4_k's budget of tokens
            return wd / "lm-f16-short", dict(src=str(ref), tokens=args.q4k_tokens, **lm)
        if kind == "lm":  # QAT on the books; for f16 the control without quantization
            tokens = {"f16": args.lm_tokens, "tq2_0": args.lm_tokens, "q4_k": args.q4k_tokens}[t]
            qat = {} if t == "f16" else dict(qat=t, embed_type=embed[t])
            return wd / ("lm-f16" if t == "f16" else f"qat-{t}"), dict(src=str(ref), tokens=tokens, **qat, **lm)
        qat = {} if t == "f16" else dict(qat=t, embed_type=embed[t])
        name = f"spam-f16-{split}" if t == "f16" else f"spam-qat-{t}-{split}"
        return wd / name, dict(src=str(ref), task="spam", data=str(SPAM), split=split, tokens=args.spam_tokens, **qat)

    done: dict = {}

    def run(key) -> tuple[Path, dict]:
        if key not in done:
            out, kw = spec(key)
            done[key] = (out, run_finetune(out, log, **kw))
        return done[key]

    def gguf_of(ckpt: Path, t: str, name: str) -> Path:
        f = wd / f"{name}.gguf"
        e = embed["tq2_0" if t.startswith("tq") else t]
        scale = ternary_scale_for(ckpt, None, log)  # the rule QAT trained with, as `gpt2cube convert` takes
        convert(ckpt, f, Recipe(linear=t, embed=e, ternary_scale=scale), force=True, progress=False, log=lambda m: None)
        return f

    lm_stage = "QAT (LM" + (" + distillation)" if args.distill_weight > 0 else ")")
    plan = [  # (type, stage, what) in the order of importance, so a cut-short run has the headline rows
        ("tq2_0", "as converted", None), ("tq2_0", lm_stage, ("tq2_0", "lm")), ("f16", "as converted", None),
        ("f16", "LM fine-tuned, no QAT (control)", ("f16", "lm")), ("tq2_0", "spam fine-tuned with QAT", ("tq2_0", "spam")),
        ("f16", "spam fine-tuned", ("f16", "spam")), ("q4_k", "as converted", None), ("q4_k", lm_stage, ("q4_k", "lm")),
        ("f16", "LM fine-tuned, no QAT (control, q4_k's tokens)", ("f16", "lm-short")),
        ("tq1_0", "as converted", None), ("tq1_0", lm_stage, ("tq2_0", "lm")), ("q4_k", "spam fine-tuned with QAT", ("q4_k", "spam")),
    ]
    rows = []
    previous = json.loads((wd / "recovery.json").read_text()) if args.only and (wd / "recovery.json").is_file() else None
    for t, stage, what in plan:
        if args.only and not any(o in f"{t} {stage}" for o in args.only):
            old = [r for r in (previous or {}).get("rows", []) if (r["type"], r["stage"]) == (t, stage)]
            rows += old  # kept as measured before
            continue
        t0 = time.perf_counter()
        if what is None:
            row, summary = measure(gguf_of(ref, t, f"{t}-plain"), args, None), None
        elif what[1].startswith("lm"):
            ckpt, summary = run((*what, None))
            row = measure(gguf_of(ckpt, t, f"{t}-{what[1]}"), args, None)
        else:  # one model per spam split, each scored on its own split only
            strat, summary = run((*what, "stratified"))
            bal, _ = run((*what, "balanced"))
            row = measure(gguf_of(strat, t, f"{t}-spam-stratified"), args, "stratified")
            row.update(measure(gguf_of(bal, t, f"{t}-spam-balanced"), args, "balanced", spam_only=True))
        row = {"type": t, "stage": stage, **row, "ft_tokens": summary["tokens"] if summary else 0,
               "ft_minutes": round(summary["seconds"] / 60, 1) if summary else 0,
               "eval_seconds": round(time.perf_counter() - t0)}
        rows.append(row)
        log(json.dumps(row))
        (wd / "recovery.partial.json").write_text(json.dumps(rows, indent=2))

    if args.only:
        sweep = (previous or {}).get("sweep", [])
    else:
        sweep = [] if args.no_sweep else run_sweep(args, wd, ref, lm, gguf_of, log)
    for r in rows:
        r.setdefault("gguf", str(wd / gguf_name(r)))
    measure_speed(rows, args, log)
    meta = {"reference": str(ref), "eval_text": f"{EVAL_BOOK} (held out of the reference and of every "
            f"fine-tune), {args.max_windows} windows of 512", "validation_books": VALIDATION,
            "spam": "deduplicated; stratified test split and balanced test split; model answering (label "
            "likelihood: threshold fitted on 300 training messages, and the answer itself, threshold 0)",
            "hellaswag": f"validation split, seeded subset of {args.hellaswag_limit}", "threads": args.threads,
            "lm_tokens": args.lm_tokens, "q4k_tokens": args.q4k_tokens, "spam_tokens": args.spam_tokens or TASK_DEFAULTS["spam"]["tokens"],
            "distill_weight": args.distill_weight,
            "speed": f"tg64 after a 128-token prompt, median of {args.repeats}, every file back to back at the end"}
    write_report(wd, meta, rows, sweep)


def run_sweep(args, wd: Path, ref: Path, lm: dict, gguf_of, log) -> list[dict]:
    from gpt2cube.eval.perplexity import llama_perplexity, read_text

    out = []
    for lr, warm in args.sweep:
        d = wd / f"sweep-lr{lr:g}-w{warm}"
        s = run_finetune(d, log, src=str(ref), qat="tq2_0", embed_type="q4_k", tokens=args.sweep_tokens, lr=lr,
                         qat_warmup=warm, eval_every=10, **lm)
        curve = [(r["tokens"], r["val_ppl"]) for r in map(json.loads, (d / "train_log.jsonl").read_text().splitlines())
                 if "val_ppl" in r]
        ppl = llama_perplexity(gguf_of(d, "tq2_0", d.name), read_text(BOOKS / EVAL_BOOK), 512,
                               max_windows=args.max_windows, n_threads=args.threads).ppl
        out.append({"lr": lr, "qat_warmup": warm, "tokens": s["tokens"], "minutes": round(s["seconds"] / 60, 1),
                    "val_curve": curve, "ppl_pg35": round(ppl, 2)})
        log(json.dumps({k: v for k, v in out[-1].items() if k != "val_curve"}))
    plot_sweep(out, wd / "sweep.png")
    return out


def table(rows: list[dict]) -> str:
    cols = ["type", "stage", "ppl_pg35", "spam F1 strat", "F1 strat (answer)", "spam acc strat", "spam F1 bal",
            "spam acc bal", "acc bal (answer)", "hellaswag",
            "file_mb", "tg_t_s", "peak_rss_mb", "ft_tokens", "ft_minutes"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = {**r, "spam F1 strat": r["spam_stratified"]["f1"], "spam acc strat": r["spam_stratified"]["accuracy"],
                 "spam F1 bal": r["spam_balanced"]["f1"], "spam acc bal": r["spam_balanced"]["accuracy"],
                 "F1 strat (answer)": r["spam_stratified"].get("answer", {}).get("f1", ""),
                 "acc bal (answer)": r["spam_balanced"].get("answer", {}).get("accuracy", "")}
        lines.append("| " + " | ".join(str(cells.get(c, "")) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def plot_rows(rows: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = [f"{r['type']}\n{r['stage'].split(' (')[0].replace('spam fine-tuned', 'spam')}"
              for r in rows]
    a.bar(range(len(rows)), [r["ppl_pg35"] for r in rows], color="tab:blue")
    a.set_xticks(range(len(rows)), labels, fontsize=6, rotation=90)
    a.set_ylabel("held-out PPL (pg35, llama.cpp)")
    a.set_yscale("log")
    b.bar([i - 0.2 for i in range(len(rows))], [r["spam_stratified"]["f1"] for r in rows], 0.4, label="stratified F1")
    b.bar([i + 0.2 for i in range(len(rows))], [r["spam_balanced"]["accuracy"] for r in rows], 0.4, label="balanced accuracy")
    b.set_xticks(range(len(rows)), labels, fontsize=6, rotation=90)
    b.set_ylim(0, 1)
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def plot_sweep(sweep: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for s in sweep:
        x, y = zip(*s["val_curve"])
        ax.plot(x, y, "o-", ms=3, label=f"lr {s['lr']:g}, warm-up {s['qat_warmup']} (pg35 {s['ppl_pg35']})")
    ax.set_xlabel("fine-tuning tokens")
    ax.set_ylabel("validation PPL, tq2_0 weights (torch)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
