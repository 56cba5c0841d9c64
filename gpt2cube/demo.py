"""The README's main job: convert the embedded default model to every registered type, run each
file in llama.cpp, and print one table: size, bits per weight, held-out perplexity, speed, and
agreement of llama.cpp's logits with transformers on a fixed text.

The default model is the shipped reference GPT-2 (models/reference/, trained on Project
Gutenberg by `gpt2cube train`); its held-out perplexity is measured on a book it never saw
(The Time Machine, pg35) when ../shared/data is present. Without the reference checkpoint the
job falls back to a random GPT-2, where only agreement and speed mean anything.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from .converter import convert
from .engine.build import EngineUnavailable
from .eval.bench import bench
from .eval.llama_runner import llama_logits
from .eval.perplexity import llama_perplexity
from .eval.routed import routed_perplexity
from .gguf_file import read_header
from .hypercube.build import HypercubeOptions
from .hypercube.topology import Hypercube
from .kernels import QUANT_TYPES
from .models import hf_logits, load_hf_model, model_from_gguf
from .pipeline import Pipeline, load_pipeline, run_pipeline
from .synth import make_random_gpt2
from .tokenizers import encode_text, hf_tokenizer

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "models" / "reference"
# the QAT-recovered reference (models/reference-ternary/RECOVERY.md): ternary linear layers, Q4_K embeddings
RECOVERED = ROOT / "models" / "reference-ternary" / "reference-tq2_0.gguf"
HELD_OUT_BOOK = ROOT.parent / "shared" / "data" / "gutenberg" / "books" / "pg35.txt"
CALIB_BOOK = ROOT.parent / "shared" / "data" / "gutenberg" / "books" / "pg11.txt"  # a training book
TEXT = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the "
    "age of foolishness, it was the epoch of belief, it was the epoch of incredulity."
)


def run_demo(workdir: Path | None, log: Callable[[str], None], model: Path | None = None,
             max_windows: int = 40, types: list[str] | None = None, bench_repeats: int = 5) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="gpt2cube-demo-") as tmp:
        root = Path(workdir) if workdir else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        model = model or (REFERENCE if (REFERENCE / "config.json").is_file() else None)
        if model is None:
            log(f"no reference model at {REFERENCE}; building a random GPT-2 (4 x 256) in {root / 'model'}")
            src, hf = make_random_gpt2(root / "model", n_layer=4, n_embd=256, n_head=4, init_std=0.1)
        else:
            src, hf = model, load_hf_model(model)
            log(f"model: {src}")
        tokens = encode_text(hf_tokenizer(), TEXT)
        ref = hf_logits(hf, tokens)
        book = _held_out(max_windows) if model is not None and HELD_OUT_BOOK.is_file() else None
        if model is not None and book is None:
            log(f"{HELD_OUT_BOOK} is absent: no held-out perplexity column")
        rows = []
        for name in types or list(QUANT_TYPES):
            out = root / f"model-{name}.gguf"
            t0 = time.perf_counter()
            convert(src, out, name, force=True, progress=False, log=log)
            seconds = time.perf_counter() - t0
            rows.append(_file_row(name, out, tokens, ref, book, max_windows, bench_repeats, convert_s=round(seconds, 2)))
            log(f"{name}: done")
        if model == REFERENCE and CALIB_BOOK.is_file() and not types:
            for label, pipe in _calibrated():
                out = root / f"model-{label.split()[0]}-calibrated.gguf"
                t0 = time.perf_counter()
                run_pipeline(src, out, pipe, force=True, progress=False, log=lambda m: None)
                rows.append(_file_row(label, out, tokens, ref, book, max_windows, bench_repeats,
                                      convert_s=round(time.perf_counter() - t0, 2)))
                log(f"{label}: done")
        if model == REFERENCE and RECOVERED.is_file() and not types:
            # the shipped recovered file: its logits against transformers on its own (dequantized) weights
            rec_ref = hf_logits(model_from_gguf(RECOVERED), tokens)
            rows.append(_file_row("tq2_0 QAT (shipped)", RECOVERED, tokens, rec_ref, book, max_windows, bench_repeats))
            log("recovered ternary: done")
        return rows


SMALLEST = ROOT / "recipes" / "reference-smallest.toml"


def _calibrated() -> list[tuple[str, Pipeline]]:
    """The calibrated rows, without training: q4_k with an importance matrix, tq2_0 by GPTQ
    (act-order, row-fit scales, imatrix), and the smallest recipe within 1.10x f16."""
    calib = {"text": str(CALIB_BOOK), "tokens": 16384, "ctx": 512}
    imatrix = {"tokens": 65536}
    rows = [("q4_k imatrix", Pipeline(Path("demo"), {"imatrix": imatrix, "quantize": {"type": "q4_k"}}, calib)),
            ("tq2_0 gptq+imatrix", Pipeline(Path("demo"), {"imatrix": imatrix, "quantize": {
                "type": "tq2_0", "method": "gptq", "act_order": True}}, calib))]
    if SMALLEST.is_file():
        pipe = load_pipeline(SMALLEST)
        pipe.calib["text"] = str(CALIB_BOOK)
        rows.append(("smallest recipe (tq1_0 mix)", pipe))
    return rows


def _file_row(name: str, out: Path, tokens: list[int], ref: np.ndarray, book: str | None, max_windows: int,
              bench_repeats: int, **extra) -> dict:
    got = llama_logits(out, tokens)
    nbytes, nelems = read_header(out).tensor_bytes_and_elements()
    row = {"type": name, "file_mb": round(out.stat().st_size / 1e6, 2),
           "bits_per_weight": round(8 * nbytes / nelems, 3), **extra}
    if book is not None:
        r = llama_perplexity(out, book, 512, max_windows=max_windows)
        row["held_out_ppl"] = round(r.ppl, 2)
        row["ppl_stderr"] = round(r.ppl_stderr, 2)
    b = bench(out, n_prompt=256, n_gen=64, repeats=bench_repeats)
    row["pp256_t_s"], row["tg64_t_s"] = round(b["pp_tok_s"]), round(b["tg_tok_s"])
    row["max_err_over_std"] = round(float(np.abs(got - ref).max() / ref.std()), 4)
    row["top1_agreement"] = round(float((got.argmax(1) == ref.argmax(1)).mean()), 3)
    return row


def _held_out(max_windows: int) -> str:
    """The start of the held-out book: enough text for `max_windows` windows of 512 tokens (GPT-2
    averages about 4 characters a token; 8 leaves room), so each run tokenises only what it
    scores. The windows are the book's first ones either way."""
    return HELD_OUT_BOOK.read_text(encoding="utf-8")[: max_windows * 512 * 8]


