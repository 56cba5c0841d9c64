"""Corpora as GPT-2 token streams, cached as uint16 arrays.

A corpus is a list of text files (a directory stands for its *.txt files, sorted). Each file is
tokenized with GPT-2's BPE and followed by <|endoftext|>; the cache key is the file's sha256,
so a second run (or another command on the same files) starts at once.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..tokenizers import hf_tokenizer, tokenize_file


def corpus_files(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            found = sorted(p.glob("*.txt"))
            if not found:
                raise InputError(f"{p}: directory holds no .txt files; expected a corpus of text files")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise InputError(f"{p}: no such file or directory; expected a text file or a directory of .txt files")
    if not files:
        raise InputError("no corpus given; pass --corpus FILE_OR_DIR")
    return files


def load_tokens(paths: list[Path]) -> np.ndarray:
    shared = lru_cache(maxsize=1)(hf_tokenizer)  # built once, and only if some file is not cached
    return np.concatenate([tokenize_file(f, shared) for f in corpus_files(paths)])


def split_holdout(files: list[Path], holdout: list[Path]) -> tuple[list[Path], list[Path]]:
    """(train files, held-out files); every held-out name must be among the corpus files."""
    names = {h.name for h in holdout}
    missing = names - {f.name for f in files}
    if missing:
        raise InputError(f"held-out file(s) {', '.join(sorted(missing))} are not in the corpus")
    return [f for f in files if f.name not in names], [f for f in files if f.name in names]
