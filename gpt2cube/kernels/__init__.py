"""Quantizers and packers. Importing this package registers every encoding."""

from .base import QUANT_TYPES, QuantType, get_quant_type
from . import floats, q8_0, q4_0, q4_k, ternary  # noqa: F401  (registration side effect)

__all__ = ["QUANT_TYPES", "QuantType", "get_quant_type"]
