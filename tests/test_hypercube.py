"""Hypercube: topology, calibration, the function-preserving permutation, metadata round trip,
stock llama.cpp on hypercube files, concepts, and bad input."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGUFValueType

from gpt2cube.cli import main
from gpt2cube.converter import convert
from gpt2cube.errors import GGUFFormatError, InputError
from gpt2cube.eval.llama_runner import llama_logits
from gpt2cube.gguf_file import read_gguf
from gpt2cube.hypercube.build import HypercubeOptions
from gpt2cube.hypercube.calibrate import assign_neurons, calibrate, fit_router, route
from gpt2cube.hypercube.concepts import read_concepts
from gpt2cube.hypercube.metadata import read_hypercube
from gpt2cube.hypercube.topology import Hypercube
from gpt2cube.models import hf_logits

CONCEPTS = "sea: the ship sailed over the grey ocean\nroyalty: the king and the queen in their palace\nmoney: ten pounds in gold coins\n"


@pytest.fixture(scope="module")
def concepts_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("concepts") / "concepts.txt"
    p.write_text(CONCEPTS, encoding="utf-8")
    return p


@pytest.fixture(scope="module")
def cube_files(checkpoints, calib_file, concepts_file, tmp_path_factory):
    """(plain f32 file, hypercube f32 file (d = 2, with concepts), checkpoint dir)."""
    src, _ = checkpoints["small"]
    out = tmp_path_factory.mktemp("cube")
    plain, cube = out / "plain.gguf", out / "cube.gguf"
    convert(src, plain, "f32", progress=False, log=lambda m: None)
    convert(src, cube, "f32", progress=False, log=lambda m: None,
            hypercube=HypercubeOptions(2, calib_file, 4096, concepts_file))
    return plain, cube, src


# ---- topology --------------------------------------------------------------------------------

@pytest.mark.parametrize("d", [1, 2, 3, 5, 8])
def test_routing_table_is_symmetric_and_steps_one_bit(d):
    cube = Hypercube(d)
    table = cube.routing_table()
    assert table.shape == (2**d, d)
    v = np.arange(2**d)[:, None]
    assert np.array_equal(table[table, np.arange(d)[None, :]], np.broadcast_to(v, table.shape))  # flip twice = back
    assert (cube.hamming(table, v) == 1).all()
    assert all(len(set(row)) == d for row in table)  # d distinct neighbours
    dist = cube.distances()
    assert np.array_equal(dist, dist.T) and (np.diag(dist) == 0).all()


@pytest.mark.parametrize("d", [1, 3, 6])
def test_balls_have_binomial_sizes(d):
    cube = Hypercube(d)
    for r in range(d + 1):
        want = sum(math.comb(d, i) for i in range(r + 1))
        balls = cube.ball_table(r)
        assert balls.shape == (2**d, want) and cube.ball_size(r) == want
        for v in range(2**d):
            assert (cube.hamming(balls[v], v) <= r).all() and v in balls[v]
    assert cube.ball_table(d).shape[1] == 2**d  # radius d is every vertex: dense


def test_bad_dimension():
    for d in (0, 11, 2.5):
        with pytest.raises(ValueError, match="hypercube dimension"):
            Hypercube(d)


# ---- calibration ----------------------------------------------------------------------------

def test_assign_neurons_hand_example():
    # 8 neurons, d = 1 (2 vertices of 4): neurons 0-3 fire on vertex-1 tokens, 4-7 on vertex-0 tokens
    vertex = np.array([0, 0, 1, 1])
    act = np.zeros((4, 8))
    act[2:, :4] = 1.0
    act[:2, 4:] = 1.0
    perm = assign_neurons(vertex, act, Hypercube(1))
    assert perm.tolist() == [4, 5, 6, 7, 0, 1, 2, 3]


def test_assign_neurons_keeps_groups_equal_when_preferences_are_not():
    vertex = np.array([0, 1, 2, 3] * 4)
    act = np.zeros((16, 16))
    act[vertex == 0] = 1.0  # every neuron prefers vertex 0
    perm = assign_neurons(vertex, act, Hypercube(2))
    assert sorted(perm.tolist()) == list(range(16))


def test_router_is_principal_and_balanced():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4000, 16)) * np.linspace(4, 0.5, 16) + 3.0  # axis 0 has the most variance
    w, b = fit_router(x, 3)
    assert np.allclose(np.abs(w @ w.T), np.eye(3), atol=1e-5)
    assert np.argmax(np.abs(w[0])) == 0 and np.argmax(np.abs(w[1])) == 1
    bits = (x @ w.T + b) > 0
    assert np.allclose(bits.mean(axis=0), 0.5, atol=0.01)  # median thresholds split each bit in half
    counts = np.bincount(route(x, w, b), minlength=8)
    assert counts.min() > 0.6 * len(x) / 8  # roughly balanced vertices


def test_calibration_groups_equal_disjoint_covering(checkpoints, calib_file):
    from gpt2cube.hypercube.calibrate import calibration_tokens

    _, model = checkpoints["small"]
    tokens, _ = calibration_tokens(calib_file, 4096, 50257)
    cal = calibrate(model, tokens, 3)
    n_ff = 4 * 256
    assert cal.group_size == n_ff // 8
    for layer in cal.layers:
        assert sorted(layer.perm.tolist()) == list(range(n_ff))  # a permutation: disjoint and covering
        assert layer.counts.sum() == len(tokens)


def test_permutation_preserves_hf_outputs(checkpoints, calib_file, prompt_tokens):
    import copy

    import torch

    from gpt2cube.hypercube.calibrate import calibration_tokens

    _, model = checkpoints["small"]
    tokens, _ = calibration_tokens(calib_file, 2048, 50257)
    cal = calibrate(model, tokens, 2)
    permuted = copy.deepcopy(model)
    with torch.no_grad():
        for blk, layer in zip(permuted.transformer.h, cal.layers):
            p = torch.from_numpy(layer.perm)
            blk.mlp.c_fc.weight.copy_(blk.mlp.c_fc.weight[:, p])
            blk.mlp.c_fc.bias.copy_(blk.mlp.c_fc.bias[p])
            blk.mlp.c_proj.weight.copy_(blk.mlp.c_proj.weight[p])
    assert any((layer.perm != np.arange(len(layer.perm))).any() for layer in cal.layers)  # it did move neurons
    a, b = hf_logits(model, prompt_tokens), hf_logits(permuted, prompt_tokens)
    # same sums in another order: float32 rounding only
    assert np.abs(a - b).max() / a.std() < 1e-5


# ---- the file --------------------------------------------------------------------------------

def test_metadata_round_trip(cube_files, checkpoints, calib_file):
    from gpt2cube.hypercube.calibrate import calibration_tokens

    _, cube_path, _ = cube_files
    info = read_hypercube(read_gguf(cube_path), cube_path)
    _, model = checkpoints["small"]
    tokens, sha = calibration_tokens(calib_file, 4096, 50257)
    cal = calibrate(model, tokens, 2, sha)
    assert info.dim == 2 and info.group_size == 256 and info.calib_tokens == len(tokens) and info.calib_sha256 == sha
    assert np.array_equal(info.routing_table, Hypercube(2).routing_table())
    for i, layer in enumerate(cal.layers):
        assert np.array_equal(info.router_weight[i], layer.weight) and np.array_equal(info.router_bias[i], layer.bias)
        assert np.array_equal(info.permutation[i], layer.perm) and np.array_equal(info.vertex_counts[i], layer.counts)
    assert info.concepts.names == ["sea", "royalty", "money"] and info.concepts.layer == 1
    assert info.concepts.vertices.shape == (3, 2) and info.concepts.codes.shape == (3, 2, 2)


def test_stock_llama_cpp_runs_the_hypercube_file_unchanged(cube_files, prompt_tokens):
    plain, cube, _ = cube_files
    a, b = llama_logits(plain, prompt_tokens), llama_logits(cube, prompt_tokens)
    # f32 weights, FFN sums in another order: measured 1.4e-4 x std; 1e-3 leaves room for thread chunking
    assert np.abs(a - b).max() / a.std() < 1e-3


def test_quantized_hypercube_file_runs_in_llama_cpp(checkpoints, calib_file, tmp_path, prompt_tokens):
    from gpt2cube.models import model_from_gguf

    src, _ = checkpoints["small"]
    out = tmp_path / "q.gguf"
    convert(src, out, "q4_k", progress=False, log=lambda m: None, hypercube=HypercubeOptions(2, calib_file, 2048))
    ref = hf_logits(model_from_gguf(out), prompt_tokens)  # transformers on the file's own (permuted) weights
    got = llama_logits(out, prompt_tokens)
    # the same bound as the unpermuted quantized files (tests/test_quantized_llama.py): activation rounding only
    assert np.abs(got - ref).max() / ref.std() < 0.25


def test_inspect_and_concepts_commands(cube_files):
    _, cube, _ = cube_files
    r = CliRunner().invoke(main, ["inspect", str(cube)])
    assert r.exit_code == 0, r.output
    assert "hypercube: Q_2 (4 vertices), 2 layers x 4 FFN groups of 256 neurons" in r.output
    assert "concepts at layer 1: sea ->" in r.output
    r = CliRunner().invoke(main, ["concepts", str(cube), "the ship sailed over the grey ocean", "--json"])
    assert r.exit_code == 0, r.output
    import json

    out = json.loads(r.output)
    info = read_hypercube(read_gguf(cube), cube)
    # a concept's own text routes to the concept's vertex in every layer, at Hamming distance 0
    assert [e["vertex"] for e in out["layers"]] == info.concepts.vertices[0].tolist()
    assert all(e["nearest"][0]["hamming"] == 0 for e in out["layers"])
    assert out["layers"][1]["nearest"][0]["concept"] == "sea"


def test_read_concepts(tmp_path):
    p = tmp_path / "c.txt"
    p.write_text("# comment\n\nsea: the ocean\nplain text line\n", encoding="utf-8")
    assert read_concepts(p) == [("sea", "the ocean"), ("plain text line", "plain text line")]
    p.write_text("sea: a\nsea: b\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"c.txt:2: concept 'sea' is named twice"):
        read_concepts(p)
    p.write_text("sea:\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"c.txt:1: .*expected 'name: text'"):
        read_concepts(p)


@pytest.mark.parametrize("args, message", [
    (["--hypercube-dim", "2"], "--hypercube-dim and --calib go together"),
    (["--hypercube-dim", "11", "--calib", "CALIB"], "--hypercube-dim 11; expected 1..10"),
    (["--hypercube-dim", "3", "--calib", "CALIB", "--type", "q4_k"],
     "groups of 128 neurons do not fill whole q4_k blocks of 256"),
    (["--hypercube-dim", "2", "--calib", "missing.txt"], "missing.txt: no such calibration text"),
    (["--hypercube-dim", "2", "--calib", "CALIB", "--concepts", "nope.txt"], "nope.txt: no such concepts file"),
    (["--hypercube-dim", "2", "--calib", "CALIB", "--concept-layer", "5"], "--concept-layer 5; expected 0..1"),
])
def test_convert_hypercube_errors(checkpoints, calib_file, tmp_path, args, message):
    src, _ = checkpoints["small"]
    out = tmp_path / "x.gguf"
    args = [str(calib_file) if a == "CALIB" else str(tmp_path / a) if a.endswith(".txt") else a for a in args]
    r = CliRunner().invoke(main, ["convert", str(src), "-o", str(out), "--quiet", *args])
    assert r.exit_code == 2, r.output
    assert message in r.output
    assert not out.exists() and not list(tmp_path.glob("*.partial"))


def test_short_calibration_text(checkpoints, tmp_path):
    src, _ = checkpoints["small"]
    short = tmp_path / "short.txt"
    short.write_text("too short", encoding="utf-8")
    r = CliRunner().invoke(main, ["convert", str(src), "-o", str(tmp_path / "x.gguf"), "--quiet",
                                  "--hypercube-dim", "2", "--calib", str(short)])
    assert r.exit_code == 2 and "short.txt: only 2 tokens of calibration text" in r.output


def test_every_ffn_down_type_is_checked(checkpoints, calib_file, tmp_path):
    # q8_0 everywhere but one layer's ffn_down in q4_k: groups of 128 fit q8_0's blocks, not q4_k's
    src, _ = checkpoints["small"]
    recipe = tmp_path / "r.toml"
    recipe.write_text('"blk.1.ffn_down.weight" = "q4_k"\n', encoding="utf-8")
    out = tmp_path / "x.gguf"
    r = CliRunner().invoke(main, ["convert", str(src), "-o", str(out), "--quiet", "--type", "q8_0", "--recipe", str(recipe),
                                  "--hypercube-dim", "3", "--calib", str(calib_file)])
    assert r.exit_code == 2 and "groups of 128 neurons do not fill whole q4_k blocks of 256" in r.output
    assert not out.exists()


_U32, _F32, _STR, _ARR = GGUFValueType.UINT32, GGUFValueType.FLOAT32, GGUFValueType.STRING, GGUFValueType.ARRAY


@pytest.mark.parametrize("change, message", [
    ({"hypercube.dim": (12, _U32, None)}, "hypercube.dim = 12; expected 1..10"),
    ({"hypercube.dim": ("two", _STR, None)}, "hypercube.dim = 'two'; expected an integer"),
    ({"hypercube.dim": (3, _U32, None)}, "hypercube.vertex_count = 4; expected 8"),
    ({"hypercube.group_size": (100, _U32, None)}, "hypercube.group_size = 100; expected 256"),
    ({"hypercube.routing_table": ([1, 2, 0, 3, 3, 0, 2, 2], _ARR, _U32)}, "is not Q_2's bit-transition table"),
    ({"hypercube.router.weight": ([0.5] * 10, _ARR, _F32)}, "hypercube.router.weight has 10 values; expected 1024"),
    ({"hypercube.router.weight": (["a"] * 1024, _ARR, _STR)}, "hypercube.router.weight is not an array of numbers"),
    ({"hypercube.router.bias": ([0.0, float("nan"), 0.0, 0.0], _ARR, _F32)}, "hold NaN or infinity"),
    ({"hypercube.permutation": ([0] * 2048, _ARR, _U32)}, "permutation of layer 0 is not a permutation"),
    ({"hypercube.concept.vertices": ([9] * 6, _ARR, _U32)}, "holds a vertex outside 0..3"),
    ({"hypercube.layer_count": None}, "key hypercube.layer_count is missing"),
    ({"hypercube.version": (3, _U32, None)}, "hypercube.version = 3; this gpt2cube reads versions 1..2"),
    ({"hypercube.compensation": ([0.0] * 10, _ARR, _F32)}, "hypercube.compensation has 10 values; expected 4096"),
    ({"hypercube.compensation": ([float("inf")] * 4096, _ARR, _F32)}, "hypercube.compensation holds NaN or infinity"),
    ({"hypercube.router.radius": (7, _U32, None)}, "hypercube.router.radius = 7; expected 0..2"),
    ({"hypercube.router.method": (3, _U32, None)}, "hypercube.router.method = 3; expected a string"),
])
def test_corrupt_hypercube_metadata_read_from_python(cube_files, tmp_path, change, message):
    """The Python reader (inspect, concepts) checks what the engine checks: one line naming the
    file and the key, exit 2, never a traceback."""
    from conftest import rewrite_gguf

    _, cube_path, _ = cube_files
    bad = tmp_path / "bad.gguf"
    rewrite_gguf(cube_path, bad, change)
    with pytest.raises(GGUFFormatError) as e:
        read_hypercube(read_gguf(bad), bad)
    assert message in str(e.value) and str(bad) in str(e.value)
    res = CliRunner().invoke(main, ["inspect", str(bad)])
    assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output
