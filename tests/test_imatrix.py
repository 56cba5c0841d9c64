"""Importance matrices: collection, llama-imatrix's file formats, and weighted quantization held
against llama.cpp's own imatrix quantizers (ggml_quantize_chunk with importance weights)."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gpt2cube.calib.imatrix_file import Imatrix, read_imatrix
from gpt2cube.kernels import get_quant_type
from gpt2cube.kernels.base import weighted_sq_error
from gpt2cube.kernels.ggml_ref import ggml_quantize


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gpt2cube.cli", *map(str, args)], capture_output=True, text=True)


def _weights(kind: str, rng, shape=(64, 768)) -> np.ndarray:
    draw = {"gauss": lambda: rng.standard_normal(shape), "t3": lambda: rng.standard_t(3, shape),
            "laplace": lambda: rng.laplace(size=shape)}[kind]
    return (draw() * 0.02).astype(np.float32)


@pytest.mark.parametrize("name", ["q4_0", "q4_k", "q6_k"])
@pytest.mark.parametrize("kind", ["gauss", "t3", "laplace"])
def test_weighted_error_at_most_llama_quantize_imatrix(name, kind):
    """Same weights, same importance: our importance-weighted squared error <= ggml's imatrix
    quantizer's (llama-quantize --imatrix calls exactly ggml_quantize_chunk with these weights).
    No tolerance: our search contains ggml's candidates, scored with the stored float16 scales."""
    rng = np.random.default_rng({"gauss": 0, "t3": 1, "laplace": 2}[kind])
    x = _weights(kind, rng)
    imp = rng.lognormal(0, 1.5, x.shape[1]).astype(np.float32)  # a spread like real imatrix columns
    T = get_quant_type(name)
    ours = T.dequantize(T.quantize_weighted(x, imp), x.shape)
    theirs = T.dequantize(ggml_quantize(x, T.ggml_type, imp), x.shape)
    plain = T.dequantize(T.quantize(x), x.shape)
    e_ours, e_theirs, e_plain = (weighted_sq_error(x, y, imp) for y in (ours, theirs, plain))
    assert e_ours <= e_theirs, (e_ours, e_theirs)
    assert e_ours < 0.95 * e_plain  # the importance is used: plain rounding is measurably worse under it


@pytest.mark.parametrize("name", ["q4_0", "q4_k", "q6_k"])
def test_uniform_importance_is_no_worse_than_plain(name):
    rng = np.random.default_rng(5)
    x = _weights("t3", rng, (32, 512))
    T = get_quant_type(name)
    ones = np.ones(x.shape[1], np.float32)
    e_w = weighted_sq_error(x, T.dequantize(T.quantize_weighted(x, ones), x.shape), ones)
    e_g = weighted_sq_error(x, T.dequantize(ggml_quantize(x, T.ggml_type, ones), x.shape), ones)
    assert e_w <= e_g


def test_weighted_bytes_are_what_gguf_py_decodes():
    """The weighted encoders write the same block layout: gguf-py's dequantizer reads them alike."""
    import gguf

    rng = np.random.default_rng(7)
    x = _weights("gauss", rng, (8, 512))
    imp = rng.lognormal(0, 1, 512).astype(np.float32)
    for name in ("q4_0", "q4_k", "q6_k"):
        T = get_quant_type(name)
        b = T.quantize_weighted(x, imp)
        np.testing.assert_array_equal(gguf.quants.dequantize(b, T.ggml_type), T.dequantize(b, x.shape))


def test_imatrix_formats_round_trip_and_read_a_hand_written_legacy_file(tmp_path):
    sums = {"blk.0.attn_qkv.weight": np.arange(1, 9, dtype=np.float64) * 10, "blk.0.ffn_up.weight": np.full(4, 3.0)}
    im = Imatrix(sums, {"blk.0.attn_qkv.weight": 20, "blk.0.ffn_up.weight": 3}, ["books.txt"], 2, 10)
    back = read_imatrix(im.write(tmp_path / "a.gguf"))
    assert back.chunk_count == 2 and back.chunk_size == 10 and back.datasets == ["books.txt"]
    for k in sums:
        np.testing.assert_allclose(back.importance(k), im.importance(k), rtol=1e-7)
    # the GGUF layout llama-imatrix writes: NAME.in_sum2 [ncols, 1] and NAME.counts [1, 1], F32
    from gguf import GGUFReader

    r = GGUFReader(tmp_path / "a.gguf")
    t = {x.name: x for x in r.tensors}
    assert list(t["blk.0.attn_qkv.weight.in_sum2"].shape) == [8, 1]
    assert list(t["blk.0.attn_qkv.weight.counts"].shape) == [1, 1]
    assert float(t["blk.0.attn_qkv.weight.counts"].data[0][0]) == 20
    assert r.fields["general.type"].contents() == "imatrix"
    # legacy .dat, written by hand as llama-imatrix's save_imatrix_legacy lays it out (mean * ncall)
    name = b"blk.0.ffn_up.weight"
    vals = np.array([0.5, 1.5, 2.5, 4.0], np.float32) * 3
    raw = struct.pack("<i", 1) + struct.pack("<i", len(name)) + name + struct.pack("<ii", 3, 4) + vals.tobytes()
    raw += struct.pack("<i", 7) + struct.pack("<i", 5) + b"x.txt"
    (tmp_path / "h.dat").write_bytes(raw)
    legacy = read_imatrix(tmp_path / "h.dat")
    np.testing.assert_allclose(legacy.importance("blk.0.ffn_up.weight"), [0.5, 1.5, 2.5, 4.0], rtol=1e-7)
    assert legacy.chunk_count == 7 and legacy.datasets == ["x.txt"]
    ours = read_imatrix(im.write(tmp_path / "b.dat"))
    for k in sums:
        np.testing.assert_allclose(ours.importance(k), im.importance(k), rtol=1e-6)


