"""Reading GGUF files: the one place that opens them (gguf-py's memory-mapped reader), reads
metadata values, and maps a tensor's ggml type to the quantizer that decodes it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader

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


def model_context(path: Path) -> int:
    """The context length a GGUF was trained with (`{arch}.context_length`)."""
    reader = read_gguf(path)
    arch = field_value(reader, "general.architecture", "gpt2")
    return int(field_value(reader, f"{arch}.context_length", 0))
