"""Data-parallel training throughput: `gpt2cube train` in one plain process, then under torchrun
with 1 and N processes, the same global batch, on the CPU (gloo, --threads 1 per process) or on
CUDA GPUs (NCCL) when --device cuda.

    python benchmarks/scaling.py [--corpus ../shared/data/tinyshakespeare] [--preset reference]
        [--ctx 256] [--batch-size 8] [--steps 8] [--nprocs 1 2] [--repeats 3] [--device cpu]
        [--fsdp] [--workdir DIR]

Each run trains --steps steps of the shape (random init, seed 1234) and the figures are read
from what it wrote: tokens/s from train_log.jsonl between the end of step 1 and the last step
(the first step's start-up and the final validation excluded), and each process's peak RSS
(ru_maxrss, written by the process itself at exit). Rows are the median of --repeats rounds,
each round running every configuration once in turn; ratios are against the plain process of
the same round set. With one core per process, N processes on N cores is the ideal N x: what is
missing is the gradient all-reduce and the ranks waiting for each other.
Prints JSON and a table; writes WORKDIR/scaling.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PY, print_report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _worker(rss_dir: str, args: list[str]) -> None:
    """One process of a run: gpt2cube's CLI in this interpreter, then its peak RSS to a file."""
    import atexit
    import resource

    def report() -> None:
        rank = os.environ.get("RANK", "plain")
        mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        Path(rss_dir, f"rss-{rank}.json").write_text(json.dumps({"rank": rank, "peak_rss_mb": mb}))

    atexit.register(report)
    from gpt2cube.cli import main

    main(args, prog_name="gpt2cube")


def _run(nprocs: int | None, train_args: list[str], work: Path, device: str) -> dict:
    out = Path(tempfile.mkdtemp(dir=work, prefix=f"run{nprocs or 0}-"))
    rss = out / "rss"
    rss.mkdir()
    me = [str(Path(__file__).resolve()), "--worker", str(rss), "--"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [PY, *me] if nprocs is None else \
        [PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nprocs), *me]
    ckpt = out / "ckpt"
    r = subprocess.run(cmd + train_args + ["--out", str(ckpt)], env=env, capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    rows = [json.loads(line) for line in (ckpt / "train_log.jsonl").read_text().splitlines()]
    first, last = rows[0], rows[-1]
    tps = (last["tokens"] - first["tokens"]) / max(1e-9, last["seconds"] - first["seconds"])
    mem = [json.loads(p.read_text())["peak_rss_mb"] for p in rss.glob("rss-*.json")]
    return {"tokens_per_s": tps, "peak_rss_mb_per_process": max(mem), "processes": len(mem),
            "final_loss": last["loss"], "val_loss": last.get("val_loss")}


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        _worker(sys.argv[2], sys.argv[4:])
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", type=Path, default=ROOT.parent / "shared" / "data" / "tinyshakespeare")
    ap.add_argument("--preset", default="reference")
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8, help="global batch (windows per step)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--nprocs", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--fsdp", action="store_true")
    ap.add_argument("--workdir", type=Path, default=None)
    a = ap.parse_args()
    if not a.corpus.exists():
        raise SystemExit(f"{a.corpus}: no such corpus; expected a text file or directory (--corpus)")
    if a.steps < 3:
        raise SystemExit(f"--steps {a.steps}; expected at least 3 (the first step is excluded)")
    work = a.workdir or Path(tempfile.mkdtemp(prefix="scaling-"))
    work.mkdir(parents=True, exist_ok=True)
    train_args = ["train", "--corpus", str(a.corpus), "--preset", a.preset, "--ctx", str(a.ctx),
                  "--batch-size", str(a.batch_size), "--tokens", str(a.steps * a.batch_size * a.ctx),
                  "--eval-every", str(10 ** 9), "--warmup-steps", "2", "--device", a.device, "--quiet",
                  "--precision", "fp32"] + (["--threads", "1"] if a.device == "cpu" else [])
    configs: dict[str, tuple[int | None, list[str]]] = {"plain process": (None, [])}
    for n in a.nprocs:
        configs[f"torchrun x{n}" + (" fsdp" if a.fsdp else "")] = (n, ["--fsdp"] if a.fsdp else [])
    got: dict[str, list[dict]] = {k: [] for k in configs}
    for _ in range(a.repeats):
        for name, (n, extra) in configs.items():
            got[name].append(_run(n, train_args + extra, work, a.device))
    base = statistics.median(r["tokens_per_s"] for r in got["plain process"])
    rows = []
    for name, runs in got.items():
        tps = statistics.median(r["tokens_per_s"] for r in runs)
        rows.append({"run": name, "processes": runs[0]["processes"], "tokens_per_s": round(tps, 1),
                     "tokens_per_s_per_process": round(tps / runs[0]["processes"], 1),
                     "vs_plain": round(tps / base, 3),
                     "peak_rss_mb_per_process": round(statistics.median(r["peak_rss_mb_per_process"] for r in runs), 1),
                     "final_loss": runs[0]["final_loss"]})
    device = a.device
    if a.device.startswith("cuda"):
        import torch

        device = f"{a.device} ({torch.cuda.get_device_name(0)})"
    meta = {"device": device, "preset": a.preset, "ctx": a.ctx, "global_batch": a.batch_size, "steps": a.steps,
            "repeats": a.repeats, "threads_per_process": 1 if a.device == "cpu" else None, "cpu_count": os.cpu_count(),
            "tokens_per_s": "train_log.jsonl, end of step 1 to the last step; median over rounds"}
    print_report(rows, meta, work / "scaling.json")


if __name__ == "__main__":
    main()
