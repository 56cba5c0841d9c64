"""ctypes binding of the routed engine (cpp/gpt2cube_engine.h)."""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

from ..errors import Gpt2cubeError, InputError
from .build import EngineUnavailable, library_path

_LIB: ctypes.CDLL | None = None


def _lib() -> ctypes.CDLL:
    global _LIB
    if _LIB is None:
        path = library_path()
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as e:
            raise EngineUnavailable(f"{path}: cannot load the engine library ({e})") from None
        P, I, S = ctypes.c_void_p, ctypes.c_int32, ctypes.c_char_p
        for name, res, args in (
            ("g2c_last_error", S, []), ("g2c_load", P, [S, I, I, S, S, I]), ("g2c_free", None, [P]),
            ("g2c_n_vocab", I, [P]), ("g2c_n_ctx", I, [P]), ("g2c_n_layer", I, [P]), ("g2c_n_past", I, [P]),
            ("g2c_cube_dim", I, [P]), ("g2c_n_graph_builds", I, [P]), ("g2c_n_repacked", I, [P]), ("g2c_backend_name", S, [P]),
            ("g2c_reset", None, [P]),
            ("g2c_eval", I, [P, ctypes.POINTER(I), I, I, I, I, ctypes.POINTER(ctypes.c_float), ctypes.POINTER(I)]),
        ):
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = res, args
        _LIB = lib
    return _LIB


class EngineClosed(Gpt2cubeError):
    """A RoutedModel was used after close()."""


class RoutedModel:
    """A GPT-2 GGUF loaded by the engine. `radius=None` (or >= dim) is dense. `kv_type`: the KV
    cache's type, f16 (llama.cpp's default) or f32 (for exactness checks). `repack`: ggml's
    repacked CPU layouts for the dense-only weights where the CPU has them (llama.cpp's default;
    off, the same kernels as any ggml program)."""

    def __init__(self, path: Path, *, n_ctx: int = 0, n_threads: int = 0, device: str = "cpu",
                 kv_type: str = "f16", repack: bool = True) -> None:
        self._lib = _lib()
        self._h = self._lib.g2c_load(str(path).encode(), n_ctx, n_threads, device.encode(), kv_type.encode(),
                                     int(repack))
        if not self._h:
            raise InputError(self._lib.g2c_last_error().decode(errors="replace"))
        L = self._lib
        self.n_vocab, self.n_ctx, self.n_layer = L.g2c_n_vocab(self._h), L.g2c_n_ctx(self._h), L.g2c_n_layer(self._h)
        self.dim = L.g2c_cube_dim(self._h)
        self.backend = L.g2c_backend_name(self._h).decode()

    def close(self) -> None:
        if getattr(self, "_h", None):
            self._lib.g2c_free(self._h)
            self._h = None

    __del__ = close

    def __enter__(self) -> "RoutedModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _handle(self):
        """The live engine; a closed model is a Python error, never a call into freed memory."""
        if not getattr(self, "_h", None):
            raise EngineClosed("the routed model was closed; load the file again")
        return self._h

    @property
    def n_repacked(self) -> int:
        """Weight tensors held in a repacked CPU layout."""
        return self._lib.g2c_n_repacked(self._handle())

    @property
    def n_graph_builds(self) -> int:
        """Compute graphs built so far; every other call reused the previous one."""
        return self._lib.g2c_n_graph_builds(self._handle())

    @property
    def n_past(self) -> int:
        return self._lib.g2c_n_past(self._handle())

    def reset(self) -> None:
        self._lib.g2c_reset(self._handle())

    def eval(self, tokens, radius: int | None = None, *, experts: bool = False, want_vertices: bool = False,
             all_logits: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """Runs tokens after the cached ones: logits (n, n_vocab), or (1, n_vocab) for the last
        position with all_logits=False, and, on the routed path, vertices (n_layer, n)."""
        h = self._handle()
        toks = np.ascontiguousarray(tokens, dtype=np.int32)
        n = len(toks)
        logits = np.empty((n if all_logits else 1, self.n_vocab), dtype=np.float32)
        verts = np.full((self.n_layer, n), -1, dtype=np.int32) if want_vertices else None
        r = -1 if radius is None else int(radius)
        rc = self._lib.g2c_eval(
            h, toks.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)), n, r, int(experts), int(all_logits),
            logits.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
            verts.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)) if verts is not None else None)
        if rc:
            raise InputError(self._lib.g2c_last_error().decode(errors="replace"))
        return logits, verts
