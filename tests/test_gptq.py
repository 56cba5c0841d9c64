"""Error-feedback (GPTQ) quantization: the block grids against gguf-py's dequantizers, the
algorithm against a plain re-derivation from the paper's definition, and `convert --method gptq`
end to end through llama.cpp."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from gpt2cube.calib.gptq import GptqOptions, gptq_quantize
from gpt2cube.errors import InputError
from gpt2cube.kernels import get_quant_type
from gpt2cube.kernels.ternary import absmean_scale

GRID_TYPES = ["q4_0", "q4_k", "q6_k", "tq2_0", "tq1_0"]


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gpt2cube.cli", *map(str, args)], capture_output=True, text=True)


def _layer(rng, rows=32, cols=512, n=2048):
    """Weights and the Hessian of correlated, unevenly scaled inputs (as real activations are)."""
    mix = 0.5 * np.eye(cols) + rng.standard_normal((cols, cols)) / np.sqrt(cols)
    x = rng.standard_normal((n, cols)) @ mix * rng.lognormal(0, 1, cols)
    w = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
    return w, x.T @ x / n


def _out_err(w, q, h) -> float:
    d = (np.asarray(w, np.float64) - q)
    return float(np.einsum("ij,jk,ik->", d, h, d))


@pytest.mark.parametrize("name", GRID_TYPES)
def test_grid_codes_pack_to_what_gguf_py_dequantizes(name):
    """Any codes written on a fitted grid come back from gguf-py's dequantizer (independent of
    ours) as step * k + zero; float32 products in another order: relative 1e-6."""
    import gguf

    rng = np.random.default_rng(3)
    T = get_quant_type(name)
    x = (rng.standard_t(4, (8, 256)) * 0.03).astype(np.float32)
    scale = absmean_scale(x, "row") if T.is_ternary else None
    g = T.grid(x, None, scale)
    k = rng.integers(g.kmin, g.kmax + 1, x.shape)
    packed = g.pack(k)
    assert packed.shape == (8, T.type_size * 256 // T.block_size)
    theirs = gguf.quants.dequantize(packed, T.ggml_type).reshape(x.shape)
    np.testing.assert_allclose(theirs, g.values(k), rtol=1e-6, atol=1e-9)
    # and the grid's nearest codes are what the type's own round-to-nearest would store
    if not T.is_ternary:
        rtn = T.dequantize(T.quantize(x), x.shape)
        near = g.values(g.codes(x))
        assert np.abs(near - x).mean() <= np.abs(rtn - x).mean() * (1 + 1e-6)


def _gptq_plain(w, h, T, damp):
    """The paper's definition without its speed-ups (no Cholesky, no lazy batches): the inverse
    Hessian of the remaining columns, updated by removing each quantized column (Gaussian
    elimination), and the error w_j - q_j over [H^-1]_jj carried to the columns not yet done."""
    W = np.array(w, np.float64)
    cols = W.shape[1]
    hd = np.array(h, np.float64)
    hd[np.arange(cols), np.arange(cols)] += damp * np.mean(np.diag(h))
    hinv = np.linalg.inv(hd)
    bs = T.block_size
    scale = absmean_scale(w, "tensor") if T.is_ternary else None
    Q = np.zeros_like(W)
    grid = None
    for j in range(cols):
        if j % bs == 0 and not (T.is_ternary and grid is not None):
            grid = T.grid(W[:, j : j + bs].astype(np.float32), None, scale)
        c = j % bs
        k = grid.codes(W[:, j : j + 1].astype(np.float32), slice(c, c + 1))
        Q[:, j] = grid.values(k, slice(c, c + 1))[:, 0]
        err = (W[:, j] - Q[:, j]) / hinv[j, j]
        W[:, j + 1 :] -= np.outer(err, hinv[j, j + 1 :])
        hinv = hinv - np.outer(hinv[:, j], hinv[j, :]) / hinv[j, j]
    if T.is_ternary:  # then the one tensor scale of least output error for these codes, by least squares on X
        t = np.rint(Q / scale)
        r = np.linalg.cholesky(np.asarray(h, np.float64)).T  # H = R^T R: ||D X||^2 = ||D R^T||^2 up to scale
        s = np.linalg.lstsq((t @ r.T).reshape(-1, 1), (np.asarray(w, np.float64) @ r.T).reshape(-1), rcond=None)[0][0]
        Q = t * np.float32(np.float16(s))
    return Q


@pytest.mark.parametrize("name", ["q4_0", "q4_k", "tq2_0"])
def test_gptq_equals_the_plain_definition(name):
    """Same grids, same order: the fast form (inverse Cholesky factor, lazy batches, float32)
    stores the codes the plain float64 elimination picks, but for rounding near-ties (at most
    0.5 % of weights), and its output error is within 1 % of the plain one's."""
    rng = np.random.default_rng(11)
    w, h = _layer(rng, rows=16, cols=512, n=2048)
    T = get_quant_type(name)
    res = gptq_quantize(w, h, T, name="t", opts=GptqOptions(damp=0.01, block=128))
    ours = T.dequantize(res.encoded, w.shape)
    plain = _gptq_plain(w, h, T, 0.01)
    assert np.mean(~np.isclose(ours, plain, rtol=1e-4, atol=1e-7)) <= 0.005
    assert abs(_out_err(w, ours, h) - _out_err(w, plain, h)) <= 0.01 * _out_err(w, plain, h)


