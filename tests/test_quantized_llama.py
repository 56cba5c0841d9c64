"""Quantized files run in stock llama.cpp and compute what our quantizers intended.

Reference: transformers with every weight replaced by its dequantized value from the file, so
reference and file carry the same weight error. What remains is llama.cpp quantizing the
*activations* in quantized mat-muls (to q8_0 for q8_0/q4_0 weights, to q8_K for q4_K and TQ).
Tolerance ACT_TOL = 0.25 on max |dlogit| / std(logits): measured 0.11 for q8_0, 0.12 q4_0,
0.16 q4_k, 0.20 q6_k, 0.10-0.11 tq1_0/tq2_0 on this fixture; the same files differ from the fp32 model by
0.18 (q8_0), 1.7-1.9 (4-bit) and 5.0 (ternary), and a wrong layout or transpose gives errors of
order 1 or more, so the check separates packing mistakes from activation rounding.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGUFReader

from gpt2cube.cli import main
from gpt2cube.converter import convert
from gpt2cube.converter.plan import Recipe
from gpt2cube.eval.llama_runner import llama_logits
from gpt2cube.models import dequantized_model, hf_logits

ACT_TOL = 0.25
CASES = [("q8_0", "tensor"), ("q4_0", "tensor"), ("q4_k", "tensor"), ("q6_k", "tensor"), ("tq2_0", "tensor"),
         ("tq2_0", "row"), ("tq1_0", "tensor"), ("tq1_0", "row")]


@pytest.mark.parametrize("qtype,mode", CASES)
def test_llama_cpp_equals_dequantized_reference(checkpoints, prompt_tokens, tmp_path, qtype, mode):
    src, model = checkpoints["small"]
    out = tmp_path / f"{qtype}-{mode}.gguf"
    convert(src, out, Recipe(qtype, ternary_scale=mode), progress=False)
    got = llama_logits(out, prompt_tokens)
    ref = hf_logits(dequantized_model(out, src), prompt_tokens)
    err = float(np.abs(got - ref).max() / ref.std())
    assert err <= ACT_TOL, f"{qtype}/{mode}: {err:.3f}"
    if qtype not in ("q8_0", "q6_k"):  # the reference really carries the weight error (6-8 bits: little)
        fp = hf_logits(model, prompt_tokens)
        assert float(np.abs(got - fp).max() / fp.std()) > 4 * err


def test_ternary_types_and_default_embed_type(checkpoints, tmp_path):
    src, _ = checkpoints["small"]
    out = tmp_path / "t.gguf"
    result = convert(src, out, "tq2_0", progress=False)
    types = {t.name: t.tensor_type.name for t in GGUFReader(out).tensors}
    assert types["blk.1.ffn_down.weight"] == "TQ2_0" and types["blk.0.attn_qkv.weight"] == "TQ2_0"
    # llama.cpp's own TQ files keep token_embd in Q6_K: our ternary default too
    assert types["token_embd.weight"] == "Q6_K" and types["position_embd.weight"] == "Q6_K"
    assert types["blk.0.attn_norm.weight"] == "F32" and types["blk.0.ffn_up.bias"] == "F32"
    assert set(result.ternary) == {n for n, t in types.items() if t == "TQ2_0"}
    assert all(0.2 < s["sparsity"] < 0.45 for s in result.ternary.values())


def test_ternary_of_ternary_model_is_lossless(checkpoints, tmp_path):
    """Re-converting the dequantized ternary weights gives the same tensors, bit for bit."""
    src, _ = checkpoints["small"]
    first = tmp_path / "first.gguf"
    convert(src, first, "tq2_0", progress=False)
    tern_dir = tmp_path / "ternary-model"
    dequantized_model(first, src).save_pretrained(tern_dir)
    for f in ("vocab.json", "merges.txt"):
        (tern_dir / f).write_bytes((src / f).read_bytes())
    second = tmp_path / "second.gguf"
    convert(tern_dir, second, "tq2_0", progress=False)
    a = {t.name: np.asarray(t.data).tobytes() for t in GGUFReader(first).tensors if t.tensor_type.name == "TQ2_0"}
    b = {t.name: np.asarray(t.data).tobytes() for t in GGUFReader(second).tensors if t.tensor_type.name == "TQ2_0"}
    assert a == b and len(a) == 8


def test_recipe_is_honoured_tensor_by_tensor(checkpoints, tmp_path):
    src, _ = checkpoints["small"]
    recipe = tmp_path / "mix.toml"
    recipe.write_text('[types]\n"blk.*.ffn_*.weight" = "tq1_0"\n"blk.1.ffn_down.weight" = "q8_0"\n'
                      '"token_embd.weight" = "q4_0"\n')
    out = tmp_path / "m.gguf"
    res = CliRunner().invoke(main, ["convert", str(src), "-o", str(out), "--type", "q4_k", "--embed-type", "q8_0",
                                    "--recipe", str(recipe), "--quiet"])
    assert res.exit_code == 0, res.output
    types = {t.name: t.tensor_type.name for t in GGUFReader(out).tensors}
    assert types["blk.0.ffn_up.weight"] == types["blk.0.ffn_down.weight"] == types["blk.1.ffn_up.weight"] == "TQ1_0"
    assert types["blk.1.ffn_down.weight"] == "Q8_0"  # later line wins
    assert types["blk.0.attn_qkv.weight"] == types["blk.1.attn_output.weight"] == "Q4_K"  # --type
    assert types["position_embd.weight"] == "Q8_0"  # --embed-type
    assert types["token_embd.weight"] == "Q4_0"  # recipe over --embed-type
    assert "ternary: 3 tensors, sparsity min" in res.output  # blk.1.ffn_down went q8_0
    same = tmp_path / "mix.json"
    same.write_text(json.dumps({"blk.*.ffn_*.weight": "tq1_0", "blk.1.ffn_down.weight": "q8_0",
                                "token_embd.weight": "q4_0"}))
    out2 = tmp_path / "m2.gguf"
    CliRunner().invoke(main, ["convert", str(src), "-o", str(out2), "--type", "q4_k", "--embed-type", "q8_0",
                              "--recipe", str(same), "--quiet"])
    assert {t.name: t.tensor_type.name for t in GGUFReader(out2).tensors} == types


@pytest.mark.parametrize("content,needle", [
    ('[types]\n"blk.*" = "q5_x"\n', "pattern 'blk.*' has type 'q5_x'; expected one of"),
    ('this is = not toml [', "not valid TOML"),
    ('[types]\n"nothing.matches" = "q8_0"\n', "recipe pattern 'nothing.matches' matches no weight matrix"),
    ('x = 1\n', "pattern 'x' has type 1"),
])
def test_malformed_recipe(checkpoints, tmp_path, content, needle):
    src, _ = checkpoints["small"]
    recipe = tmp_path / "bad.toml"
    recipe.write_text(content)
    out = tmp_path / "o.gguf"
    res = CliRunner().invoke(main, ["convert", str(src), "-o", str(out), "--recipe", str(recipe)])
    assert res.exit_code == 2 and needle in res.output, res.output
    assert not out.exists()


def test_fallback_and_strict(tmp_path):
    """gpt2-xl-like rows (n_embd 1600 is not a multiple of 256): q4_k and tq2_0 fall back to q4_0."""
    from gpt2cube.synth import make_random_gpt2

    src, _ = make_random_gpt2(tmp_path / "xl", n_layer=1, n_embd=320, n_head=5, n_positions=64)
    out = tmp_path / "o.gguf"
    res = CliRunner().invoke(main, ["convert", str(src), "-o", str(out), "--type", "tq2_0", "--quiet"])
    assert res.exit_code == 0, res.output
    assert "do not fit tq2_0's blocks of 256; writing them as q4_0: blk.0.attn_qkv.weight (row 320)" in res.output
    types = {t.name: t.tensor_type.name for t in GGUFReader(out).tensors}
    assert types["blk.0.ffn_down.weight"] == "TQ2_0"  # rows of 4 * 320 = 1280 = 5 * 256 fit
    assert types["blk.0.ffn_up.weight"] == "Q4_0"
    strict = tmp_path / "s.gguf"
    res = CliRunner().invoke(main, ["convert", str(src), "-o", str(strict), "--type", "q4_k", "--strict"])
    assert res.exit_code == 2
    assert "has rows of 320 weights, not a multiple of 256, so it cannot be q4_k" in res.output
    assert not strict.exists()


def test_inspect_shows_types_and_ternary_sparsity(checkpoints, tmp_path):
    src, _ = checkpoints["small"]
    out = tmp_path / "t.gguf"
    result = convert(src, out, "tq1_0", progress=False)
    info = json.loads(CliRunner().invoke(main, ["inspect", str(out), "--json"]).stdout)
    tern = {t["name"]: t for t in info["tensors"] if t["type"] == "TQ1_0"}
    assert set(tern) == set(result.ternary)
    for name, t in tern.items():
        assert t["sparsity"] == pytest.approx(result.ternary[name]["sparsity"])
        assert t["scale"] == pytest.approx(result.ternary[name]["scale"])
    text = CliRunner().invoke(main, ["inspect", str(out)]).stdout
    assert "TQ1_0" in text and "sparsity" in text
