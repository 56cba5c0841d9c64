"""gpt2cube: GPT-2-family checkpoints to GGUF files that stock llama.cpp runs."""

__version__ = "0.1.0"
