"""Helpers shared by the benchmark scripts: timing child processes, medians, tables."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def run_measured(cmd: list[str], env: dict | None = None) -> tuple[float, float]:
    """Run `cmd` as a child process; return (wall seconds, peak RSS in MB of that child)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-2000:]}")
    return wall, usage.ru_maxrss / 1024  # Linux reports KiB


def median_of(n: int, fn) -> tuple[float, float]:
    runs = [fn() for _ in range(n)]
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


def interleaved_medians(runs: dict, repeats: int, warmup: bool = False) -> dict:
    """{key: fn() -> (a, b, ...)} -> {key: per-position medians}: `repeats` rounds, each calling
    every fn once in turn, so a slower stretch of a shared machine hits them all alike and ratios
    compare runs made side by side; with `warmup`, one untimed round first."""
    got: dict = {k: [] for k in runs}
    for rnd in range(repeats + int(warmup)):
        for k, fn in runs.items():
            r = fn()
            if rnd >= int(warmup):
                got[k].append(r)
    return {k: tuple(statistics.median(col) for col in zip(*v)) for k, v in got.items()}


def print_report(rows: list[dict], meta: dict, json_path: Path | None) -> None:
    report = {"meta": meta, "rows": rows}
    text = json.dumps(report, indent=2)
    print(text)
    if json_path:
        json_path.write_text(text)
    cols = list(dict.fromkeys(c for r in rows for c in r))  # every column any row has, in first-seen order
    print()
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r.get(c, "-")) for c in cols) + " |")


PY = sys.executable

# The shared data and the reference model's held-out books (models/reference/TRAINING.md).
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
BOOKS = DATA / "gutenberg" / "books"
EVAL_BOOK = "pg35.txt"
VALIDATION = ["pg1661.txt", "pg768.txt", "pg1952.txt"]


def calibration_files() -> list[Path]:
    """The reference's training books: every book but the evaluation and validation ones, sorted."""
    held = {EVAL_BOOK, *VALIDATION}
    return sorted(p for p in BOOKS.glob("*.txt") if p.name not in held)


def build_checkpoint(workdir: Path) -> Path:
    """Built in a child process: a child's peak RSS includes its parent's image at fork time, so
    the parent must not load torch and a 124M model before timing conversions."""
    src = workdir / "gpt2-124m-random"
    if not (src / "model.safetensors").exists():
        code = ("from pathlib import Path; from gpt2cube.synth import make_random_gpt2; "
                f"make_random_gpt2(Path({str(src)!r}), n_layer=12, n_embd=768, n_head=12, n_positions=1024, "
                "vocab_size=50257, write_n_ctx=True)")
        run_measured([PY, "-c", code])
    return src


LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"  # the runtime gpt2cube pins (pyproject.toml)


def llama_cpp_source(workdir: Path, log=lambda m: print(m, file=sys.stderr)) -> Path:
    """The llama.cpp tree that llama-cpp-python vendors (its sdist from the package index,
    unpacked under workdir; cached)."""
    import tarfile

    workdir.mkdir(parents=True, exist_ok=True)
    sdists = sorted(workdir.glob("llama_cpp_python-*.tar.gz"))
    if not sdists:
        log(f"downloading the {LLAMA_CPP_PYTHON} source distribution ...")
        subprocess.run([PY, "-m", "pip", "download", "--quiet", "--no-binary", "llama-cpp-python", "--no-deps",
                        LLAMA_CPP_PYTHON, "-d", str(workdir)], check=True)
        sdists = sorted(workdir.glob("llama_cpp_python-*.tar.gz"))
    src = workdir / sdists[-1].name.removesuffix(".tar.gz")
    if not src.is_dir():
        with tarfile.open(sdists[-1]) as tf:
            tf.extractall(workdir, filter="data")
    return src / "vendor" / "llama.cpp"


NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"  # as scripts/setup.sh builds llama-cpp-python


def build_llama_tool(workdir: Path, target: str, log=lambda m: print(m, file=sys.stderr)) -> Path:
    """A llama.cpp tool (llama-bench, llama-imatrix, llama-quantize) built from the source that
    llama-cpp-python vendors, Release, native CPU flags without the AMX kernels, as
    scripts/setup.sh builds the runtime. Cached: a second call returns the existing binary."""
    build = workdir / "llama-tools-build"
    exe = build / "bin" / target
    if exe.is_file():
        return exe
    llama = llama_cpp_source(workdir, log)
    log(f"building {target} from {llama} (a few minutes on 2 cores) ...")
    subprocess.run(["cmake", "-S", str(llama), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
                    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
                    "-DBUILD_SHARED_LIBS=OFF", f"-DCMAKE_C_FLAGS={NO_AMX}", f"-DCMAKE_CXX_FLAGS={NO_AMX}"],
                   check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(build), "--target", target, "-j", str(os.cpu_count() or 2)],
                   check=True, stdout=subprocess.DEVNULL)
    if not exe.is_file():
        raise RuntimeError(f"{exe}: the build finished but produced no {target}")
    return exe


def build_llama_bench(workdir: Path, log=lambda m: print(m, file=sys.stderr)) -> Path:
    return build_llama_tool(workdir, "llama-bench", log)


def llama_bench(exe: Path, model: Path, n_prompt: int, n_gen: int, threads: int, repeats: int) -> dict:
    """llama-bench's own figures for one file: {"pp": (avg, std), "tg": (avg, std)} tokens/s."""
    out = subprocess.run([str(exe), "-m", str(model), "-p", str(n_prompt), "-n", str(n_gen), "-t", str(threads),
                          "-r", str(repeats), "-o", "json"], check=True, capture_output=True, text=True)
    res = {}
    for test in json.loads(out.stdout):
        key = "pp" if test["n_prompt"] and not test["n_gen"] else "tg"
        res[key] = (test["avg_ts"], test["stddev_ts"])
    return res
