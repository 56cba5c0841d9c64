"""HF checkpoint -> GGUF: loading, tensor map, metadata, tokenizer, writing."""

from .convert import ConvertResult, convert

__all__ = ["ConvertResult", "convert"]
