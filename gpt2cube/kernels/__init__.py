"""Quantizers and packers. Importing this package registers every encoding."""

from . import floats, q4_0, q4_k, q6_k, q8_0, ternary  # noqa: F401  (registration side effect)
from .base import QUANT_TYPES, QuantType, get_quant_type

__all__ = ["QUANT_TYPES", "QuantType", "get_quant_type"]
