"""Encodings: hand-built blocks give known bytes; fast paths equal their `_ref` twins; bytes and
dequantization equal gguf-py's (bit-exact, no tolerance)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from gpt2cube.kernels import QUANT_TYPES, get_quant_type
from gpt2cube.kernels.base import round_half_away


def _random(shape, seed=0, scale=1.0):
    x = np.random.default_rng(seed).normal(scale=scale, size=shape).astype(np.float32)
    x[0, :8] = 0.0  # an all-zero half block exercises d == 0 paths
    return x


GGUF_PY_QUANTIZES = ["f32", "f16", "bf16", "q8_0", "q4_0"]  # gguf-py has no Q4_K quantizer; TQ: see below


@pytest.mark.parametrize("name", sorted(QUANT_TYPES))
def test_fast_equals_reference(name):
    qt = get_quant_type(name)
    x = _random((3, 512), seed=1, scale=0.05)
    assert np.array_equal(qt.quantize(x).view(np.uint8), qt.quantize_ref(x).view(np.uint8))


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
