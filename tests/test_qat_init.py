"""QAT from a calibrated start (`finetune --qat TYPE --init gptq|FILE`): the latent weights begin
at exactly what a GPTQ conversion stores, training computes with those values, and converting
before any update writes the same bytes back. References: the GGUF written by `convert --method
gptq` itself (tensor bytes, and gguf-py's decoding of them)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGUFReader
from gguf.quants import dequantize as gguf_dequantize

from gpt2cube.cli import main
from gpt2cube.converter.plan import Recipe
from gpt2cube.finetune.init import start_from
from gpt2cube.finetune.qat import QuantizedWeights
from gpt2cube.models import load_hf_model, save_checkpoint
from gpt2cube.synth import make_random_gpt2


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> Path:
    return make_random_gpt2(tmp_path_factory.mktemp("init") / "student", n_layer=2, n_embd=256, n_head=4,
                            n_positions=64, init_std=0.05, seed=21)[0]


@pytest.fixture(scope="module")
def gptq_files(student, calib_file, tmp_path_factory):
    """convert --method gptq --act-order files of the student: tq2_0 and q4_k (q8_0 embeddings)."""
    d = tmp_path_factory.mktemp("gptq")
    calib = calib_file
    files = {}
    for t in ("tq2_0", "q4_k"):
        f = d / f"{t}.gguf"
        r = CliRunner().invoke(main, ["convert", str(student), "-o", str(f), "--type", t, "--embed-type", "q8_0",
                                      "--method", "gptq", "--act-order", "--calib", str(calib), "--quiet"])
        assert r.exit_code == 0, r.output
        files[t] = f
    return calib, files


def _tensors(path: Path) -> dict:
    return {t.name: t for t in GGUFReader(path).tensors}


def _decoded(t) -> np.ndarray:
    return gguf_dequantize(np.asarray(t.data), t.tensor_type).reshape(t.shape[::-1].tolist())


def _gguf_layout(model, qw: QuantizedWeights) -> dict[str, np.ndarray]:
    params = dict(model.named_parameters())
    return {q.spec.gguf_name: (params[q.name].detach().numpy().T if q.spec.transpose else params[q.name].detach().numpy())
            for q in qw.params}


def test_gptq_start_is_the_gptq_file_and_converts_back_to_it(student, gptq_files, tmp_path):
    calib, files = gptq_files
    recipe = Recipe(linear="tq2_0", embed="q8_0", ternary_scale="row-fit")
    model = load_hf_model(student)
    record = start_from(model, recipe, "gptq", calib=str(calib), calib_tokens=16_384, calib_ctx=None, log=lambda m: None)
    assert record["init"] == "gptq" and record["tensors"] == 8 and record["tokens"] > 0
    stored = _tensors(files["tq2_0"])
    qw = QuantizedWeights(model, recipe)
    latent = _gguf_layout(model, qw)
    state = qw.state()
    for q in qw.params:
        if q.spec.role != "linear":
            continue
        # the latent weights are what convert --method gptq stored (gguf-py decodes the file) ...
        assert np.array_equal(latent[q.spec.gguf_name], _decoded(stored[q.spec.gguf_name])), q.spec.gguf_name
        # ... and a fixed point of the fake quantizer: step 0 trains on exactly those values
        assert np.array_equal(state[q.name].numpy(), model.get_parameter(q.name).detach().numpy()), q.spec.gguf_name
    # converting the start (round to nearest, the QAT rule) writes the GPTQ file's bytes again
    ckpt = tmp_path / "start"
    save_checkpoint(model, student, ckpt, {})
    back = tmp_path / "back.gguf"
    r = CliRunner().invoke(main, ["convert", str(ckpt), "-o", str(back), "--type", "tq2_0", "--embed-type", "q8_0",
                                  "--ternary-scale", "row-fit", "--quiet"])
    assert r.exit_code == 0, r.output
    again = _tensors(back)
    assert sorted(again) == sorted(stored)
    for name, t in stored.items():
        assert bytes(np.asarray(again[name].data)) == bytes(np.asarray(t.data)), name


def test_q4_k_start_moves_and_says_how_much(student, gptq_files):
    """Not a fixed point: QAT's q4_k rule re-fits each block's grid on the GPTQ values. The share
    it reports is the share of the file's values (decoded by gguf-py) that the fake quantizer moves."""
    calib, files = gptq_files
    recipe = Recipe(linear="q4_k", embed="q8_0")
    model = load_hf_model(student)
    said = []
    record = start_from(model, recipe, str(files["q4_k"]), calib=None, calib_tokens=0, calib_ctx=None, log=said.append)
    qw = QuantizedWeights(model, recipe)
    state, stored = qw.state(), _tensors(files["q4_k"])
    moved = total = 0
    for q in qw.params:
        if q.spec.role != "linear":
            continue
        got = state[q.name].numpy()
        want = _decoded(stored[q.spec.gguf_name])
        assert np.array_equal(_gguf_layout(model, qw)[q.spec.gguf_name], want)  # the start is the file's values
        moved += int(((got.T if q.spec.transpose else got) != want).sum())
        total += want.size
    assert 0 < moved < total / 2
    m = record["moved_by_qat"]["q4_k"]
    assert m["tensors"] == 8 and m["moved_weights"] == moved and m["weights"] == total
    assert any(w.startswith("warning: --init: QAT's round-to-nearest rule re-fits the grids of q4_k (8 tensors") for w in said)


