"""Q6_K: super-blocks of 256 weights = 16 sub-blocks of 16, each with a signed 8-bit scale,
under one float16 super-block factor; symmetric 6-bit codes (no min).

Byte layout of a super-block (210 bytes, ggml's `block_q6_K`):
    ql     : uint8[128]  (bytes 0-127)    low 4 bits of the codes
    qh     : uint8[64]   (bytes 128-191)  high 2 bits of the codes
    scales : int8[16]    (bytes 192-207)  sub-block scales
    d      : float16     (bytes 208-209)  super-block factor
For half h < 2 (weights 128h .. 128h + 127) and l < 32, with L the codes 0..63:
    ql[64h + l]      = L[128h + l]      & 15 | (L[128h + 64 + l] & 15) << 4
    ql[64h + 32 + l] = L[128h + 32 + l] & 15 | (L[128h + 96 + l] & 15) << 4
    qh[32h + l]      = L[128h + l] >> 4 | (L[128h + 32 + l] >> 4) << 2
                       | (L[128h + 64 + l] >> 4) << 4 | (L[128h + 96 + l] >> 4) << 6
Dequantization: x[16j + i] = d * scales[j] * (L[16j + i] - 32).

Our quantizer (ggml's family, written for plain squared error, the error that matters):
 1. per sub-block, 4 candidate inverse steps -n / max (n = 31.1, 31.7, 32.3, 32.9, max the
    signed value of largest magnitude, so it lands on the code -32 side, which has room for it;
    n > 32.5 clips it, trading its error for a finer step); for each, the codes are rounded and
    the step refitted by least squares; the lowest squared error wins. ggml's reference tries 19
    steps (31.1 .. 32.9 by 0.1) scored by an x^2-weighted fit;
 2. the 16 steps quantized to int8 against the largest (-128), d = its step / -128 in float16;
 3. a local refinement ggml does not do: each sub-block tries its int8 scale +-1 with the codes
    re-rounded against the stored step d * scale, and keeps the lower error.
Measured against ggml's reference quantizer (tests/test_kernels_lowbit.py): 0.97-0.98x its RMSE on
Gaussian, Student-t(3), Laplace and uniform weights, at about a third of the work of
reproducing its 19 ordered float32 fits.

With an importance matrix (`quantize_weighted`, convert --imatrix) every sum above is weighted
by the imatrix column means w (the error is sum_i w_i (x_i - d q_i)^2), step 1 tries llama.cpp's
19 numerators 32 + 0.1 k, k = -9..9, fitted and scored under w as llama-quantize does for Q6_K,
and step 3's refinement scores under w too.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType, LlamaFileType

from .base import Grid, QuantType, as_blocks, importance_blocks, per_block

QK_K = 256
NMAX = 32
GROUP_MAX_EPS = np.float32(1e-15)
STEP_NUMERATORS = (31.1, 31.7, 32.3, 32.9)
WEIGHTED_NUMERATORS = tuple(32 + 0.1 * k for k in range(-9, 10))  # llama.cpp's make_qx_quants
ONES = np.ones(16, np.float32)


def _row_dots(a: np.ndarray, b: np.ndarray, w: np.ndarray | None = None) -> np.ndarray:
    """Per-row (w-weighted) dot products of (M, 16) arrays: the product, then a matrix-vector sum (BLAS)."""
    return (a * b if w is None else a * b * w) @ ONES


def _codes(x: np.ndarray, step: np.ndarray) -> np.ndarray:
    """Signed codes -32..31 for (M, 16) weights at step (M,) (0 for a zero step)."""
    with np.errstate(divide="ignore"):
        inv = np.where(step != 0, 1 / step, 0).astype(np.float32)
    q = x * inv[:, None]
    np.rint(q, out=q)
    return np.clip(q, -NMAX, NMAX - 1, out=q)


def _sq_error(sxx: np.ndarray, x: np.ndarray, q: np.ndarray, step: np.ndarray, w: np.ndarray | None = None) -> np.ndarray:
    """sum_i w_i (x_i - step * q_i)^2 from sums: no second pass over the residual."""
    return sxx - 2 * step * _row_dots(q, x, w) + step * step * _row_dots(q, q, w)


def fit_subblocks(x: np.ndarray, w: np.ndarray | None = None) -> np.ndarray:
    """(M, 16) float32 -> least-squares step (M,) of the best candidate (0 for a flat sub-block);
    with weights w (M, 16), the weighted fit over llama.cpp's candidates."""
    ax = np.abs(x)
    k = np.argmax(ax, axis=1)
    rows = np.arange(x.shape[0])
    flat = ax[rows, k] < GROUP_MAX_EPS
    mx = np.where(flat, np.float32(1), x[rows, k]).astype(np.float32)
    sxx = _row_dots(x, x, w)
    best_err = np.full(x.shape[0], np.inf, np.float32)
    best = np.zeros(x.shape[0], np.float32)
    q = np.empty_like(x)
    for n in STEP_NUMERATORS if w is None else WEIGHTED_NUMERATORS:
        np.multiply(x, (np.float32(-n) / mx)[:, None], out=q)
        np.rint(q, out=q)
        np.clip(q, -NMAX, NMAX - 1, out=q)
        sxq, sqq = _row_dots(x, q, w), _row_dots(q, q, w)
        with np.errstate(divide="ignore", invalid="ignore"):
            step = sxq / sqq
            err = sxx - sxq * step
        better = (sqq > 0) & (err < best_err)
        best_err = np.where(better, err, best_err)
        best = np.where(better, step, best)
    return np.where(flat, np.float32(0), best).astype(np.float32)


