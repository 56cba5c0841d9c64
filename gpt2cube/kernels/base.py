"""The registry of GGUF tensor encodings.

Each encoding is a class that registers itself by name (`class Q8_0(QuantType, name="q8_0")`);
the CLI's `--type` choices and the converter read this registry, never a chain of ifs. A class
packs float32 rows into the exact bytes ggml expects (`quantize`), keeps a plain numpy
reference twin (`quantize_ref`, one block at a time, written for reading not speed) and unpacks
bytes back to float32 (`dequantize`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
from gguf import GGMLQuantizationType, LlamaFileType

QUANT_TYPES: dict[str, type["QuantType"]] = {}
ENCODE_THREADS = max(1, min(4, os.cpu_count() or 1))


class QuantType:
    name: ClassVar[str]
    ggml_type: ClassVar[GGMLQuantizationType]
    file_type: ClassVar[LlamaFileType]
    block_size: ClassVar[int]  # weights per block (1 for plain float types)
    type_size: ClassVar[int]  # bytes per block
    # The type to use instead when a row length does not fit block_size (None: always fits).
    fallback: ClassVar[str | None] = None
    is_ternary: ClassVar[bool] = False
    takes_importance: ClassVar[bool] = False  # quantize_weighted exists (convert --imatrix)
    has_grid: ClassVar[bool] = False  # grid exists (convert --method gptq)

    def __init_subclass__(cls, name: str | None = None, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if name is not None:
            if name in QUANT_TYPES:
                raise ValueError(f"quant type {name!r} registered twice")
            cls.name = name
            QUANT_TYPES[name] = cls

    @classmethod
    def row_ok(cls, row_length: int) -> bool:
        """Whether rows of this many weights (ggml's ne0) can be stored in this type."""
        return row_length % cls.block_size == 0

    @classmethod
    def nbytes(cls, shape: tuple[int, ...]) -> int:
        n = int(np.prod(shape, dtype=np.int64))
        return n // cls.block_size * cls.type_size

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.type_size / self.block_size

    @classmethod
    def quantize(cls, x: np.ndarray) -> np.ndarray:
        """float32 array (..., n) -> encoded array whose bytes are the GGUF tensor data."""
        raise NotImplementedError(f"{cls.__name__} must implement quantize")

    @classmethod
    def quantize_rows(cls, x: np.ndarray, chunk_elems: int = 1 << 18, importance: np.ndarray | None = None) -> np.ndarray:
        """`quantize` (or `quantize_weighted` with `importance`) over a 2-D array a band of rows at
        a time, so temporaries stay around `chunk_elems` floats per worker instead of growing with
        the tensor (token_embd of GPT-2 is 38.6M); bands run on a few threads (numpy releases the
        GIL in its loops)."""
        def enc(a: np.ndarray) -> np.ndarray:
            return cls.quantize(a) if importance is None else cls.quantize_weighted(a, importance)

        rows = max(1, chunk_elems // max(1, x.shape[-1]))
        if x.ndim != 2 or x.shape[0] <= rows:
            return enc(x)
        first = enc(x[:rows])
        out = np.empty((x.shape[0], first.shape[1]), dtype=first.dtype)
        out[:rows] = first

        def band(i: int) -> None:
            out[i : i + rows] = enc(x[i : i + rows])

        with ThreadPoolExecutor(max_workers=ENCODE_THREADS) as pool:
            list(pool.map(band, range(rows, x.shape[0], rows)))
        return out

    @classmethod
    def encode(cls, x: np.ndarray, scale_mode: str = "tensor",
               importance: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
        """The converter's entry: encoded bytes plus statistics worth reporting (none here;
        ternary types report sparsity). `scale_mode` only matters to ternary types; `importance`
        (one positive weight per column, an imatrix entry) to the types that take it."""
        if importance is not None and cls.takes_importance:
            return cls.quantize_rows(x, importance=importance), {}
        return cls.quantize_rows(x), {}

    @classmethod
    def quantize_weighted(cls, x: np.ndarray, importance: np.ndarray) -> np.ndarray:
        """Like `quantize`, choosing scales to minimise sum_j importance[j] * (x_j - q_j)^2 over
        each row (llama-quantize --imatrix); only for classes with `takes_importance`."""
        raise NotImplementedError(f"{cls.__name__} takes no importance weights")

    @classmethod
    def grid(cls, x: np.ndarray, importance: np.ndarray | None = None, scale: np.ndarray | None = None) -> "Grid":
        """The values this type can store for the blocks of x (rows, n), n a multiple of block_size,
        with the block parameters (scales, mins) fitted to x as `quantize` (or `quantize_weighted`
        with `importance`) fits them; ternary types take their `scale` (rows, 1) from the caller,
        as it belongs to the whole tensor. Error-feedback quantization (calib.gptq) fixes a block's
        grid when it reaches the block, then rounds each updated column onto it."""
        raise NotImplementedError(f"{cls.__name__} has no grid (no error-feedback quantization)")

    @classmethod
    def quantize_ref(cls, x: np.ndarray) -> np.ndarray:
        """Reference twin of `quantize`; defaults to `quantize` where there is no fast path."""
        return cls.quantize(x)

    @classmethod
    def dequantize(cls, data: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """Encoded bytes -> float32 array of `shape`."""
        raise NotImplementedError(f"{cls.__name__} must implement dequantize")


def get_quant_type(name: str) -> type[QuantType]:
    try:
        return QUANT_TYPES[name]
    except KeyError:
        known = ", ".join(sorted(QUANT_TYPES))
        raise ValueError(f"unknown tensor type {name!r}; known types: {known}") from None


def as_blocks(x: np.ndarray, block_size: int) -> np.ndarray:
    """(..., n) float array -> (n_blocks, block_size) float32 view/copy, row-major."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.shape[-1] % block_size:
        raise ValueError(f"row length {x.shape[-1]} is not a multiple of the block size {block_size}")
    return x.reshape(-1, block_size)


def round_half_away(x: np.ndarray) -> np.ndarray:
    """C's roundf (halves away from zero), exactly, in float32.

    `floor(|x| + 0.5)` is not exact in float32 (0.49999997 + 0.5 rounds up to 1.0); the
    fractional part of x is exact (Sterbenz), so comparing it with 0.5 is.
    """
    t = np.trunc(x)
    return t + np.where(np.abs(x - t) >= 0.5, np.sign(x), 0).astype(x.dtype)


def importance_blocks(x: np.ndarray, importance: np.ndarray, block_size: int) -> np.ndarray:
    """The per-column importance laid over x's blocks: (n_blocks, block_size) float32."""
    imp = np.asarray(importance, dtype=np.float32)
    if imp.shape != (x.shape[-1],):
        raise ValueError(f"importance has shape {imp.shape}; expected ({x.shape[-1]},), one weight per column")
    return np.ascontiguousarray(np.broadcast_to(imp, x.shape), dtype=np.float32).reshape(-1, block_size)


def weighted_sq_error(x: np.ndarray, y: np.ndarray, importance: np.ndarray) -> float:
    """sum over rows and columns j of importance[j] * (x - y)^2 (float64): the error an imatrix
    measures, the sum over calibration tokens of (dW x)^2 if input columns were independent."""
    d = (np.asarray(x, np.float64) - np.asarray(y, np.float64)) ** 2
    return float((d.reshape(-1, d.shape[-1]) @ np.asarray(importance, np.float64)).sum())


@dataclass
class Grid:
    """The values one group of blocks can store: x^ = step * k + zero, k an integer in
    [kmin, kmax], per element (step and zero are (rows, n), constant over each (sub-)block);
    `pack(k)` writes codes k (rows, n) as the type's bytes (rows, n / block_size * type_size)
    with these block parameters, so the file dequantizes to `values(k)` (up to float32 rounding
    of the product)."""

    step: np.ndarray
    zero: np.ndarray
    kmin: int
    kmax: int
    pack: Callable[[np.ndarray], np.ndarray]
    _cols: tuple[np.ndarray, np.ndarray] | None = field(default=None, init=False, repr=False)  # step, zero transposed

    def codes(self, x: np.ndarray, cols: slice | int = slice(None)) -> np.ndarray:
        """Nearest codes for x at columns `cols` of the group (a zero step stores `zero` alone: code kmin)."""
        return self._nearest(x, self.step[:, cols], self.zero[:, cols])

    def values(self, k: np.ndarray, cols: slice | int = slice(None)) -> np.ndarray:
        return self.step[:, cols] * k + self.zero[:, cols]

    def round_column(self, w: np.ndarray, col: int) -> tuple[np.ndarray, np.ndarray]:
        """(codes, values) of one column w (rows,) at column `col`: `codes` and `values` for a
        single column, reading contiguous copies of the block parameters (made on first use)."""
        if self._cols is None:
            self._cols = (np.ascontiguousarray(self.step.T), np.ascontiguousarray(self.zero.T))
        step, zero = self._cols[0][col], self._cols[1][col]
        k = self._nearest(w, step, zero)
        return k, step * k + zero

    def _nearest(self, x: np.ndarray, step: np.ndarray, zero: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            k = np.rint((x - zero) / step)
        return np.clip(np.where(step == 0, self.kmin, k), self.kmin, self.kmax)


def per_block(v: np.ndarray, rows: int, n: int) -> np.ndarray:
    """One value per (sub-)block, row-major (rows * n / width values) -> (rows, n), each repeated
    over its block's width."""
    v = np.asarray(v, np.float32).reshape(rows, -1)
    return np.repeat(v, n // v.shape[1], axis=1)
