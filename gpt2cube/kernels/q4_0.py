"""Q4_0: blocks of 32 weights, one scale each, 4-bit codes with an implicit offset of 8.

Byte layout of a block (18 bytes, ggml's `block_q4_0`):
    d   : float16                   (bytes 0-1)   d = m / -8, m = the weight of largest |x|
    qs  : uint8[16]                 (bytes 2-17)  qs[j] = q[j] | q[j + 16] << 4
    q[i] = min(15, trunc(x[i] / d + 8.5))          (codes 0..15)
Dequantization: x[i] = (q[i] - 8) * d.
Using the signed extreme (not |max|) puts it exactly on code 0, so the 16th level is not wasted.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType, LlamaFileType

from .base import QuantType, as_blocks

QK4_0 = 32


def _codes(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(nb, 32) float32 -> (d (nb, 1) float32, codes (nb, 32) uint8)."""
    idx = np.abs(blocks).argmax(axis=1)
    m = np.take_along_axis(blocks, idx[:, None], axis=1)
    d = m / np.float32(-8)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
    q = np.minimum(np.trunc(blocks * inv + np.float32(8.5)), 15).astype(np.uint8)
    return d, q


class Q4_0(QuantType, name="q4_0"):
    ggml_type = GGMLQuantizationType.Q4_0
    file_type = LlamaFileType.MOSTLY_Q4_0
    block_size = QK4_0
    type_size = 2 + QK4_0 // 2
    fallback = "f16"

    @classmethod
    def quantize(cls, x: np.ndarray) -> np.ndarray:
        d, q = _codes(as_blocks(x, QK4_0))
        out = np.empty((q.shape[0], cls.type_size), dtype=np.uint8)
        out[:, :2] = d.astype(np.float16).view(np.uint8)
        out[:, 2:] = q[:, :16] | (q[:, 16:] << 4)
        return out.reshape(*np.shape(x)[:-1], -1)

    @classmethod
    def quantize_ref(cls, x: np.ndarray) -> np.ndarray:
        out = bytearray()
        for block in as_blocks(x, QK4_0):
            m = np.float32(0)
            for v in block:  # the signed value of largest magnitude (first one on ties)
                if abs(v) > abs(m):
                    m = v
            d = np.float32(m / np.float32(-8))
            inv = np.float32(1) / d if d != 0 else np.float32(0)
            q = [min(15, int(np.float32(v) * inv + np.float32(8.5))) for v in block]
            out += np.float16(d).tobytes() + bytes(q[j] | (q[j + 16] << 4) for j in range(16))
        return np.frombuffer(bytes(out), dtype=np.uint8).reshape(*np.shape(x)[:-1], -1)

    @classmethod
    def dequantize(cls, data: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        raw = np.frombuffer(np.ascontiguousarray(data), dtype=np.uint8).reshape(-1, cls.type_size)
        d = raw[:, :2].copy().view(np.float16).astype(np.float32)
        qs = raw[:, 2:]
        q = np.concatenate([qs & 0xF, qs >> 4], axis=1).astype(np.float32)
        return ((q - 8) * d).reshape(shape)