def _ft(student, out, corpus, *extra):
    args = ["finetune", str(student), "--out", str(out), "--corpus", str(corpus), "--holdout", "b.txt", "--ctx", "32",
            "--batch-size", "4", "--tokens", str(32 * 4 * 3), "--lr", "1e-3", "--warmup-steps", "1", "--eval-every", "3",
            "--seed", "3", "--precision", "fp32", "--quiet", *extra]
    return CliRunner().invoke(main, args)


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_finetune_from_gptq_and_from_the_file_start_alike(student, gptq_files, corpus, tmp_path):
    calib, files = gptq_files
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    r = _ft(student, a, corpus, "--qat", "tq2_0", "--embed-type", "q8_0", "--init", "gptq", "--calib", str(calib))
    assert r.exit_code == 0, r.output
    assert "--ternary-scale row-fit" in r.output  # the next-step hint converts with the rule QAT trained
    r = _ft(student, b, corpus, "--qat", "tq2_0", "--embed-type", "q8_0", "--init", str(files["tq2_0"]))
    assert r.exit_code == 0, r.output
    r = _ft(student, c, corpus, "--qat", "tq2_0", "--embed-type", "q8_0", "--ternary-scale", "row-fit")
    assert r.exit_code == 0, r.output
    # step 0 validates at the start: GPTQ computed now and the file convert wrote are the same values,
    # round to nearest is another start
    v0 = [_rows(d)[0]["val_loss"] for d in (a, b, c)]
    assert v0[0] == v0[1] and v0[2] != v0[0]
    record = json.loads((a / "finetune.json").read_text())
    assert record["config"]["ternary_scale"] == "row-fit" and record["start"]["init"] == "gptq"
    assert json.loads((b / "finetune.json").read_text())["start"]["init"] == str(files["tq2_0"])
    # convert without options stores what QAT trained (the recorded rule and embedding type)
    f = tmp_path / "a.gguf"
    r = CliRunner().invoke(main, ["convert", str(a), "-o", str(f), "--type", "tq2_0", "--quiet"])
    assert r.exit_code == 0, r.output
    model = load_hf_model(a)
    qw = QuantizedWeights(model, Recipe(linear="tq2_0", embed="q8_0", ternary_scale="row-fit"))
    state, stored = qw.state(), _tensors(f)
    for q in qw.params:
        want = state[q.name].numpy()
        assert np.array_equal(_decoded(stored[q.spec.gguf_name]), want.T if q.spec.transpose else want), q.spec.gguf_name


@pytest.mark.parametrize("args, message", [
    (["--init", "gptq", "--calib", "{calib}"], "--init gptq sets where quantization-aware training starts; expected --qat"),
    (["--qat", "tq2_0", "--init", "gptq"], "--init gptq needs --calib TEXT"),
    (["--qat", "tq2_0", "--calib", "{calib}"], "--calib goes with --init gptq"),
    (["--qat", "tq2_0", "--init", "{missing}"], "no such GGUF file; expected 'gptq' or a GGUF file"),
    (["--qat", "tq2_0", "--init", "gptq", "--calib", "{calib}", "--calib-tokens", "10"], "expected at least 64"),
    (["--qat", "tq2_0", "--init", "gptq", "--calib", "{calib}", "--calib-ctx", "8"], "--calib-ctx 8; expected 16 .. 64"),
    (["--qat", "tq2_0", "--embed-type", "q8_0", "--init", "{q4_k}"],
     "tensor blk.0.attn_qkv.weight is stored as q4_k; --qat plans tq2_0"),
    (["--qat", "tq2_0", "--embed-type", "q8_0", "--ternary-scale", "tensor", "--init", "{tq2_0}"],
     "its ternary scale rule is row-fit; --ternary-scale tensor would train other values"),
    (["--qat", "tq2_0", "--embed-type", "q8_0", "--init", "{other}"], "tensor blk.0.ffn_up.weight is [512, 256]"),
    (["--qat", "tq2_0", "--embed-type", "q8_0", "--init", "{cube}"], "a hypercube file"),
])
def test_bad_init_is_one_line(student, gptq_files, corpus, tmp_path, args, message):
    calib, files = gptq_files
    other = make_random_gpt2(tmp_path / "wide", n_layer=2, n_embd=256, n_head=4, n_inner=512, n_positions=64,
                             init_std=0.05, seed=5)[0]
    other_file = tmp_path / "other.gguf"
    cube = tmp_path / "cube.gguf"
    if "{other}" in args:
        r = CliRunner().invoke(main, ["convert", str(other), "-o", str(other_file), "--type", "tq2_0", "--embed-type",
                                      "q8_0", "--ternary-scale", "row-fit", "--quiet"])
        assert r.exit_code == 0, r.output
    if "{cube}" in args:
        r = CliRunner().invoke(main, ["convert", str(student), "-o", str(cube), "--type", "tq2_0", "--embed-type", "q8_0",
                                      "--ternary-scale", "row-fit", "--hypercube-dim", "2", "--calib", str(calib),
                                      "--quiet"])
        assert r.exit_code == 0, r.output
    fill = dict(calib=calib, missing=tmp_path / "none.gguf", other=other_file, cube=cube, **files)
    out = tmp_path / "out"
    r = _ft(student, out, corpus, *[a.format(**fill) for a in args])
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output
    assert not out.exists()
