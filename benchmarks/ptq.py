"""Calibrated quantization without training on the reference model: round to nearest, importance
matrix, GPTQ and GPTQ + importance matrix, each file run in llama.cpp, beside llama.cpp's own
llama-quantize --imatrix on the same model and the same importance matrix.

    python benchmarks/ptq.py [--workdir DIR] [--reference models/reference]
        [--types q4_0 q4_k q6_k tq2_0] [--methods rtn imatrix gptq gptq+imatrix gptq+ao gptq+ao+imatrix]
        [--calib-tokens 16384] [--max-windows 10] [--ternary-scales tensor row-fit]
        [--curve 2048 8192 32768] [--embed-types q8_0 q6_k] [--no-llama-tools] [--tools-dir DIR] [--shape-124m]

Calibration text: the first 60,000 characters of each of the first 12 training books (sorted by
name; the held-out pg35 and the three validation books excluded), written to WORKDIR/calib.txt;
`--calib-tokens` of it feed both `gpt2cube imatrix` and `--method gptq` (windows of 512).
Evaluation: the held-out book pg35 (The Time Machine), `--max-windows` windows of 512, second
half of each scored, as llama-perplexity does; every file in llama.cpp through llama-cpp-python
(f32 KV cache). Columns: PPL and its ratio to the f16 file's; KL divergence from the f16 file's
next-token distribution and top-1 agreement with it on the same scored positions, as
`llama-perplexity --kl-divergence` measures them; conversion seconds and peak RSS of the
`gpt2cube convert` process (median of 1 run: calibration dominates). llama-quantize rows:
llama-quantize --pure --imatrix on our f16 file with our importance matrix (and, with the
llama-imatrix tool built, llama-imatrix's own matrix of the same f16 file on the same text;
their agreement is reported per tensor). `--curve` adds tq2_0 GPTQ rows over calibration tokens;
`--embed-types` adds tq2_0 rows with other embedding types (the ternary default question);
`--shape-124m` times GPTQ conversion of a random GPT-2 124M checkpoint (speed only).
Writes WORKDIR/ptq.json, ptq.md, ptq.png; prints JSON and the table.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _common import (BOOKS, EVAL_BOOK, PY, build_checkpoint, build_llama_tool, calibration_files,  # noqa: E402
                     print_report)

LLAMA_TYPE = {"q4_0": "Q4_0", "q4_k": "Q4_K", "q6_k": "Q6_K"}  # llama-quantize type names


def calibration_text(out: Path, books: int = 12, chars: int = 60_000) -> Path:
    files = calibration_files()[:books]
    out.write_text("\n\n".join(p.read_text(encoding="utf-8")[:chars] for p in files), encoding="utf-8")
    return out


def measured(cmd: list) -> tuple[float, float]:
    """(seconds, peak RSS MB) of a command, the RSS read by /usr/bin/time: a child forked from
    this process (which holds the reference logits) would count this process's pages as its own."""
    t0 = time.perf_counter()
    r = subprocess.run(["/usr/bin/time", "-f", "__RSS_KB %M", *map(str, cmd)], stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, text=True)
    sec = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({r.returncode}):\n{r.stderr[-2000:]}")
    kb = re.findall(r"__RSS_KB (\d+)", r.stderr)  # llama-imatrix leaves its last line open: search, not split
    return sec, int(kb[-1]) / 1024


def gpt2cube(*args) -> tuple[float, float]:
    """(seconds, peak RSS MB) of one gpt2cube command in its own process."""
    return measured([PY, "-m", "gpt2cube", *args])


class Reference:
    """The f16 file's log-probabilities on the scored positions of every evaluation window."""

    def __init__(self, f16: Path, text: str, ctx: int, max_windows: int):
        from gpt2cube.eval.perplexity import window_starts
        from gpt2cube.tokenizers import encode_text, hf_tokenizer

        tokens = np.asarray(encode_text(hf_tokenizer(), text))
        self.windows = [tokens[s : s + ctx] for s in window_starts(len(tokens), ctx, max_windows)]
        self.first = ctx // 2
        self.logp = [self._logp(f16, w) for w in self.windows]

    def _logp(self, path: Path, w: np.ndarray) -> np.ndarray:
        from gpt2cube.eval.llama_runner import llama_logits

        z = llama_logits(path, [int(t) for t in w]).astype(np.float64)[self.first : -1]
        z -= z.max(axis=1, keepdims=True)
        return (z - np.log(np.exp(z).sum(axis=1, keepdims=True))).astype(np.float32)

    def measure(self, path: Path) -> dict:
        nll, kl, top1 = [], [], []
        for w, ref in zip(self.windows, self.logp):
            lp = self._logp(path, w)
            tgt = w[self.first + 1 :]
            nll.append(-lp[np.arange(len(tgt)), tgt])
            kl.append((np.exp(ref.astype(np.float64)) * (ref.astype(np.float64) - lp)).sum(axis=1))
            top1.append(ref.argmax(axis=1) == lp.argmax(axis=1))
        nll, kl, top1 = np.concatenate(nll), np.concatenate(kl), np.concatenate(top1)
        return {"ppl": float(np.exp(nll.mean())), "kl": float(kl.mean()),
                "kl_se": float(kl.std(ddof=1) / np.sqrt(len(kl))), "top1": float(top1.mean()), "scored": int(len(nll))}


