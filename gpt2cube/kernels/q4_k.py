"""Q4_K: super-blocks of 256 weights = 8 sub-blocks of 32, each with its own 6-bit scale and
6-bit min, themselves scaled by two float16 super-block factors.

Byte layout of a super-block (144 bytes, ggml's `block_q4_K`):
    d      : float16    (bytes 0-1)     factor for the sub-block scales
    dmin   : float16    (bytes 2-3)     factor for the sub-block mins
    scales : uint8[12]  (bytes 4-15)    6-bit sc[j], m[j] for j < 8:
             j < 4 : sc[j] = scales[j] & 63,        m[j] = scales[j + 4] & 63
             j >= 4: sc[j] = scales[j + 4] & 15 | (scales[j - 4] >> 6) << 4
                     m[j]  = scales[j + 4] >> 4 | (scales[j] >> 6) << 4
    qs     : uint8[128] (bytes 16-143)  for chunk c < 4 and l < 32: qs[32c + l] holds
             q[64c + l] in its low nibble and q[64c + 32 + l] in its high nibble
Dequantization: x[32j + i] = d * sc[j] * q[32j + i] - dmin * m[j].

Our quantizer (the same family as ggml's reference, written for plain squared error):
 1. per sub-block, a search over 7 candidate step sizes around (max - min) / 15; for each, the
    codes are rounded and (scale, min) refitted by least squares (min <= 0 kept);
 2. sub-block scales and mins quantized to 6 bits against the super-block maxima;
 3. a local refinement ggml does not do: each sub-block tries its 6-bit scale or its min +-1
    with the codes re-rounded, and keeps the lowest error.
gguf-py cannot quantize Q4_K; tests hold this against ggml's reference quantizer (RMSE) and
gguf-py's dequantizer (bit-exact).

With an importance matrix (`quantize_weighted`, convert --imatrix) the error is
sum_i w_i (x_i - x^_i)^2, w the imatrix column means: step 1 tries llama.cpp's 37 candidates
(15 - 0.9 + 0.05 i) / (max - min) plus its first guess, each refitted by weighted least squares
under w and under llama.cpp's own weights w_i sqrt(sigma^2 + x_i^2) and scored under w; steps 2
and 3 as above, scored under w.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType, LlamaFileType

from .base import Grid, QuantType, as_blocks, importance_blocks, per_block

QK_K = 256
# Candidate step sizes (15 + R_MIN + R_DELTA * i) / (max - min), i = 0..N_STEPS. ggml uses 21
# candidates of 0.1; 7 of 0.33 cover the same range at a third of the cost and, with the
# refinement below, still end at about 0.985x ggml's RMSE on Gaussian and t(3) weights.
N_STEPS, R_MIN, R_DELTA = 6, -1.0, 1 / 3
# Moves of the 6-bit (scale, min) codes tried per sub-block after the super-block maxima fix d
# and dmin.
REFINE_MOVES = ((-1, 0), (1, 0), (0, -1), (0, 1))


def _sq_error(sxx, sx, sq, sq2, sqx, n, scale, mins):
    """sum_i (scale * q_i + mins - x_i)^2 expanded into sums already at hand: no pass over x."""
    return (sxx + scale * scale * sq2 + n * mins * mins - 2 * scale * sqx - 2 * mins * sx
            + 2 * scale * mins * sq)


ONES = np.ones(32, np.float32)


def _row_sums(a: np.ndarray) -> np.ndarray:
    """Sum of each 32-weight row: a matrix-vector product (BLAS) is ~10x numpy's short-axis sum."""
    return a @ ONES


