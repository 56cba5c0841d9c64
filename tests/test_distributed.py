"""Data-parallel training under torchrun (gloo, CPU, 2 processes of 1 thread each) on tiny random
GPT-2s: the same steps as one process with the same global batch, exact resume, a killed rank
that ends the job cleanly, FSDP2 equal to DDP, and the launch errors.

Tolerance. With the same micro-batch on one process (accumulating) and on two (DDP), each
micro-batch's forward and backward are the same computation, and the gradient of the step is
the same pairwise float32 sum (g0 + g1; DDP scales each by 2 / 2, both exact): the runs agree to
the bit on the CPU, and the logged loss (the same two shares summed) too. We allow REL = 1e-6
on losses and ATOL = 1e-6 on weights for the one order that can differ, the sum inside a gloo
all-reduce. One process with the whole batch in one forward sums the batch in another order
(BLAS blocking over more rows): that comparison gets LOOSE = 2e-4 relative on the loss.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import CORPUS_TEXT
from gpt2cube.synth import make_random_gpt2

REL, ATOL, LOOSE = 1e-6, 1e-6, 2e-4
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
    ENV.pop(k, None)


def _gpt2cube(args: list[str], nproc: int = 1, timeout: int = 240) -> subprocess.CompletedProcess:
    launch = [sys.executable, "-m", "gpt2cube"] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), "-m", "gpt2cube"]
    return subprocess.run(launch + [str(a) for a in args], env=ENV, capture_output=True, text=True, timeout=timeout)


def _ok(r: subprocess.CompletedProcess) -> None:
    assert r.returncode == 0, r.stderr[-3000:]


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def _state(out: Path) -> dict:
    import torch

    return torch.load(out / "train_state.pt", map_location="cpu", weights_only=False)


def _same_run(a: Path, b: Path, rel: float = REL, atol: float = ATOL) -> None:
    ra, rb = _rows(a), _rows(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    slack = 0.0 if rel == 0 else 1.01e-4  # the log rounds to 4 decimals: a hair's difference can round apart
    for x, y in zip(ra, rb):
        for k in ("loss", "val_loss", "val_f1"):
            if k in x:
                assert abs(x[k] - y[k]) <= rel * abs(x[k]) + slack, (k, x, y)
    sa, sb = _state(a)["model"], _state(b)["model"]
    assert sa.keys() == sb.keys()
    worst = max(float((sa[k].float() - sb[k].float()).abs().max()) for k in sa)
    assert worst <= atol, worst


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("dist")
    corpus = d / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text(CORPUS_TEXT)
    (corpus / "b.txt").write_text(CORPUS_TEXT[: len(CORPUS_TEXT) // 3])
    sms = d / "sms.txt"
    lines = [f"spam\tWIN a prize {i} now, call 0800 {i:04d} to claim" for i in range(12)]
    lines += [f"ham\tsee you at {i} tonight, bring the notes for lecture {i}" for i in range(28)]
    sms.write_text("\n".join(lines) + "\n")
    student = make_random_gpt2(d / "student", n_layer=2, n_embd=64, n_head=2, n_positions=64, init_std=0.05,
                               seed=11)[0]
    ENV["GPT2CUBE_CACHE"] = str(d / "cache")
    return {"dir": d, "corpus": corpus, "sms": sms, "student": student}


TRAIN = ["train", "--corpus", "CORPUS", "--holdout", "b.txt", "--n-layer", "2", "--n-embd", "32", "--n-head", "2",
         "--ctx", "32", "--tokens", str(32 * 4 * 6), "--batch-size", "4", "--warmup-steps", "2", "--eval-every", "3",
         "--device", "cpu", "--precision", "fp32", "--quiet", "--threads", "1"]


def _train_args(data, out: Path, *extra) -> list:
    return [data["corpus"] if a == "CORPUS" else a for a in TRAIN] + ["--out", out, *extra]


@pytest.fixture(scope="module")
def trained(data) -> dict[str, Path]:
    """train: 1 process accumulating 2 micro-batches of 2, 2 processes of 2, 1 process of 4."""
    d = data["dir"]
    runs = {"one": (1, ["--micro-batch", "2"]), "two": (2, []), "whole": (1, [])}
    for name, (n, extra) in runs.items():
        _ok(_gpt2cube(_train_args(data, d / f"train-{name}", *extra), n))
    return {name: d / f"train-{name}" for name in runs}


def test_train_two_processes_take_the_steps_of_one(trained):
    # bit for bit: gloo's all-reduce of two ranks adds the same two terms one process accumulates,
    # and a + b is exact in either order
    _same_run(trained["one"], trained["two"], rel=0, atol=0)
    # the whole batch in one forward: the same optimisation, float sums in another order
    # (measured 4.4e-7 on weights of magnitude up to 1.0)
    _same_run(trained["one"], trained["whole"], rel=LOOSE, atol=1e-5)
    s = _state(trained["two"])
    assert s["world_size"] == 2 and s["micro_batch"] == 2 and len(s["torch_rng_ranks"]) == 2


def test_rank_zero_writes_the_layout_of_one_process(trained):
    one, two = trained["one"], trained["two"]
    names = lambda d: sorted(p.name for p in d.iterdir())  # noqa: E731
    assert names(one) == names(two)
    assert not [n for n in names(two) if n.endswith((".tmp", ".partial"))]
    assert len(_rows(two)) == 6 and (two / "loss_curve.png").stat().st_size > 0


def test_resume_under_two_processes_is_exact(data, trained):
    part = data["dir"] / "train-part"
    _ok(_gpt2cube(_train_args(data, part, "--stop-at", "3"), 2))
    assert _state(part)["step"] == 3
    _ok(_gpt2cube(_train_args(data, part, "--resume"), 2))
    _same_run(trained["two"], part, rel=0.0, atol=0.0)


def test_resume_with_another_world_size_continues_the_global_order(data, trained):
    part = data["dir"] / "train-part1"
    _ok(_gpt2cube(_train_args(data, part, "--stop-at", "3"), 2))
    _ok(_gpt2cube(_train_args(data, part, "--resume", "--micro-batch", "2"), 1))
    _same_run(trained["two"], part)


def test_fsdp_equals_ddp(data, trained):
    out = data["dir"] / "train-fsdp"
    _ok(_gpt2cube(_train_args(data, out, "--fsdp"), 2))
    # FSDP2 reduce-scatters where DDP all-reduces: the same two-term sums, ulps apart at most
    _same_run(trained["two"], out, rel=1e-5, atol=1e-5)
    assert set(_state(out)["model"]) == set(_state(trained["two"])["model"])  # plain names, full tensors


FT = ["finetune", "STUDENT", "--ctx", "32", "--batch-size", "4", "--lr", "1e-3", "--warmup-steps", "2",
      "--eval-every", "2", "--seed", "3", "--device", "cpu", "--precision", "fp32", "--quiet", "--threads", "1"]


def _ft_args(data, out: Path, *extra) -> list:
    return [data["student"] if a == "STUDENT" else a for a in FT] + ["--out", out, *extra]


LM = ["--corpus", "CORPUS", "--holdout", "b.txt", "--tokens", str(32 * 4 * 4)]
SPAM = ["--task", "spam", "--data", "SMS", "--tokens", "2000", "--dropout", "0", "--lm-weight", "0.3"]


@pytest.mark.parametrize("mode", ["qat", "spam", "distill", "routed"])
def test_finetune_two_processes_take_the_steps_of_one(data, mode, tmp_path, calib_file):
    task = SPAM if mode == "spam" else LM
    extra = [data["corpus"] if a == "CORPUS" else data["sms"] if a == "SMS" else a for a in task]
    if mode == "qat":
        extra += ["--qat", "tq2_0"]
    elif mode == "distill":
        extra += ["--distill", data["student"], "--distill-weight", "0.5", "--temperature", "2"]
    elif mode == "routed":
        cube = tmp_path / "cube.gguf"
        _ok(_gpt2cube(["convert", data["student"], "-o", cube, "--type", "f32", "--hypercube-dim", "2",
                       "--calib", calib_file]))
        extra += ["--routed", cube]
    one, two = tmp_path / "one", tmp_path / "two"
    _ok(_gpt2cube(_ft_args(data, one, "--micro-batch", "2", *extra)))
    _ok(_gpt2cube(_ft_args(data, two, *extra), 2))
    _same_run(one, two)
    assert (two / "finetune.json").read_text() == (one / "finetune.json").read_text().replace(
        str(one), str(two)).replace('"micro_batch": 2', '"micro_batch": null')


def _children_with_rank(pid: int, rank: int) -> list[int]:
    found = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            env = (p / "environ").read_bytes().split(b"\0")
            stat = (p / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and b"TORCHELASTIC_RUN_ID" in b" ".join(env) and int(stat[1]) == pid:
            found.append(int(p.name))
    return found


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the rank's process through /proc")
def test_a_killed_rank_ends_the_job_cleanly(data):
    out = data["dir"] / "train-killed"
    args = [data["corpus"] if a == "CORPUS" else a for a in TRAIN]
    args[args.index("--tokens") + 1] = str(32 * 4 * 100_000)
    args[args.index("--eval-every") + 1] = "1"
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "gpt2cube"]
    proc = subprocess.Popen(launch + [str(a) for a in args] + ["--out", str(out), "--dist-timeout", "30"], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not ((out / "train_log.jsonl").is_file() and len(_rows(out)) >= 3):
            time.sleep(0.5)
        victims = _children_with_rank(proc.pid, 1)
        assert victims, "rank 1 not found"
        os.kill(victims[0], signal.SIGKILL)
        _, err = proc.communicate(timeout=90)  # no rank hangs
    finally:
        proc.kill()
    assert proc.returncode != 0
    assert not [p.name for p in out.iterdir() if p.name.endswith((".tmp", ".partial"))]
    assert _state(out)["step"] >= 3  # what is there is whole
    ours = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(ours) <= 1 and all("rank" in line for line in ours), err[-2000:]


def _one_line_error(r: subprocess.CompletedProcess, needle: str) -> None:
    assert r.returncode != 0
    ours = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(ours) == 1 and needle in ours[0], r.stderr[-3000:]
    assert "Traceback" not in r.stderr.split("error:")[0], r.stderr[-3000:]


@pytest.mark.parametrize("nproc, extra, needle", [
    (1, ["--fsdp"], "this process was not started by torchrun"),
    (2, ["--batch-size", "3"], "--batch-size 3 is not divisible by 2 processes x --micro-batch 1 = 2"),
    (2, ["--batch-size", "1"], "2 processes for --batch-size 1"),
    (2, ["--micro-batch", "4"], "--batch-size 4 is not divisible by 2 processes x --micro-batch 4 = 8"),
])
def test_launch_errors_are_one_line_and_write_nothing(data, tmp_path, nproc, extra, needle):
    out = tmp_path / "out"
    r = _gpt2cube(_train_args(data, out, *extra), nproc)
    _one_line_error(r, needle)
    assert not out.exists()


def test_resume_with_other_settings_is_refused_on_every_rank(data, tmp_path):
    out = tmp_path / "ft"
    _ok(_gpt2cube(_ft_args(data, out, *[data["corpus"] if a == "CORPUS" else a for a in LM], "--stop-at", "1")))
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    r = _gpt2cube(_ft_args(data, out, *[data["corpus"] if a == "CORPUS" else a for a in LM], "--resume",
                           "--lr", "2e-3"), 2)
    _one_line_error(r, "--resume: lr = 0.002 but the run in")
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_fsdp_finetune_with_a_teacher_equals_ddp(data, tmp_path):
    extra = [data["corpus"] if a == "CORPUS" else a for a in LM] + ["--distill", data["student"]]
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    _ok(_gpt2cube(_ft_args(data, ddp, *extra), 2))
    _ok(_gpt2cube(_ft_args(data, fsdp, *extra, "--fsdp"), 2))
    _same_run(ddp, fsdp, rel=1e-5, atol=1e-5)
    # the exported checkpoint is a plain HF directory with the same tensors
    from safetensors.numpy import load_file

    a, b = load_file(ddp / "model.safetensors"), load_file(fsdp / "model.safetensors")
    assert a.keys() == b.keys() and max(float(abs(a[k] - b[k]).max()) for k in a) <= 1e-5


def test_fsdp_with_qat_is_refused(data, tmp_path):
    out = tmp_path / "out"
    extra = [data["corpus"] if a == "CORPUS" else a for a in LM]
    r = _gpt2cube(_ft_args(data, out, *extra, "--qat", "tq2_0", "--fsdp"), 2)
    _one_line_error(r, "--fsdp with --qat tq2_0")
    assert not out.exists()


def _torchrun_env(monkeypatch, rank: int, local_rank: int, size: int = 2) -> None:
    for k, v in dict(RANK=rank, WORLD_SIZE=size, LOCAL_RANK=local_rank, MASTER_ADDR="127.0.0.1",
                     MASTER_PORT="29500").items():
        monkeypatch.setenv(k, str(v))


def test_cuda_join_sets_the_rank_gpu_before_the_group(monkeypatch):
    """Without GPUs here, torch's calls are stand-ins that record the order: each rank owns
    cuda:LOCAL_RANK before init_process_group, which is told the device (device_id), so the checks
    agreed on before training never meet with every rank on cuda:0."""
    import torch
    import torch.distributed as dist

    from gpt2cube.errors import InputError
    from gpt2cube.loop.world import join

    calls = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.append(("set_device", i)))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: calls.append(("init", backend, kw)))
    _torchrun_env(monkeypatch, rank=1, local_rank=1)
    world = join("cuda", 60.0)
    assert world.rank == 1 and world.distributed
    assert calls[0] == ("set_device", 1)
    assert calls[1][:2] == ("init", "nccl") and calls[1][2]["device_id"] == torch.device("cuda", 1)
    calls.clear()
    _torchrun_env(monkeypatch, rank=0, local_rank=0)
    join("cpu", 60.0)  # gloo: no GPU named
    assert calls == [("init", "gloo", {"timeout": calls[0][2]["timeout"]})]
    calls.clear()
    _torchrun_env(monkeypatch, rank=3, local_rank=3, size=4)
    with pytest.raises(InputError, match="LOCAL_RANK 3: this machine has 2 CUDA devices"):
        join("cuda", 60.0)
    assert calls == []  # refused before joining any group
