"""`compare`: every evaluation for several GGUF files, side by side: results.json, a markdown
table and PNG plots (size vs perplexity, speed per file, spam F1 per file)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Callable

from ..atomic import write_text, write_with
from ..gguf_file import read_header
from ..inspect_gguf import inspect_gguf
from .bench import bench
from .hellaswag import evaluate_hellaswag
from .perplexity import hf_perplexity, llama_perplexity, read_text
from .spam import evaluate_spam

RESULTS_SCHEMA_VERSION = 1


def _label(model: Path) -> str:
    kind = read_header(model).kv.get("gpt2cube.output_type")
    return f"{model.stem}" + (f" [{kind}]" if kind and kind not in model.stem else "")


def run_compare(models: list[Path], out: Path, *, text: Path | None = None, hf: Path | None = None,
                spam: Path | None = None, hellaswag: Path | None = None, ctx: int = 512,
                max_windows: int | None = None, spam_limit: int | None = None, hellaswag_limit: int | None = 200,
                do_bench: bool = True, n_threads: int | None = None, progress: bool = True,
                log: Callable[[str], None] = print) -> dict:
    from tqdm import tqdm


    text_str = read_text(text) if text else None
    steps = [(m, job) for m in models for job in ("info", "perplexity", "spam", "hellaswag", "bench")
             if (job != "perplexity" or text) and (job != "spam" or spam) and (job != "hellaswag" or hellaswag)
             and (job != "bench" or do_bench)]
    rows: dict[str, dict] = {}
    results: dict = {"schema": RESULTS_SCHEMA_VERSION, "created_s": round(time.time()), "models": []}
    with tqdm(total=len(steps) + (1 if hf and text else 0), desc="compare", file=sys.stderr,
              disable=not progress) as bar:
        if hf and text:
            results["hf_reference"] = hf_perplexity(hf, text_str, ctx, max_windows=max_windows).as_json()
            bar.update(1)
        for m, job in steps:
            row = rows.setdefault(str(m), {"model": str(m), "label": _label(m)})
            bar.set_postfix_str(f"{m.name}: {job}")
            if job == "info":
                info = inspect_gguf(m)
                row["file_mb"] = round(info["file_bytes"] / 1e6, 3)
                row["bits_per_weight"] = info["bits_per_weight"]
            elif job == "perplexity":
                row["perplexity"] = llama_perplexity(m, text_str, ctx, max_windows=max_windows,
                                                     n_threads=n_threads).as_json()
            elif job == "spam":
                row["spam"] = evaluate_spam(m, spam, limit=spam_limit, n_threads=n_threads)
            elif job == "hellaswag":
                row["hellaswag"] = evaluate_hellaswag(m, hellaswag, limit=hellaswag_limit, n_threads=n_threads)
            elif job == "bench":
                row["bench"] = bench(m, n_threads=n_threads)
            bar.update(1)
    results["models"] = list(rows.values())
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "results.json", json.dumps(results, indent=2, default=float))
    write_text(out / "results.md", markdown_table(results))
    write_plots(results, out)
    log(f"wrote {out / 'results.json'}, {out / 'results.md'} and plots")
    return results


def table_rows(results: dict) -> list[dict]:
    rows = []
    for r in results["models"]:
        row = {"model": r["label"], "MB": r.get("file_mb"), "bpw": r.get("bits_per_weight")}
        if "perplexity" in r:
            p = r["perplexity"]
            row["PPL"] = f"{p['ppl']:.3f} ± {p['ppl_stderr']:.3f}"
        if "spam" in r:
            row["spam F1 (prompt)"] = round(r["spam"]["label_likelihood"]["f1"], 4)
            row["spam F1 (probe)"] = round(r["spam"]["linear_probe"]["f1"], 4)
        if "hellaswag" in r:
            h = r["hellaswag"]
            row["HellaSwag"] = f"{h['accuracy']:.4f} ± {h['stderr']:.4f}"
        if "bench" in r:
            b = r["bench"]
            row["pp t/s"], row["tg t/s"] = round(b["pp_tok_s"], 1), round(b["tg_tok_s"], 1)
            row["RSS MB"] = round(b["peak_rss_mb"])
        rows.append(row)
    return rows


def markdown_table(results: dict) -> str:
    rows = table_rows(results)
    cols = list(dict.fromkeys(c for r in rows for c in r))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join("" if r.get(c) is None else str(r.get(c)) for c in cols) + " |" for r in rows]
    if "hf_reference" in results:
        h = results["hf_reference"]
        lines += ["", f"transformers reference: PPL {h['ppl']:.3f} ± {h['ppl_stderr']:.3f} on the same windows"]
    return "\n".join(lines) + "\n"


def write_plots(results: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = results["models"]
    labels = [m["label"] for m in models]
    written = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        write_with(out / name, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
        plt.close(fig)
        written.append(out / name)

    if all("perplexity" in m for m in models):
        fig, ax = plt.subplots(figsize=(6, 4))
        for m in models:
            ax.errorbar(m["file_mb"], m["perplexity"]["ppl"], yerr=m["perplexity"]["ppl_stderr"], fmt="o")
            ax.annotate(m["label"], (m["file_mb"], m["perplexity"]["ppl"]), fontsize=8, xytext=(4, 4),
                        textcoords="offset points")
        ax.set_xlabel("file size (MB)")
        ax.set_ylabel("perplexity")
        ax.set_title("size vs perplexity")
        ax.grid(alpha=0.3)
        save(fig, "size_vs_perplexity.png")
    if all("bench" in m for m in models):
        fig, ax = plt.subplots(figsize=(7, 4))
        x = range(len(models))
        ax.bar([i - 0.2 for i in x], [m["bench"]["pp_tok_s"] for m in models], 0.4, label="prompt (pp) t/s")
        ax.bar([i + 0.2 for i in x], [m["bench"]["tg_tok_s"] for m in models], 0.4, label="generation (tg) t/s")
        ax.set_xticks(list(x), labels, rotation=20, ha="right")
        ax.set_yscale("log")
        ax.legend()
        ax.set_title("speed per file")
        save(fig, "speed.png")
    if all("spam" in m for m in models):
        fig, ax = plt.subplots(figsize=(7, 4))
        x = range(len(models))
        ax.bar([i - 0.2 for i in x], [m["spam"]["label_likelihood"]["f1"] for m in models], 0.4, label="prompted")
        ax.bar([i + 0.2 for i in x], [m["spam"]["linear_probe"]["f1"] for m in models], 0.4, label="linear probe")
        ax.set_xticks(list(x), labels, rotation=20, ha="right")
        ax.set_ylim(0, 1)
        ax.set_ylabel("spam F1")
        ax.legend()
        save(fig, "spam_f1.png")
    return written