@pytest.mark.parametrize("name", GRID_TYPES)
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_lowers_the_output_error_of_round_to_nearest(name, act_order):
    rng = np.random.default_rng(5)
    w, h = _layer(rng)
    T = get_quant_type(name)
    mode = "row-fit" if T.is_ternary else "tensor"
    rtn = T.dequantize(T.encode(w, mode)[0], w.shape)
    res = gptq_quantize(w, h, T, name="t", opts=GptqOptions(act_order=act_order), ternary_scale_mode=mode)
    q = T.dequantize(res.encoded, w.shape)
    assert _out_err(w, q, h) < 0.8 * _out_err(w, rtn, h)
    if T.is_ternary:  # every value is exactly -1, 0 or +1 times its row's stored scale
        s = np.abs(q).max(axis=1, keepdims=True)
        assert set(np.unique(np.round(q / np.where(s > 0, s, 1), 6))) <= {-1.0, 0.0, 1.0}


def test_bad_hessians_are_one_line_naming_the_tensor():
    T = get_quant_type("q4_0")
    w = np.ones((2, 32), np.float32)
    indefinite = np.eye(32)
    indefinite[0, 1] = indefinite[1, 0] = 2.0  # diagonal positive, not positive definite
    with pytest.raises(InputError, match=r"blk\.3\.ffn_up\.weight: the Hessian .* not positive definite"):
        gptq_quantize(w, indefinite, T, name="blk.3.ffn_up.weight", opts=GptqOptions(damp=0.0))
    with pytest.raises(InputError, match="non-finite"):
        gptq_quantize(w, np.full((32, 32), np.nan), T, name="x")
    with pytest.raises(InputError, match="every input column is zero"):
        gptq_quantize(w, np.zeros((32, 32)), T, name="x")
    with pytest.raises(InputError, match="--gptq-damp -1"):
        GptqOptions(damp=-1)


