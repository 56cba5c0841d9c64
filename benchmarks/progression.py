"""From n-grams to GPT on the same tokens.

--stage reference (the default): unigram, modified Kneser-Ney 2..5-gram (the headline baseline,
as KenLM's lmplz), interpolated KN 5-gram and the backoff 5-gram trained on the Gutenberg training
books, then the reference GPT-2 in each GGUF type run by llama.cpp, all scored with one definition
(llama-perplexity's windows, second half scored) on the held-out books and on WikiText-2 test.
Writes DIR/progression.{json,md,png}.

--stage matched: every model trained here on the same training books with the same token budget
(--budget) and window (--train-ctx): unigram and modified-KN 5-gram (on the budget's tokens and on
all of them), Bengio FFNN, Elman RNN, LSTM (`gpt2cube baseline neural`), and the GPT-2 variants of
`gpt2cube train --pos ... [--parallel-residual] [--attention linformer] [--alternate-direction]
[--residual-diffusion S]` and the seed's four (`--drift-diffusion [PARTS]`, `--parallel mean|concat|add`,
`--duo-predict [--duo-loss original]`, `--pos rotating [--rotating-freqs gp] [--rotating-norm]`)
at one shape (--shape LxExH), non-embedding parameters
matched within about 20 %. Held-out PPL with its standard error (PyTorch, the same windows for
every row; plus llama.cpp on the f16 file where the variant converts), parameters, training
tokens/s, HellaSwag (seeded validation subset), and a length-extrapolation table: PPL at 1x, 2x
and 4x the training window (llama.cpp where the architecture runs there, else PyTorch; absolute
position tables stop at 1x). Each finished row is saved at once as DIR/rows/<row>.json; a later run
skips rows already saved there (--redo measures them again), so the table can be built in several
runs of one or a few --rows each; the table DIR/matched.{json,md,png} is written from every saved
row, in the order of MATCHED_ROWS. Each row is what this command runs:

    gpt2cube train --corpus BOOKS --holdout ... --pos P [--parallel-residual] [...] --n-layer L --n-embd E --n-head H \
        --ctx C --tokens B --batch-size 8 --lr 2e-3 --warmup-steps 50
    gpt2cube baseline neural --model ffnn|rnn|lstm --train BOOKS --exclude ... --tokens B --ctx C ...

    python benchmarks/progression.py [--stage reference|matched] [--model models/reference] [--ctx 512]
        [--max-windows N] [--types f16 q8_0 q4_k tq2_0] [--budget 300000] [--train-ctx 128]
        [--shape 4x128x4] [--rows ...] [--out DIR]
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
    ap.add_argument("--stage", choices=["reference", "matched"], default="reference")
    ap.add_argument("--budget", type=int, default=300_000, help="matched: training tokens per model")
    ap.add_argument("--train-ctx", type=int, default=128, help="matched: training window (1x of the extrapolation)")
    ap.add_argument("--shape", default="4x128x4", help="matched: GPT n_layer x n_embd x n_head")
    ap.add_argument("--rows", nargs="+", default=None, help="matched: only these rows (labels of MATCHED_ROWS)")
    ap.add_argument("--redo", action="store_true", help="matched: measure rows already saved in DIR/rows again")
    ap.add_argument("--hellaswag", type=int, default=200, help="matched: seeded HellaSwag tasks (0: none)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.stage == "matched":
        return matched(args)
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


# label -> ("gpt", VariantSpec fields: train's options) | ("neural", baseline neural options) | ("ngram", order, budget-only)
MATCHED_ROWS: dict[str, tuple] = {
    "unigram": ("ngram", 1, False),
    "modified KN 5-gram (budget tokens)": ("ngram", 5, True),
    "modified KN 5-gram (all training tokens)": ("ngram", 5, False),
    "FFNN (Bengio, 5-gram window)": ("neural", {"kind": "ffnn", "n_hidden": 1024, "order": 5}),
    "Elman RNN": ("neural", {"kind": "rnn", "n_hidden": 768}),
    "LSTM": ("neural", {"kind": "lstm", "n_hidden": 384}),
    "GPT-2 learned positions": ("gpt", {}),
    "GPT-2 sinusoidal": ("gpt", {"pos": "sinusoidal"}),
    "GPT-2 RoPE": ("gpt", {"pos": "rope"}),
    "GPT-2 RoPE, 1/4 of head dims": ("gpt", {"pos": "rope", "rope_fraction": 0.25}),
    "GPT-2 RoPE, parallel residual blocks": ("gpt", {"pos": "rope", "parallel_residual": True}),
    "GPT-2 ALiBi": ("gpt", {"pos": "alibi"}),
    "GPT-2 no positions": ("gpt", {"pos": "none"}),
    "GPT-2 KERPLE": ("gpt", {"pos": "kerple"}),
    "GPT-2 FIRE": ("gpt", {"pos": "fire"}),
    "GPT-2 RoPE, per-head wavelengths (rope-spread)": ("gpt", {"pos": "rope-spread"}),
    "GPT-2 causal Linformer (block 32, k 8)": ("gpt", {"attention": "linformer", "linformer_block": 32, "linformer_k": 8}),
    "GPT-2 alternate-direction": ("gpt", {"alternate_direction": True}),
    "GPT-2 residual diffusion (sigma 0.1)": ("gpt", {"residual_diffusion": 0.1}),
    # the seed's four variants (shiva-upsurge/parallel_transformer d868f70), as its code defines them
    "GPT-2 drift-diffusion (drift, diffusion, baseline)": ("gpt", {"drift_diffusion": "drift,diffusion,baseline"}),
    "GPT-2 drift only (with baseline)": ("gpt", {"drift_diffusion": "drift,baseline"}),
    "GPT-2 parallel paths (mean)": ("gpt", {"parallel_paths": "mean"}),
    "GPT-2 parallel paths (concat)": ("gpt", {"parallel_paths": "concat"}),
    "GPT-2 parallel paths (add)": ("gpt", {"parallel_paths": "add"}),
    "GPT-2 duo-predict (intended loss)": ("gpt", {"duo_predict": True}),
    "GPT-2 duo-predict (the seed's loss alignment)": ("gpt", {"duo_predict": True, "duo_loss": "original"}),
    "GPT-2 rotating heads (lr)": ("gpt", {"pos": "rotating"}),
    "GPT-2 rotating heads (lr, norm)": ("gpt", {"pos": "rotating", "rotating_norm": True}),
    "GPT-2 rotating heads (gp)": ("gpt", {"pos": "rotating", "rotating_freqs": "gp"}),
    "GPT-2 rotating heads (gp, norm)": ("gpt", {"pos": "rotating", "rotating_freqs": "gp", "rotating_norm": True}),
}


def matched(args) -> None:
    """The matched-budget table and the length-extrapolation table (see the module doc)."""
    import torch

    from gpt2cube.tokenizers import encode_text, hf_tokenizer
    from gpt2cube.train.data import corpus_files, split_holdout

    torch.set_num_threads(args.threads)
    books = args.data / "gutenberg" / "books"
    if not books.is_dir():
        sys.exit(f"{books}: not found; the progression needs ../shared/data")
    train_files, held = split_holdout(corpus_files([books]), [Path(h) for h in HELD_OUT])
    held_text = "\n".join(f.read_text(encoding="utf-8") for f in held)
    held_tokens = np.array(encode_text(hf_tokenizer(), held_text))
    hs_data = args.data / "hellaswag" / "hellaswag_val_full.txt"
    n_layer, n_embd, n_head = (int(v) for v in args.shape.split("x"))
    C, W = args.train_ctx, args.max_windows or 200
    args.out.mkdir(parents=True, exist_ok=True)
    wanted = args.rows or list(MATCHED_ROWS)
    unknown = sorted(set(wanted) - set(MATCHED_ROWS))
    if unknown:
        sys.exit(f"--rows: unknown {unknown}; known: {list(MATCHED_ROWS)}")
    meta = {"budget_tokens": args.budget, "train_ctx": C, "gpt_shape": args.shape, "held_out": HELD_OUT,
            "windows": W, "held_out_tokens": int(len(held_tokens)), "hellaswag_tasks": args.hellaswag,
            "hellaswag_split": "validation"}
    saved_dir = args.out / "rows"
    saved_dir.mkdir(exist_ok=True)
    cache: dict = {}  # the training tokens, loaded once for the n-gram rows
    for label in wanted:
        saved = saved_dir / (_slug(label) + ".json")
        if saved.is_file() and not args.redo:
            if json.loads(saved.read_text())["meta"] == meta:
                print(f"{label}: saved in {saved}, skipped (--redo measures it again)", file=sys.stderr)
                continue
            print(f"{label}: {saved} was measured with other settings; measuring again", file=sys.stderr)
        kind, *opt = MATCHED_ROWS[label]
        row, ex = _matched_row(args, label, kind, opt, C, W, held_text, held_tokens, train_files, hs_data,
                               (n_layer, n_embd, n_head), cache)
        _write_atomic(saved, json.dumps({"meta": meta, "threads": args.threads, "row": row, "extrapolation": ex}, indent=2))
    rows, extrap, threads = [], [], set()
    for label in MATCHED_ROWS:
        saved = saved_dir / (_slug(label) + ".json")
        if saved.is_file():
            rec = json.loads(saved.read_text())
            if rec["meta"] == meta:
                rows.append(rec["row"])
                threads.add(rec["threads"])
                if rec["extrapolation"]:
                    extrap.append(rec["extrapolation"])
    meta["threads"] = sorted(threads)
    report = {"meta": meta, "rows": rows, "extrapolation": extrap}
    (args.out / "matched.json").write_text(json.dumps(report, indent=2))
    md = _md_table(rows) + ("\n\nLength extrapolation (PPL, held-out books):\n\n" + _md_table(extrap) if extrap else "")
    (args.out / "matched.md").write_text(md + "\n")
    _plot_matched(rows, f"PPL held-out (ctx {C})", args.out / "matched.png")
    print(json.dumps(report, indent=2))
    print(md)


def _slug(label: str) -> str:
    return label.replace(" ", "_").replace(",", "").replace("/", "-").replace("(", "").replace(")", "")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".part")
    tmp.write_text(text)
    tmp.replace(path)


def _matched_row(args, label, kind, opt, C, W, held_text, held_tokens, train_files, hs_data, shape, cache):
    """Train (or fit) one row's model and measure it: (row, extrapolation row or None)."""
    from gpt2cube.constants import GPT2_VOCAB_SIZE
    from gpt2cube.converter import convert
    from gpt2cube.errors import InputError, UnsupportedArchitecture
    from gpt2cube.eval.hellaswag import evaluate_hellaswag
    from gpt2cube.eval.perplexity import hf_perplexity, llama_perplexity
    from gpt2cube.train.data import load_tokens
    from gpt2cube.train.ngram import NGramModel, ngram_perplexity
    from gpt2cube.train.trainer import TrainConfig, train
    from gpt2cube.variants.spec import POSITIONS, VariantSpec

    n_layer, n_embd, n_head = shape
    row = {"model": label, "parameters": None, "non_embedding_parameters": None, "train_tokens": None,
           "train_tok_s": None, f"PPL held-out (ctx {C})": None, "±": None, "PPL llama.cpp f16": None,
           "HellaSwag": None}
    t0 = time.perf_counter()
    if kind == "ngram":
        order, budget_only = opt
        if "tokens" not in cache:
            cache["tokens"] = load_tokens(train_files)
        toks = cache["tokens"][: args.budget] if budget_only else cache["tokens"]
        model = NGramModel(order, "mkn").fit(toks)
        r = ngram_perplexity(model, held_tokens, C, W)
        row.update({"train_tokens": int(len(toks)), f"PPL held-out (ctx {C})": round(r.ppl, 2),
                    "±": round(r.ppl_stderr, 2), "fit_s": round(time.perf_counter() - t0, 1)})
        print(json.dumps(row), file=sys.stderr)
        return row, None
    out = args.out / _slug(label)
    common = dict(corpus=[str(f) for f in train_files], out=str(out), ctx=C, tokens=args.budget, batch_size=8,
                  lr=2e-3, warmup_steps=50, eval_every=10**9, seed=1234, device="cpu")
    if kind == "neural":
        cfg = TrainConfig(**common, n_embd=opt[0].get("n_embd", n_embd), neural={"n_embd": n_embd, **opt[0]})
    else:
        spec = VariantSpec(**opt[0])
        cfg = TrainConfig(**common, n_layer=n_layer, n_embd=n_embd, n_head=n_head,
                          variant={} if spec.is_plain_gpt2 else {**vars(spec)})
    summary = train(cfg, progress=False, log=lambda m: None)
    n_params = summary["parameters"]
    emb = GPT2_VOCAB_SIZE * n_embd
    if kind == "gpt":  # a learned position table and duo-predict's mask-token row are embeddings too
        emb = (spec.vocab_size + (C if POSITIONS[spec.pos].table == "learned" else 0)) * n_embd
    r = hf_perplexity(out, held_text, C, max_windows=W)
    row.update({"parameters": n_params, "non_embedding_parameters": n_params - emb,
                "train_tokens": summary["tokens"], "train_tok_s": summary["tokens_per_s"],
                f"PPL held-out (ctx {C})": round(r.ppl, 2), "±": round(r.ppl_stderr, 2)})
    gguf = out / "f16.gguf"
    try:
        if kind == "gpt":
            convert(out, gguf, "f16", force=True, progress=False, log=lambda m: None)
        else:
            gguf = None
    except UnsupportedArchitecture:
        gguf = None
    if gguf is not None:
        row["PPL llama.cpp f16"] = round(llama_perplexity(gguf, held_text, C, max_windows=W).ppl, 2)
    if args.hellaswag and hs_data.is_file():
        row["HellaSwag"] = round(evaluate_hellaswag(out, hs_data, limit=args.hellaswag, seed=0)["accuracy"], 3)
    ex = None
    if kind == "gpt":
        ex = {"model": label, "engine": "llama.cpp" if gguf is not None else "pytorch"}
        for mult in (1, 2, 4):
            try:
                if gguf is not None:
                    ppl = llama_perplexity(gguf, held_text, C * mult, max_windows=max(1, W // mult)).ppl
                else:
                    ppl = hf_perplexity(out, held_text, C * mult, max_windows=max(1, W // mult)).ppl
                ex[f"{mult}x ({C * mult})"] = round(ppl, 2)
            except InputError as e:  # an absolute position table: bounded to 1x
                ex[f"{mult}x ({C * mult})"] = "n/a (position table)" if "context length" in str(e) else str(e)
        print(json.dumps(ex), file=sys.stderr)
    row["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(row), file=sys.stderr)
    return row, ex


def _md_table(rows: list[dict]) -> str:
    cols = list(dict.fromkeys(c for r in rows for c in r))
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join("" if r.get(c) is None else str(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(out)


def _plot_matched(rows: list[dict], key: str, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.8))
    x = np.arange(len(rows))
    ax.bar(x, [r[key] for r in rows], yerr=[r["±"] for r in rows], capsize=3)
    ax.set_xticks(x, [r["model"] for r in rows], rotation=35, ha="right")
    ax.set_yscale("log")
    ax.set_ylabel(f"held-out {key.split('(')[0].strip()} (log scale)")
    ax.set_title("Same books, same token budget: n-grams -> FFNN -> RNN -> LSTM -> GPT-2 variants")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


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
