"""What the converter writes besides weights: metadata, determinism, tensor types and layout
(checked with gguf-py's reader against the checkpoint itself), inspect and --json output."""

from __future__ import annotations

import hashlib
import json

import gguf
import numpy as np
from click.testing import CliRunner
from gguf import GGUFReader

from gpt2cube.cli import main
from gpt2cube.converter import convert
from gpt2cube.converter.checkpoint import open_checkpoint


def _field(reader, key):
    return reader.fields[key].contents()


def test_output_is_deterministic(checkpoints, tmp_path):
    src, _ = checkpoints["small"]
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    convert(src, a, "q8_0", progress=False)
    convert(src, b, "q8_0", progress=False)
    assert hashlib.sha256(a.read_bytes()).digest() == hashlib.sha256(b.read_bytes()).digest()


def test_metadata_keys(checkpoints, tmp_path):
    src, model = checkpoints["untied"]
    out = tmp_path / "m.gguf"
    convert(src, out, "f16", progress=False)
    r = GGUFReader(out)
    cfg = model.config
    assert _field(r, "general.architecture") == "gpt2"
    assert _field(r, "general.file_type") == 1  # MOSTLY_F16
    assert _field(r, "gpt2.context_length") == cfg.n_positions
    assert _field(r, "gpt2.embedding_length") == cfg.n_embd
    assert _field(r, "gpt2.feed_forward_length") == 4 * cfg.n_embd
    assert _field(r, "gpt2.block_count") == cfg.n_layer
    assert _field(r, "gpt2.attention.head_count") == cfg.n_head
    assert np.isclose(_field(r, "gpt2.attention.layer_norm_epsilon"), cfg.layer_norm_epsilon)
    assert _field(r, "tokenizer.ggml.model") == "gpt2"
    assert _field(r, "tokenizer.ggml.pre") == "gpt-2"
    assert len(_field(r, "tokenizer.ggml.tokens")) == cfg.vocab_size
    assert _field(r, "tokenizer.ggml.eos_token_id") == 50256
    sha = hashlib.sha256((src / "model.safetensors").read_bytes()).hexdigest()
    assert _field(r, "gpt2cube.source.sha256") == [sha]
    assert _field(r, "gpt2cube.source.files") == ["model.safetensors"]
    names, types = _field(r, "gpt2cube.tensor.names"), _field(r, "gpt2cube.tensor.types")
    assert dict(zip(names, types)) == {t.name: ("f16" if t.tensor_type.name == "F16" else "f32") for t in r.tensors}
    assert "output.weight" in names  # untied head is kept


def test_tensors_equal_checkpoint_after_transpose(checkpoints, tmp_path):
    """Every f32 tensor in the file is the checkpoint tensor, transposed where HF uses Conv1D."""
    src, _ = checkpoints["legacy_bin"]
    out = tmp_path / "m.gguf"
    convert(src, out, "f32", progress=False)
    ckpt = open_checkpoint(src)
    tensors = {t.name: t for t in GGUFReader(out).tensors}
    assert "output.weight" not in tensors  # tied
    assert len(tensors) == 4 + 12 * ckpt.config["n_layer"]
    qkv = tensors["blk.1.attn_qkv.weight"]
    assert list(qkv.shape) == [128, 384]  # ggml order: ne0 = n_embd (row length) first
    assert np.array_equal(np.asarray(qkv.data), ckpt.load("h.1.attn.c_attn.weight").T)
    assert np.array_equal(np.asarray(tensors["token_embd.weight"].data), ckpt.load("wte.weight"))
    assert np.array_equal(np.asarray(tensors["blk.0.ffn_down.bias"].data), ckpt.load("h.0.mlp.c_proj.bias"))


def test_q8_0_tensor_bytes_are_our_quantizer(checkpoints, tmp_path):
    src, _ = checkpoints["small"]
    out = tmp_path / "m.gguf"
    convert(src, out, "q8_0", progress=False)
    ckpt = open_checkpoint(src)
    t = next(t for t in GGUFReader(out).tensors if t.name == "blk.0.ffn_up.weight")
    # gguf-py's Q8_0 quantizer (independent of ours) on the transposed checkpoint tensor
    w = np.ascontiguousarray(ckpt.load("transformer.h.0.mlp.c_fc.weight").T, dtype=np.float32)
    expected = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0)
    assert np.asarray(t.data).tobytes() == expected.tobytes()


def test_fallback_for_rows_that_do_not_fit(tmp_path):
    from gpt2cube.synth import make_random_gpt2

    src, _ = make_random_gpt2(tmp_path / "odd", n_layer=1, n_embd=64, n_head=2, n_inner=100, vocab_size=50257)
    out = tmp_path / "m.gguf"
    warnings: list[str] = []
    result = convert(src, out, "q8_0", progress=False, log=warnings.append)
    types = {t.name: t.tensor_type.name for t in GGUFReader(out).tensors}
    assert types["blk.0.ffn_down.weight"] == "F16"  # rows of 100 do not fit 32-blocks
    assert types["blk.0.ffn_up.weight"] == "Q8_0"  # rows of 64 fit
    assert any("blk.0.ffn_down.weight (row 100)" in w for w in warnings)
    assert result.tensor_types["f16"] >= 1


def test_cli_json_summary_and_inspect(checkpoints, tmp_path):
    src, _ = checkpoints["small"]
    out = tmp_path / "m.gguf"
    res = CliRunner().invoke(main, ["convert", str(src), "-o", str(out), "--type", "q8_0", "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["output"] == str(out) and summary["bytes"] == out.stat().st_size
    assert summary["tensor_types"] == {"f32": 18, "q8_0": 10}  # 2 x 4 linear + 2 embeddings
    assert summary["seconds"] > 0

    res = CliRunner().invoke(main, ["inspect", str(out), "--json"])
    info = json.loads(res.stdout)
    assert info["architecture"] == "gpt2" and info["hparams"]["block_count"] == 2
    assert info["metadata"]["tokenizer.ggml.tokens"]["length"] == 50257  # long arrays summarised
    by_name = {t["name"]: t for t in info["tensors"]}
    assert by_name["blk.0.attn_qkv.weight"] == {"name": "blk.0.attn_qkv.weight", "type": "Q8_0",
                                               "shape": [256, 768], "bytes": 768 * 8 * 34, "elements": 768 * 256}
    assert 8.5 < info["bits_per_weight"] < 9.5
    text = CliRunner().invoke(main, ["inspect", str(out)]).stdout
    assert "blk.0.attn_qkv.weight" in text and "bits per weight" in text and "gpt2cube.version" in text