@pytest.mark.parametrize("name", ["q4_k", "tq2_0"])
def test_dead_columns_carry_no_error(name):
    """A column no calibration token reached (H_jj = 0) is zeroed before quantizing (gptq.py):
    whatever it held cannot move the grids or the other columns, and it is stored as the grid's
    value nearest 0."""
    rng = np.random.default_rng(2)
    w, h = _layer(rng, rows=8, cols=256, n=1024)
    h[:, 7] = h[7, :] = 0
    T = get_quant_type(name)
    q = T.dequantize(gptq_quantize(w, h, T, name="t").encoded, w.shape)
    other = w.copy()
    other[:, 7] = rng.normal(0, 5.0, 8)  # far larger than any live weight
    q2 = T.dequantize(gptq_quantize(other, h, T, name="t").encoded, w.shape)
    assert np.array_equal(q, q2)
    if T.is_ternary:
        assert not q[:, 7].any()  # code 0
    else:  # within half a grid step of 0: the step divides the gaps between the sub-block's values
        for r in range(q.shape[0]):
            gaps = np.diff(np.unique(q[r, :32]))
            assert abs(q[r, 7]) <= gaps[gaps > 0].min() / 2 * (1 + 1e-5), r


def _llama_logits(path, tokens):
    from llama_cpp import Llama

    llm = Llama(str(path), n_ctx=len(tokens) + 8, verbose=False, logits_all=True, flash_attn=False, type_k=0, type_v=0)
    llm.eval(tokens)
    return np.asarray(llm.scores[: len(tokens)], dtype=np.float64)


def test_convert_gptq_runs_in_llama_cpp_and_is_closer_to_the_model(checkpoints, calib_file, tmp_path):
    """End to end: llama.cpp's logits of the GPTQ file are closer to transformers' logits of the
    unquantized model than the round-to-nearest file's, on text after the calibration slice."""
    import torch
    from gguf import GGUFReader

    from gpt2cube.hypercube.calibrate import calibration_tokens

    src, model = checkpoints["small"]
    files = {}
    for tag, extra in (("rtn", []), ("gptq", ["--method", "gptq", "--calib", calib_file, "--calib-ctx", "64",
                                              "--calib-tokens", "512"])):
        files[tag] = tmp_path / f"{tag}.gguf"
        r = _cli("convert", src, "-o", files[tag], "--type", "q4_0", "--quiet", *extra)
        assert r.returncode == 0, r.stderr
    fields = GGUFReader(files["gptq"]).fields
    assert fields["gpt2cube.quant.method"].contents() == "gptq"
    assert fields["gpt2cube.calib.tokens"].contents() == 512
    tokens, _ = calibration_tokens(calib_file, 100_000, 50257)
    probe = [int(t) for t in tokens[512:576]]  # not among the 512 calibration tokens
    with torch.no_grad():
        ref = model(torch.tensor([probe])).logits[0].double().numpy()
    errs = {k: float(np.mean((_llama_logits(f, probe) - ref) ** 2)) for k, f in files.items()}
    assert errs["gptq"] < errs["rtn"], errs


def test_gptq_bad_inputs_fail_with_one_line_and_no_file(checkpoints, calib_file, tmp_path):
    src, _ = checkpoints["small"]
    out = tmp_path / "x.gguf"
    cases = [
        (["--method", "gptq"], "--method gptq needs --calib"),
        (["--method", "gptq", "--calib", calib_file, "--concepts", calib_file], "--hypercube-dim and --calib go together"),
        (["--method", "gptq", "--calib", calib_file, "--hypercube-dim", "3"], "do not fill whole q4_k blocks"),
        (["--act-order"], "options of --method gptq"),
        (["--method", "gptq", "--calib", calib_file, "--calib-ctx", "64", "--calib-tokens", "40"], "at least 64"),
        (["--method", "gptq", "--calib", calib_file, "--calib-ctx", "4096"], "--calib-ctx 4096"),
        (["--method", "gptq", "--calib", calib_file, "--gptq-damp", "nan"], "--gptq-damp nan"),
        (["--method", "gptq", "--calib", tmp_path / "none.txt"], "none.txt"),
    ]
    for extra, needle in cases:
        r = _cli("convert", src, "-o", out, "--type", "q4_k", "--quiet", *extra)
        assert r.returncode != 0 and needle in r.stderr and "Traceback" not in r.stderr, (extra, r.stderr)
        assert not out.exists() and not list(tmp_path.glob(".x.gguf*"))
