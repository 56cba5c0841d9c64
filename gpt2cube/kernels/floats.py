"""Plain float encodings: f32, f16, bf16 (one weight per "block")."""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType, LlamaFileType

from .base import QuantType


class F32(QuantType, name="f32"):
    ggml_type = GGMLQuantizationType.F32
    file_type = LlamaFileType.ALL_F32
    block_size = 1
    type_size = 4

    @classmethod
    def quantize(cls, x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x, dtype=np.float32)

    @classmethod
    def dequantize(cls, data: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        return np.frombuffer(data, dtype=np.float32).reshape(shape).copy()


class F16(QuantType, name="f16"):
    ggml_type = GGMLQuantizationType.F16
    file_type = LlamaFileType.MOSTLY_F16
    block_size = 1
    type_size = 2

    @classmethod
    def quantize(cls, x: np.ndarray) -> np.ndarray:
        # numpy converts with round-to-nearest-even, as ggml's GGML_FP32_TO_FP16 does.
        return np.ascontiguousarray(x, dtype=np.float32).astype(np.float16)

    @classmethod
    def dequantize(cls, data: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        return np.frombuffer(data, dtype=np.float16).reshape(shape).astype(np.float32)


class BF16(QuantType, name="bf16"):
    """bfloat16: the top 16 bits of a float32, rounded to nearest even; NaNs stay quiet NaNs."""

    ggml_type = GGMLQuantizationType.BF16
    file_type = LlamaFileType.MOSTLY_BF16
    block_size = 1
    type_size = 2

    @classmethod
    def quantize(cls, x: np.ndarray) -> np.ndarray:
        u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
        is_nan = (u & 0x7FFFFFFF) > 0x7F800000
        # uint32 wrap-around only happens for u > 0xFFFF7FFF, which are NaNs replaced below.
        rounded = (u + (np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1)))) >> 16
        quiet_nan = (u >> 16) | 0x40
        return np.where(is_nan, quiet_nan, rounded).astype(np.uint16)

    @classmethod
    def quantize_ref(cls, x: np.ndarray) -> np.ndarray:
        flat = np.ascontiguousarray(x, dtype=np.float32).ravel()
        out = np.empty(flat.shape, dtype=np.uint16)
        for i, v in enumerate(flat.view(np.uint32).tolist()):
            if (v & 0x7FFFFFFF) > 0x7F800000:
                out[i] = (v >> 16) | 0x40
            else:
                out[i] = ((v + 0x7FFF + ((v >> 16) & 1)) >> 16) & 0xFFFF
        return out.reshape(np.shape(x))

    @classmethod
    def dequantize(cls, data: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        bits = np.frombuffer(data, dtype=np.uint16).astype(np.uint32) << 16
        return bits.view(np.float32).reshape(shape)
