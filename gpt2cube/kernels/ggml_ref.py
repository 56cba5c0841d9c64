"""ggml's own reference quantizers, called through ctypes in the libggml-base shared library
that the llama-cpp-python wheel installs. Used only to measure our quantizers against them
(tests, benchmarks); never in the converter."""

from __future__ import annotations

import ctypes
from functools import lru_cache
from pathlib import Path

import numpy as np


@lru_cache(maxsize=1)
def _lib() -> ctypes.CDLL:
    import llama_cpp

    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    candidates = sorted(lib_dir.glob("libggml-base.*"))
    if not candidates:
        raise FileNotFoundError(f"{lib_dir}: no libggml-base shared library (is llama-cpp-python installed?)")
    lib = ctypes.CDLL(str(candidates[0]))
    f = lib.ggml_quantize_chunk
    f.restype = ctypes.c_size_t
    f.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                  ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    return lib


def ggml_quantize(x: np.ndarray, ggml_type: int, importance: np.ndarray | None = None) -> np.ndarray:
    """2-D float32 (rows, n) -> ggml's bytes (rows, row_size); `importance` (n,) is the imatrix
    entry llama-quantize --imatrix would hand ggml_quantize_chunk for this tensor."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows, n = x.shape
    lib = _lib()
    out = np.zeros((rows, lib.ggml_row_size(int(ggml_type), n)), dtype=np.uint8)
    imp = None if importance is None else np.ascontiguousarray(importance, dtype=np.float32)
    if imp is not None and imp.shape != (n,):
        raise ValueError(f"importance has shape {imp.shape}; expected ({n},)")
    lib.ggml_quantize_chunk(int(ggml_type), x.ctypes.data, out.ctypes.data, 0, rows, n,
                            None if imp is None else imp.ctypes.data)
    return out
