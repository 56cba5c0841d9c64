"""Structured pruning of GPT-2 checkpoints (FFN neurons), with importance measured on text."""

from .ffn import PruneConfig, prune

__all__ = ["PruneConfig", "prune"]
