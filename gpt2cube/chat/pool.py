"""The models a server offers: described from their headers at start, loaded when first asked
for, unloaded least-recently-used to stay under a memory budget, one request at a time per model
with a bounded queue (more get 429). A model that must wait for room waits for the models in use
to finish their current request (then they unload: turns alternate) up to load_wait_s, else
503. A file that fails to load is marked unavailable with the reason; the others
keep serving.

Memory per loaded model is estimated as the file (llama.cpp maps it and reads all of it) plus the
f16 KV cache (2 x layers x context x embedding x 2 bytes) plus OVERHEAD_BYTES for compute buffers
and the runtime; benchmarks/serve_load.py measures the process against it.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError

OVERHEAD_BYTES = 48 << 20


class ServeError(Exception):
    """An HTTP error with its status: 404 unknown model, 429 queue full, 503 unavailable / no memory."""

    def __init__(self, status: int, message: str, kind: str = "server_error") -> None:
        super().__init__(message)
        self.status, self.kind = status, kind


@dataclass
class Entry:
    name: str
    path: Path
    info: dict
    est_bytes: int
    reason: str | None = None  # unavailable when set
    backend: object | None = None
    last_used: float = 0.0
    waiting: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def public(self) -> dict:
        return {**self.info, "loaded": self.backend is not None, "available": self.reason is None,
                **({"unavailable_reason": self.reason} if self.reason else {})}


def describe(path: Path, n_ctx: int | None) -> tuple[dict, int]:
    """What the page shows for a file, and its memory estimate; InputError if it is not a GGUF."""
    from ..gguf_file import read_header
    from ..inspect_gguf import inspect_gguf

    read_header(path)  # a clear error for a file that is not GGUF at all
    d = inspect_gguf(path)
    hp = d["hparams"]
    linear = [t for t in d["tensors"] if t["name"].endswith(("attn_qkv.weight", "ffn_up.weight", "ffn_down.weight"))]
    types = sorted({t["type"] for t in linear}) or sorted({t["type"] for t in d["tensors"]})
    ctx = min(n_ctx or hp.get("context_length", 1024), hp.get("context_length", 1024))
    kv = 2 * int(hp.get("block_count", 0)) * ctx * int(hp.get("embedding_length", 0)) * 2
    info = {"file": path.name, "architecture": d["architecture"], "type": "+".join(types),
            "size_mb": round(d["file_bytes"] / 1e6, 2), "bits_per_weight": d["bits_per_weight"],
            "parameters": d["parameters"], "context": ctx,
            "hypercube_dim": d.get("hypercube", {}).get("dim")}
    return info, d["file_bytes"] + kv + OVERHEAD_BYTES


class ModelPool:
    def __init__(self, paths: list[Path], *, budget_bytes: int, queue_limit: int = 8, n_ctx: int | None = None,
                 n_threads: int | None = None, loader=None, load_wait_s: float = 30.0) -> None:
        from .backends import open_backend

        self.budget, self.queue_limit, self.n_ctx, self.n_threads = budget_bytes, queue_limit, n_ctx, n_threads
        self._open = loader or (lambda e: open_backend(e.path, n_ctx=n_ctx, n_threads=n_threads))
        self._loading = asyncio.Lock()
        self._freed = asyncio.Event()
        self._memory_waiters = 0
        self.load_wait_s = load_wait_s
        self.loads = 0
        self.entries: dict[str, Entry] = {}
        for p in paths:
            name = p.stem
            k = 2
            while name in self.entries:
                name, k = f"{p.stem}-{k}", k + 1
            try:
                info, est = describe(p, n_ctx)
                reason = None if est <= budget_bytes else (
                    f"needs about {est / 1e6:.0f} MB, more than the whole --memory-budget {budget_bytes / 1e6:.0f} MB")
            except (InputError, OSError, ValueError, KeyError) as e:
                info, est, reason = {"file": p.name}, 0, f"cannot read {p}: {str(e).splitlines()[0]}"
            self.entries[name] = Entry(name, p, info, est, reason)
        if not self.entries:
            raise InputError("no models to serve")

    def get(self, name) -> Entry:
        if not isinstance(name, str) or name not in self.entries:
            raise ServeError(404, f"model {name!r} is not served here; models: {', '.join(self.entries)}",
                             "invalid_request_error")
        e = self.entries[name]
        if e.reason:
            raise ServeError(503, f"model {name!r} is unavailable: {e.reason}")
        return e

    def loaded_bytes(self) -> int:
        return sum(e.est_bytes for e in self.entries.values() if e.backend is not None)

    async def acquire(self, name) -> Entry:
        """The model, loaded, held for this request (release() when done). Waits its turn."""
        e = self.get(name)
        if e.waiting >= self.queue_limit:
            raise ServeError(429, f"model {name!r} has {e.waiting} requests waiting (limit {self.queue_limit}); "
                                  "retry later", "rate_limit_error")
        e.waiting += 1
        try:
            await e.lock.acquire()
        finally:
            e.waiting -= 1
        try:
            if e.reason:
                raise ServeError(503, f"model {name!r} is unavailable: {e.reason}")
            if e.backend is None:
                async with self._loading:  # one load at a time, so the budget check holds
                    if e.backend is None:
                        await self._load(e)
            e.last_used = time.monotonic()
            return e
        except BaseException:
            e.lock.release()
            raise

    def release(self, e: Entry) -> None:
        e.last_used = time.monotonic()
        if self._memory_waiters and e.backend is not None:
            self._unload(e)  # a load is waiting for room: this model is idle now, make room (fair turns)
        e.lock.release()
        self._freed.set()

    async def _load(self, e: Entry) -> None:
        # eviction runs on the event loop: a model whose lock is free cannot be picked up meanwhile;
        # models in use are waited for (each unloads when its current request ends) up to load_wait_s
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.load_wait_s
        while True:
            for other in sorted(self.entries.values(), key=lambda x: x.last_used):
                if self.loaded_bytes() + e.est_bytes <= self.budget:
                    break
                if other.backend is not None and other is not e and not other.lock.locked():
                    self._unload(other)
            if self.loaded_bytes() + e.est_bytes <= self.budget:
                break
            left = deadline - loop.time()
            if left <= 0:
                busy = [o.name for o in self.entries.values() if o.backend is not None]
                raise ServeError(503, f"model {e.name!r} (about {e.est_bytes / 1e6:.0f} MB) does not fit in the "
                                      f"{self.budget / 1e6:.0f} MB budget beside {', '.join(busy)}, still in use "
                                      f"after {self.load_wait_s:.0f} s; retry later")
            self._freed.clear()
            self._memory_waiters += 1
            try:
                await asyncio.wait_for(self._freed.wait(), left)
            except TimeoutError:
                pass
            finally:
                self._memory_waiters -= 1
        try:
            e.backend = await asyncio.to_thread(self._open, e)
        except Exception as exc:  # the file is broken: say why, keep serving the others
            e.reason = f"failed to load: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
            raise ServeError(503, f"model {e.name!r} is unavailable: {e.reason}") from None
        self.loads += 1

    def _unload(self, e: Entry) -> None:
        backend, e.backend = e.backend, None
        backend.close()

    def close(self) -> None:
        for e in self.entries.values():
            if e.backend is not None:
                self._unload(e)
