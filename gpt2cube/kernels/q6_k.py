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

The quantizer is ggml's reference (`quantize_row_q6_K_ref`, what llama-quantize writes without
an importance matrix), reproduced to the byte: per sub-block, 19 candidate inverse steps
-(32 + 0.1 k) / max (k = -9..9) scored by the x^2-weighted least-squares fit of the rounded
codes; the sub-block scales quantized to int8 against the largest; the codes re-rounded against
the stored scales. Byte equality needs the same float32 arithmetic: sums in order, rounding to
nearest even (ggml's `nearest_int`), and the same choice of fused multiply-adds. ggml-base, where
the reference quantizer lives, is compiled for x86-64 without FMA, and there the default
(`fused=False`) gives ggml's bytes exactly (tests/test_kernels_lowbit.py). A build that fuses the
sums (clang contracts `s += a * b` by default on arm64) rounds a few sub-blocks' fits
differently (measured: 2-3 % of super-blocks); `fused=True` models that build. The converter
always writes the unfused variant, so its files are the same bytes on every platform.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType, LlamaFileType

from .base import QuantType, as_blocks

QK_K = 256
NMAX = 32
GROUP_MAX_EPS = np.float32(1e-15)


def _fma(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """float32 a * b + c with one rounding: the float32 product is exact in float64, the sum is
    rounded once to float64 and then to float32 (a second rounding that can only differ from a
    true fused operation on an exact float64 tie, about 2^-29 of cases)."""
    return (a.astype(np.float64) * b.astype(np.float64) + c.astype(np.float64)).astype(np.float32)


def _mul_add(a, b, c, fused: bool):
    return _fma(a, b, c) if fused else np.float32(c + a * b)


def _accumulate(a: np.ndarray, b: np.ndarray, c: np.ndarray, fused: bool) -> None:
    """c += a * b in float32, in place (unfused: the product rounded, then the sum)."""
    if fused:
        c[...] = _fma(a, b, c)
    else:
        c += a * b


def _nearest(x: np.ndarray) -> np.ndarray:
    return np.rint(x).astype(np.int32)  # ggml's nearest_int: round half to even (|x| < 2^22)


def _fit(x: np.ndarray, w: np.ndarray, iscale: np.ndarray, fused: bool):
    """Codes (16, C, M) for candidate inverse steps iscale (C, M) and the sums of the weighted
    fit (C, M), accumulated in ggml's order (float sums depend on it). Weights run along the
    first axis so each step of the sequential sum reads contiguous rows."""
    xt, wt = np.ascontiguousarray(x.T), np.ascontiguousarray(w.T)
    wxt = wt * xt
    l = np.empty((x.shape[1], *iscale.shape), np.float32)
    sumlx = np.zeros(iscale.shape, np.float32)
    suml2 = np.zeros(iscale.shape, np.float32)
    for i in range(x.shape[1]):  # sequential, as the C loop
        li = l[i]
        np.multiply(iscale, xt[i], out=li)
        np.rint(li, out=li)  # nearest_int (round half to even) on float32, exact for |x| < 2^22
        np.clip(li, -NMAX, NMAX - 1, out=li)
        _accumulate(wxt[i], li, sumlx, fused)
        _accumulate(wt[i] * li, li, suml2, fused)
    return l, sumlx, suml2


# the candidates' numerators in ggml's order: nmax, then nmax + 0.1 k for k = -9..-1, 1..9
STEPS = [k for k in range(-9, 10) if k != 0]
SUB_CHUNK = 8192  # sub-blocks fitted at once: (19, 8192, 16) temporaries, a few tens of MB


def _exact_choice(x: np.ndarray, iscale: np.ndarray, fused: bool) -> tuple[np.ndarray, np.ndarray]:
    """ggml's choice: every candidate's sums in ggml's order, then each candidate compared with
    the best so far (strict '>'). -> (scale (M,), signed codes (M, 16))."""
    rows = np.arange(x.shape[0])
    l, sumlx, suml2 = _fit(x, x * x, iscale, fused)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = (sumlx / suml2).astype(np.float32)
    scale = np.where(suml2[0] != 0, ratio[0], np.float32(0)).astype(np.float32)
    best = (scale * sumlx[0]).astype(np.float32)
    pick = np.zeros(x.shape[0], np.int64)
    for c in range(1, iscale.shape[0]):
        with np.errstate(over="ignore", invalid="ignore"):  # huge weights overflow float32, as in C
            better = (suml2[c] > 0) & (sumlx[c] * sumlx[c] > best * suml2[c])
        pick = np.where(better, c, pick)
        scale = np.where(better, ratio[c], scale)
        best = np.where(better, (ratio[c] * sumlx[c]).astype(np.float32), best)
    return scale, l[:, pick, rows].T


def fit_subblocks(x: np.ndarray, fused: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(M, 16) float32 -> (scale (M,), codes (M, 16) in 0..63): ggml's make_qx_quants(16, 32,
    rmse_type 1) for every sub-block at once, all 19 candidate steps evaluated together and
    the one ggml's loop keeps (each compared with the best so far) chosen."""
    if x.shape[0] > SUB_CHUNK:
        parts = [fit_subblocks(x[i : i + SUB_CHUNK], fused) for i in range(0, x.shape[0], SUB_CHUNK)]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    ax = np.abs(x)
    k = np.argmax(ax, axis=1)  # the first largest |x|, as the C loop's strict '>'
    rows = np.arange(x.shape[0])
    mx, amax = x[rows, k], ax[rows, k]
    flat = amax < GROUP_MAX_EPS
    mx = np.where(flat, np.float32(1), mx).astype(np.float32)
    nums = [np.float32(NMAX)] + [_mul_add(np.float32(0.1), np.float32(k), np.float32(NMAX), fused) for k in STEPS]
    iscale = np.stack([(-n / mx).astype(np.float32) for n in nums])  # -nmax / max, -(nmax + 0.1f*is) / max
    scale, l = _exact_choice(x, iscale, fused)
    scale = np.where(flat, np.float32(0), scale).astype(np.float32)
    codes = np.where(flat[:, None], 0, l.astype(np.int32) + NMAX)
    return scale, codes


def quantize_superblocks(blocks: np.ndarray, fused: bool = False):
    """(N, 256) -> (d float16 (N,), scales int8 (N, 16), codes uint8 (N, 256) in 0..63)."""
    n = blocks.shape[0]
    sub = blocks.reshape(-1, 16)
    scale, codes = fit_subblocks(sub, fused)
    scale, codes = scale.reshape(n, 16), codes.reshape(n, 16, 16)
    j = np.argmax(np.abs(scale), axis=1)
    max_scale = scale[np.arange(n), j]
    flat = np.abs(max_scale) < GROUP_MAX_EPS
    safe = np.where(flat, np.float32(1), max_scale).astype(np.float32)
    iscale = (np.float32(-128) / safe).astype(np.float32)
    d = np.where(flat, np.float32(0), np.float32(1) / iscale).astype(np.float16)
    sc = np.minimum(127, _nearest(iscale[:, None] * scale))
    sc = np.where(flat[:, None], 0, sc).astype(np.int8)
    dj = (d.astype(np.float32)[:, None] * sc.astype(np.float32)).astype(np.float32)  # (N, 16)
    with np.errstate(divide="ignore", invalid="ignore"):
        requant = np.clip(_nearest(blocks.reshape(n, 16, 16) / dj[:, :, None]), -NMAX, NMAX - 1) + NMAX
    # a sub-block whose stored scale is 0 keeps its fitted codes (ggml skips it); a flat
    # super-block is all zero bytes
    codes = np.where((dj == 0)[:, :, None], codes, requant)
    codes = np.where(flat[:, None, None], 0, codes)
    return d, sc, codes.reshape(n, QK_K).astype(np.uint8)


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

    @classmethod
    def quantize(cls, x: np.ndarray) -> np.ndarray:
        blocks = as_blocks(x, QK_K)
        return pack(*quantize_superblocks(blocks)).reshape(*np.shape(x)[:-1], -1)

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
