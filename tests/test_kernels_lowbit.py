"""Ternary (BitNet b1.58 absmean -> TQ1_0/TQ2_0), Q4_0, Q4_K and Q6_K: hand-built blocks with known
bytes, the transformation doing what it says, agreement with gguf-py and ggml's reference."""

from __future__ import annotations


import gguf
import numpy as np
import pytest

from gpt2cube.kernels import get_quant_type
from gpt2cube.kernels.ggml_ref import ggml_quantize
from gpt2cube.kernels.ternary import EPS, absmean_scale, ternarize

TERNARY = ["tq1_0", "tq2_0"]


def _w(shape, seed=0, scale=0.05):
    return np.random.default_rng(seed).normal(scale=scale, size=shape).astype(np.float32)


@pytest.mark.parametrize("mode", ["tensor", "row"])
def test_absmean_ternarization_is_what_bitnet_defines(mode):
    w = _w((6, 512), seed=1) * np.arange(1, 7, dtype=np.float32)[:, None]  # rows of different scale
    s = absmean_scale(w, mode)
    expected = np.abs(w).mean() if mode == "tensor" else np.abs(w).mean(axis=1)
    assert np.allclose(s.ravel(), expected, rtol=2**-10)  # float16 rounding of s
    assert np.array_equal(s, s.astype(np.float16).astype(np.float32))  # exactly what a block stores
    t = ternarize(w, s)
    assert set(np.unique(t)) <= {-1, 0, 1}
    assert np.array_equal(t, np.clip(np.rint(w / s), -1, 1))
    for name in TERNARY:
        qt = get_quant_type(name)
        deq = qt.dequantize(qt.quantize(w, mode), w.shape)
        for r in range(w.shape[0]):  # values are exactly {-s, 0, +s} of that row
            assert set(np.unique(deq[r])) <= {-s[r, 0], 0.0, s[r, 0]}
        _, stats = qt.encode(w, mode)
        assert stats["sparsity"] == pytest.approx(float((t == 0).mean()))
        assert 0.2 < stats["sparsity"] < 0.45  # ~31 % for Gaussian weights (|w| < mean|w| / 2)


def test_absmean_epsilon_guard():
    s = absmean_scale(np.zeros((2, 256), np.float32))
    assert np.all(s == np.float32(np.float16(EPS)))


@pytest.mark.parametrize("name", TERNARY)
@pytest.mark.parametrize("mode", ["tensor", "row"])
def test_ternary_of_ternary_is_lossless_and_matches_gguf_py(name, mode):
    qt = get_quant_type(name)
    rng = np.random.default_rng(3)
    t = rng.integers(-1, 2, size=(4, 512)).astype(np.float32)
    t[:, ::7] = 1.0  # no all-zero block (gguf-py's absmax would store d = 0 there)
    a = np.array([[0.03125], [0.0625], [0.125], [0.25]], np.float32)  # float16-exact scales
    w = t * (a if mode == "row" else a[0])
    ours = qt.quantize(w, mode)
    assert np.array_equal(qt.dequantize(ours, w.shape), w)
    # On ternary input ggml's absmax quantizer (gguf-py's port) finds the same scale: same bytes.
    assert ours.tobytes() == gguf.quants.quantize(w, qt.ggml_type).tobytes()


def test_tq2_0_hand_built_block():
    t = np.zeros((1, 256), np.int8)
    t[0, 0], t[0, 32], t[0, 64], t[0, 96], t[0, 128], t[0, 255] = 1, -1, 1, 1, -1, 1
    got = get_quant_type("tq2_0").pack(t, np.array([[0.5]], np.float32)).tobytes()
    # byte 0 holds elements 0, 32, 64, 96 at bits 0-1, 2-3, 4-5, 6-7: codes 2, 0, 2, 2
    assert got[0] == 2 | 0 << 2 | 2 << 4 | 2 << 6
    assert got[32] == 0 | 1 << 2 | 1 << 4 | 1 << 6  # element 128 = -1 -> 0, rest 0 -> code 1
    assert got[63] == 1 | 1 << 2 | 1 << 4 | 2 << 6  # element 255: c=1, l=3, m=31
    assert all(b == 0b01010101 for i, b in enumerate(got[:64]) if i not in (0, 32, 63))
    assert got[64:] == np.float16(0.5).tobytes()


def test_tq1_0_hand_built_block():
    t = np.zeros((1, 256), np.int8)
    t[0, 0] = 1  # byte 0, most significant trit
    t[0, 240] = -1  # qh byte 0, first trit
    got = get_quant_type("tq1_0").pack(t, np.array([[0.25]], np.float32)).tobytes()
    # byte 0: trits (2,1,1,1,1) = 2*81+27+9+3+1 = 202 -> ceil(202*256/243) = 213
    assert got[0] == (202 * 256 + 242) // 243 == 213
    # all-zero weights: trits (1,1,1,1,1) = 121 -> ceil(121*256/243) = 128
    assert got[1] == 128 and got[47] == 128
    # qh byte 0: trits (0,1,1,1) then *3: (0*27+9+3+1)*3 = 39 -> ceil(39*256/243) = 42
    assert got[48] == 42
    assert got[52:] == np.float16(0.25).tobytes()
    assert len(got) == 54


def test_q4_0_hand_built_block():
    x = np.zeros((1, 32), np.float32)
    x[0, 0], x[0, 1], x[0, 16] = -8.0, 4.0, 1.0  # d = -8 / -8 = 1
    got = get_quant_type("q4_0").quantize(x).tobytes()
    assert got[:2] == np.float16(1.0).tobytes()
    # q = trunc(x/d + 8.5): -8 -> 0, 4 -> 12, 1 -> 9, 0 -> 8; qs[j] = q[j] | q[j+16] << 4
    assert got[2] == 0 | 9 << 4 and got[3] == 12 | 8 << 4 and got[4] == 8 | 8 << 4