def format_table(rows: list[dict]) -> str:
    cols = list(dict.fromkeys(c for r in rows for c in r))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def run_routed_demo(workdir: Path | None, log: Callable[[str], None], model: Path | None = None,
                    max_windows: int = 40, dim: int = 2, qtype: str = "q8_0") -> list[dict]:
    """The hypercube part of the main job: the reference model converted with --hypercube-dim,
    then held-out perplexity in stock llama.cpp and in the routed engine, dense and at each
    radius. Empty (with a line on stderr) when the engine, the reference model or the data is
    missing: the rest of the main job does not depend on it."""

    model = model or (REFERENCE if (REFERENCE / "config.json").is_file() else None)
    if model is None or not HELD_OUT_BOOK.is_file() or not CALIB_BOOK.is_file():
        log("routed engine: skipped (needs the reference model and ../shared/data)")
        return []
    book = _held_out(max_windows)
    with tempfile.TemporaryDirectory(prefix="gpt2cube-demo-") as tmp:
        root = Path(workdir) if workdir else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        out = root / f"model-{qtype}-cube{dim}.gguf"
        convert(model, out, qtype, force=True, progress=False, log=log,
                hypercube=HypercubeOptions(dim, CALIB_BOOK, 16384, ROOT / "recipes" / "concepts.txt"))
        stock = llama_perplexity(out, book, 512, max_windows=max_windows)
        rows = [{"file": out.name, "engine": "llama.cpp", "ffn_groups": f"{2**dim}/{2**dim}",
                 "held_out_ppl": round(stock.ppl, 2)}]
        cube = Hypercube(dim)
        try:
            for radius in [None, *range(dim - 1, -1, -1)]:
                r = routed_perplexity(out, book, 512, radius, max_windows=max_windows)
                used = cube.ball_size(dim if radius is None else radius)
                rows.append({"file": out.name, "engine": r.engine, "ffn_groups": f"{used}/{cube.n_vertices}",
                             "held_out_ppl": round(r.ppl, 2)})
        except EngineUnavailable as e:
            log(f"routed engine: unavailable ({e})")
        return rows