def test_collected_statistic_equals_layernormed_hidden_states(checkpoints, calib_file, tmp_path):
    """The inputs of all four linear weights, recomputed by hand from transformers'
    output_hidden_states and the block's weights (not through our hooks): attn_qkv sees ln_1(h),
    attn_output the merged heads of causal softmax(q k^T / sqrt(d)) v, ffn_up ln_2 of the
    residual after attention, ffn_down gelu_new of ffn_up's output; sum of squares per column."""
    import torch

    from gpt2cube.hypercube.calibrate import calibration_tokens

    src, model = checkpoints["small"]
    out = tmp_path / "m.imatrix.gguf"
    r = _cli("imatrix", src, "--calib", calib_file, "-o", out, "--ctx", "64", "--calib-tokens", "300")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["chunks"] == 4 and info["tokens"] == 256  # 300 tokens -> 4 whole windows of 64
    im = read_imatrix(out)
    assert sorted(im.sums) == sorted(f"blk.{i}.{n}.weight" for i in range(2)
                                     for n in ("attn_qkv", "attn_output", "ffn_up", "ffn_down"))
    tokens, _ = calibration_tokens(calib_file, 300, 50257)
    ids = torch.from_numpy(tokens[:256].reshape(4, 64))
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states
        for i in range(2):
            blk = model.transformer.h[i]
            n_head = model.config.n_head
            x1 = blk.ln_1(hs[i])
            qkv = x1 @ blk.attn.c_attn.weight + blk.attn.c_attn.bias
            q, k, v = (t.reshape(4, 64, n_head, -1).transpose(1, 2) for t in qkv.split(256, dim=-1))
            att = q @ k.transpose(-1, -2) / np.sqrt(q.shape[-1])
            att = att.masked_fill(torch.triu(torch.ones(64, 64, dtype=torch.bool), 1), float("-inf")).softmax(-1)
            merged = (att @ v).transpose(1, 2).reshape(4, 64, 256)
            h2 = hs[i] + merged @ blk.attn.c_proj.weight + blk.attn.c_proj.bias
            x2 = blk.ln_2(h2)
            u = x2 @ blk.mlp.c_fc.weight + blk.mlp.c_fc.bias
            g = 0.5 * u * (1 + torch.tanh(np.sqrt(2 / np.pi) * (u + 0.044715 * u ** 3)))  # gelu_new
            out_i = h2 + g @ blk.mlp.c_proj.weight + blk.mlp.c_proj.bias
            if i + 1 < 2:  # the hand-made block is the model's block
                torch.testing.assert_close(out_i, hs[i + 1], rtol=1e-4, atol=1e-4)
            for name, a in (("attn_qkv", x1), ("attn_output", merged), ("ffn_up", x2), ("ffn_down", g)):
                a = a.double().reshape(256, -1)
                np.testing.assert_allclose(im.sums[f"blk.{i}.{name}.weight"], (a * a).sum(0).numpy(), rtol=1e-4,
                                           atol=1e-6 * float((a * a).sum(0).max()), err_msg=f"blk.{i}.{name}")
                assert im.counts[f"blk.{i}.{name}.weight"] == 256
    assert im.sums["blk.0.ffn_down.weight"].shape == (1024,)