def _row_dots(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", a, b)


def _ls_fit(sw, sx, sl, sl2, sxl):
    """Least-squares (scale, min) of x ~= scale * l + min from weighted sums, min <= 0 (a positive
    min cannot be stored: the scale alone is refitted); det = sw * sl2 - sl^2 > 0 required."""
    det = sw * sl2 - sl * sl
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = (sw * sxl - sx * sl) / det
        mins = (sl2 * sx - sl * sxl) / det
        pos = mins > 0
        scale = np.where(pos, sxl / sl2, scale)
        mins = np.where(pos, 0, mins)
    return scale, mins, det


def _fit_subblocks_weighted(x: np.ndarray, w: np.ndarray, wg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, 32) with error weights w and llama.cpp's weights wg -> (scale, neg_min) of least
    w-weighted error over llama.cpp's candidate steps, each refitted under w and under wg."""
    mn = np.minimum(x.min(axis=1), 0)
    rng = x.max(axis=1) - mn
    ok = rng > 0
    safe = np.where(ok, rng, 1).astype(np.float32)
    wx = w * x
    sw, sx, sxx = _row_sums(w), _row_sums(wx), _row_dots(wx, x)
    gx = wg * x
    gw, gsx = _row_sums(wg), _row_sums(gx)
    shifted = x - mn[:, None]
    q = np.empty_like(x)
    # llama.cpp's first guess: step (max - min) / 15 from the minimum, not refitted
    np.multiply(shifted, (15 / safe)[:, None], out=q)
    np.rint(q, out=q)
    np.clip(q, 0, 15, out=q)
    scale0 = safe / 15
    best_err = np.where(ok, _sq_error(sxx, sx, _row_dots(w, q), _row_dots(w * q, q), _row_dots(wx, q), sw, scale0, mn),
                        np.inf).astype(np.float32)
    best_scale = np.where(ok, scale0, 0).astype(np.float32)
    best_min = mn.astype(np.float32)
    for step in range(37):
        np.multiply(shifted, ((15 - 0.9 + 0.05 * step) / safe)[:, None], out=q)
        np.rint(q, out=q)
        np.clip(q, 0, 15, out=q)
        sl, sl2, sxl = _row_dots(w, q), _row_dots(w * q, q), _row_dots(wx, q)
        for fit in ((sw, sx, sl, sl2, sxl), (gw, gsx, _row_dots(wg, q), _row_dots(wg * q, q), _row_dots(gx, q))):
            scale, mins, det = _ls_fit(*fit)
            err = _sq_error(sxx, sx, sl, sl2, sxl, sw, scale, mins)
            better = ok & (det > 0) & (err < best_err)
            best_err = np.where(better, err, best_err)
            best_scale = np.where(better, scale, best_scale)
            best_min = np.where(better, mins, best_min)
    return best_scale.astype(np.float32), (-best_min).astype(np.float32)


def _fit_subblocks(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, 32) -> (scale (N,), neg_min (N,)) with x ~= scale * q - neg_min, q in 0..15."""
    mn = np.minimum(x.min(axis=1), 0)
    rng = x.max(axis=1) - mn
    ok = rng > 0
    safe = np.where(ok, rng, 1).astype(np.float32)
    best_scale = np.zeros(x.shape[0], np.float32)  # flat sub-blocks: x = -neg_min exactly
    best_min = mn.astype(np.float32)
    best_err = np.full(x.shape[0], np.inf, np.float32)
    n = np.float32(x.shape[1])
    sum_x, sum_xx = _row_sums(x), _row_dots(x, x)
    shifted = x - mn[:, None]
    q = np.empty_like(x)
    for step in range(N_STEPS + 1):
        iscale = (R_MIN + R_DELTA * step + 15) / safe
        np.multiply(shifted, iscale[:, None], out=q)
        np.rint(q, out=q)
        np.clip(q, 0, 15, out=q)
        sl, sl2, sxl = _row_sums(q), _row_dots(q, q), _row_dots(q, x)
        scale, mins, det = _ls_fit(n, sum_x, sl, sl2, sxl)
        err = _sq_error(sum_xx, sum_x, sl, sl2, sxl, n, scale, mins)
        better = ok & (det > 0) & (err < best_err)
        best_err = np.where(better, err, best_err)
        best_scale = np.where(better, scale, best_scale)
        best_min = np.where(better, mins, best_min)
    return best_scale.astype(np.float32), (-best_min).astype(np.float32)


def _codes(x: np.ndarray, dl: np.ndarray, ml: np.ndarray) -> np.ndarray:
    """Codes for (N, 32) given effective scale dl and min ml per sub-block (ggml's final pass)."""
    with np.errstate(divide="ignore"):
        inv = np.where(dl > 0, 1 / dl, 0).astype(np.float32)
    q = x + ml[:, None]
    q *= inv[:, None]
    np.rint(q, out=q)
    return np.clip(q, 0, 15, out=q)


def _quantize_superblocks(x: np.ndarray, weights: np.ndarray | None = None
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(nb, 256) -> d (nb,), dmin (nb,), sc (nb, 8), m (nb, 8), q (nb, 256), all as stored;
    with `weights` (nb, 256, an imatrix's), every choice minimises the weighted error."""
    nb = x.shape[0]
    sub = x.reshape(nb * 8, 32)
    if weights is None:
        scale, negmin = _fit_subblocks(sub)
        w = None
    else:
        w = weights.reshape(nb * 8, 32)
        sigma2 = np.repeat(2 * (x * x).mean(axis=1), 8)  # llama.cpp's, per super-block
        scale, negmin = _fit_subblocks_weighted(sub, w, w * np.sqrt(sigma2[:, None] + sub * sub))
    scale, negmin = scale.reshape(nb, 8), negmin.reshape(nb, 8)
    max_scale, max_min = scale.max(axis=1), negmin.max(axis=1)
    with np.errstate(divide="ignore"):
        inv_s = np.where(max_scale > 0, 63 / max_scale, 0)
        inv_m = np.where(max_min > 0, 63 / max_min, 0)
    sc = np.minimum(np.rint(inv_s[:, None] * scale), 63).reshape(-1)
    m = np.minimum(np.rint(inv_m[:, None] * negmin), 63).reshape(-1)
    d = (max_scale / 63).astype(np.float16).astype(np.float32)
    dmin = (max_min / 63).astype(np.float16).astype(np.float32)
    d_sub, dmin_sub = np.repeat(d, 8), np.repeat(dmin, 8)

    # Refinement: try sc +-1 or m +-1 per sub-block with codes re-rounded; keep the best
    # (scale, min) pair, then round the codes once against it.
    if w is None:
        n, sum_x, sum_xx = np.float32(32), _row_sums(sub), _row_dots(sub, sub)
    else:
        wx = w * sub
        n, sum_x, sum_xx = _row_sums(w), _row_sums(wx), _row_dots(wx, sub)

    def err_of(sc_try: np.ndarray, m_try: np.ndarray) -> np.ndarray:
        dl, ml = d_sub * sc_try, dmin_sub * m_try
        q = _codes(sub, dl, ml)
        if w is None:
            return _sq_error(sum_xx, sum_x, _row_sums(q), _row_dots(q, q), _row_dots(q, sub), n, dl, -ml)
        return _sq_error(sum_xx, sum_x, _row_dots(w, q), _row_dots(w * q, q), _row_dots(wx, q), n, dl, -ml)

    best_e = err_of(sc, m)
    best_sc, best_m = sc.copy(), m.copy()
    for ds, dm in REFINE_MOVES:
        sc_t = np.clip(sc + ds, 0, 63)
        m_t = np.clip(m + dm, 0, 63)
        e = err_of(sc_t, m_t)
        better = e < best_e
        best_e = np.where(better, e, best_e)
        best_sc = np.where(better, sc_t, best_sc)
        best_m = np.where(better, m_t, best_m)
    q = _codes(sub, d_sub * best_sc, dmin_sub * best_m)
    return d, dmin, best_sc.reshape(nb, 8), best_m.reshape(nb, 8), q.reshape(nb, QK_K)


def pack_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """(nb, 8) 6-bit scales and mins -> (nb, 12) bytes in ggml's layout."""
    sc, m = sc.astype(np.uint8), m.astype(np.uint8)
    out = np.zeros((sc.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = sc[:, 0:4] | ((sc[:, 4:8] >> 4) << 6)
    out[:, 4:8] = m[:, 0:4] | ((m[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:8] & 0xF) | ((m[:, 4:8] & 0xF) << 4)
    return out


def unpack_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sc = np.empty((s.shape[0], 8), dtype=np.uint8)
    m = np.empty_like(sc)
    sc[:, :4], m[:, :4] = s[:, 0:4] & 63, s[:, 4:8] & 63
    sc[:, 4:] = (s[:, 8:12] & 0xF) | ((s[:, 0:4] >> 6) << 4)
    m[:, 4:] = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    return sc, m


class Q4_K(QuantType, name="q4_k"):
    ggml_type = GGMLQuantizationType.Q4_K
    file_type = LlamaFileType.MOSTLY_Q4_K_M
    block_size = QK_K
    type_size = 4 + 12 + QK_K // 2
    fallback = "q4_0"
    takes_importance = True
    has_grid = True

    @classmethod
    def quantize(cls, x: np.ndarray) -> np.ndarray:
        return cls._pack(as_blocks(x, QK_K), None, x)

    @classmethod
    def quantize_weighted(cls, x: np.ndarray, importance: np.ndarray) -> np.ndarray:
        return cls._pack(as_blocks(x, QK_K), importance_blocks(x, importance, QK_K), x)

    @classmethod
    def grid(cls, x: np.ndarray, importance: np.ndarray | None = None, scale: np.ndarray | None = None) -> Grid:
        """x^ = (d * sc) * k - dmin * m, k in 0..15, per sub-block of 32."""
        blocks = as_blocks(x, QK_K)
        weights = None if importance is None else importance_blocks(x, importance, QK_K)
        d, dmin, sc, m, _ = _quantize_superblocks(blocks, weights)
        rows, n = x.shape
        step = per_block(d[:, None] * sc.astype(np.float32), rows, n)
        zero = -per_block(dmin[:, None] * m.astype(np.float32), rows, n)
        return Grid(step, zero, 0, 15, lambda k: cls._pack_fields(d, dmin, sc, m, k.reshape(-1, QK_K), x))

    @classmethod
    def _pack(cls, blocks: np.ndarray, weights: np.ndarray | None, x: np.ndarray) -> np.ndarray:
        return cls._pack_fields(*_quantize_superblocks(blocks, weights), x)

    @classmethod
    def _pack_fields(cls, d, dmin, sc, m, q, x: np.ndarray) -> np.ndarray:
        nb = q.shape[0]
        q = q.astype(np.uint8).reshape(-1, 4, 2, 32)  # [block, chunk, half, l]
        out = np.empty((nb, cls.type_size), dtype=np.uint8)
        out[:, 0:2] = d.astype(np.float16).view(np.uint8).reshape(-1, 2)
        out[:, 2:4] = dmin.astype(np.float16).view(np.uint8).reshape(-1, 2)
        out[:, 4:16] = pack_scales(sc, m)
        out[:, 16:] = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)
        return out.reshape(*np.shape(x)[:-1], -1)

    @classmethod
    def quantize_ref(cls, x: np.ndarray) -> np.ndarray:
        """Block by block through the same math, with the byte packing spelled out per field."""
        out = bytearray()
        for block in as_blocks(x, QK_K):
            d, dmin, sc, m, q = (a[0] for a in _quantize_superblocks(block[None, :]))
            scales = [0] * 12
            for j in range(8):
                ls, lm = int(sc[j]), int(m[j])
                if j < 4:
                    scales[j] |= ls
                    scales[j + 4] |= lm
                else:
                    scales[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4)
                    scales[j - 4] |= (ls >> 4) << 6
                    scales[j] |= (lm >> 4) << 6
            qs = [int(q[64 * c + l]) | (int(q[64 * c + 32 + l]) << 4) for c in range(4) for l in range(32)]
            out += np.float16(d).tobytes() + np.float16(dmin).tobytes() + bytes(scales) + bytes(qs)
        return np.frombuffer(bytes(out), dtype=np.uint8).reshape(*np.shape(x)[:-1], -1)

    @classmethod
    def dequantize(cls, data: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        raw = np.frombuffer(np.ascontiguousarray(data), dtype=np.uint8).reshape(-1, cls.type_size)
        d = raw[:, 0:2].copy().view(np.float16).astype(np.float32)
        dmin = raw[:, 2:4].copy().view(np.float16).astype(np.float32)
        sc, m = unpack_scales(raw[:, 4:16])
        qs = raw[:, 16:].reshape(-1, 4, 1, 32)
        q = np.concatenate([qs & 0xF, qs >> 4], axis=2).reshape(-1, 8, 32).astype(np.float32)
        x = d[:, :, None] * sc[:, :, None] * q - dmin[:, :, None] * m[:, :, None]
        return x.reshape(shape)
