"""Evaluation through llama-cpp-python (the real runtime) and transformers (the reference)."""
