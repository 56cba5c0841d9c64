"""The routed engine against stock llama.cpp on the reference model: held-out perplexity and
speed for the dense FFN and each routing radius.

    python benchmarks/routed.py [--model models/reference] [--dim 2] [--types q8_0 q4_k]
                                [--max-windows 40] [--repeats 3] [--out DIR] [--speed-only]

--speed-only skips the perplexities (for random-weight checkpoints of other shapes, e.g. the 124M
one benchmarks/convert.py builds: speed does not depend on the weights).

The model is converted with --hypercube-dim D, calibrated on a training book (pg11, never a
held-out one) with recipes/concepts.txt. Per type: llama.cpp (dense, its default CPU repacking),
the engine dense, and the engine at radius 0..D-1, each with PPL on The Time Machine (pg35,
held out; windows of 512, second half scored) and prompt (pp) / generation (tg) tokens per
second (the median of --repeats rounds after a warm-up round; in each round llama.cpp and every
engine setting run in turn, so ratios compare runs made side by side), the share of the weight
bytes a generated token reads (the ball's share of ffn_up/ffn_down + everything else), and the
memory-bandwidth bound for those bytes (tg <= read bandwidth / bytes per token; the bandwidth is
measured here, a threaded sum over 1 GiB, and is in the JSON's meta). Prints JSON and a table;
writes DIR/routed.json. Run it on an otherwise idle machine: ggml's threads spin.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT / "benchmarks"))
from _common import interleaved_medians, print_report  # noqa: E402


def speed_run(run_prompt, run_token, prompt: list[int], n_gen: int):
    """One timed prompt and n_gen generated tokens after it -> (pp, tg) tokens/s."""
    def run() -> tuple[float, float]:
        t0 = time.perf_counter()
        run_prompt(prompt)
        pp_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for i in range(n_gen):
            run_token(prompt[i % len(prompt)])
        return len(prompt) / pp_s, n_gen / (time.perf_counter() - t0)
    return run


def memory_bandwidth(threads: int, mib: int = 1024, repeats: int = 5) -> float:
    """Bytes/s this machine reads: the best of `repeats` sums of a `mib` MiB array split over
    `threads` threads (numpy releases the GIL in its loops). An upper bound on what a token's
    weight reads can use; tg can be at most bandwidth / bytes read per token."""
    import numpy as np
    from concurrent.futures import ThreadPoolExecutor

    a = np.ones(mib << 18, dtype=np.float32)
    parts = np.array_split(a, threads)
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats):
            t0 = time.perf_counter()
            list(pool.map(np.sum, parts))
            best = min(best, time.perf_counter() - t0)
    return a.nbytes / best


def weight_bytes(path: Path) -> dict:
    """Bytes of the weights a generated token reads: the FFN matrices, and everything else that is
    multiplied (attention, norms, biases, the head; of the embeddings only one row is read, so
    they count only as the head when tied)."""
    from gguf import GGUFReader

    ffn = other = 0
    names = {t.name: int(t.n_bytes) for t in GGUFReader(path).tensors}
    for name, n in names.items():
        if ".ffn_up.weight" in name or ".ffn_down.weight" in name:
            ffn += n
        elif name == "position_embd.weight" or (name == "token_embd.weight" and "output.weight" in names):
            continue
        else:
            other += n
    return {"ffn": ffn, "other": other}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "reference")
    ap.add_argument("--dim", type=int, default=2)
    ap.add_argument("--types", nargs="+", default=["q8_0", "q4_k"])
    ap.add_argument("--max-windows", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--n-prompt", type=int, default=256)
    ap.add_argument("--n-gen", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("/tmp/gpt2cube-routed"))
    ap.add_argument("--speed-only", action="store_true", help="no perplexities")
    ap.add_argument("--router", default="learned", choices=["learned", "pca"],
                    help="how the file's routers are fitted (speed does not depend on it; pca calibrates faster)")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from gpt2cube.converter import convert
    from gpt2cube.engine.binding import RoutedModel
    from gpt2cube.eval.llama_runner import load_llama
    from gpt2cube.eval.perplexity import llama_perplexity
    from gpt2cube.eval.routed import routed_perplexity
    from gpt2cube.hypercube.build import HypercubeOptions
    from gpt2cube.hypercube.topology import Hypercube
    from gpt2cube.tokenizers import GGUFTokenizer

    books = DATA / "gutenberg" / "books"
    if not books.is_dir():
        sys.exit(f"{books}: not found; this benchmark needs ../shared/data")
    args.out.mkdir(parents=True, exist_ok=True)
    text = (books / "pg35.txt").read_text(encoding="utf-8")
    rows = []
    bandwidth = memory_bandwidth(args.threads)
    for qtype in args.types:
        path = args.out / f"reference-{qtype}-cube{args.dim}.gguf"
        convert(args.model, path, qtype, force=True, progress=False, log=lambda m: None,
                hypercube=HypercubeOptions(args.dim, books / "pg11.txt", 16384, ROOT / "recipes" / "concepts.txt",
                                           router=args.router))
        read = weight_bytes(path)
        tok = GGUFTokenizer(path)
        prompt = tok.encode(text)[: args.n_prompt]
        tok.close()

        n_ctx = args.n_prompt + args.n_gen + 8
        llm = load_llama(path, n_ctx=n_ctx, n_threads=args.threads)
        eng = RoutedModel(path, n_ctx=n_ctx, n_threads=args.threads)

        def llama_prompt(p):
            llm.reset()
            llm.eval(p)

        def engine_runs(radius):
            def run_prompt(p):
                eng.reset()
                eng.eval(p, radius, all_logits=False)  # llama.cpp computes the last position's only, too
            return run_prompt, lambda t: eng.eval([t], radius, all_logits=False)

        radii = [None, *range(args.dim)]
        configs = {"llama": (llama_prompt, lambda t: llm.eval([t]))}
        configs.update({("engine", r): engine_runs(r) for r in radii})
        # llama.cpp and every engine setting in turn each round, after a warm-up round
        speeds = interleaved_medians({k: speed_run(*fns, prompt, args.n_gen) for k, fns in configs.items()},
                                     args.repeats, warmup=True)
        llm.close()
        eng.close()
        total = read["other"] + read["ffn"]
        base_pp, base_tg = speeds["llama"]
        ppl = None if args.speed_only else llama_perplexity(path, text, 512, max_windows=args.max_windows,
                                                            n_threads=args.threads).ppl
        rows.append({"type": qtype, "engine": "llama.cpp (dense)", "radius": "-", "ffn_groups": f"{2**args.dim}/{2**args.dim}",
                     "weight_bytes_share": 1.0, "ppl": ppl and round(ppl, 2), "pp_tok_s": round(base_pp, 1),
                     "tg_tok_s": round(base_tg, 1), "pp_vs_llama": 1.0, "tg_vs_llama": 1.0,
                     "tg_bound_tok_s": round(bandwidth / total, 1)})
        for radius in radii:
            pp, tg = speeds[("engine", radius)]
            ppl = None if args.speed_only else routed_perplexity(path, text, 512, radius, max_windows=args.max_windows,
                                                                 n_threads=args.threads).ppl
            used = Hypercube(args.dim).ball_size(args.dim if radius is None else radius)
            read_bytes = read["other"] + used / 2**args.dim * read["ffn"]
            rows.append({"type": qtype, "engine": "routed engine", "radius": "dense" if radius is None else radius,
                         "ffn_groups": f"{used}/{2**args.dim}", "weight_bytes_share": round(read_bytes / total, 3),
                         "ppl": ppl and round(ppl, 2), "pp_tok_s": round(pp, 1), "tg_tok_s": round(tg, 1),
                         "pp_vs_llama": round(pp / base_pp, 3), "tg_vs_llama": round(tg / base_tg, 3),
                         "tg_bound_tok_s": round(bandwidth / read_bytes, 1)})
    meta = {"model": str(args.model), "kv_cache": "f16 (both)", "measured_read_bandwidth_gb_s": round(bandwidth / 1e9, 2), "dim": args.dim, "threads": args.threads, "repeats": args.repeats,
            "n_prompt": args.n_prompt, "n_gen": args.n_gen, "ppl_text": "pg35 (held out)",
            "ppl_windows": args.max_windows, "calibration": "pg11, 16384 tokens"}
    print_report(rows, meta, args.out / "routed.json")


if __name__ == "__main__":
    main()
