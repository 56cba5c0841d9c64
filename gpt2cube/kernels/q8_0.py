"""Q8_0: blocks of 32 weights, one scale each.

Byte layout of a block (34 bytes, ggml's `block_q8_0`):
    d   : float16, little endian   (bytes 0-1)   d = max|x| / 127
    qs  : int8[32]                 (bytes 2-33)  qs[i] = roundf(x[i] / d), halves away from zero
Dequantization: x[i] = d * qs[i]  (d taken back from float16).
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType, LlamaFileType

from .base import QuantType, as_blocks, round_half_away

QK8_0 = 32


class Q8_0(QuantType, name="q8_0"):
    ggml_type = GGMLQuantizationType.Q8_0
    file_type = LlamaFileType.MOSTLY_Q8_0
    block_size = QK8_0
    type_size = 2 + QK8_0
    fallback = "f16"

    @classmethod
    def quantize(cls, x: np.ndarray) -> np.ndarray:
        blocks = as_blocks(x, QK8_0)  # (nb, 32)
        d = np.abs(blocks).max(axis=1, keepdims=True) / np.float32(127)
        with np.errstate(divide="ignore"):
            inv = np.where(d == 0, np.float32(0), np.float32(1) / d)  # ggml multiplies by 1/d
        qs = round_half_away(blocks * inv).astype(np.int8)
        out = np.empty((blocks.shape[0], cls.type_size), dtype=np.uint8)
        out[:, :2] = d.astype(np.float16).view(np.uint8)
        out[:, 2:] = qs.view(np.uint8)
        return out.reshape(*np.shape(x)[:-1], -1)

    @classmethod
    def quantize_ref(cls, x: np.ndarray) -> np.ndarray:
        blocks = as_blocks(x, QK8_0)
        out = bytearray()
        for block in blocks:
            amax = np.float32(max(abs(float(v)) for v in block))
            d = np.float32(amax / np.float32(127))
            inv = np.float32(1) / d if d != 0 else np.float32(0)
            q = [int(round_half_away(np.float32(v) * inv)) for v in block]
            out += np.float16(d).tobytes() + np.array(q, dtype=np.int8).tobytes()
        return np.frombuffer(bytes(out), dtype=np.uint8).reshape(*np.shape(x)[:-1], -1)

    @classmethod
    def dequantize(cls, data: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        raw = np.frombuffer(np.ascontiguousarray(data), dtype=np.uint8).reshape(-1, cls.type_size)
        d = raw[:, :2].copy().view(np.float16).astype(np.float32)
        qs = raw[:, 2:].view(np.int8).astype(np.float32)
        return (d * qs).reshape(shape)
