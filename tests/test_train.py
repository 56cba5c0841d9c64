"""Training: loss goes down, resuming is exact, the checkpoint converts and runs in llama.cpp,
and bad input gets a clear error."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from gpt2cube.cli import main
from gpt2cube.converter import convert
from gpt2cube.eval.llama_runner import llama_logits
from gpt2cube.models import hf_logits
from gpt2cube.train.trainer import TrainConfig, train


def _cfg(corpus: Path, out: Path, **kw) -> TrainConfig:
    base = dict(corpus=[str(corpus)], out=str(out), n_layer=2, n_embd=64, n_head=2, ctx=32, tokens=32 * 4 * 12,
                batch_size=4, lr=3e-3, warmup_steps=2, eval_every=4, eval_batches=2, holdout=["b.txt"], seed=7)
    base.update(kw)
    return TrainConfig(**base)


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_few_steps_lower_the_loss(corpus, tmp_path):
    out = tmp_path / "run"
    summary = train(_cfg(corpus, out), progress=False)
    rows = _log(out)
    assert len(rows) == 12 and summary["step"] == 12
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0
    evals = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(evals) == 3 and evals[-1] < evals[0]
    assert (out / "loss_curve.png").stat().st_size > 1000
    assert {"config.json", "model.safetensors", "vocab.json", "merges.txt"} <= {p.name for p in out.iterdir()}


def test_resume_is_exact(corpus, tmp_path):
    import torch
    from safetensors.torch import load_file

    whole, split = tmp_path / "whole", tmp_path / "split"
    train(_cfg(corpus, whole), progress=False)
    train(_cfg(corpus, split, stop_at=5), progress=False)
    assert len(_log(split)) == 5
    train(_cfg(corpus, split), resume=True, progress=False)
    a, b = _log(whole), _log(split)
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    evals_a = {r["step"]: r["val_loss"] for r in a if "val_loss" in r}
    evals_b = {r["step"]: r["val_loss"] for r in b if "val_loss" in r}  # also evaluates at its stop, step 5
    assert evals_a == {k: evals_b[k] for k in evals_a} and 5 in evals_b
    wa, wb = load_file(whole / "model.safetensors"), load_file(split / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_after_a_crash_logs_each_step_once(corpus, tmp_path, monkeypatch):
    """A run that dies between evaluations (state saved at step 4, rows 5 and 6 logged, a torn
    line from the crash): the resumed log is the uninterrupted run's, row for row."""
    import gpt2cube.loop.core as core

    whole, crashed = tmp_path / "whole", tmp_path / "crashed"
    train(_cfg(corpus, whole), progress=False)
    real = core.cosine_lr

    def dies_at_step_6(step, *a):
        if step == 6:
            with open(crashed / "train_log.jsonl", "a") as f:
                f.write('{"step": 7, "lo')  # a line cut short by the kill
            raise RuntimeError("killed")
        return real(step, *a)

    monkeypatch.setattr(core, "cosine_lr", dies_at_step_6)
    with pytest.raises(RuntimeError, match="killed"):
        train(_cfg(corpus, crashed), progress=False)
    assert [r["step"] for r in map(json.loads, (crashed / "train_log.jsonl").read_text().splitlines()[:-1])] == \
        [1, 2, 3, 4, 5, 6]
    monkeypatch.setattr(core, "cosine_lr", real)
    train(_cfg(corpus, crashed), resume=True, progress=False)
    a, b = _log(whole), _log(crashed)
    assert [r["step"] for r in b] == list(range(1, 13))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]


def test_checkpoint_converts_and_runs_in_llama_cpp(corpus, tmp_path):
    from transformers import GPT2LMHeadModel

    out = tmp_path / "run"
    train(_cfg(corpus, out), progress=False)
    gguf_path = tmp_path / "m.gguf"
    convert(out, gguf_path, "f32", progress=False)
    model = GPT2LMHeadModel.from_pretrained(out).float().eval()
    tokens = [464, 1468, 3290, 6807, 284, 262, 1910, 290]
    ref = hf_logits(model, tokens)
    got = llama_logits(gguf_path, tokens)
    assert float(np.abs(got - ref).max() / ref.std()) < 0.006  # the f32 tolerance of test_convert_llama


@pytest.mark.parametrize("args,needle", [
    (["--corpus", "MISSING"], "nope.txt: no such file or directory"),
    (["--corpus", "EMPTY"], "empty.txt: the file is empty"),
    (["--corpus", "CORPUS", "--preset", "huge"], "'huge' is not one of"),
    (["--corpus", "CORPUS", "--ctx", "100000", "--holdout", "b.txt"], "fewer than one window of --ctx 100000"),
    (["--corpus", "CORPUS", "--holdout", "zzz.txt"], "held-out file(s) zzz.txt are not in the corpus"),
    (["--corpus", "CORPUS", "--resume"], "nothing to resume"),
])
def test_bad_input(corpus, tmp_path, args, needle):
    (tmp_path / "empty.txt").write_text("  \n")
    subst = {"MISSING": str(tmp_path / "nope.txt"), "EMPTY": str(tmp_path / "empty.txt"), "CORPUS": str(corpus)}
    args = [subst.get(a, a) for a in args]
    res = CliRunner().invoke(main, ["train", *args, "--out", str(tmp_path / "o"), "--preset", "tiny", "--quiet"]
                             if "--preset" not in args else ["train", *args, "--out", str(tmp_path / "o"), "--quiet"])
    assert res.exit_code == 2, res.output
    assert needle in res.output


def test_resume_with_other_shape_is_refused(corpus, tmp_path):
    out = tmp_path / "run"
    train(_cfg(corpus, out, stop_at=2), progress=False)
    res = CliRunner().invoke(main, ["train", "--corpus", str(corpus), "--out", str(out), "--n-layer", "2",
                                    "--n-embd", "64", "--n-head", "2", "--ctx", "64", "--resume", "--quiet",
                                    "--holdout", "b.txt"])
    assert res.exit_code == 2
    assert "--resume: ctx = 64 but the checkpoint" in res.output


@pytest.mark.parametrize("probes, expected", [({}, "fp32"), ({"_is_avx512_bf16_supported": True}, "bf16"),
                                              ({"_is_amx_tile_supported": True}, "bf16")])
def test_auto_precision_is_bf16_only_where_the_cpu_has_it(monkeypatch, probes, expected):
    # torch emulates bf16 on CPUs without AVX512-BF16 / AMX (31x slower products on an AVX2 CPU)
    import torch

    from gpt2cube.train.trainer import pick_precision

    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, name, lambda v=probes.get(name, False): v, raising=False)
    assert pick_precision("auto", "cpu") == expected
    assert pick_precision("fp32", "cpu") == "fp32" and pick_precision("bf16", "cpu") == "bf16"
    assert pick_precision("auto", "mps") == "fp32"
