"""The README's main job: convert a model to every registered type, run each file in llama.cpp
and print sizes and agreement with transformers.

Until the reference model ships (models/reference/), the model is a random GPT-2 built here;
agreement is measured on logits of a fixed text, so it means "the file computes what the
checkpoint computes", not "the model is good".
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from .converter import convert
from .converter.inspect import inspect_gguf
from .eval.llama_runner import llama_logits
from .kernels import QUANT_TYPES
from .synth import hf_logits, hf_tokenizer, make_random_gpt2

TEXT = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the "
    "age of foolishness, it was the epoch of belief, it was the epoch of incredulity."
)


def run_demo(workdir: Path | None, log: Callable[[str], None]) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="gpt2cube-demo-") as tmp:
        root = Path(workdir) if workdir else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        log(f"building a random GPT-2 (4 x 256, vocab 50257) in {root / 'model'}")
        src, model = make_random_gpt2(root / "model", n_layer=4, n_embd=256, n_head=4, init_std=0.1)
        tokens = hf_tokenizer().encode(TEXT)
        ref = hf_logits(model, tokens)
        rows = []
        for name in QUANT_TYPES:
            out = root / f"model-{name}.gguf"
            t0 = time.perf_counter()
            convert(src, out, name, force=True, progress=False, log=log)
            seconds = time.perf_counter() - t0
            got = llama_logits(out, tokens)
            info = inspect_gguf(out)
            rows.append({
                "type": name,
                "file_mb": round(out.stat().st_size / 1e6, 3),
                "bits_per_weight": info["bits_per_weight"],
                "convert_s": round(seconds, 2),
                "max_err_over_std": round(float(np.abs(got - ref).max() / ref.std()), 5),
                "top1_agreement": round(float((got.argmax(1) == ref.argmax(1)).mean()), 4),
            })
            log(f"{name}: done")
        return rows


def format_table(rows: list[dict]) -> str:
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)
