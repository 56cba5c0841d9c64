"""`gpt2cube serve`: a local web page and an OpenAI-compatible API over a ModelPool.

Built on Starlette (the ASGI toolkit FastAPI is made of) and served by uvicorn: streaming
responses for server-sent events, a client disconnect seen as the stream's cancellation, and a
test client, with two small dependencies. llama-cpp-python's own server extra was not used: it
serves one model at a time (swapping per request) and has no memory budget or side-by-side use.

Endpoints: GET / (the page), GET /v1/models, POST /v1/completions, POST /v1/chat/completions
(both with "stream": true for server-sent events ending in "data: [DONE]"), GET /health.
Generation runs in a worker thread per request; tokens reach the event loop through a queue; when
the client goes away the worker is told to stop at its next token and the model's slot is freed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import uuid
from importlib import resources

from ..errors import InputError
from .conversation import Conversation
from .pool import ModelPool, ServeError
from .sampling import Sampling
from .text import StopMatcher

MAX_BODY = 1 << 20


def _error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
    from starlette.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": kind, "param": param}}, status_code=status)


def _sampling(body: dict, n_ctx: int) -> Sampling:
    fields = {"temperature": float, "top_k": int, "top_p": float, "repeat_penalty": float, "seed": int,
              "max_tokens": int}
    kw = {}
    for name, typ in fields.items():
        if name in body and body[name] is not None:
            v = body[name]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or (typ is int and not isinstance(v, int)):
                raise InputError(f"{name} = {v!r}; expected {'an integer' if typ is int else 'a number'}")
            kw[name] = typ(v)
    s = Sampling(**{"max_tokens": 64, **kw})
    if s.max_tokens >= n_ctx:
        raise InputError(f"max_tokens = {s.max_tokens}; expected fewer than the model's context of {n_ctx}")
    return s


def create_app(pool: ModelPool):
    from starlette.applications import Starlette
    from starlette.requests import ClientDisconnect
    from starlette.responses import HTMLResponse, JSONResponse, StreamingResponse
    from starlette.routing import Route

    page = resources.files("gpt2cube.chat").joinpath("page.html").read_text(encoding="utf-8")

    async def index(request):
        return HTMLResponse(page)

    async def health(request):
        return JSONResponse({"ok": True, "loaded": [n for n, e in pool.entries.items() if e.backend is not None],
                             "loaded_mb_estimate": round(pool.loaded_bytes() / 1e6, 1),
                             "budget_mb": round(pool.budget / 1e6, 1), "loads": pool.loads})

    async def models(request):
        return JSONResponse({"object": "list", "data": [
            {"id": n, "object": "model", "owned_by": "gpt2cube", "gpt2cube": e.public()} for n, e in pool.entries.items()]})

    async def _body(request) -> dict:
        raw = await request.body()
        if len(raw) > MAX_BODY:
            raise InputError(f"request body of {len(raw)} bytes; at most {MAX_BODY}")
        try:
            body = json.loads(raw)
        except ValueError as e:
            raise InputError(f"the body is not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise InputError("the body must be a JSON object")
        return body

    def _prompt_ids(kind: str, body: dict, backend, s: Sampling):
        budget = backend.n_ctx - s.max_tokens
        if kind == "completion":
            prompt = body.get("prompt")
            if not isinstance(prompt, str) or not prompt:
                raise InputError("prompt: expected a non-empty string")
            ids = backend.tokenize(prompt)
            cut = max(0, len(ids) - budget)
            return ids[cut:], {"prompt_truncated_tokens": cut}, ()
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs or not all(
                isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                and isinstance(m.get("content"), str) for m in msgs):
            raise InputError("messages: expected a non-empty list of {role: system|user|assistant, content: string}")
        if msgs[-1]["role"] != "user":
            raise InputError("messages: the last message must be the user's")
        fmt = body.get("format", "transcript")
        system = "\n".join(m["content"] for m in msgs if m["role"] == "system")
        conv = Conversation(fmt=fmt, **({"system": system} if system else {}))
        pending = None
        for m in msgs[:-1]:
            if m["role"] == "user":
                pending = m["content"]
            elif m["role"] == "assistant":
                conv.add(pending or "", m["content"])
                pending = None
        p = conv.prompt(backend.tokenize, msgs[-1]["content"], budget)
        return p.ids, {"dropped_turns": p.dropped_turns, "prompt_truncated_tokens": p.truncated_tokens}, p.stops

    async def generate(request, kind: str):
        try:
            body = await _body(request)
        except ClientDisconnect:
            return _error(400, "the client went away")
        except InputError as e:
            return _error(400, str(e))
        name = body.get("model")
        try:
            entry = pool.get(name)
            s = _sampling(body, entry.info.get("context", 1024))
        except ServeError as e:
            return _error(e.status, str(e), e.kind, "model")
        except InputError as e:
            return _error(400, str(e))
        stream = bool(body.get("stream", False))
        try:
            entry = await pool.acquire(name)
        except ServeError as e:
            return _error(e.status, str(e), e.kind)
        try:
            ids, notes, stops = _prompt_ids(kind, body, entry.backend, s)
        except InputError as e:
            pool.release(entry)
            return _error(400, str(e))
        run = _Run(entry, ids, s, stops, asyncio.get_running_loop(), pool)
        run.start()
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        obj = "chat.completion" if kind == "chat" else "text_completion"

        def choice(text: str, finish):
            if kind == "chat":
                key = "delta" if stream else "message"
                return {"index": 0, key: {"role": "assistant", "content": text}, "finish_reason": finish}
            return {"index": 0, "text": text, "finish_reason": finish}

        def extra():
            return {"usage": {"prompt_tokens": len(ids), "completion_tokens": run.count,
                              "total_tokens": len(ids) + run.count},
                    "gpt2cube": {**notes, "tokens_per_s": round(run.tokens_per_s, 2), "engine": run.engine}}

        if not stream:
            text = "".join([t async for t in run.texts()])
            return JSONResponse({"id": rid, "object": obj, "created": created, "model": name,
                                 "choices": [choice(text, run.finish)], **extra()})

        async def events():
            try:
                head = {"id": rid, "object": f"{obj}.chunk" if kind == "chat" else obj, "created": created, "model": name}
                yield _sse({**head, "choices": [choice("", None)], "gpt2cube": notes})
                async for t in run.texts():
                    yield _sse({**head, "choices": [choice(t, None)]})
                yield _sse({**head, "choices": [choice("", run.finish)], **extra()})
                yield "data: [DONE]\n\n"
            finally:
                run.stop.set()  # a client that went away: the worker stops at its next token

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def completions(request):
        return await generate(request, "completion")

    async def chat_completions(request):
        return await generate(request, "chat")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        pool.close()

    app = Starlette(lifespan=lifespan, routes=[
        Route("/", index), Route("/health", health), Route("/v1/models", models),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    ])
    app.state.pool = pool
    return app


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


class _Run:
    """One generation in a worker thread; texts() yields its pieces on the event loop. The model's
    slot is released when the worker ends, whether it finished, was stopped or failed."""

    def __init__(self, entry, ids, sampling: Sampling, stops, loop, pool) -> None:
        self.entry, self.ids, self.s, self.loop, self.pool = entry, ids, sampling, loop, pool
        self.matcher = StopMatcher(stops)
        self.queue: asyncio.Queue = asyncio.Queue()
        self.stop = threading.Event()
        self.count, self.finish, self.tokens_per_s = 0, "length", 0.0
        self.engine = entry.backend.engine

    def start(self) -> None:
        threading.Thread(target=self._work, daemon=True).start()

    def _put(self, item) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    def _work(self) -> None:
        t0 = time.perf_counter()
        try:
            for tok in self.entry.backend.stream(self.ids, self.s, self.stop):
                self.count += tok.id >= 0
                text, stopped = self.matcher.push(tok.text)
                if text:
                    self._put(text)
                if stopped:
                    self.finish = "stop"
                    break
            else:
                tail = self.matcher.flush()
                if tail:
                    self._put(tail)
                self.finish = "length" if self.count >= self.s.max_tokens else "stop"
        except Exception as e:  # reported in the stream; the server keeps running
            self._put(f"\n[generation failed: {e}]")
            self.finish = "error"
        finally:
            secs = time.perf_counter() - t0
            self.tokens_per_s = self.count / secs if secs > 0 else 0.0
            self.loop.call_soon_threadsafe(self.pool.release, self.entry)
            self._put(None)

    async def texts(self):
        while True:
            item = await self.queue.get()
            if item is None:
                return
            yield item
