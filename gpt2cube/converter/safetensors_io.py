"""A minimal safetensors reader that maps one tensor at a time.

Why not `safetensors.safe_open`: we want (a) float32 out of BF16 without importing torch,
(b) precise errors for truncated or corrupt files naming the tensor and byte offsets, and
(c) each tensor mapped only while it is converted, so peak RSS stays near the largest tensor
rather than the whole checkpoint.

Format: u64 little-endian header length N, N bytes of JSON {name: {dtype, shape,
data_offsets: [begin, end]}, "__metadata__": {...}}, then the data block; offsets are relative
to the start of the data block.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import CorruptCheckpoint

_MAX_HEADER = 100 * 1024 * 1024

# safetensors dtype -> (numpy storage dtype, bytes per element)
_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),  # widened to float32 by shifting into the top half
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}


@dataclass(frozen=True)
class _Entry:
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


class SafetensorsFile:
    """Validated index of one .safetensors file; `load(name)` returns a float32 copy."""

    def __init__(self, path: Path) -> None:
        self.path = path
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CorruptCheckpoint(
                    f"{path}: {size} bytes is too short for a safetensors file "
                    "(expected an 8-byte header length first); the file is truncated or not safetensors"
                )
            n = int.from_bytes(head, "little")
            if n > min(size - 8, _MAX_HEADER):
                raise CorruptCheckpoint(
                    f"{path}: header length {n} exceeds the file ({size} bytes); "
                    "the file is truncated or not safetensors"
                )
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise CorruptCheckpoint(f"{path}: the safetensors header is not valid JSON ({e})") from None
        if not isinstance(header, dict):
            raise CorruptCheckpoint(f"{path}: the safetensors header is not a JSON object")
        self.data_start = 8 + n
        data_size = size - self.data_start
        self._entries: dict[str, _Entry] = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            self._entries[name] = self._validate(name, info, data_size)
        self._check_disjoint()

    def _check_disjoint(self) -> None:
        """Two tensors sharing bytes would silently alias each other's weights."""
        spans = sorted((e.begin, e.end, n) for n, e in self._entries.items() if e.end > e.begin)
        for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
            if b1 < e0:
                raise CorruptCheckpoint(f"{self.path}: tensors {n0!r} [{b0}, {e0}) and {n1!r} [{b1}, {e1}) overlap; "
                                        "expected each tensor in its own byte range (the file is corrupt)")

    def _validate(self, name: str, info: object, data_size: int) -> _Entry:
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]  # type: ignore[index]
        except (TypeError, KeyError, ValueError):
            raise CorruptCheckpoint(f"{self.path}: malformed header entry for tensor {name!r}: {info!r}") from None
        if any(d < 0 for d in shape) or not isinstance(begin, int) or not isinstance(end, int):
            raise CorruptCheckpoint(f"{self.path}: tensor {name!r} has shape {list(shape)} and data_offsets "
                                    f"[{begin!r}, {end!r}]; expected non-negative integers")
        if dtype not in _DTYPES:
            raise CorruptCheckpoint(
                f"{self.path}: tensor {name!r} has dtype {dtype!r}; expected one of {', '.join(_DTYPES)}"
            )
        want = int(np.prod(shape, dtype=np.int64)) * _DTYPES[dtype].itemsize
        if begin < 0 or end < begin:
            raise CorruptCheckpoint(f"{self.path}: tensor {name!r} has data_offsets [{begin}, {end}]; expected "
                                    "0 <= begin <= end")
        if end - begin != want:
            raise CorruptCheckpoint(
                f"{self.path}: tensor {name!r} spans bytes [{begin}, {end}) but shape {list(shape)} "
                f"of {dtype} needs {want} bytes"
            )
        if end > data_size:
            raise CorruptCheckpoint(
                f"{self.path}: tensor {name!r} needs data up to byte {self.data_start + end} but the file "
                f"has {self.data_start + data_size} bytes; the file is truncated (re-download or re-save it)"
            )
        return _Entry(dtype, shape, begin, end)

    def names(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name].shape

    def load(self, name: str) -> np.ndarray:
        e = self._entries[name]
        storage = _DTYPES[e.dtype]
        count = (e.end - e.begin) // storage.itemsize
        if count == 0:
            return np.zeros(e.shape, dtype=np.float32)
        mapped = np.memmap(self.path, dtype=storage, mode="r", offset=self.data_start + e.begin, shape=(count,))
        try:
            if e.dtype == "BF16":
                out = (mapped.astype(np.uint32) << 16).view(np.float32)
            else:
                out = mapped.astype(np.float32)
        finally:
            del mapped  # unmap now: pages of a finished tensor must not count against RSS
        return out.reshape(e.shape)