def test_q4_k_hand_built_block():
    """A super-block whose values sit exactly on a Q4_K grid decodes back exactly. (The largest
    scale and min codes are 63, as the quantizer chooses d = max scale / 63, dmin likewise.)"""
    q = np.tile(np.arange(16, dtype=np.float32), 16)  # codes 0..15 in every sub-block
    sc = np.array([1, 2, 3, 4, 5, 6, 7, 63], np.float32)
    m = np.array([0, 9, 18, 27, 36, 45, 54, 63], np.float32)
    d, dmin = np.float32(2**-6), np.float32(2**-7)
    x = (d * np.repeat(sc, 32) * q - dmin * np.repeat(m, 32)).reshape(1, 256)
    qt = get_quant_type("q4_k")
    data = qt.quantize(x)
    assert data.shape == (1, 144)
    assert np.array_equal(qt.dequantize(data, x.shape), x)
    assert data[0, :4].tobytes() == np.float16(d).tobytes() + np.float16(dmin).tobytes()
    assert np.array_equal(qt.dequantize(data, x.shape), gguf.quants.dequantize(data, qt.ggml_type))


@pytest.mark.parametrize("dist", ["normal", "student_t3"])
def test_q4_k_error_at_most_ggml_reference(dist):
    rng = np.random.default_rng(7)
    x = (rng.normal(size=(96, 768)) if dist == "normal" else rng.standard_t(3, size=(96, 768))) * 0.04
    x = x.astype(np.float32)
    qt = get_quant_type("q4_k")
    ours = qt.dequantize(qt.quantize(x), x.shape)
    ref = gguf.quants.dequantize(ggml_quantize(x, qt.ggml_type), qt.ggml_type)
    rmse = lambda y: float(np.sqrt(((y - x) ** 2).mean()))  # noqa: E731
    assert rmse(ours) <= rmse(ref), (rmse(ours), rmse(ref))


def test_q4_0_bytes_equal_ggml_reference():
    x = _w((8, 256), seed=9)
    assert get_quant_type("q4_0").quantize(x).tobytes() == ggml_quantize(x, get_quant_type("q4_0").ggml_type).tobytes()


@pytest.mark.parametrize("dist", ["normal", "student_t3", "laplace", "uniform", "gamma", "outliers", "half_zero",
                                  "wide_range"])
def test_q6_k_error_below_ggml_reference(dist):
    """Q6_K's squared error at or below ggml's reference quantizer's (what llama-quantize writes
    without an importance matrix) on every weight distribution, its bytes decoded by gguf-py."""
    rng = np.random.default_rng(11)
    shape = (48, 1024)
    x = {"normal": lambda: rng.normal(size=shape) * 0.02, "student_t3": lambda: rng.standard_t(3, size=shape),
         "laplace": lambda: rng.laplace(size=shape), "uniform": lambda: rng.uniform(-1, 1, size=shape),
         "gamma": lambda: rng.gamma(2, size=shape),  # all positive
         "outliers": lambda: rng.normal(size=shape) * np.where(rng.random(shape) < 0.01, 30, 1),
         "half_zero": lambda: np.where(rng.random(shape) < 0.5, 0, rng.normal(size=shape)),
         # rows from 1e-12 (squares in float32's subnormals) to 1e6
         "wide_range": lambda: rng.normal(size=shape) * np.logspace(-12, 6, 48)[:, None]}[dist]()
    x = x.astype(np.float32)
    x[0, :256] = 0.0  # an all-zero super-block: zero bytes
    x[1, :16] = 0.0   # an all-zero sub-block
    qt = get_quant_type("q6_k")
    ours = qt.quantize(x)
    ref = ggml_quantize(x, qt.ggml_type)
    assert ours.shape == ref.shape == (48, 4 * 210)
    assert not ours[0, :210].any()
    ours_x = gguf.quants.dequantize(ours, qt.ggml_type)
    assert np.array_equal(ours_x, qt.dequantize(ours, x.shape))
    assert not ours_x[1, :16].any()
    ref_x = gguf.quants.dequantize(ref, qt.ggml_type)
    # per row, relative to the row's own scale, so the 1e6 rows do not hide the 1e-12 ones
    rel = lambda y: np.sqrt(((y - x) ** 2).mean(axis=1)) / np.maximum(np.abs(x).max(axis=1), 1e-30)  # noqa: E731
    assert rel(ours_x).mean() <= rel(ref_x).mean(), (rel(ours_x).mean(), rel(ref_x).mean())
    assert np.array_equal(qt.quantize_ref(x[:4]), ours[:4])  # the block-by-block packing spelled out


def test_q6_k_hand_built_block():
    """Codes -32, -28, ..., 28 in every sub-block (the -32 fixes the step) under sub-block scales
    whose largest magnitude is -128 decode back exactly."""
    q = np.tile(np.arange(-32, 32, 4, dtype=np.float32), (16, 1))
    sc = np.array([-128, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 100, 110, 120, 127, 64], np.float32)
    d = np.float32(2**-10)
    x = (d * sc[:, None] * q).reshape(1, 256)
    qt = get_quant_type("q6_k")
    data = qt.quantize(x)
    assert data.shape == (1, 210)
    assert np.array_equal(qt.dequantize(data, x.shape), x)
    assert np.array_equal(qt.dequantize(data, x.shape), gguf.quants.dequantize(data, qt.ggml_type))
    assert data[0, 208:].tobytes() == np.float16(d).tobytes()  # d = 1 / (-128 / max_scale), max_scale = -128 d
    assert data[0, 192:208].view(np.int8).tolist() == sc.astype(int).tolist()
