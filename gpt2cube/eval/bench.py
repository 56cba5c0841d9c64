"""Speed and memory of a GGUF in llama.cpp, measured as llama-bench measures them (read from
tools/llama-bench/llama-bench.cpp of the llama.cpp that llama-cpp-python 0.3.36 vendors), so the
two agree on the same file:
 - one context of n_prompt + n_gen positions, n_batch 2048, n_ubatch 512, f16 KV cache, flash
   attention on llama.cpp's default (auto), the given threads;
 - pp: n_prompt random tokens decoded in batches of n_batch into an emptied KV cache, only the
   last position's logits computed; tg: n_gen single-token decodes from position 0 into an
   emptied cache (a separate test: no prompt before it), each followed by a synchronize;
 - one warm-up of each test (a pp of n_prompt tokens, a tg of one token), then `repeats` timed
   runs; tokens per second per run, reported as their mean (llama-bench's "avg") with the
   standard deviation, the median and every run.
Load time is the model load plus context creation. Peak RSS is measured in a fresh child process
that loads the model and runs the tests (the same process that is timed).
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

from ..errors import GGUFFormatError, Gpt2cubeError, InputError
from ..gguf_file import model_context
from .llama_runner import KV_F16, default_threads

N_BATCH, N_UBATCH = 2048, 512  # llama-bench's defaults


def _timings(model: Path, n_prompt: int, n_gen: int, repeats: int, n_threads: int) -> dict:
    import llama_cpp as lc

    t0 = time.perf_counter()
    lc.llama_backend_init()
    mp = lc.llama_model_default_params()
    mdl = lc.llama_model_load_from_file(str(model).encode(), mp)
    if not mdl:
        raise GGUFFormatError(f"{model}: llama.cpp could not load the model")
    cp = lc.llama_context_default_params()
    cp.n_ctx = n_prompt + n_gen
    cp.n_batch, cp.n_ubatch = N_BATCH, N_UBATCH
    cp.type_k = cp.type_v = KV_F16
    cp.n_threads = cp.n_threads_batch = n_threads
    ctx = lc.llama_init_from_model(mdl, cp)
    if not ctx:
        lc.llama_model_free(mdl)
        raise Gpt2cubeError(f"{model}: llama.cpp could not create a context of {n_prompt + n_gen} positions")
    load_s = time.perf_counter() - t0
    n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(mdl))
    rng = np.random.default_rng(0)
    mem = lc.llama_get_memory(ctx)
    lc.llama_set_n_threads(ctx, n_threads, n_threads)

    def decode(tokens: list[int]) -> None:
        arr = (lc.llama_token * len(tokens))(*tokens)
        if lc.llama_decode(ctx, lc.llama_batch_get_one(arr, len(tokens))) != 0:
            raise Gpt2cubeError(f"{model}: llama.cpp's decode of {len(tokens)} tokens failed")

    def prompt_test(n: int) -> None:
        done = 0
        while done < n:
            k = min(n - done, N_BATCH)
            decode(rng.integers(0, n_vocab, size=k).tolist())
            done += k
        lc.llama_synchronize(ctx)

    def gen_test(n: int) -> None:
        token = int(rng.integers(0, n_vocab))
        for _ in range(n):
            decode([token])  # llama_batch_get_one continues at the cache's next position
            lc.llama_synchronize(ctx)
            token = int(rng.integers(0, n_vocab))

    def timed(test, n: int, warmup: int) -> list[float]:
        lc.llama_memory_clear(mem, False)
        test(warmup)
        runs = []
        for _ in range(repeats):
            lc.llama_memory_clear(mem, False)
            t = time.perf_counter()
            test(n)
            runs.append(n / (time.perf_counter() - t))
        return runs

    try:
        pp = timed(prompt_test, n_prompt, n_prompt) if n_prompt else []
        tg = timed(gen_test, n_gen, 1) if n_gen else []
    finally:
        lc.llama_free(ctx)
        lc.llama_model_free(mdl)
    out = {"load_s": load_s, "pp_runs": pp, "tg_runs": tg}
    for name, runs in (("pp", pp), ("tg", tg)):
        if runs:
            out[f"{name}_tok_s"] = statistics.fmean(runs)
            out[f"{name}_tok_s_std"] = statistics.stdev(runs) if len(runs) > 1 else 0.0
            out[f"{name}_tok_s_median"] = statistics.median(runs)
    return out


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


# The measuring child: a fresh process, so its peak RSS is the model's alone.
_CHILD = f"""
import json, sys
sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})
from pathlib import Path
from gpt2cube.errors import Gpt2cubeError
from gpt2cube.eval.bench import _timings, _peak_rss_mb
try:
    r = _timings(Path(sys.argv[1]), *map(int, sys.argv[2:6]))
    r["peak_rss_mb"] = _peak_rss_mb()
except Gpt2cubeError as e:
    r = {{"error": str(e), "exit_code": e.exit_code}}
print(json.dumps(r))
"""


def bench(model: Path, *, n_prompt: int = 512, n_gen: int = 128, repeats: int = 5, n_threads: int | None = None) -> dict:
    """pp and tg tokens per second (see the module doc). A GPT-2 cannot go past its trained
    positions, so when n_prompt + n_gen exceed them the prompt is shortened (the result says so)."""
    threads = n_threads or default_threads()
    if n_prompt < 1 or n_gen < 1 or repeats < 1:
        raise InputError(f"--n-prompt {n_prompt}, --n-gen {n_gen}, --repeats {repeats}; expected positive integers")
    n_ctx = model_context(model)
    asked = n_prompt
    n_prompt = min(n_prompt, n_ctx - n_gen)
    if n_prompt < 1:
        raise InputError(f"{model}: --n-gen {n_gen} leaves no room for a prompt in the model's context of {n_ctx}")
    out = subprocess.run([sys.executable, "-c", _CHILD, str(model), str(n_prompt), str(n_gen), str(repeats), str(threads)],
                         capture_output=True, text=True)
    try:
        result = json.loads(out.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise Gpt2cubeError(f"{model}: the benchmark process failed (exit {out.returncode}): {last}") from None
    if "error" in result:  # a gpt2cube error in the child: the same message and exit code here
        err = Gpt2cubeError(result["error"])
        err.exit_code = result["exit_code"]
        raise err
    result.update({"model": str(model), "file_mb": os.path.getsize(model) / 1e6, "threads": threads,
                   "n_prompt": n_prompt, "n_gen": n_gen, "repeats": repeats,
                   **({"note": f"--n-prompt {asked} shortened to {n_prompt}: the model has {n_ctx} positions"}
                      if n_prompt != asked else {})})
    return result
