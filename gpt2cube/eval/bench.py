"""Speed and memory of a GGUF in llama.cpp, as llama-bench measures them: load time, prompt
processing (pp: `n_prompt` tokens in one batch, fresh KV cache) and token generation (tg:
`n_gen` single-token decodes), tokens per second, median of `repeats` runs after one warm-up.
Peak RSS is measured in a fresh child process that loads the model and runs one pp and tg.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from ..gguf_file import model_context
from .llama_runner import default_threads


def _timings(model: Path, n_prompt: int, n_gen: int, repeats: int, n_threads: int) -> dict:
    from llama_cpp import Llama

    t0 = time.perf_counter()
    llm = Llama(model_path=str(model), n_ctx=n_prompt + n_gen + 8, n_batch=n_prompt, n_ubatch=n_prompt,
                n_threads=n_threads, n_threads_batch=n_threads, verbose=False, seed=0)
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    vocab = llm.n_vocab()
    pp, tg = [], []
    try:
        for r in range(repeats + 1):  # first round is a warm-up
            prompt = rng.integers(100, vocab - 1, size=n_prompt).tolist()
            llm.reset()  # the next eval drops the KV cache beyond position 0
            t = time.perf_counter()
            llm.eval(prompt)
            t_pp = time.perf_counter() - t
            t = time.perf_counter()
            for i in range(n_gen):
                llm.eval([int(prompt[i % n_prompt])])
            t_tg = time.perf_counter() - t
            if r:
                pp.append(n_prompt / t_pp)
                tg.append(n_gen / t_tg)
    finally:
        llm.close()
    return {"load_s": load_s, "pp_tok_s": statistics.median(pp), "tg_tok_s": statistics.median(tg),
            "pp_runs": pp, "tg_runs": tg}


def _peak_rss_mb() -> float:
    """Peak RSS of this process's own image. Linux's VmHWM starts afresh at exec, unlike
    ru_maxrss, which also counts the parent's size at fork."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def bench(model: Path, *, n_prompt: int = 512, n_gen: int = 128, repeats: int = 3, n_threads: int | None = None) -> dict:

    threads = n_threads or default_threads()
    n_prompt = min(n_prompt, model_context(model) - n_gen - 8)
    code = (f"import json,resource,sys; sys.path.insert(0,{str(Path(__file__).resolve().parents[2])!r}); "
            "from gpt2cube.eval.bench import _timings, _peak_rss_mb; from pathlib import Path; "
            f"r=_timings(Path({str(model)!r}),{n_prompt},{n_gen},{repeats},{threads}); "
            "r['peak_rss_mb']=_peak_rss_mb(); print(json.dumps(r))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result.update({"model": str(model), "file_mb": os.path.getsize(model) / 1e6, "threads": threads,
                   "n_prompt": n_prompt, "n_gen": n_gen, "repeats": repeats})
    return result
