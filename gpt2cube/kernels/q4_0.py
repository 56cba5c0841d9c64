"""Q4_0: blocks of 32 weights, one scale each, 4-bit codes with an implicit offset of 8.

Byte layout of a block (18 bytes, ggml's `block_q4_0`):
    d   : float16                   (bytes 0-1)   d = m / -8, m = the weight of largest |x|
    qs  : uint8[16]                 (bytes 2-17)  qs[j] = q[j] | q[j + 16] << 4
    q[i] = min(15, trunc(x[i] / d + 8.5))          (codes 0..15)
Dequantization: x[i] = (q[i] - 8) * d.
Using the signed extreme (not |max|) puts it exactly on code 0, so the 16th level is not wasted.

With an importance matrix (`quantize_weighted`, convert --imatrix) each block minimises
sum_i w_i (x_i - d q_i)^2, w the imatrix column means: the 19 inverse steps -(8 + 0.1 k) / m,
k = -9..9, that llama.cpp's make_qx_quants tries, each with its step refitted by least squares
twice, under w and under llama.cpp's weights w_i sqrt(sigma^2 + x_i^2) (so llama-quantize's own
choice is among the candidates), scored with the float16 step actually stored; the winner's codes
are then re-rounded against that stored step (which can only lower the error).
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType, LlamaFileType

from .base import Grid, QuantType, as_blocks, importance_blocks, per_block

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


GROUP_MAX_EPS = np.float32(1e-15)
ONES = np.ones(QK4_0, np.float32)


def weighted_steps(b: np.ndarray, w: np.ndarray, wg: np.ndarray, nmax: int, tries: range) -> np.ndarray:
    """(nb, n) blocks, weights w (the error's) and wg (llama.cpp's) -> the float16-exact step per
    block, among inverse steps -(nmax + 0.1 k) / m (k in `tries`, m the signed extreme), each refitted
    under w and under wg, of least w-weighted error with codes clipped to -nmax .. nmax - 1."""
    ones = np.ones(b.shape[1], np.float32)
    idx = np.abs(b).argmax(axis=1)
    m = np.take_along_axis(b, idx[:, None], axis=1)[:, 0]
    flat = np.abs(m) < GROUP_MAX_EPS
    m = np.where(flat, np.float32(1), m).astype(np.float32)
    wx, gx = w * b, wg * b
    sxx = (wx * b) @ ones
    best_err = np.full(b.shape[0], np.inf, np.float32)
    best = np.zeros(b.shape[0], np.float32)
    q = np.empty_like(b)
    for k in tries:
        np.multiply(b, (np.float32(-(nmax + 0.1 * k)) / m)[:, None], out=q)
        np.rint(q, out=q)
        np.clip(q, -nmax, nmax - 1, out=q)
        qq = q * q
        sxq, sqq = (wx * q) @ ones, (w * qq) @ ones
        for num, den in ((sxq, sqq), ((gx * q) @ ones, (wg * qq) @ ones)):
            with np.errstate(divide="ignore", invalid="ignore"):
                d = np.where(den > 0, num / den, 0).astype(np.float16).astype(np.float32)
            err = sxx - 2 * d * sxq + d * d * sqq
            better = (den > 0) & (err < best_err)
            best_err = np.where(better, err, best_err)
            best = np.where(better, d, best)
    return np.where(flat, np.float32(0), best).astype(np.float32)


def llama_weights(b: np.ndarray, imp: np.ndarray, row_sigma2: np.ndarray) -> np.ndarray:
    """llama.cpp's weights for an imatrix: imp * sqrt(sigma^2 + x^2), sigma^2 per row (or block)."""
    return imp * np.sqrt(row_sigma2[:, None] + b * b)


class Q4_0(QuantType, name="q4_0"):
    ggml_type = GGMLQuantizationType.Q4_0
    file_type = LlamaFileType.MOSTLY_Q4_0
    block_size = QK4_0
    type_size = 2 + QK4_0 // 2
    fallback = "f16"
    takes_importance = True
    has_grid = True

    @classmethod
    def quantize(cls, x: np.ndarray) -> np.ndarray:
        d, q = _codes(as_blocks(x, QK4_0))
        return cls._pack(d, q, x)

    @classmethod
    def quantize_weighted(cls, x: np.ndarray, importance: np.ndarray) -> np.ndarray:
        b = as_blocks(x, QK4_0)
        d = cls._weighted_steps(b, x, importance)
        with np.errstate(divide="ignore"):
            inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
        q = (np.clip(np.rint(b * inv[:, None]), -8, 7) + 8).astype(np.uint8)
        return cls._pack(d[:, None], q, x)

    @staticmethod
    def _weighted_steps(b: np.ndarray, x: np.ndarray, importance: np.ndarray) -> np.ndarray:
        w = importance_blocks(x, importance, QK4_0)
        rows = b.shape[0] // max(1, x.shape[-1] // QK4_0)
        sigma2 = np.repeat((b.reshape(rows, -1) ** 2).mean(axis=1), x.shape[-1] // QK4_0)
        return weighted_steps(b, w, llama_weights(b, w, sigma2), 8, range(-9, 10))

    @classmethod
    def grid(cls, x: np.ndarray, importance: np.ndarray | None = None, scale: np.ndarray | None = None) -> Grid:
        """x^ = d * (k - 8), k in 0..15, d the block's stored float16 step."""
        b = as_blocks(x, QK4_0)
        if importance is None:
            d = _codes(b)[0][:, 0]
        else:
            d = cls._weighted_steps(b, x, importance)
        d = d.astype(np.float16).astype(np.float32)
        step = per_block(d, x.shape[0], x.shape[1])
        return Grid(step, -8 * step, 0, 15, lambda k: cls._pack(d[:, None], k.astype(np.uint8).reshape(-1, QK4_0), x))

    @classmethod
    def _pack(cls, d: np.ndarray, q: np.ndarray, x: np.ndarray) -> np.ndarray:
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
