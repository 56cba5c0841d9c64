"""Pipeline recipes (`convert --recipe` with [[step]] tables): the steps run in order and give the
file the separate commands give; bad recipes are one line naming the key, and nothing is written."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from gguf import GGUFReader

PIPELINE = """
[calib]
text = "{calib}"
tokens = 512
ctx = 64

[[step]]
run = "prune"
ffn = 0.5

[[step]]
run = "imatrix"
tokens = 512

[[step]]
run = "quantize"
type = "q4_k"
method = "gptq"
act_order = true
types = {{ "blk.0.attn_qkv.weight" = "tq2_0" }}

[[step]]
run = "hypercube"
dim = 1
"""


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gpt2cube.cli", *map(str, args)], capture_output=True, text=True)


def _tensors(path) -> dict[str, np.ndarray]:
    return {t.name: (t.tensor_type.name, np.asarray(t.data).tobytes()) for t in GGUFReader(path).tensors}


def test_pipeline_equals_the_steps_run_by_hand(checkpoints, calib_file, tmp_path):
    src, _ = checkpoints["small"]
    recipe = tmp_path / "r.toml"
    recipe.write_text(PIPELINE.format(calib=calib_file), encoding="utf-8")
    out = tmp_path / "p.gguf"
    r = _cli("convert", src, "--recipe", recipe, "-o", out, "--quiet", "--eval-text", calib_file, "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert [s["step"] for s in summary["steps"]] == ["prune", "imatrix", "quantize"]
    assert summary["steps"][0]["kept_per_layer"] == 512
    assert summary["bytes"] == out.stat().st_size < summary["before_bytes"]
    assert summary["after_ppl"] > 0 and summary["ppl_ratio"] == round(summary["after_ppl"] / summary["before_ppl"], 4)
    assert "routed_ppl" in summary and summary["routed_radius"] == 0
    for step in ("prune", "imatrix", "quantize"):
        assert f"pipeline: step" in r.stderr and f"{step} done" in r.stderr
    assert not list(tmp_path.glob(".p.gguf.pipeline-*"))  # the pruned checkpoint is gone
    # the same by hand: prune, imatrix, convert with every option
    pruned, im, hand = tmp_path / "pruned", tmp_path / "m.imatrix.gguf", tmp_path / "hand.gguf"
    for args in (("prune", src, "--out", pruned, "--ffn", "0.5", "--calib", calib_file, "--calib-tokens", "512",
                  "--ctx", "64"),
                 ("imatrix", pruned, "--calib", calib_file, "-o", im, "--calib-tokens", "512", "--ctx", "64")):
        assert _cli(*args).returncode == 0
    types = tmp_path / "types.toml"
    types.write_text('"blk.0.attn_qkv.weight" = "tq2_0"\n', encoding="utf-8")
    r = _cli("convert", pruned, "-o", hand, "--type", "q4_k", "--method", "gptq", "--act-order", "--calib", calib_file,
             "--calib-tokens", "512", "--calib-ctx", "64", "--imatrix", im, "--recipe", types, "--hypercube-dim", "1",
             "--quiet")
    assert r.returncode == 0, r.stderr
    a, b = _tensors(out), _tensors(hand)
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)  # byte-identical tensors, same types
    assert a["blk.0.attn_qkv.weight"][0] == "TQ2_0" and a["blk.1.ffn_down.weight"][0] == "Q4_K"
    fields = GGUFReader(out).fields
    assert fields["hypercube.dim"].contents() == 1 and fields["gpt2cube.quant.method"].contents() == "gptq"


BAD = [
    ('[[step]]\nrun = "distill"\n', "run = 'distill' is not a step; expected one of prune, imatrix, quantize, hypercube"),
    ('[[step]]\nrun = "quantize"\ntype = "q4_k"\n[[step]]\nrun = "prune"\nffn = 0.2\n',
     "[[step]] 2: \"prune\" after \"quantize\"; steps run in the order prune -> imatrix -> quantize -> hypercube"),
    ('[[step]]\nrun = "prune"\nffn = 1.5\n[[step]]\nrun = "quantize"\ntype = "q4_k"\n',
     "[[step]] 1 (run = \"prune\"): ffn = 1.5; expected a fraction in (0, 1) or a whole count"),
    ('[[step]]\nrun = "prune"\nffn = -0.1\n[[step]]\nrun = "quantize"\ntype = "q4_k"\n', "ffn = -0.1"),
    ('[[step]]\nrun = "quantize"\ntype = "q4_k"\nsize = 3\n', "key 'size' is unknown"),
    ('[[step]]\nrun = "quantize"\ntype = "q5_k"\n', "type = 'q5_k'; expected one of"),
    ('[[step]]\nrun = "quantize"\ntype = "q4_k"\nact_order = true\n', "act_order, damp and block are GPTQ's"),
    ('[[step]]\nrun = "quantize"\ntype = "q4_k"\nmethod = "gptq"\nact_order = "yes"\n', "act_order = 'yes'; expected"),
    ('[[step]]\nrun = "hypercube"\ndim = 2\n', "no \"quantize\" step"),
    ('[[step]]\nrun = "quantize"\ntype = "q4_k"\n[[step]]\nrun = "quantize"\ntype = "q4_0"\n', "a second \"quantize\""),
    ('[types]\n"*" = "q4_k"\n[[step]]\nrun = "quantize"\ntype = "q4_k"\n', "table [types] is not part of a pipeline"),
    ('[[step]]\nrun = "quantize"\ntype = "q4_k"\nmethod = "gptq"\n', "recipe names none; give [calib] text"),
    ('[calib]\ntext = "{calib}"\ntokens = 100\nctx = 128\n[[step]]\nrun = "quantize"\ntype = "q4_k"\nmethod = "gptq"\n'
     '[[step]]\nrun = "hypercube"\ndim = 2\n', "need at least one window of 128 tokens"),
    ('[calib]\ntext = "{calib}"\n[[step]]\nrun = "quantize"\ntype = "q4_k"\n[[step]]\nrun = "hypercube"\n',
     "no dim; expected the hypercube dimension"),
]


@pytest.mark.parametrize("text,needle", BAD, ids=range(len(BAD)))
def test_bad_pipeline_recipes_are_one_line_and_write_nothing(checkpoints, tmp_path, text, needle):
    src, _ = checkpoints["small"]
    from conftest import CALIB_TEXT

    calib = tmp_path / "short.txt"
    calib.write_text(CALIB_TEXT[:600], encoding="utf-8")  # about 130 tokens: under one 128-token window of 100
    recipe = tmp_path / "r.toml"
    recipe.write_text(text.replace("{calib}", str(calib)), encoding="utf-8")
    out = tmp_path / "x.gguf"
    r = _cli("convert", src, "--recipe", recipe, "-o", out, "--quiet")
    assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and (str(recipe) in r.stderr or "short.txt" in r.stderr)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["r.toml", "short.txt"]


def test_pipeline_options_come_from_the_recipe(checkpoints, calib_file, tmp_path):
    src, _ = checkpoints["small"]
    recipe = tmp_path / "r.toml"
    recipe.write_text('[[step]]\nrun = "quantize"\ntype = "q4_k"\n', encoding="utf-8")
    r = _cli("convert", src, "--recipe", recipe, "-o", tmp_path / "x.gguf", "--type", "q4_0")
    assert r.returncode == 2 and "--type is set by the pipeline recipe" in r.stderr
    r = _cli("convert", src, "-o", tmp_path / "x.gguf", "--eval-text", calib_file)
    assert r.returncode == 2 and "--eval-text goes with a pipeline --recipe" in r.stderr
    assert not (tmp_path / "x.gguf").exists()