def test_convert_with_imatrix_runs_in_llama_cpp_and_lowers_the_weighted_error(checkpoints, calib_file, tmp_path):
    from gpt2cube.gguf_file import dequantize_tensor, read_gguf

    src, model = checkpoints["small"]
    imf = tmp_path / "m.imatrix.gguf"
    assert _cli("imatrix", src, "--calib", calib_file, "-o", imf, "--ctx", "64").returncode == 0
    im = read_imatrix(imf)
    files = {}
    for tag, extra in (("rtn", []), ("imat", ["--imatrix", imf])):
        files[tag] = tmp_path / f"{tag}.gguf"
        r = _cli("convert", src, "-o", files[tag], "--type", "q4_k", "--quiet", *extra)
        assert r.returncode == 0, r.stderr
    readers = {k: {t.name: t for t in read_gguf(f).tensors} for k, f in files.items()}
    sd = model.state_dict()
    for name, hf in (("blk.0.ffn_down.weight", "transformer.h.0.mlp.c_proj.weight"),
                     ("blk.1.attn_qkv.weight", "transformer.h.1.attn.c_attn.weight")):
        w = sd[hf].numpy().T
        imp = im.importance(name)
        errs = {k: weighted_sq_error(w, dequantize_tensor(readers[k][name], w.shape), imp) for k in files}
        assert errs["imat"] < errs["rtn"], errs
    from gguf import GGUFReader

    assert GGUFReader(files["imat"]).fields["quantize.imatrix.entries_count"].contents() == 8
    from llama_cpp import Llama

    llm = Llama(str(files["imat"]), n_ctx=64, verbose=False, logits_all=True)
    llm.eval([10, 20, 30])
    assert np.isfinite(np.asarray(llm.scores[:3])).all()


def test_bad_imatrix_inputs_fail_with_one_line_and_no_file(checkpoints, calib_file, tmp_path):
    src, _ = checkpoints["small"]
    other, _ = checkpoints["legacy_bin"]  # 128 wide: another model
    imf = tmp_path / "other.imatrix.gguf"
    assert _cli("imatrix", other, "--calib", calib_file, "-o", imf, "--ctx", "64").returncode == 0
    out = tmp_path / "x.gguf"
    r = _cli("convert", src, "-o", out, "--type", "q4_0", "--imatrix", imf)
    assert r.returncode != 0 and "another model" in r.stderr and "128 columns" in r.stderr and "256 input" in r.stderr
    assert not out.exists() and not list(tmp_path.glob(".x.gguf*"))
    good = tmp_path / "good.imatrix.gguf"
    assert _cli("imatrix", src, "--calib", calib_file, "-o", good, "--ctx", "64").returncode == 0
    im = read_imatrix(good)
    for bad_value, word in ((np.nan, "finite"), (0.0, "positive")):
        s = dict(im.sums)
        s["blk.1.ffn_up.weight"] = s["blk.1.ffn_up.weight"].copy()
        s["blk.1.ffn_up.weight"][3] = bad_value
        bad = Imatrix(s, im.counts, im.datasets, im.chunk_count, im.chunk_size).write(tmp_path / f"bad{word}.gguf")
        r = _cli("convert", src, "-o", out, "--type", "q6_k", "--imatrix", bad)
        assert r.returncode != 0 and "blk.1.ffn_up.weight column 3" in r.stderr and word in r.stderr, r.stderr
        assert not out.exists()
    (tmp_path / "junk.dat").write_bytes(b"\x05\x00")
    r = _cli("convert", src, "-o", out, "--type", "q4_0", "--imatrix", tmp_path / "junk.dat")
    assert r.returncode != 0 and "junk.dat" in r.stderr and "Traceback" not in r.stderr
    r = _cli("imatrix", src, "--calib", calib_file, "-o", tmp_path / "y.gguf", "--ctx", "64", "--calib-tokens", "10")
    assert r.returncode != 0 and "--calib-tokens 10" in r.stderr and not (tmp_path / "y.gguf").exists()


def test_imatrix_of_a_gguf_file_is_that_of_its_weights(checkpoints, calib_file, tmp_path):
    """On an f32 GGUF (the checkpoint's weights exactly) the statistic equals the checkpoint's;
    on a q4_0 file it is that of the stored (rounded) weights, which differ."""
    src, _ = checkpoints["small"]
    f32, q4 = tmp_path / "m-f32.gguf", tmp_path / "m-q4.gguf"
    assert _cli("convert", src, "-o", f32, "--type", "f32", "--quiet").returncode == 0
    assert _cli("convert", src, "-o", q4, "--type", "q4_0", "--quiet").returncode == 0
    mats = {}
    for tag, s in (("ckpt", src), ("f32", f32), ("q4", q4)):
        out = tmp_path / f"{tag}.imatrix.gguf"
        r = _cli("imatrix", s, "--calib", calib_file, "-o", out, "--ctx", "64")
        assert r.returncode == 0, r.stderr
        mats[tag] = read_imatrix(out)
    for name in mats["ckpt"].sums:
        a, b, c = (mats[k].importance(name) for k in ("ckpt", "f32", "q4"))
        np.testing.assert_allclose(b, a, rtol=1e-4)  # float32 reductions in another order only
        assert not np.allclose(c, a, rtol=1e-4) and np.isfinite(c).all() and (c > 0).all()


def test_a_text_shorter_than_asked_is_said(checkpoints, calib_file, tmp_path):
    src, _ = checkpoints["small"]
    out = tmp_path / "m.imatrix.gguf"
    r = _cli("imatrix", src, "--calib", calib_file, "-o", out, "--ctx", "64", "--calib-tokens", "1000000")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert f"fewer than the 1000000 asked; the importance matrix is of its {info['chunks']} whole windows of 64" \
        in r.stderr
    assert info["warning"] in r.stderr and out.is_file()
