"""Encodings: hand-built blocks give known bytes; fast paths equal their `_ref` twins; bytes and
dequantization equal gguf-py's (bit-exact, no tolerance)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from gpt2cube.kernels import QUANT_TYPES, get_quant_type
from gpt2cube.kernels.base import QuantType, round_half_away


def _random(shape, seed=0, scale=1.0):
    x = np.random.default_rng(seed).normal(scale=scale, size=shape).astype(np.float32)
    x[0, :8] = 0.0  # an all-zero half block exercises d == 0 paths
    return x


GGUF_PY_QUANTIZES = ["f32", "f16", "bf16", "q8_0", "q4_0"]  # gguf-py has no Q4_K quantizer; TQ: see below


# types whose `quantize_ref` is an implementation of its own (block by block, bytes spelled
# out), not a wrapper of the fast path's math; q4_k and the ternary types are checked against
# independent derivations below instead
OWN_TWINS = ["bf16", "q8_0", "q4_0"]


@pytest.mark.parametrize("name", OWN_TWINS)
def test_fast_equals_reference_twin(name):
    qt = get_quant_type(name)
    assert qt.quantize_ref.__func__ is not QuantType.quantize_ref.__func__  # a twin of its own
    x = _random((3, 512), seed=1, scale=0.05)
    assert np.array_equal(qt.quantize(x).view(np.uint8), qt.quantize_ref(x).view(np.uint8))


@pytest.mark.parametrize("name", ["tq1_0", "tq2_0"])
@pytest.mark.parametrize("mode", ["tensor", "row"])
def test_ternary_bytes_equal_bitnet_definition_packed_by_gguf_py(name, mode):
    """BitNet b1.58 written out here (s = mean|W| per tensor or row, stored as float16; W_t =
    clip(round(W / s), -1, 1)), and the packing left to gguf-py: given W_t * s its absmax
    quantizer finds the block scale s and the codes W_t, so its bytes must equal ours on W."""
    qt = get_quant_type(name)
    w = _random((6, 512), seed=7, scale=0.05) * np.arange(1, 7, dtype=np.float32)[:, None]
    a = np.abs(w.astype(np.float64))
    s = (a.mean() if mode == "tensor" else a.mean(axis=1, keepdims=True)).astype(np.float32)
    s = np.broadcast_to(np.float32(np.float16(s)), (6, 1)).astype(np.float32)
    t = np.clip(np.rint(w / s), -1, 1)
    assert np.all(np.abs(t.reshape(-1, 256)).max(axis=1) == 1)  # every block has a non-zero: d = s
    want = gguf.quants.quantize((t * s).astype(np.float32), qt.ggml_type)
    assert qt.quantize(w, mode).tobytes() == want.tobytes()


def test_q4_k_codes_are_the_rounding_of_its_stored_scales():
    """A per-block re-derivation from the bytes, sharing no code with the quantizer: unpack d,
    dmin and the 6-bit scales and mins by ggml's layout (get_scale_min_k4), then every 4-bit code
    must be clip(round((x + dmin m) / (d sc)), 0, 15) of the input; and the chosen scales must beat
    the trivial ones (min/max of each sub-block) in squared error over the tensor."""
    x = _random((4, 512), seed=11, scale=0.05)
    data = get_quant_type("q4_k").quantize(x).reshape(-1, 144)
    total = total_trivial = 0.0
    for b, block in enumerate(data):
        xb = x.reshape(-1, 256)[b]
        d = float(np.frombuffer(block[0:2].tobytes(), np.float16)[0])
        dmin = float(np.frombuffer(block[2:4].tobytes(), np.float16)[0])
        sc12 = block[4:16]
        qs = block[16:]
        for j in range(8):
            if j < 4:
                sc, m = sc12[j] & 63, sc12[j + 4] & 63
            else:
                sc = (sc12[j + 4] & 0xF) | ((sc12[j - 4] >> 6) << 4)
                m = (sc12[j + 4] >> 4) | ((sc12[j] >> 6) << 4)
            chunk, half = divmod(j, 2)
            byte = qs[32 * chunk : 32 * chunk + 32]
            q = (byte & 0xF) if half == 0 else (byte >> 4)
            seg = xb[32 * j : 32 * j + 32].astype(np.float64)
            scale, mn = np.float32(d) * np.float32(sc), np.float32(dmin) * np.float32(m)
            if scale == 0:
                continue
            want = np.clip(np.rint((seg + mn) / scale), 0, 15)
            # a value exactly between two levels may go either way in float32
            assert np.all((q == want) | (np.abs((seg + mn) / scale - np.rint((seg + mn) / scale)) > 0.499)), (b, j)
            err = np.sum((scale * q - mn - seg) ** 2)
            lo, hi = seg.min(), seg.max()
            triv = (hi - min(lo, 0)) / 15
            tq = np.clip(np.rint((seg - min(lo, 0)) / triv), 0, 15) if triv > 0 else np.zeros(32)
            trivial = np.sum((triv * tq + min(lo, 0) - seg) ** 2)
            # per sub-block within 10 %: the stored scale is a 6-bit multiple of a float16 d, the
            # trivial one exact (measured at most 1.023x on this input)
            assert err <= trivial * 1.10 + 1e-12, (b, j)
            total += err
            total_trivial += trivial
    # the search must win overall (measured 0.823x; scales min/max alone give about 1.0x)
    assert total <= 0.9 * total_trivial, total / total_trivial


@pytest.mark.parametrize("name", GGUF_PY_QUANTIZES)
def test_bytes_equal_gguf_py(name):
    qt = get_quant_type(name)
    x = _random((16, 256), seed=2, scale=0.05)
    ours = qt.quantize(x)
    assert ours.view(np.uint8).tobytes() == gguf.quants.quantize(x, qt.ggml_type).view(np.uint8).tobytes()
    assert ours.nbytes == qt.nbytes(x.shape)


@pytest.mark.parametrize("name", sorted(QUANT_TYPES))
def test_dequant_equals_gguf_py(name):
    qt = get_quant_type(name)
    x = _random((16, 512), seed=5, scale=0.05)
    ours = qt.quantize(x)
    assert np.array_equal(qt.dequantize(ours, x.shape), gguf.quants.dequantize(ours.view(np.uint8), qt.ggml_type))


def test_q8_0_hand_built_block():
    x = np.zeros((1, 32), np.float32)
    x[0, 0], x[0, 1], x[0, 2], x[0, 3] = 1.27, -0.635, 0.005, -1.27  # d = 0.01
    got = get_quant_type("q8_0").quantize(x).tobytes()
    d = np.float16(np.float32(1.27) / np.float32(127)).tobytes()
    assert got[:2] == d
    # 0.005 / 0.01 = 0.5 rounds away from zero to 1; -0.635/0.01 = -63.5 -> -64
    assert list(np.frombuffer(got[2:6], np.int8)) == [127, -64, 1, -127]
    assert got[6:] == bytes(28)


def test_bf16_hand_built_values():
    x = np.array([[1.0, -2.0, 1.00390625, 1.01171875, np.inf, np.nan]], np.float32)
    got = get_quant_type("bf16").quantize(x)
    # 1.00390625 is exactly halfway between bf16 1.0 and 1.0078125: ties to even -> 0x3F80;
    # 1.01171875 is halfway between 1.0078125 (odd) and 1.015625: ties to even -> 0x3F82.
    assert [hex(v) for v in got[0]] == ["0x3f80", "0xc000", "0x3f80", "0x3f82", "0x7f80", "0x7fc0"]


def test_round_half_away_matches_c_roundf():
    x = np.array([0.5, 1.5, 2.5, -0.5, -2.5, 0.49999997, -0.49999997, 126.5, 0.0], np.float32)
    assert round_half_away(x).tolist() == [1, 2, 3, -1, -3, 0, 0, 127, 0]


def test_row_fit_and_sizes():
    q8 = get_quant_type("q8_0")
    assert q8.row_ok(64) and not q8.row_ok(100)
    assert q8.nbytes((3, 64)) == 3 * 2 * 34
    assert get_quant_type("f16").nbytes((3, 5)) == 30
    with pytest.raises(ValueError, match="unknown tensor type 'q9'"):
        get_quant_type("q9")


@pytest.mark.parametrize("name", sorted(QUANT_TYPES))
def test_chunked_encoding_equals_whole(name):
    qt = get_quant_type(name)
    x = _random((37, 256), seed=3)
    assert np.array_equal(qt.quantize_rows(x, chunk_elems=5 * 256).view(np.uint8), qt.quantize(x).view(np.uint8))
