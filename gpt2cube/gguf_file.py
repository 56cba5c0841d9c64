"""Reading GGUF files: the one place that opens them (gguf-py's memory-mapped reader), reads
metadata values, and maps a tensor's ggml type to the quantizer that decodes it."""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader

from .errors import GGUFFormatError
from .kernels import QUANT_TYPES, QuantType


def read_gguf(path: Path) -> GGUFReader:
    if not path.is_file():
        raise GGUFFormatError(f"{path}: no such file")
    try:
        return GGUFReader(path)
    except (ValueError, KeyError, IndexError, OSError) as e:
        raise GGUFFormatError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def field_value(reader: GGUFReader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


_BY_GGML = {q.ggml_type: q for q in QUANT_TYPES.values()}


def quant_type_of(tensor, path: Path | None = None) -> QuantType:
    """The registered encoding of a GGUF tensor; an error naming it when gpt2cube has none."""
    qt = _BY_GGML.get(tensor.tensor_type)
    if qt is None:
        raise GGUFFormatError(f"{path or 'GGUF'}: tensor {tensor.name} is {tensor.tensor_type.name}, a type gpt2cube "
                              f"cannot decode; expected one of {', '.join(sorted(QUANT_TYPES))}")
    return qt


def dequantize_tensor(tensor, shape: tuple[int, ...], path: Path | None = None) -> np.ndarray:
    """A GGUF tensor as float32 in numpy shape `shape` (rows, row length)."""
    return quant_type_of(tensor, path).dequantize(np.asarray(tensor.data), shape)


# GGUF value types (gguf-py's GGUFValueType): fixed sizes, 8 = string, 9 = array
_SCALAR = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9


@dataclass
class Header:
    """A GGUF file's scalar metadata (arrays are skipped, not decoded) and tensor table."""

    version: int
    kv: dict[str, Any]
    tensors: list[tuple[str, tuple[int, ...], int]]  # (name, ggml shape ne0 first, ggml type id)

    def tensor_bytes_and_elements(self) -> tuple[int, int]:
        nbytes = nelems = 0
        for _, shape, ttype in self.tensors:
            n = int(np.prod(shape, dtype=np.int64))
            block, size = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
            nbytes += n // block * size
            nelems += n
        return nbytes, nelems


def read_header(path: Path) -> Header:
    """The header alone, parsed directly: gguf-py's reader decodes every metadata array element
    by element (seconds for a 50,257-token vocabulary), which a command that needs one number
    (the context length, the bits per weight) should not pay. Errors as `read_gguf`'s."""
    if not path.is_file():
        raise GGUFFormatError(f"{path}: no such file")
    try:
        with open(path, "rb") as f:
            buf = memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
        return _parse_header(buf)
    except (ValueError, KeyError, IndexError, struct.error, OSError) as e:
        raise GGUFFormatError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def _parse_header(buf: memoryview) -> Header:
    if bytes(buf[:4]) != b"GGUF":
        raise ValueError("no GGUF magic")
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
    pos = 24

    def string(pos: int) -> tuple[str, int]:
        (n,) = struct.unpack_from("<Q", buf, pos)
        end = pos + 8 + n
        if end > len(buf):
            raise ValueError("a string runs past the end of the file")
        return bytes(buf[pos + 8 : end]).decode("utf-8", errors="replace"), end

    def skip_or_read(vtype: int, pos: int) -> tuple[Any, int]:
        if vtype in _SCALAR:
            dt = np.dtype(_SCALAR[vtype])
            return np.frombuffer(buf, dt, 1, pos)[0].item(), pos + dt.itemsize
        if vtype == _STRING:
            return string(pos)
        if vtype == _ARRAY:
            sub, n = struct.unpack_from("<IQ", buf, pos)
            pos += 12
            if sub in _SCALAR:
                end = pos + n * np.dtype(_SCALAR[sub]).itemsize
                if end > len(buf):
                    raise ValueError("an array runs past the end of the file")
                return None, end
            for _ in range(n):
                _, pos = skip_or_read(sub, pos)
            return None, pos
        raise ValueError(f"unknown metadata value type {vtype}")

    kv: dict[str, Any] = {}
    for _ in range(n_kv):
        key, pos = string(pos)
        (vtype,) = struct.unpack_from("<I", buf, pos)
        value, pos = skip_or_read(vtype, pos + 4)
        if value is not None:
            kv[key] = value
    tensors = []
    for _ in range(n_tensors):
        name, pos = string(pos)
        (n_dims,) = struct.unpack_from("<I", buf, pos)
        if n_dims > 4:
            raise ValueError(f"tensor {name} has {n_dims} dimensions")
        dims = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
        (ttype,) = struct.unpack_from("<I", buf, pos + 4 + 8 * n_dims)
        pos += 4 + 8 * n_dims + 4 + 8  # dims, type, offset
        tensors.append((name, tuple(int(d) for d in dims), int(ttype)))
    return Header(int(version), kv, tensors)


def model_context(path: Path) -> int:
    """The context length a GGUF was trained with (`{arch}.context_length`)."""
    kv = read_header(path).kv
    return int(kv.get(f"{kv.get('general.architecture', 'gpt2')}.context_length", 0))


def has_position_table(path: Path) -> bool:
    """Whether the file adds learned/fixed absolute positions (`position_embd.weight`), which
    bound it to `context_length`; RoPE, ALiBi and position-free files run past it."""
    return any(name == "position_embd.weight" for name, _, _ in read_header(path).tensors)