def imatrix_agreement(ours: Path, theirs: Path) -> dict:
    """Per tensor, the largest relative difference of the two importance vectors."""
    from gpt2cube.calib.imatrix_file import read_imatrix

    a, b = read_imatrix(ours), read_imatrix(theirs)
    common = sorted(set(a.sums) & set(b.sums))
    rel = {n: float(np.max(np.abs(a.importance(n) - b.importance(n)) / np.maximum(b.importance(n), 1e-12)))
           for n in common}
    return {"tensors_ours": len(a.sums), "tensors_llama": len(b.sums), "common": len(common),
            "max_rel_diff": max(rel.values()) if rel else None,
            "median_rel_diff": float(np.median(list(rel.values()))) if rel else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=ROOT / "out" / "ptq")
    ap.add_argument("--reference", type=Path, default=ROOT / "models" / "reference")
    ap.add_argument("--types", nargs="*", default=["q4_0", "q4_k", "q6_k", "tq2_0"])
    ap.add_argument("--methods", nargs="+", default=["rtn", "imatrix", "gptq", "gptq+imatrix", "gptq+ao",
                                                     "gptq+ao+imatrix"])
    ap.add_argument("--ternary-scales", nargs="+", default=["tensor", "row", "row-fit"])
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--max-windows", type=int, default=10)
    ap.add_argument("--curve", nargs="*", type=int, default=[])
    ap.add_argument("--embed-types", nargs="*", default=[])
    ap.add_argument("--no-llama-tools", action="store_true")
    ap.add_argument("--tools-dir", type=Path, default=None, help="where llama-quantize / llama-imatrix are built "
                    "(cached) [default: WORKDIR]")
    ap.add_argument("--shape-124m", action="store_true")
    a = ap.parse_args()
    if not (BOOKS / EVAL_BOOK).is_file():
        sys.exit(f"{BOOKS / EVAL_BOOK}: not found; this benchmark needs ../shared/data beside the checkout")
    w = a.workdir
    w.mkdir(parents=True, exist_ok=True)
    calib = calibration_text(w / "calib.txt")
    meta = {"reference": str(a.reference), "calib": f"{calib} (12 training books x 60,000 chars)",
            "calib_tokens": a.calib_tokens, "eval": f"{EVAL_BOOK}, {a.max_windows} windows of 512 (second half scored)"}
    f16 = w / "f16.gguf"
    gpt2cube("convert", a.reference, "-o", f16, "--type", "f16", "--quiet", "--force")
    imat = w / "imatrix.gguf"
    sec, rss = gpt2cube("imatrix", a.reference, "--calib", calib, "-o", imat, "--calib-tokens", a.calib_tokens, "--force")
    meta["imatrix_seconds"], meta["imatrix_rss_mb"] = round(sec, 2), round(rss)
    print(f"reference logits of {f16.name} ...", file=sys.stderr)
    ref = Reference(f16, (BOOKS / EVAL_BOOK).read_text(encoding="utf-8"), 512, a.max_windows)
    rows = [{"type": "f16", "method": "-", **ref.measure(f16), "MB": f16.stat().st_size / 1e6}]

    def add(tag_type: str, method: str, out: Path, extra: list, took=None) -> None:
        sec, rss = took if took else gpt2cube("convert", a.reference, "-o", out, "--quiet", "--force", *extra)
        row = {"type": tag_type, "method": method, **ref.measure(out), "MB": out.stat().st_size / 1e6,
               "seconds": round(sec, 2), "rss_mb": round(rss)}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)

    gptq = ["--method", "gptq", "--calib", calib, "--calib-tokens", str(a.calib_tokens)]
    for t in a.types:
        scales = a.ternary_scales if t.startswith("tq") else [None]
        for sc in scales:
            tag = f"{t} ({sc})" if sc else t
            sc_args = ["--ternary-scale", sc] if sc else []
            for m in a.methods:
                if sc and m.startswith("gptq") and sc != "row-fit":
                    continue  # ternary: rtn rows for every scale rule; gptq rows with its default, row-fit
                extra = ["--type", t, *sc_args] + (gptq if m.startswith("gptq") else []) + \
                        (["--act-order"] if "+ao" in m else []) + (["--imatrix", imat] if m.endswith("imatrix") else [])
                add(tag, m, w / f"{t}-{sc or 'x'}-{m}.gguf", extra)
    for n in a.curve:
        add("tq2_0 (row-fit)", f"gptq+ao, {n} tokens", w / f"tq2_0-curve-{n}.gguf",
            ["--type", "tq2_0", "--method", "gptq", "--act-order", "--calib", calib, "--calib-tokens", str(n)])
    for e in a.embed_types:
        add(f"tq2_0 (row-fit), embed {e}", "rtn", w / f"tq2_0-embed-{e}.gguf",
            ["--type", "tq2_0", "--ternary-scale", "row-fit", "--embed-type", e])

    if not a.no_llama_tools:
        tools = a.tools_dir or w
        quant = build_llama_tool(tools, "llama-quantize")
        llama_imat = None
        try:
            tool = build_llama_tool(tools, "llama-imatrix")
            llama_imat = w / "llama-imatrix.gguf"
            measured([tool, "-m", f16, "-f", calib, "-o", llama_imat, "-c", "512",
                      "--chunks", str(a.calib_tokens // 512), "-t", "2", "--no-ppl"])
            meta["imatrix_agreement"] = imatrix_agreement(imat, llama_imat)
        except RuntimeError as e:
            meta["imatrix_agreement"] = f"llama-imatrix failed: {e}"
            llama_imat = None
        for t in [t for t in a.types if t in LLAMA_TYPE]:
            for tag, im in (("ours", imat), ("llama-imatrix", llama_imat)):
                if im is None:
                    continue
                out = w / f"llama-{t}-{tag}.gguf"
                took = measured([quant, "--pure", "--imatrix", im, f16, out, LLAMA_TYPE[t], "2"])
                add(f"{t}", f"llama-quantize --imatrix ({tag})", out, [], took)

    if a.shape_124m:
        src = build_checkpoint(w)
        for t in ("q4_k", "tq2_0"):
            for m in ("rtn", "gptq"):
                sec, rss = gpt2cube("convert", src, "-o", w / f"124m-{t}-{m}.gguf", "--type", t, "--quiet", "--force",
                                    *(gptq if m == "gptq" else []))
                rows.append({"type": f"{t} (124M shape, random)", "method": m, "seconds": round(sec, 2),
                             "rss_mb": round(rss), "MB": (w / f"124m-{t}-{m}.gguf").stat().st_size / 1e6})
                (w / f"124m-{t}-{m}.gguf").unlink()

    base = rows[0]["ppl"]
    for r in rows:
        if "ppl" in r:
            r["ppl_ratio"] = r["ppl"] / base
    print_report(rows, meta, w / "ptq.json")
    write_markdown(rows, meta, w / "ptq.md")
    plot(rows, w / "ptq.png")


def write_markdown(rows: list[dict], meta: dict, path: Path) -> None:
    lines = [f"- {k}: {v}" for k, v in meta.items()] + ["", "| type | method | PPL | x f16 | KL | top-1 | MB | s | RSS MB |",
                                                        "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        f = lambda k, fmt: (fmt.format(r[k]) if r.get(k) is not None else "-")  # noqa: E731
        lines.append(f"| {r['type']} | {r['method']} | {f('ppl', '{:.2f}')} | {f('ppl_ratio', '{:.4f}')} | "
                     f"{f('kl', '{:.4f}')} | {f('top1', '{:.3f}')} | {f('MB', '{:.2f}')} | {f('seconds', '{:.1f}')} | "
                     f"{f('rss_mb', '{:.0f}')} |")
    path.write_text("\n".join(lines) + "\n")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [r for r in rows if "kl" in r and r["method"] != "-"]
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in pts:
        ax.scatter(r["MB"], r["kl"], label=f"{r['type']} {r['method']}", s=20)
    ax.set_xlabel("file MB")
    ax.set_ylabel("KL from f16 (nats/token)")
    ax.set_yscale("log")
    ax.legend(fontsize=5, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
