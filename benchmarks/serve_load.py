"""Load on `gpt2cube serve`, loopback only: N concurrent streaming requests across two models
with a memory budget that holds one of them at a time, in two waves.

Every request must finish (HTTP 200 and "data: [DONE]") or get a clear 429 / 503; the server's
peak RSS is compared with its RSS at start plus the budget; the RSS after each wave (--waves)
shows whether anything accumulates.

    python benchmarks/serve_load.py [--model models/reference] [--requests 50] [--max-tokens 32]
                                    [--queue 8] [--waves 2] [--workdir DIR] [--json-out FILE]

Needs httpx (pip install -e ".[test]"). Prints JSON and a table.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _common import print_report  # noqa: E402


def _rss_mb(pid: int, key: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _one(url: str, model: str, max_tokens: int, seed: int, out: list) -> None:
    import httpx

    body = {"model": model, "prompt": "It was a dark and stormy night, and", "max_tokens": max_tokens,
            "stream": True, "seed": seed}
    t0 = time.perf_counter()
    rec = {"model": model, "status": None, "first_token_s": None, "seconds": None, "done": False, "error": None}
    try:
        with httpx.Client(timeout=300) as c, c.stream("POST", f"{url}/v1/completions", json=body) as r:
            rec["status"] = r.status_code
            if r.status_code != 200:
                rec["error"] = json.loads(r.read())["error"]["message"]
            else:
                for line in r.iter_lines():
                    if line == "data: [DONE]":
                        rec["done"] = True
                    elif line.startswith("data: ") and rec["first_token_s"] is None:
                        if json.loads(line[6:])["choices"][0]["text"]:
                            rec["first_token_s"] = time.perf_counter() - t0
    except Exception as e:  # noqa: BLE001 - a failed request is a result
        rec["error"] = f"{type(e).__name__}: {e}"
    rec["seconds"] = time.perf_counter() - t0
    out.append(rec)


def _wave(url: str, models: list[str], n: int, max_tokens: int) -> tuple[list[dict], float]:
    out: list[dict] = []
    threads = [threading.Thread(target=_one, args=(url, models[i % len(models)], max_tokens, i, out)) for i in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out, time.perf_counter() - t0


def _summary(recs: list[dict], secs: float) -> dict:
    ok = [r for r in recs if r["status"] == 200 and r["done"]]
    ftl = sorted(r["first_token_s"] for r in ok if r["first_token_s"] is not None)
    q = (lambda p: round(ftl[min(len(ftl) - 1, int(p * len(ftl)))], 3)) if ftl else (lambda p: None)
    return {"requests": len(recs), "completed": len(ok), "http_429": sum(r["status"] == 429 for r in recs),
            "http_503": sum(r["status"] == 503 for r in recs),
            "unexplained": sum(1 for r in recs if not (r in ok or r["status"] in (429, 503))),
            "seconds": round(secs, 2), "completed_per_s": round(len(ok) / secs, 2),
            "first_token_p50_s": q(0.5), "first_token_p95_s": q(0.95),
            "errors_seen": sorted({r["error"].split(";")[0] for r in recs if r["error"]})[:4]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "reference")
    ap.add_argument("--requests", type=int, default=50)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--queue", type=int, default=8)
    ap.add_argument("--waves", type=int, default=2, help="waves of --requests each; RSS is read after every one")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/gpt2cube-serve-load"))
    ap.add_argument("--json-out", type=Path, default=None)
    args = ap.parse_args()
    from gpt2cube.chat.pool import describe
    from gpt2cube.converter import convert

    args.workdir.mkdir(parents=True, exist_ok=True)
    files = []
    for t in ("f16", "q8_0"):
        f = args.workdir / f"{args.model.name}-{t}.gguf"
        if not f.exists():
            convert(args.model, f, t, progress=False, log=lambda m: None)
        files.append(f)
    est = [describe(f, 1024)[1] for f in files]
    budget_mb = max(est) * 1.5 / 1e6  # one model fits, two do not
    assert sum(est) / 1e6 > budget_mb
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "gpt2cube", "serve", *map(str, files), "--port", str(port), "--memory-budget",
           f"{budget_mb:.1f}", "--queue", str(args.queue), "--threads", "2"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    import httpx

    try:
        for _ in range(300):
            try:
                httpx.get(f"{url}/health", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        start_rss = _rss_mb(proc.pid, "VmRSS")
        names = [f.stem for f in files]
        rows = []
        for i in range(max(1, args.waves)):
            w, secs = _wave(url, names, args.requests, args.max_tokens)
            rows.append({"wave": i + 1, **_summary(w, secs), "rss_after_mb": round(_rss_mb(proc.pid, "VmRSS"), 1)})
        peak = _rss_mb(proc.pid, "VmHWM")
        health = httpx.get(f"{url}/health").json()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    meta = {"models": [str(f) for f in files], "estimates_mb": [round(e / 1e6, 1) for e in est],
            "budget_mb": round(budget_mb, 1), "queue_per_model": args.queue, "max_tokens": args.max_tokens,
            "rss_start_mb": round(start_rss, 1), "peak_rss_mb": round(peak, 1),
            "peak_over_start_plus_budget_mb": round(peak - start_rss - budget_mb, 1),
            "server_loads": health["loads"], "server_exit_code": proc.returncode, "cpu_count": os.cpu_count()}
    print_report(rows, meta, args.json_out)


if __name__ == "__main__":
    main()
