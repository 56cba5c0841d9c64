"""Structured FFN pruning of the reference model: what each importance measure costs at each
sparsity, with and without recovery, every figure from the converted GGUF run by llama.cpp; and
the speed and size of pruned files on the GPT-2 124M shape.

    python benchmarks/pruning.py [--workdir DIR] [--reference models/reference]
        [--fractions 0.1 0.25 0.5] [--measures activation taylor magnitude random] [--seeds 0 1]
        [--recover activation taylor] [--recover-tokens 409600] [--recover-at 0.1 0.25] [--type f16] [--max-windows 40]
        [--spam-limit N] [--calib-tokens 65536] [--threads 2] [--repeats 3] [--no-124m | --only-124m] [--resume]

Quality rows (reference model): the unpruned file (f16 and q4_k), then fraction x measure x seed
(bias compensation on; calibration: --calib-tokens tokens of the training books, pg35 and the
validation books excluded; the seed draws the calibration windows and the random measure;
magnitude has no seed), then, for the measures named by --recover, the pruned model (seed 0)
after `finetune --distill` from the unpruned reference (--recover-tokens on the training books),
set beside the control: the unpruned model after the same fine-tuning (more training alone
lowers this small model's PPL, so "recovered / control" is the cost of pruning itself);
then the 63 MB recipe (recipes/gpt2-124m-63mb.toml: prune --recipe, recovery, convert --recipe,
i.e. Q4_K) beside the unpruned q4_k file.
Columns: held-out PPL (pg35, llama.cpp, --max-windows windows of 512), spam F1 (the model
answering, label likelihood, calibrated threshold and threshold 0, deduplicated stratified test
split), parameters, file MB; the summary table gives mean +- standard deviation over seeds.
Speed, measured after all training and evaluation (pp384 / tg128 t/s, `gpt2cube bench`, the
median of --repeats rounds, each round benching every file once in turn): on the reference, the unpruned file and one file per fraction (files
of one fraction have the same shapes); on the GPT-2 124M shape (random weights: speed and size do
not depend on them), Q4_K files with the FFN width of each fraction and of the recipe, each
against the unpruned 124M Q4_K file in the same run.
Writes WORKDIR/pruning.json, pruning.md, pruning.png; prints JSON and the tables.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _common import BOOKS, DATA, EVAL_BOOK, VALIDATION, calibration_files, interleaved_medians  # noqa: E402
SPAM = DATA / "sms_spam" / "SMSSpamCollection"


def params_of(ckpt: Path) -> int:
    import numpy as np
    from safetensors import safe_open

    with safe_open(str(ckpt / "model.safetensors"), "np") as f:  # a tied head is stored once
        return sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys() if not k.endswith(("attn.bias", "masked_bias")))


RECIPE = ROOT / "recipes" / "gpt2-124m-63mb.toml"
GPT2_124M = {"n_layer": 12, "n_embd": 768, "n_head": 12, "n_positions": 1024, "vocab_size": 50257}


def quality(gguf: Path, args) -> dict:
    from gpt2cube.eval.perplexity import llama_perplexity, read_text
    from gpt2cube.eval.spam import evaluate_spam

    r = llama_perplexity(gguf, read_text(BOOKS / EVAL_BOOK), 512, max_windows=args.max_windows, n_threads=args.threads)
    s = evaluate_spam(gguf, SPAM, split="stratified", limit=args.spam_limit, n_threads=args.threads, probe=False)
    return {"ppl_pg35": round(r.ppl, 2), "spam_f1": round(s["label_likelihood"]["f1"], 4),
            "spam_f1_answer": round(s["label_likelihood"]["answer"]["f1"], 4), "file_mb": round(gguf.stat().st_size / 1e6, 2)}


def interleaved_speed(files: list[Path], args) -> dict[Path, dict]:
    """pp384 / tg128 t/s of each file (`gpt2cube bench`, its own warm-up), the median of
    --repeats rounds, each round benching every file once in turn."""
    from gpt2cube.eval.bench import bench

    def run(f: Path):
        def once() -> tuple[float, float]:
            b = bench(f, n_prompt=384, n_gen=128, repeats=1, n_threads=args.threads)
            return b["pp_tok_s_median"], b["tg_tok_s_median"]
        return once

    meds = interleaved_medians({f: run(f) for f in files}, args.repeats)
    return {f: {"pp_t_s": round(pp, 1), "tg_t_s": round(tg, 1)} for f, (pp, tg) in meds.items()}


def ffn_width(ckpt: Path) -> int:
    cfg = json.loads((ckpt / "config.json").read_text())
    return cfg.get("n_inner") or 4 * cfg["n_embd"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/gpt2cube-pruning"))
    ap.add_argument("--reference", type=Path, default=ROOT / "models" / "reference")
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.25, 0.5])
    ap.add_argument("--measures", nargs="+", default=["activation", "taylor", "magnitude", "random"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--recover", nargs="*", default=["activation", "taylor"], help="measures whose pruned models are recovered")
    ap.add_argument("--recover-tokens", type=int, default=409_600)
    ap.add_argument("--recover-at", type=float, nargs="*", default=None,
                    help="fractions whose pruned models are recovered [default: every --fractions]")
    ap.add_argument("--type", default="f16", help="encoding of the quality rows' files (convert --type)")
    ap.add_argument("--calib-tokens", type=int, default=65_536)
    ap.add_argument("--max-windows", type=int, default=40)
    ap.add_argument("--spam-limit", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-124m", action="store_true", help="skip the 124M-shape speed and size rows")
    ap.add_argument("--only-124m", action="store_true", help="only the 124M-shape speed and size rows")
    ap.add_argument("--resume", action="store_true", help="keep the rows of WORKDIR/pruning.partial.json")
    args = ap.parse_args()
    if not DATA.is_dir():
        sys.exit(f"{DATA}: the shared data sets are needed (Gutenberg books, SMS spam)")
    sys.path.insert(0, str(ROOT))
    import torch

    from gpt2cube.converter import convert
    from gpt2cube.converter.plan import Recipe, load_recipe_file
    from gpt2cube.finetune.loop import FinetuneConfig, finetune
    from gpt2cube.prune import PruneConfig, prune
    from gpt2cube.prune.recipe import load_prune_recipe

    torch.set_num_threads(args.threads)
    wd = args.workdir
    wd.mkdir(parents=True, exist_ok=True)
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    if args.only_124m:
        shape_rows = speed_124m(args, wd, load_prune_recipe(RECIPE), Recipe(linear="q4_k", patterns=load_recipe_file(RECIPE)), log)
        report = {"meta": {"threads": args.threads, "repeats": args.repeats, "speed": "pp384 / tg128, gpt2cube bench, "
                           "median of --repeats interleaved rounds"}, "gpt2_124m_shape": shape_rows}
        (wd / "pruning-124m.json").write_text(json.dumps(report, indent=2))
        print(json.dumps(report, indent=2))
        print()
        print(table(shape_rows, SHAPE_COLS))
        return
    calib = [str(p) for p in calibration_files()]
    partial = wd / "pruning.partial.json"
    done = {r["name"]: r for r in json.loads(partial.read_text())} if args.resume and partial.exists() else {}
    rows: list[dict] = []

    def add(row: dict) -> None:
        rows.append(row)
        log(json.dumps(row))
        partial.write_text(json.dumps(rows, indent=2))

    def gguf_of(ckpt: Path, name: str, recipe: Recipe | str | None = None) -> Path:
        f = wd / f"{name}.gguf"
        convert(ckpt, f, recipe or args.type, force=True, progress=False, log=lambda m: None)
        return f

    def row(name: str, make) -> None:
        """One quality row, measured unless --resume kept it (its file must still be there)."""
        if name in done and Path(done[name]["gguf"]).exists():
            add(done[name])
            return
        t0 = time.perf_counter()
        info, gguf = make()
        add({"name": name, **info, "gguf": str(gguf), "seconds": round(time.perf_counter() - t0, 1), **quality(gguf, args)})

    def pruned(frac: float, imp: str, seed: int, **kw) -> tuple[Path, dict]:
        out = wd / f"{imp}-{frac:g}-s{seed}"
        s = prune(PruneConfig(src=str(args.reference), out=str(out), ffn=frac, importance=imp, calib=calib,
                              calib_tokens=args.calib_tokens, seed=seed, **kw), force=True, log=log)
        return out, s

    def recovered(ckpt: Path, name: str | None = None) -> tuple[Path, dict]:
        rec = wd / f"{name or ckpt.name}-recovered"
        ft = finetune(FinetuneConfig(src=str(ckpt), out=str(rec), corpus=[str(BOOKS)], holdout=VALIDATION,
                                     exclude=[EVAL_BOOK], tokens=args.recover_tokens, distill=str(args.reference),
                                     distill_weight=0.5), force=True, progress=False, log=log)
        return rec, {"ft_tokens": ft["tokens"], "ft_minutes": round(ft["seconds"] / 60, 1)}

    base = {"fraction": 0.0, "importance": "none", "seed": None, "recovered": False, "params": params_of(args.reference),
            "kept_ffn": ffn_width(args.reference)}
    row("unpruned", lambda: (base | {"type": args.type}, gguf_of(args.reference, "unpruned")))
    row("unpruned q4_k", lambda: (base | {"type": "q4_k"}, gguf_of(args.reference, "unpruned-q4_k", "q4_k")))

    def make_control():  # the same fine-tuning on the unpruned model: what recovery's tokens alone buy
        rec, ft = recovered(args.reference, "unpruned")
        return base | {"recovered": True, "type": args.type, **ft}, gguf_of(rec, rec.name)
    if args.recover:
        row("unpruned, recovery fine-tuning (control)", make_control)
    for frac in args.fractions:
        for imp in args.measures:
            for seed in ([0] if imp == "magnitude" else args.seeds):
                def make(frac=frac, imp=imp, seed=seed):
                    out, s = pruned(frac, imp, seed)
                    info = {"fraction": frac, "importance": imp, "seed": seed, "recovered": False, "type": args.type,
                            "kept_ffn": s["kept_per_layer"], "params": params_of(out)}
                    return info, gguf_of(out, out.name)
                row(f"{imp} {frac:g} seed {seed}", make)
                if imp in args.recover and seed == args.seeds[0] and (args.recover_at is None or frac in args.recover_at):
                    def make_rec(frac=frac, imp=imp, seed=seed):
                        rec, ft = recovered(wd / f"{imp}-{frac:g}-s{seed}")
                        info = {"fraction": frac, "importance": imp, "seed": seed, "recovered": True, "type": args.type,
                                "kept_ffn": ffn_width(rec), "params": params_of(rec), **ft}
                        return info, gguf_of(rec, rec.name)
                    row(f"{imp} {frac:g} seed {seed} recovered", make_rec)
    recipe_prune = load_prune_recipe(RECIPE)
    recipe_types = Recipe(linear="q4_k", patterns=load_recipe_file(RECIPE))

    def make_recipe():
        out, s = pruned(recipe_prune["ffn"], recipe_prune.get("importance", "activation"), 0,
                        multiple_of=recipe_prune.get("multiple_of", 32))
        rec, ft = recovered(out)
        info = {"fraction": recipe_prune["ffn"], "importance": recipe_prune.get("importance", "activation"), "seed": 0,
                "recovered": True, "type": "recipe (q4_k)", "kept_ffn": s["kept_per_layer"], "params": params_of(rec), **ft}
        return info, gguf_of(rec, "recipe-63mb", recipe_types)
    row("recipe gpt2-124m-63mb", make_recipe)

    # Speed: after everything else, back to back, one file per shape.
    log("speed ...")
    control = next((r for r in rows if r["name"].endswith("(control)")), None)
    for r in rows:
        r["ppl_ratio"] = round(r["ppl_pg35"] / rows[0]["ppl_pg35"], 3)
        if r["recovered"] and control is not None:  # against the same fine-tuning of the unpruned model
            r["ppl_ratio_vs_control"] = round(r["ppl_pg35"] / control["ppl_pg35"], 3)
    one_file: dict[tuple, Path] = {}  # files of one shape and type run alike: one of each is timed
    for r in rows:
        one_file.setdefault((r["kept_ffn"], r["type"]), Path(r["gguf"]))
    speeds = interleaved_speed(list(one_file.values()), args)
    for r in rows:
        r.update(speeds[one_file[(r["kept_ffn"], r["type"])]])
    for r in rows:
        ref = rows[0] if r["type"] == rows[0]["type"] else rows[1]
        r["pp_ratio"] = round(r["pp_t_s"] / ref["pp_t_s"], 3)
        r["tg_ratio"] = round(r["tg_t_s"] / ref["tg_t_s"], 3)
    shape_rows = [] if args.no_124m else speed_124m(args, wd, recipe_prune, recipe_types, log)
    report = {"meta": {"reference": str(args.reference), "type": args.type, "eval_text": f"{EVAL_BOOK}, {args.max_windows} "
                       "windows of 512 (held out of the reference, the calibration text and every recovery)",
                       "calibration": f"{args.calib_tokens} tokens of the training books, seeds {args.seeds}",
                       "spam": "deduplicated stratified test split, model answering (calibrated threshold; answer = "
                               "threshold 0)" + (f", first {args.spam_limit}" if args.spam_limit else ""),
                       "recovery": f"finetune --distill reference --distill-weight 0.5, {args.recover_tokens} tokens",
                       "threads": args.threads, "repeats": args.repeats},
              "rows": rows, "summary": summarize(rows), "gpt2_124m_shape": shape_rows}
    (wd / "pruning.json").write_text(json.dumps(report, indent=2))
    md = table(report["summary"], SUMMARY_COLS) + "\n" + table(shape_rows, SHAPE_COLS)
    (wd / "pruning.md").write_text(md)
    plot(report["summary"], wd / "pruning.png")
    print(json.dumps(report, indent=2))
    print()
    print(md)


def speed_124m(args, wd: Path, recipe_prune: dict, recipe_types, log) -> list[dict]:
    """Random GPT-2 124M-shape checkpoints with each fraction's FFN width, Q4_K, against the
    unpruned one in the same run."""
    from gpt2cube.converter import convert
    from gpt2cube.prune.ffn import kept_width
    from gpt2cube.synth import make_random_gpt2

    n_ff = 4 * GPT2_124M["n_embd"]
    widths = {"unpruned": n_ff}
    for frac in args.fractions:
        widths[f"ffn {frac:g}"] = kept_width(n_ff, frac, 32)  # as the quality rows; Q4_K falls back to Q4_0 where 256 does not divide
    widths["recipe gpt2-124m-63mb"] = kept_width(n_ff, recipe_prune["ffn"], recipe_prune.get("multiple_of", 32))
    out, files = [], []
    for name, width in widths.items():
        ckpt = wd / f"gpt2-124m-ffn{width}"
        if not (ckpt / "model.safetensors").exists():
            make_random_gpt2(ckpt, **GPT2_124M, n_inner=width, seed=0)
        f = wd / f"gpt2-124m-ffn{width}-q4_k.gguf"
        convert(ckpt, f, recipe_types, force=True, progress=False, log=lambda m: None)
        log(f"124M shape, {name}: {f.stat().st_size / 1e6:.1f} MB")
        files.append(f)
        out.append({"name": name, "kept_ffn": width, "params": params_of(ckpt), "file_mb": round(f.stat().st_size / 1e6, 2),
                    "type": "q4_k"})
    speeds = interleaved_speed(files, args)
    for r, f in zip(out, files):
        r.update(speeds[f])
    for r in out:
        r["pp_ratio"] = round(r["pp_t_s"] / out[0]["pp_t_s"], 3)
        r["tg_ratio"] = round(r["tg_t_s"] / out[0]["tg_t_s"], 3)
    return out


def summarize(rows: list[dict]) -> list[dict]:
    """One line per (fraction, measure, recovered, type): mean and standard deviation over seeds."""
    import numpy as np

    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["fraction"], r["importance"], r["recovered"], r["type"]), []).append(r)
    out = []
    for (frac, imp, rec, typ), rs in groups.items():
        def ms(key):
            v = np.array([r[key] for r in rs], dtype=float)
            return f"{v.mean():.4g}" + (f" ± {v.std(ddof=1):.2g}" if len(v) > 1 else "")
        out.append({"fraction": frac, "importance": imp, "recovered": rec, "type": typ, "seeds": len(rs),
                    "ppl_pg35": ms("ppl_pg35"), "ppl_ratio": ms("ppl_ratio"),
                    "ppl_ratio_vs_control": rs[0].get("ppl_ratio_vs_control", ""), "spam_f1": ms("spam_f1"),
                    "spam_f1_answer": ms("spam_f1_answer"), "kept_ffn": rs[0]["kept_ffn"], "params": rs[0]["params"],
                    "file_mb": rs[0]["file_mb"], "tg_ratio": rs[0]["tg_ratio"], "pp_ratio": rs[0]["pp_ratio"],
                    "_ppl": float(np.mean([r["ppl_pg35"] for r in rs])),
                    "_ppl_sd": float(np.std([r["ppl_pg35"] for r in rs], ddof=1)) if len(rs) > 1 else 0.0})
    return out


SUMMARY_COLS = ["fraction", "importance", "recovered", "type", "seeds", "ppl_pg35", "ppl_ratio", "ppl_ratio_vs_control", "spam_f1",
                "spam_f1_answer", "kept_ffn", "params", "file_mb", "pp_ratio", "tg_ratio"]
SHAPE_COLS = ["name", "kept_ffn", "params", "file_mb", "pp_t_s", "pp_ratio", "tg_t_s", "tg_ratio"]


def table(rows: list[dict], cols: list[str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def plot(summary: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    base = summary[0]["_ppl"]
    curves = [r for r in summary if r["importance"] != "none" and r["type"] != "recipe (q4_k)"]
    for imp in dict.fromkeys(r["importance"] for r in curves):
        for rec in (False, True):
            pts = sorted((r["fraction"], r["_ppl"], r["_ppl_sd"]) for r in curves if r["importance"] == imp and r["recovered"] == rec)
            if pts:
                ax.errorbar([0] + [p[0] for p in pts], [base] + [p[1] for p in pts], yerr=[0] + [p[2] for p in pts],
                            fmt="o-" if not rec else "s--", capsize=3, label=f"{imp}{' + recovery' if rec else ''}")
    ax.set_yscale("log")
    ax.set_xlabel("fraction of FFN neurons removed (every layer)")
    ax.set_ylabel("held-out PPL (pg35, llama.cpp); bars: sd over seeds")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


if __name__ == "__main__":
    main()
