"""Token streams from a GGUF file: stock llama.cpp (llama-cpp-python, its own sampler) or the
routed engine (hypercube files; the Python sampler of sampling.py, each token's vertices kept).

`stream(ids, sampling, stop)` yields Token(id, text, vertices) until <|endoftext|>, max_tokens or
`stop` (a threading.Event another thread may set: a disconnected client, Ctrl-C).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from ..constants import GPT2_EOT_ID
from ..errors import InputError
from ..gguf_file import model_context
from .sampling import Sampling, sample_token
from .text import Utf8Stream


@dataclass
class Token:
    id: int
    text: str
    vertices: list[int] | None = None  # routed engine: this token's vertex in each layer


class LlamaBackend:
    engine = "llama.cpp"

    def __init__(self, path: Path, *, n_ctx: int | None = None, n_threads: int | None = None) -> None:
        from ..eval.llama_runner import load_llama

        trained = model_context(path)
        self.n_ctx = min(n_ctx or trained, trained) if trained else (n_ctx or 1024)
        self._llm = load_llama(path, n_ctx=self.n_ctx, n_threads=n_threads)

    def tokenize(self, text: str) -> list[int]:
        return list(self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)) if text else []

    def stream(self, ids: list[int], s: Sampling, stop: threading.Event) -> Iterator[Token]:
        self._llm.set_seed(s.seed)
        utf8 = Utf8Stream()
        gen = self._llm.generate(ids, top_k=s.top_k, top_p=s.top_p, min_p=0.0, temp=s.temperature,
                                 repeat_penalty=s.repeat_penalty, reset=True)
        try:
            for n, tok in enumerate(gen):
                if tok == GPT2_EOT_ID or stop.is_set() or len(ids) + n >= self.n_ctx:
                    break
                yield Token(int(tok), utf8.push(self._llm.detokenize([tok])))
                if n + 1 >= s.max_tokens:
                    break
        finally:
            gen.close()
        tail = utf8.flush()
        if tail:
            yield Token(-1, tail)

    def close(self) -> None:
        self._llm.close()


class RoutedBackend:
    engine = "routed"

    def __init__(self, path: Path, *, radius: int | None = None, n_ctx: int | None = None,
                 n_threads: int | None = None, device: str = "cpu") -> None:
        from ..engine.binding import RoutedModel
        from ..tokenizers import GGUFTokenizer

        if radius is not None and radius < 0:
            raise InputError(f"--radius {radius}; expected 0..d (the cube dimension)")
        trained = model_context(path)
        self.n_ctx = min(n_ctx or trained, trained)
        self._tok = GGUFTokenizer(path)
        try:
            self._eng = RoutedModel(path, n_ctx=self.n_ctx, n_threads=n_threads or 0, device=device)
        except Exception:
            self._tok.close()
            raise
        self.radius = radius
        self.routed = self._eng.dim > 0 and radius is not None and radius < self._eng.dim

    def tokenize(self, text: str) -> list[int]:
        return self._tok.encode(text) if text else []

    def stream(self, ids: list[int], s: Sampling, stop: threading.Event) -> Iterator[Token]:
        rng = np.random.default_rng(s.seed)
        self._eng.reset()
        logits, _ = self._eng.eval(ids, self.radius, want_vertices=self.routed, all_logits=False)
        history, utf8 = list(ids), Utf8Stream()
        for _ in range(s.max_tokens):
            if stop.is_set() or len(history) >= self.n_ctx:
                break
            nxt = sample_token(logits[-1], s, history, rng)
            if nxt == GPT2_EOT_ID:
                break
            history.append(nxt)
            logits, verts = self._eng.eval([nxt], self.radius, want_vertices=self.routed, all_logits=False)
            yield Token(nxt, utf8.push(self._tok.decode_bytes([nxt])),
                        verts[:, 0].tolist() if verts is not None else None)
        tail = utf8.flush()
        if tail:
            yield Token(-1, tail)

    def close(self) -> None:
        self._eng.close()
        self._tok.close()


def open_backend(path: Path, engine: str = "llama.cpp", **kw):
    if not Path(path).is_file():
        raise InputError(f"{path}: no such model file; expected a GGUF file")
    if engine == "routed":
        return RoutedBackend(path, **kw)
    if kw.get("radius") is not None:
        raise InputError("--radius needs --engine routed (stock llama.cpp always runs the dense FFN)")
    kw.pop("radius", None)
    kw.pop("device", None)
    return LlamaBackend(path, **kw)
