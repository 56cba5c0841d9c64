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


def print_report(rows: list[dict], meta: dict, json_path: Path | None) -> None:
    report = {"meta": meta, "rows": rows}
    text = json.dumps(report, indent=2)
    print(text)
    if json_path:
        json_path.write_text(text)
    cols = list(rows[0])
    print()
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")


PY = sys.executable


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
