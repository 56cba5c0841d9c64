"""Ternary weights as BitNet b1.58 defines them, packed as ggml's TQ2_0 and TQ1_0.

Method (absmean): s = mean(|W|) over the tensor (or over each output row with scale mode
"row"), guarded below by EPS; the scale is rounded to float16 first, because that is what the
block stores, so the file holds exactly the s the weights were divided by. Then
    W_t = clip(round(W / s), -1, 1)     (round = half to even, as torch.round in BitNet's code)
    W  ~= s * W_t.
A tensor (row) that is already ternary, with every |w| in {0, a}, keeps s = a: absmean would
give a * (fraction non-zero) and change the weights, and ternarizing a ternary model must be
lossless. Only linear layers are ternarized; the recipe decides which tensors are.

ggml's own TQ quantizers use absmax per block (d = max|x|), which turns ordinary weights into
mostly zeros; we never call them. Rows (ne0) must be a multiple of 256; every block lies inside
one row, so a per-row scale is exact too.

TQ2_0 block, 256 weights in 66 bytes (2.0625 bpw):
    qs : uint8[64]   element e = 128*c + 32*l + m (c < 2, l < 4, m < 32) is the 2-bit code
                     (W_t + 1 in {0, 1, 2}) at bits 2l..2l+1 of qs[32*c + m]
    d  : float16     the scale s
    dequantization: x[e] = (code(e) - 1) * d
TQ1_0 block, 256 weights in 54 bytes (1.6875 bpw), base-3 digits ("trits") t = W_t + 1:
    qs : uint8[48]   bytes 0..31: element 32*n + m (n < 5) is trit n of byte m;
                     bytes 32..47: element 160 + 16*n + m is trit n of byte 32 + m
    qh : uint8[4]    element 240 + 4*n + j (n < 4) is trit n of byte j (a fifth trit is 0)
    d  : float16     the scale s
    A byte holding trits t0..t4 (t0 most significant) is ceil((sum t_n 3^(4-n)) * 256 / 243);
    trit n is recovered as ((byte * 3^n mod 256) * 3) >> 8.
    dequantization: x[e] = (trit(e) - 1) * d
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from gguf import GGMLQuantizationType, LlamaFileType

from .base import Grid, QuantType

QK_K = 256
EPS = np.float32(1e-5)  # smallest scale; above float16's subnormal range
SCALE_MODES = ("tensor", "row")  # what QAT trains with (finetune/fakequant.py follows them)
# Scales fitted to the weights (and an importance matrix, when given) for conversion without
# training: per row, the float16 scale of least (weighted) squared error of s * clip(round(w / s)).
FITTED_SCALE_MODES = ("row-fit",)
FIT_FACTORS = np.linspace(0.5, 2.0, 31, dtype=np.float32)  # candidate multiples of the row's absmean
_POW3 = np.array([81, 27, 9, 3, 1], dtype=np.uint16)


def absmean_scale(w: np.ndarray, mode: str = "tensor") -> np.ndarray:
    """Scale per row, shape (rows, 1), float32 holding a float16 value."""
    if mode not in SCALE_MODES:
        raise ValueError(f"ternary scale mode {mode!r}; expected one of {', '.join(SCALE_MODES)}")
    a = np.abs(np.asarray(w, dtype=np.float32))
    axis = None if mode == "tensor" else 1
    s = a.mean(axis=axis, keepdims=True, dtype=np.float64)
    peak = a.max(axis=axis, keepdims=True)
    nonzero_min = np.where(a > 0, a, np.inf).min(axis=axis, keepdims=True)
    already = (peak > 0) & (nonzero_min == peak)  # every non-zero |w| is the same value
    s = np.where(already, peak, s)
    s = np.maximum(s.astype(np.float32), EPS).astype(np.float16).astype(np.float32)
    return np.broadcast_to(s, (a.shape[0], 1)).copy()


def ternary_scale(w: np.ndarray, mode: str = "tensor", importance: np.ndarray | None = None) -> np.ndarray:
    """Scale per row (rows, 1) for any scale mode: absmean ("tensor", "row") or fitted ("row-fit")."""
    if mode in FITTED_SCALE_MODES:
        return fitted_row_scale(w, importance)
    return absmean_scale(w, mode)


def fitted_row_scale(w: np.ndarray, importance: np.ndarray | None = None, chunk: int = 256) -> np.ndarray:
    """Per row, among s = f * absmean (f in FIT_FACTORS) and each one's least-squares refit
    sum(h w t) / sum(h t^2), the float16 s of least sum_j h_j (w_j - s t_j)^2 with
    t = clip(round(w / s), -1, 1); h = importance (ones without). Rows done `chunk` at a time."""
    w = np.asarray(w, dtype=np.float32)
    h = np.ones(w.shape[1], np.float32) if importance is None else np.asarray(importance, np.float32)
    base = absmean_scale(w, "row")
    out = np.empty_like(base)
    for i in range(0, w.shape[0], chunk):
        x, b = w[i : i + chunk], base[i : i + chunk]
        best_e = np.full((x.shape[0], 1), np.inf, np.float32)
        best_s = b.copy()
        for f in FIT_FACTORS:
            s = np.maximum(b * f, EPS).astype(np.float16).astype(np.float32)
            t = np.clip(np.rint(x / s), -1, 1)
            num, den = (h * x * t).sum(1, keepdims=True), (h * t * t).sum(1, keepdims=True)
            with np.errstate(divide="ignore", invalid="ignore"):
                refit = np.where(den > 0, num / den, s)
            for cand in (s, np.maximum(refit, EPS).astype(np.float16).astype(np.float32)):
                tc = np.clip(np.rint(x / cand), -1, 1)
                e = (h * (x - cand * tc) ** 2).sum(1, keepdims=True)
                better = e < best_e
                best_e, best_s = np.where(better, e, best_e), np.where(better, cand, best_s)
        out[i : i + chunk] = best_s
    return out


def ternarize(w: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """W_t = clip(round(W / s), -1, 1) as int8; `scale` broadcasts over rows."""
    return np.clip(np.rint(np.asarray(w, dtype=np.float32) / scale), -1, 1).astype(np.int8)


class _Ternary(QuantType):
    block_size = QK_K
    fallback = "q4_0"
    is_ternary: ClassVar[bool] = True
    has_grid: ClassVar[bool] = True
    takes_importance: ClassVar[bool] = True  # weighs the fitted scale (--ternary-scale row-fit) only

    @classmethod
    def quantize(cls, x: np.ndarray, scale_mode: str = "tensor") -> np.ndarray:
        x2 = np.asarray(x, dtype=np.float32).reshape(-1, np.shape(x)[-1])
        s = absmean_scale(x2, scale_mode)
        return cls.pack(ternarize(x2, s), s).reshape(*np.shape(x)[:-1], -1)

    @classmethod
    def quantize_rows(cls, x: np.ndarray, chunk_elems: int = 1 << 21) -> np.ndarray:
        return cls.encode(x, "tensor", chunk_elems)[0]

    @classmethod
    def encode(cls, x: np.ndarray, scale_mode: str = "tensor", chunk_elems: int = 1 << 21,  # type: ignore[override]
               importance: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
        """The converter's entry: the scale needs the whole tensor, the packing goes by row bands.
        `importance` (an imatrix entry) only weighs the fitted scale modes."""
        s = ternary_scale(x, scale_mode, importance)
        rows = max(1, chunk_elems // x.shape[1])
        out = np.empty((x.shape[0], x.shape[1] // QK_K * cls.type_size), dtype=np.uint8)
        zeros = 0
        for i in range(0, x.shape[0], rows):
            t = ternarize(x[i : i + rows], s[i : i + rows])
            zeros += int((t == 0).sum())
            out[i : i + rows] = cls.pack(t, s[i : i + rows])
        stats = {"sparsity": zeros / x.size, "scale_mode": scale_mode,
                 "scale": float(s[0, 0]) if scale_mode == "tensor" else float(s.mean())}
        return out, stats

    @classmethod
    def grid(cls, x: np.ndarray, importance: np.ndarray | None = None, scale: np.ndarray | None = None) -> Grid:
        """x^ = s * (k - 1), k in 0..2, s the tensor's (or row's) scale (rows, 1), given."""
        if scale is None:
            raise ValueError("a ternary grid needs the tensor's scale (rows, 1)")
        s = np.asarray(scale, np.float32).reshape(-1, 1)
        step = np.broadcast_to(s, x.shape).astype(np.float32)
        return Grid(step, -step, 0, 2, lambda k: cls.pack(k.astype(np.int8) - 1, s))

    @classmethod
    def pack(cls, t: np.ndarray, scale: np.ndarray) -> np.ndarray:
        """Ternary codes (rows, n) int8 in {-1,0,1} and scales (rows, 1) -> (rows, n/256*type_size) bytes."""
        rows, n = t.shape
        if n % QK_K:
            raise ValueError(f"row length {n} is not a multiple of {QK_K}")
        codes = (t.astype(np.int16) + 1).astype(np.uint8).reshape(-1, QK_K)
        d = np.repeat(np.asarray(scale, np.float32).reshape(rows, 1), n // QK_K, axis=0).astype(np.float16)
        out = np.empty((codes.shape[0], cls.type_size), dtype=np.uint8)
        out[:, : cls.type_size - 2] = cls._pack_codes(codes)
        out[:, cls.type_size - 2 :] = d.view(np.uint8).reshape(-1, 2)
        return out.reshape(rows, -1)

    @classmethod
    def dequantize(cls, data: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        raw = np.frombuffer(np.ascontiguousarray(data), dtype=np.uint8).reshape(-1, cls.type_size)
        d = raw[:, -2:].copy().view(np.float16).astype(np.float32)
        codes = cls._unpack_codes(raw[:, :-2]).astype(np.float32)
        return ((codes - 1) * d).reshape(shape)

    @classmethod
    def _pack_codes(cls, codes: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    @classmethod
    def _unpack_codes(cls, packed: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class TQ2_0(_Ternary, name="tq2_0"):
    ggml_type = GGMLQuantizationType.TQ2_0
    file_type = LlamaFileType.MOSTLY_TQ2_0
    type_size = QK_K // 4 + 2

    @classmethod
    def _pack_codes(cls, codes: np.ndarray) -> np.ndarray:
        c = codes.reshape(-1, 2, 4, 32)  # [block, c, l, m]
        packed = c[:, :, 0] | (c[:, :, 1] << 2) | (c[:, :, 2] << 4) | (c[:, :, 3] << 6)
        return packed.reshape(-1, 64)

    @classmethod
    def _unpack_codes(cls, packed: np.ndarray) -> np.ndarray:
        q = packed.reshape(-1, 2, 1, 32)
        shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
        return ((q >> shifts) & 3).reshape(-1, QK_K)

    @classmethod
    def quantize_ref(cls, x: np.ndarray, scale_mode: str = "tensor") -> np.ndarray:
        x2 = np.asarray(x, dtype=np.float32).reshape(-1, np.shape(x)[-1])
        s = absmean_scale(x2, scale_mode)
        t = ternarize(x2, s)
        out = bytearray()
        for r in range(t.shape[0]):
            for b in range(0, t.shape[1], QK_K):
                block = [int(v) + 1 for v in t[r, b : b + QK_K]]
                qs = [0] * 64
                for e, code in enumerate(block):
                    c, l, m = e // 128, (e % 128) // 32, e % 32
                    qs[32 * c + m] |= code << (2 * l)
                out += bytes(qs) + np.float16(s[r, 0]).tobytes()
        return np.frombuffer(bytes(out), dtype=np.uint8).reshape(*np.shape(x)[:-1], -1)


def _trits_to_byte(trits: np.ndarray) -> np.ndarray:
    """(..., 5) trits, first most significant -> ceil(value * 256 / 243) as uint8."""
    v = (trits.astype(np.uint16) * _POW3).sum(axis=-1, dtype=np.uint16)
    return ((v * 256 + 242) // 243).astype(np.uint8)


def _byte_to_trits(b: np.ndarray, n: int) -> np.ndarray:
    """uint8 array -> (..., n) trits."""
    pow3 = np.array([1, 3, 9, 27, 81], dtype=np.uint16)[:n]
    q = (b[..., None].astype(np.uint16) * pow3) & 0xFF
    return ((q * 3) >> 8).astype(np.uint8)


class TQ1_0(_Ternary, name="tq1_0"):
    ggml_type = GGMLQuantizationType.TQ1_0
    file_type = LlamaFileType.MOSTLY_TQ1_0
    type_size = 48 + 4 + 2

    @classmethod
    def _pack_codes(cls, codes: np.ndarray) -> np.ndarray:
        nb = codes.shape[0]
        a = codes[:, :160].reshape(nb, 5, 32).transpose(0, 2, 1)  # byte m <- trits n = 0..4
        b = codes[:, 160:240].reshape(nb, 5, 16).transpose(0, 2, 1)
        h = codes[:, 240:].reshape(nb, 4, 4).transpose(0, 2, 1)  # byte j <- trits n = 0..3
        h = np.concatenate([h, np.zeros((nb, 4, 1), np.uint8)], axis=2)  # fifth trit 0
        return np.concatenate([_trits_to_byte(a), _trits_to_byte(b), _trits_to_byte(h)], axis=1)

    @classmethod
    def _unpack_codes(cls, packed: np.ndarray) -> np.ndarray:
        nb = packed.shape[0]
        a = _byte_to_trits(packed[:, :32], 5).transpose(0, 2, 1).reshape(nb, 160)
        b = _byte_to_trits(packed[:, 32:48], 5).transpose(0, 2, 1).reshape(nb, 80)
        h = _byte_to_trits(packed[:, 48:52], 4).transpose(0, 2, 1).reshape(nb, 16)
        return np.concatenate([a, b, h], axis=1)

    @classmethod
    def quantize_ref(cls, x: np.ndarray, scale_mode: str = "tensor") -> np.ndarray:
        x2 = np.asarray(x, dtype=np.float32).reshape(-1, np.shape(x)[-1])
        s = absmean_scale(x2, scale_mode)
        t = ternarize(x2, s)

        def byte(trits: list[int]) -> int:
            v = 0
            for tr in trits:
                v = v * 3 + tr
            return (v * 256 + 242) // 243

        out = bytearray()
        for r in range(t.shape[0]):
            for b in range(0, t.shape[1], QK_K):
                e = [int(v) + 1 for v in t[r, b : b + QK_K]]
                qs = [byte([e[32 * n + m] for n in range(5)]) for m in range(32)]
                qs += [byte([e[160 + 16 * n + m] for n in range(5)]) for m in range(16)]
                qh = [byte([e[240 + 4 * n + j] for n in range(4)] + [0]) for j in range(4)]
                out += bytes(qs + qh) + np.float16(s[r, 0]).tobytes()
        return np.frombuffer(bytes(out), dtype=np.uint8).reshape(*np.shape(x)[:-1], -1)
