"""Compressions alone and composed: each a pipeline recipe (`gpt2cube convert --recipe`), with its
size, held-out PPL through llama.cpp and (hypercube files) the routed engine at every radius,
prompt and generation speed against llama.cpp dense on the same file, conversion time and the
conversion's peak memory.

    python benchmarks/pipeline.py [--shape reference|124m] [--model DIR] [--stages NAME ...]
        [--dim 2] [--max-windows 40] [--repeats 3] [--n-prompt 128] [--n-gen 64] [--threads 2]
        [--out DIR] [--no-speed] [--no-ppl]

Stages (--stages picks; default all):
  f16                  the baseline
  q4_k imatrix         importance matrix, then Q4_K
  prune 25%            FFN pruning (activation importance, FLAP bias compensation), f16
  gptq tq2_0           importance matrix, GPTQ act-order TQ2_0 (row-fit scales), Q4_K embeddings
  cube q4_k            Q4_K with a Q_dim hypercube (learned routers)
  prune+gptq+cube      prune 25% -> imatrix -> GPTQ TQ2_0 (ffn_down Q4_0) -> hypercube, one recipe
  smallest recipe      recipes/reference-smallest.toml
Calibration: pg11 (a training book), 16,384 tokens; imatrix 65,536 tokens asked (as many as the
book has). PPL: pg35 (held out), --max-windows windows of 512. Each conversion is a fresh
`gpt2cube convert` process; its wall time and peak RSS are measured once (conversion is
deterministic; the table says so). Speed: per file, llama.cpp dense and the routed engine (dense
and each radius) in turn each round, a warm-up round, then the median of --repeats rounds of a
--n-prompt prompt and --n-gen generated tokens; ratios compare runs made side by side.
`--shape 124m` uses a random-weight GPT-2 124M (benchmarks/_common.build_checkpoint): conversion
time, memory and speed only (its perplexities mean nothing). Writes DIR/pipeline.json and
pipeline.png; prints JSON and the table. Run it on an otherwise idle machine: ggml's threads spin.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
BOOKS = DATA / "gutenberg" / "books"
sys.path.insert(0, str(ROOT / "benchmarks"))
from _common import PY, build_checkpoint, interleaved_medians, print_report, run_measured  # noqa: E402
from routed import speed_run  # noqa: E402

CALIB_TOKENS = 16_384
IMATRIX = {"run": "imatrix", "tokens": 65_536}
PRUNE = {"run": "prune", "ffn": 0.25, "importance": "activation", "multiple_of": 256}
GPTQ_TQ2 = {"run": "quantize", "type": "tq2_0", "embed_type": "q4_k", "method": "gptq", "act_order": True}


def stages(dim: int) -> dict[str, list[dict] | Path]:
    cube = {"run": "hypercube", "dim": dim}
    return {
        "f16": [{"run": "quantize", "type": "f16"}],
        "q4_k imatrix": [IMATRIX, {"run": "quantize", "type": "q4_k"}],
        "prune 25%": [PRUNE, {"run": "quantize", "type": "f16"}],
        "gptq tq2_0": [IMATRIX, GPTQ_TQ2],
        "cube q4_k": [{"run": "quantize", "type": "q4_k"}, cube],
        # ffn_down Q4_0: its rows are the pruned width (768), whose Q_2 groups of 192 must fill whole
        # blocks; TQ2_0 and K-quant blocks are 256 wide, Q4_0's 32
        "prune+gptq+cube": [PRUNE, IMATRIX, {**GPTQ_TQ2, "types": {"blk.*.ffn_down.weight": "q4_0"}}, cube],
        "smallest recipe": ROOT / "recipes" / "reference-smallest.toml",
    }


def toml_of(steps: list[dict], calib: Path) -> str:
    def value(v) -> str:
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{value(k)} = {value(x)}" for k, x in v.items()) + " }"
        return ("true" if v else "false") if isinstance(v, bool) else f'"{v}"' if isinstance(v, str) else str(v)

    lines = ["[calib]", f'text = "{calib}"', f"tokens = {CALIB_TOKENS}", ""]
    for s in steps:
        lines += ["[[step]]", *(f"{k} = {value(v)}" for k, v in s.items()), ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=["reference", "124m"], default="reference")
    ap.add_argument("--model", type=Path, default=None, help="checkpoint [default: models/reference, or the 124M build]")
    ap.add_argument("--stages", nargs="+", default=None, metavar="NAME")
    ap.add_argument("--dim", type=int, default=2)
    ap.add_argument("--max-windows", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--n-prompt", type=int, default=128)
    ap.add_argument("--n-gen", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("/tmp/gpt2cube-pipeline"))
    ap.add_argument("--no-speed", action="store_true")
    ap.add_argument("--no-ppl", action="store_true", help="speed, size and conversion only (no perplexities)")
    args = ap.parse_args()
    if not BOOKS.is_dir():
        sys.exit(f"{BOOKS}: not found; this benchmark needs ../shared/data (calibration and held-out books)")
    all_stages = stages(args.dim)
    names = args.stages or list(all_stages)
    unknown = [n for n in names if n not in all_stages]
    if unknown:
        sys.exit(f"--stages {unknown[0]!r}; expected some of: {', '.join(all_stages)}")
    args.out.mkdir(parents=True, exist_ok=True)
    model = args.model or (ROOT / "models" / "reference" if args.shape == "reference" else build_checkpoint(args.out))
    score = (args.shape == "reference" or args.model is not None) and not args.no_ppl
    calib = BOOKS / "pg11.txt"
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731

    files: dict[str, tuple[Path, float, float]] = {}
    for name in names:
        recipe = all_stages[name]
        if isinstance(recipe, list):
            path = args.out / f"{name.replace(' ', '_').replace('%', 'pct').replace('+', '_')}.toml"
            path.write_text(toml_of(recipe, calib), encoding="utf-8")
            recipe = path
        gguf = args.out / f"{recipe.stem}-{args.shape}.gguf"
        cmd = [PY, "-m", "gpt2cube", "convert", str(model), "-o", str(gguf), "--recipe", str(recipe), "--calib",
               str(calib), "--force", "--quiet"]
        wall, rss = run_measured(cmd)
        files[name] = (gguf, wall, rss)
        log(f"{name}: {gguf.stat().st_size / 1e6:.2f} MB in {wall:.1f} s, peak RSS {rss:.0f} MB")

    sys.path.insert(0, str(ROOT))
    from gpt2cube.eval.perplexity import llama_perplexity
    from gpt2cube.eval.routed import routed_perplexity
    from gpt2cube.gguf_file import read_gguf
    from gpt2cube.hypercube.metadata import has_hypercube, read_hypercube
    from gpt2cube.hypercube.topology import Hypercube

    text = (BOOKS / "pg35.txt").read_text(encoding="utf-8")
    rows: list[dict] = []
    base_ppl = None
    for name, (gguf, wall, rss) in files.items():
        reader = read_gguf(gguf)
        dim = read_hypercube(reader, gguf).dim if has_hypercube(reader) else None
        ppl = llama_perplexity(gguf, text, 512, max_windows=args.max_windows, n_threads=args.threads).ppl if score else None
        if name == "f16":
            base_ppl = ppl
        row = {"stage": name, "engine": "llama.cpp", "radius": "-", "file_mb": round(gguf.stat().st_size / 1e6, 2),
               "ppl": ppl and round(ppl, 2), "convert_s": round(wall, 1), "convert_peak_rss_mb": round(rss)}
        out = [row]
        if dim is not None:
            for radius in [None, *range(dim)]:
                r = routed_perplexity(gguf, text, 512, radius, max_windows=args.max_windows,
                                      n_threads=args.threads).ppl if score else None
                used = Hypercube(dim).ball_size(dim if radius is None else radius)
                out.append({"stage": name, "engine": "routed", "radius": "dense" if radius is None else radius,
                            "ffn_groups": f"{used}/{2 ** dim}", "file_mb": row["file_mb"], "ppl": r and round(r, 2)})
        if not args.no_speed:
            speeds = speed_of(gguf, dim, text, args)
            base_pp, base_tg = speeds["llama"]
            for o in out:
                key = "llama" if o["engine"] == "llama.cpp" else (None if o["radius"] == "dense" else o["radius"])
                pp, tg = speeds[key]
                o.update(pp_tok_s=round(pp, 1), tg_tok_s=round(tg, 1), pp_vs_llama=round(pp / base_pp, 3),
                         tg_vs_llama=round(tg / base_tg, 3))
        rows += out
        log(f"{name}: measured")
    for r in rows:
        if base_ppl and r.get("ppl"):
            r["ppl_vs_f16"] = round(r["ppl"] / base_ppl, 4)
    meta = {"model": str(model), "shape": args.shape, "calibration": f"pg11, {CALIB_TOKENS} tokens",
            "ppl_text": f"pg35 (held out), {args.max_windows} windows of 512" if score else "not scored (--no-ppl, or random weights)",
            "speed": None if args.no_speed else f"pp{args.n_prompt} / tg{args.n_gen}, median of {args.repeats} "
            "interleaved rounds after a warm-up, llama.cpp dense and the routed engine on the same file",
            "convert": "one fresh `gpt2cube convert --recipe` process per stage: wall seconds and peak RSS, measured once",
            "threads": args.threads, "dim": args.dim}
    print_report(rows, meta, args.out / "pipeline.json")
    plot(rows, args.out / "pipeline.png")


def speed_of(gguf: Path, dim: int | None, text: str, args) -> dict:
    """(pp, tg) tokens/s medians: 'llama' and, for a hypercube file, the engine per radius (None = dense)."""
    from gpt2cube.engine.binding import RoutedModel
    from gpt2cube.eval.llama_runner import load_llama
    from gpt2cube.tokenizers import GGUFTokenizer

    tok = GGUFTokenizer(gguf)
    prompt = tok.encode(text)[: args.n_prompt]
    tok.close()
    n_ctx = args.n_prompt + args.n_gen + 8
    llm = load_llama(gguf, n_ctx=n_ctx, n_threads=args.threads)

    def llama_prompt(p):
        llm.reset()
        llm.eval(p)

    configs = {"llama": (llama_prompt, lambda t: llm.eval([t]))}
    eng = None
    if dim is not None:
        eng = RoutedModel(gguf, n_ctx=n_ctx, n_threads=args.threads)

        def engine(radius):
            def run_prompt(p):
                eng.reset()
                eng.eval(p, radius, all_logits=False)
            return run_prompt, lambda t: eng.eval([t], radius, all_logits=False)

        configs.update({r: engine(r) for r in [None, *range(dim)]})
    try:
        return interleaved_medians({k: speed_run(*fns, prompt, args.n_gen) for k, fns in configs.items()},
                                   args.repeats, warmup=True)
    finally:
        llm.close()
        if eng is not None:
            eng.close()


def plot(rows: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = any(r.get("ppl") for r in rows)  # else an unscored shape: speed against size
    key, ylabel = ("ppl", "PPL pg35 (held out)") if scored else ("tg_tok_s", "tg tokens/s")
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in (r for r in rows if r.get(key)):
        label = r["stage"] + ("" if r["engine"] == "llama.cpp" else f" routed r={r['radius']}")
        ax.scatter(r["file_mb"], r[key], marker="o" if r["engine"] == "llama.cpp" else "x")
        ax.annotate(label, (r["file_mb"], r[key]), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("file MB")
    ax.set_ylabel(ylabel)
    if scored:
        ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