def quantize_superblocks(blocks: np.ndarray, weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N, 256) -> (d float16 (N,), scales int8 (N, 16), codes uint8 (N, 256) in 0..63); with
    `weights` (N, 256), every choice minimises the weighted error."""
    n = blocks.shape[0]
    sub = blocks.reshape(-1, 16)
    w = None if weights is None else weights.reshape(-1, 16)
    step = fit_subblocks(sub, w).reshape(n, 16)
    j = np.argmax(np.abs(step), axis=1)
    max_step = step[np.arange(n), j]
    flat = np.abs(max_step) < GROUP_MAX_EPS
    safe = np.where(flat, np.float32(1), max_step).astype(np.float32)
    iscale = (np.float32(-128) / safe).astype(np.float32)
    d = np.where(flat, np.float32(0), np.float32(1) / iscale).astype(np.float16)
    sc = np.clip(np.rint(iscale[:, None] * step), -128, 127).reshape(-1)
    d_sub = np.repeat(d.astype(np.float32), 16)
    sxx = _row_dots(sub, sub, w)
    best_err = _sq_error(sxx, sub, _codes(sub, d_sub * sc), d_sub * sc, w)
    best = sc.copy()
    for move in (-1, 1):
        trial = np.clip(sc + move, -128, 127)
        err = _sq_error(sxx, sub, _codes(sub, d_sub * trial), d_sub * trial, w)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best = np.where(better, trial, best)
    codes = (_codes(sub, d_sub * best) + NMAX).reshape(n, QK_K)  # a zero step: code 32, i.e. 0
    codes[flat] = 0  # an all-zero super-block is all zero bytes, as ggml writes it
    return d, best.reshape(n, 16).astype(np.int8), codes.astype(np.uint8)


def pack(d: np.ndarray, sc: np.ndarray, codes: np.ndarray) -> np.ndarray:
    n = codes.shape[0]
    L = codes.reshape(n, 2, 4, 32)  # [block, half, quarter, l]
    out = np.empty((n, 210), dtype=np.uint8)
    lo, hi = L & 0xF, L >> 4
    ql = np.concatenate([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)], axis=2)
    out[:, 0:128] = ql.reshape(n, 128)
    out[:, 128:192] = (hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)).reshape(n, 64)
    out[:, 192:208] = sc.view(np.uint8)
    out[:, 208:210] = d.view(np.uint8).reshape(n, 2)
    return out


class Q6_K(QuantType, name="q6_k"):
    ggml_type = GGMLQuantizationType.Q6_K
    file_type = LlamaFileType.MOSTLY_Q6_K
    block_size = QK_K
    type_size = 128 + 64 + 16 + 2
    fallback = "q8_0"
    takes_importance = True
    has_grid = True

    @classmethod
    def quantize(cls, x: np.ndarray) -> np.ndarray:
        blocks = as_blocks(x, QK_K)
        return pack(*quantize_superblocks(blocks)).reshape(*np.shape(x)[:-1], -1)

    @classmethod
    def quantize_weighted(cls, x: np.ndarray, importance: np.ndarray) -> np.ndarray:
        blocks = as_blocks(x, QK_K)
        w = importance_blocks(x, importance, QK_K)
        return pack(*quantize_superblocks(blocks, w)).reshape(*np.shape(x)[:-1], -1)

    @classmethod
    def grid(cls, x: np.ndarray, importance: np.ndarray | None = None, scale: np.ndarray | None = None) -> Grid:
        """x^ = (d * sc) * (k - 32), k in 0..63, per sub-block of 16."""
        blocks = as_blocks(x, QK_K)
        d, sc, _ = quantize_superblocks(blocks, None if importance is None else importance_blocks(x, importance, QK_K))
        step = per_block(d.astype(np.float32)[:, None] * sc.astype(np.float32), *x.shape)
        return Grid(step, -NMAX * step, 0, 2 * NMAX - 1,
                    lambda k: pack(d, sc, k.astype(np.uint8).reshape(-1, QK_K)).reshape(x.shape[0], -1))

    @classmethod
    def quantize_ref(cls, x: np.ndarray) -> np.ndarray:
        """Block by block through the same math, with the byte packing spelled out per field."""
        out = bytearray()
        for block in as_blocks(x, QK_K):
            d, sc, codes = (a[0] for a in quantize_superblocks(block[None, :]))
            L = [int(c) for c in codes]
            ql, qh = [0] * 128, [0] * 64
            for h in range(2):
                for l in range(32):
                    q = [L[128 * h + 32 * k + l] for k in range(4)]
                    ql[64 * h + l] = (q[0] & 15) | (q[2] & 15) << 4
                    ql[64 * h + 32 + l] = (q[1] & 15) | (q[3] & 15) << 4
                    qh[32 * h + l] = q[0] >> 4 | (q[1] >> 4) << 2 | (q[2] >> 4) << 4 | (q[3] >> 4) << 6
            out += bytes(ql) + bytes(qh) + sc.astype(np.int8).tobytes() + np.float16(d).tobytes()
        return np.frombuffer(bytes(out), dtype=np.uint8).reshape(*np.shape(x)[:-1], -1)

    @classmethod
    def dequantize(cls, data: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        raw = np.frombuffer(np.ascontiguousarray(data), dtype=np.uint8).reshape(-1, cls.type_size)
        n = raw.shape[0]
        ql, qh = raw[:, 0:128].reshape(n, 2, 2, 32), raw[:, 128:192].reshape(n, 2, 32)
        lo = np.stack([ql[:, :, 0] & 0xF, ql[:, :, 1] & 0xF, ql[:, :, 0] >> 4, ql[:, :, 1] >> 4], axis=2)
        hi = np.stack([(qh >> s) & 3 for s in (0, 2, 4, 6)], axis=2)
        q = ((lo | (hi << 4)).astype(np.int32) - NMAX).reshape(n, 16, 16).astype(np.float32)
        sc = raw[:, 192:208].view(np.int8).astype(np.float32)
        d = raw[:, 208:210].copy().view(np.float16).astype(np.float32).reshape(n)
        return (d[:, None, None] * sc[:, :, None] * q).reshape(shape)
