"""Chat and serve: prompts within the context, streamed text, the sampler, both backends against
llama.cpp's own greedy decoding, the terminal loop, and the web server (API, errors, memory
budget, queue, disconnects) run in-process and as a real uvicorn server on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from gpt2cube.chat.backends import LlamaBackend, open_backend
from gpt2cube.chat.conversation import Conversation
from gpt2cube.chat.pool import ModelPool
from gpt2cube.chat.sampling import Sampling, sample_token
from gpt2cube.chat.text import StopMatcher, Utf8Stream
from gpt2cube.cli import main
from gpt2cube.constants import GPT2_EOT_ID
from gpt2cube.converter import convert
from gpt2cube.errors import InputError
from gpt2cube.eval.llama_runner import llama_greedy
from gpt2cube.tokenizers import hf_tokenizer

from conftest import rewrite_gguf

GREEDY = Sampling(temperature=0.0, repeat_penalty=1.0, max_tokens=16)


@pytest.fixture(scope="module")
def files(checkpoints, tmp_path_factory):
    """Two small models of one checkpoint (f16, q8_0), a file that is not GGUF, a truncated one and
    one llama.cpp refuses to load."""
    src, _ = checkpoints["small"]
    d = tmp_path_factory.mktemp("chat")
    out = {}
    for t in ("f16", "q8_0"):
        out[t] = d / f"small-{t}.gguf"
        convert(src, out[t], t, progress=False)
    out["junk"] = d / "junk.gguf"
    out["junk"].write_bytes(b"not a model at all")
    out["truncated"] = d / "truncated.gguf"
    data = out["f16"].read_bytes()
    out["truncated"].write_bytes(data[: len(data) // 2])
    out["headless"] = d / "headless.gguf"  # reads as GGUF, but llama.cpp cannot load it (no head count)
    rewrite_gguf(out["f16"], out["headless"], {"gpt2.attention.head_count": None})
    return out


def _tok():
    t = hf_tokenizer()
    return lambda text: t.encode(text)


# --- conversation, text stream, sampler ------------------------------------------------------

def test_history_is_trimmed_oldest_first_and_said_so():
    tok = _tok()
    conv = Conversation()
    for i in range(6):
        conv.add(f"question number {i} about the sea", f"answer number {i} about ships")
    full = conv.prompt(tok, "and the last one?", 1000)
    assert full.dropped_turns == 0 and full.truncated_tokens == 0
    text = hf_tokenizer().decode(full.ids)
    assert text.startswith(conv.system) and text.endswith("User: and the last one?\nAssistant:")
    short = conv.prompt(tok, "and the last one?", len(full.ids) - 20)
    assert short.dropped_turns >= 1 and len(short.ids) <= len(full.ids) - 20
    kept = hf_tokenizer().decode(short.ids)
    assert "question number 5" in kept and "question number 0" not in kept  # the newest turns stay


def test_a_message_longer_than_the_context_keeps_its_end():
    tok = _tok()
    long = " ".join(f"word{i}" for i in range(400)) + " what now?"
    p = Conversation().prompt(tok, long, 64)
    assert len(p.ids) <= 64 and p.truncated_tokens > 0
    assert hf_tokenizer().decode(p.ids).endswith("what now?\nAssistant:")


def test_dialogpt_turns_end_with_endoftext():
    conv = Conversation(fmt="dialogpt")
    conv.add("hi", "hello")
    p = conv.prompt(_tok(), "how are you", 100)
    assert p.ids.count(GPT2_EOT_ID) == 3 and p.ids[-1] == GPT2_EOT_ID and p.stops == ()
    with pytest.raises(InputError, match="chat format"):
        Conversation(fmt="chatml")


def test_utf8_split_across_tokens_and_stop_strings():
    s = Utf8Stream()
    euro = "€".encode()
    assert s.push(b"a" + euro[:1]) == "a" and s.push(euro[1:2]) == "" and s.push(euro[2:] + b"b") == "€b"
    assert s.push(b"\xff") == "\ufffd"  # an invalid byte is replaced, never held for ever
    m = StopMatcher(("\nUser:",))
    assert m.push("Hello\nUs") == ("Hello", False)  # "\nUs" could start the stop string: held
    assert m.push("ually") == ("\nUsually", False)  # it did not: released
    assert m.push(" fine.\nUser: next") == (" fine.", True)


def test_sampler():
    rng = np.random.default_rng(0)
    logits = np.array([1.0, 3.0, 2.0, 0.5])
    assert sample_token(logits, Sampling(temperature=0), [], rng) == 1
    assert sample_token(logits, Sampling(temperature=1.0, top_k=1), [], rng) == 1
    assert sample_token(logits, Sampling(temperature=1.0, top_p=1e-6), [], rng) == 1
    # repetition penalty: token 1 was just said, 3.0 / 2.0 = 1.5 < 2.0
    assert sample_token(logits, Sampling(temperature=0, repeat_penalty=2.0), [1], rng) == 2
    s = Sampling(temperature=1.0, top_k=0, top_p=1.0, repeat_penalty=1.0)
    draws = np.bincount([sample_token(logits, s, [], rng) for _ in range(20000)], minlength=4) / 20000
    want = np.exp(logits) / np.exp(logits).sum()
    assert np.abs(draws - want).max() < 0.015  # 20000 draws: 3 sigma is about 0.01
    for bad in ({"temperature": -1}, {"top_p": 0}, {"top_k": -2}, {"repeat_penalty": 3}, {"max_tokens": 0}):
        with pytest.raises(InputError):
            Sampling(**bad)


# --- backends ------------------------------------------------------------------------------

def test_llama_backend_greedy_equals_llama_cpp_argmax(files, prompt_tokens):
    b = LlamaBackend(files["f16"])
    try:
        got = [t.id for t in b.stream(prompt_tokens[:12], GREEDY, threading.Event()) if t.id >= 0]
    finally:
        b.close()
    ref = llama_greedy(files["f16"], prompt_tokens[:12], 16, kv_f32=False)
    assert got == ref[: len(got)] and len(got) >= 1  # stops early only at <|endoftext|>
    assert len(got) == 16 or ref[len(got)] == GPT2_EOT_ID


def test_routed_backend_dense_equals_llama_cpp_and_reports_vertices(checkpoints, calib_file, prompt_tokens, tmp_path):
    pytest.importorskip("gpt2cube.engine.binding")
    from gpt2cube.hypercube.build import HypercubeOptions

    try:
        from gpt2cube.engine.build import library_path

        library_path(log=lambda m: None)
    except Exception as e:  # noqa: BLE001 - the engine is optional at run time
        pytest.skip(f"routed engine not built: {e}")
    src, _ = checkpoints["small"]
    cube = tmp_path / "cube.gguf"
    convert(src, cube, "f16", progress=False, log=lambda m: None, hypercube=HypercubeOptions(2, calib_file, 2048))
    ids = prompt_tokens[:12]
    with_dense = open_backend(cube, "routed", radius=None)
    try:
        dense = [t.id for t in with_dense.stream(ids, GREEDY, threading.Event()) if t.id >= 0]
    finally:
        with_dense.close()
    assert dense == llama_greedy(cube, ids, 16, kv_f32=False)[: len(dense)]
    routed = open_backend(cube, "routed", radius=0)
    try:
        toks = [t for t in routed.stream(ids, GREEDY, threading.Event()) if t.id >= 0]
    finally:
        routed.close()
    assert toks and all(len(t.vertices) == 2 and all(0 <= v < 4 for v in t.vertices) for t in toks)
    with pytest.raises(InputError, match="--engine routed"):
        open_backend(cube, "llama.cpp", radius=1)


# --- terminal chat -------------------------------------------------------------------------

def test_chat_command_streams_and_keeps_history_in_the_context(files):
    msgs = "\n".join(["Hello there, how are you today my friend?"] * 4 + ["/stats", "/reset", "/stats", "/bogus", "/quit"])
    r = CliRunner().invoke(main, ["chat", str(files["q8_0"]), "--ctx", "96", "--max-tokens", "24", "--seed", "3"],
                           input=msgs + "\n")
    assert r.exit_code == 0, r.output
    assert r.output.count("assistant:") == 4
    assert "oldest turn(s) left out to fit the 96-token context" in r.output
    assert "tokens/s; context" in r.output and "[history cleared]" in r.output and "unknown command /bogus" in r.output
    bad = CliRunner().invoke(main, ["chat", str(files["junk"])], input="hi\n")
    assert bad.exit_code == 2 and "junk.gguf" in bad.output
    bad = CliRunner().invoke(main, ["chat", str(files["q8_0"]), "--top-p", "0"], input="hi\n")
    assert bad.exit_code == 2 and "top_p" in bad.output


# --- the server, in-process ----------------------------------------------------------------

def _client(paths, budget_mb=400.0, **kw):
    from starlette.testclient import TestClient

    from gpt2cube.chat.server import create_app

    pool = ModelPool(paths, budget_bytes=int(budget_mb * 1e6), n_ctx=128, **kw)
    return TestClient(create_app(pool)), pool


def _events(lines) -> list:
    out = []
    for line in lines:
        if line.startswith("data: ") and line != "data: [DONE]":
            out.append(json.loads(line[6:]))
    return out


def test_api_completions_chat_and_models(files, prompt_tokens):
    client, pool = _client([files["f16"], files["q8_0"]])
    with client as c:
        models = c.get("/v1/models").json()["data"]
        assert [m["id"] for m in models] == ["small-f16", "small-q8_0"]
        info = models[1]["gpt2cube"]
        assert info["type"] == "Q8_0" and info["architecture"] == "gpt2" and 8 < info["bits_per_weight"] < 9
        prompt = hf_tokenizer().decode(prompt_tokens[:12])
        r = c.post("/v1/completions", json={"model": "small-f16", "prompt": prompt, "max_tokens": 8,
                                             "temperature": 0, "repeat_penalty": 1.0}).json()
        ref = llama_greedy(files["f16"], hf_tokenizer().encode(prompt), 8, kv_f32=False)
        assert r["choices"][0]["text"] == hf_tokenizer().decode(ref[: r["usage"]["completion_tokens"]])
        assert r["usage"]["prompt_tokens"] == 12 and r["gpt2cube"]["engine"] == "llama.cpp"
        with c.stream("POST", "/v1/chat/completions", json={
                "model": "small-q8_0", "stream": True, "max_tokens": 12,
                "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                             {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Why?"}]}) as s:
            assert s.status_code == 200 and s.headers["content-type"].startswith("text/event-stream")
            lines = [line for line in s.iter_lines() if line]
        ev = _events(lines)
        assert lines[-1] == "data: [DONE]" and ev[0]["object"] == "chat.completion.chunk"
        assert ev[-1]["choices"][0]["finish_reason"] in ("stop", "length") and ev[-1]["usage"]["completion_tokens"] >= 1
        assert "".join(e["choices"][0]["delta"]["content"] for e in ev)
        html = c.get("/").text
        assert "gpt2cube chat" in html and "/v1/chat/completions" in html


def test_api_bad_input(files):
    client, pool = _client([files["f16"], files["junk"], files["truncated"], files["headless"]])
    with client as c:
        def err(body=None, content=None, path="/v1/completions"):
            r = c.post(path, json=body) if content is None else c.post(path, content=content)
            return r.status_code, r.json()["error"]["message"]

        assert err({"model": "nope", "prompt": "x"})[0] == 404
        assert err(content=b"{not json")[0] == 400
        assert err(content=b"[1, 2]") == (400, "the body must be a JSON object")
        for field, value in (("temperature", 9), ("top_p", 0), ("max_tokens", 0), ("max_tokens", 5000),
                             ("seed", "x"), ("top_k", 1.5)):
            code, msg = err({"model": "small-f16", "prompt": "x", field: value})
            assert code == 400 and field in msg
        assert err({"model": "small-f16", "prompt": ""})[0] == 400
        assert err({"model": "small-f16", "messages": [{"role": "user"}]}, path="/v1/chat/completions")[0] == 400
        assert err({"model": "small-f16", "messages": [{"role": "user", "content": "a"},
                                                       {"role": "assistant", "content": "b"}]},
                   path="/v1/chat/completions")[0] == 400
        code, msg = err({"model": "junk", "prompt": "x"})
        assert code == 503 and "junk.gguf" in msg
        code, msg = err({"model": "truncated", "prompt": "x"})
        assert code == 503 and "truncated.gguf" in msg
        code, msg = err({"model": "headless", "prompt": "x"})  # it reads; llama.cpp's load fails
        assert code == 503 and "failed to load" in msg
        listed = {m["id"]: m["gpt2cube"] for m in c.get("/v1/models").json()["data"]}
        assert not listed["headless"]["available"] and "failed to load" in listed["headless"]["unavailable_reason"]
        # the others keep serving; a prompt longer than the context is cut and the reply says so
        r = c.post("/v1/completions", json={"model": "small-f16", "prompt": "word " * 400, "max_tokens": 8}).json()
        n = len(hf_tokenizer().encode("word " * 400))
        assert r["gpt2cube"]["prompt_truncated_tokens"] == n - (128 - 8) and r["usage"]["prompt_tokens"] == 120


def test_memory_budget_unloads_least_recently_used(files):
    client, pool = _client([files["f16"], files["q8_0"]], budget_mb=1.0)
    assert all(e.reason and "memory-budget" in e.reason for e in pool.entries.values())  # neither fits at all
    one = max(e.est_bytes for e in pool.entries.values())
    client, pool = _client([files["f16"], files["q8_0"]], budget_mb=one * 1.5 / 1e6)
    with client as c:
        for name in ("small-f16", "small-q8_0", "small-f16"):
            assert c.post("/v1/completions", json={"model": name, "prompt": "Hi", "max_tokens": 2}).status_code == 200
            h = c.get("/health").json()
            assert h["loaded"] == [name] and h["loaded_mb_estimate"] <= h["budget_mb"]
        assert h["loads"] == 3


# --- a real server on loopback: disconnects and the queue ------------------------------------

@contextlib.contextmanager
def _serving(pool):
    import uvicorn

    from gpt2cube.chat.server import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(pool), host="127.0.0.1", port=port, log_level="error"))
    loop = asyncio.new_event_loop()  # kept, so a test can act on the pool from the server's own loop
    t = threading.Thread(target=loop.run_until_complete, args=(server.serve(),), daemon=True)
    t.start()
    deadline = time.time() + 20
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", loop
    finally:
        server.should_exit = True
        t.join(10)


@pytest.fixture
def live_server(files):
    pool = ModelPool([files["q8_0"]], budget_bytes=int(400e6), n_ctx=128, queue_limit=1)
    with _serving(pool) as (url, loop):
        yield url, pool, loop


def test_disconnect_frees_the_slot_and_the_queue_is_bounded(live_server):
    import httpx

    url, pool, loop = live_server
    name = "small-q8_0"
    body = {"model": name, "prompt": "Once upon a time", "max_tokens": 100, "stream": True,
            "repeat_penalty": 1.0}
    with httpx.Client(timeout=30) as c:
        with c.stream("POST", f"{url}/v1/completions", json=body) as r:
            assert r.status_code == 200
            next(r.iter_lines())  # the first event, then hang up mid-stream
        t0 = time.time()
        r = c.post(f"{url}/v1/completions", json={**body, "stream": False, "max_tokens": 4})
        assert r.status_code == 200 and time.time() - t0 < 20  # the slot came back

    # The queue: this test holds the model's slot itself (on the server's loop, as a request
    # would), so what the next four requests meet does not depend on how fast the model runs.
    held = asyncio.run_coroutine_threadsafe(pool.acquire(name), loop).result(20)
    results = []

    def stream_one():
        with httpx.Client(timeout=60) as cc:
            with cc.stream("POST", f"{url}/v1/completions", json={**body, "max_tokens": 8}) as rr:
                results.append(rr.status_code)
                for _ in rr.iter_lines():
                    pass

    threads = [threading.Thread(target=stream_one) for _ in range(4)]
    for th in threads:
        th.start()
    deadline = time.time() + 30
    while (len(results) < 3 or pool.entries[name].waiting < 1) and time.time() < deadline:
        time.sleep(0.02)
    # one waits for the slot (queue limit 1), the other three are told to retry at once
    assert sorted(results) == [429, 429, 429] and pool.entries[name].waiting == 1, (results, pool.entries[name].waiting)
    loop.call_soon_threadsafe(pool.release, held)
    for th in threads:
        th.join(60)
    assert sorted(results) == [200, 429, 429, 429]
    assert not pool.entries["small-q8_0"].lock.locked()


def test_serve_refuses_a_public_address_unless_asked(files):
    r = CliRunner().invoke(main, ["serve", str(files["q8_0"]), "--host", "0.0.0.0"])
    assert r.exit_code == 2 and "--allow-remote" in r.output


# --- the page in a real browser --------------------------------------------------------------

def _webdriver():
    """Debian's chromium + chromedriver driven through Selenium's WebDriver client, or the reason not."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return None, "selenium is not installed (pip install -e '.[test]')"
    browser = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        return None, "no Chromium / chromedriver on this machine (Debian: apt install chromium chromium-driver)"
    return (browser, driver), ""


@pytest.mark.skipif(_webdriver()[0] is None, reason=_webdriver()[1])
def test_page_streams_two_models_side_by_side_in_chromium(files, tmp_path):
    """Headless Chromium opens the page, picks f16 for the left pane and q8_0 for the right, types a
    prompt in the text box and presses Send. A MutationObserver installed before the click records
    the reply's text each time it runs (once per batch of DOM changes, so at most once per network
    read): each reply must grow through several partial texts, prefixes of the final one (tokens
    streamed in over separate reads, not one final write); both panes fill; tokens/s is shown. The screenshot is
    kept as tmp_path/serve.png, and copied to $GPT2CUBE_SCREENSHOT when that is set (how the
    README's picture is made)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    (browser, chromedriver), _ = _webdriver()
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1200,760"):
        opts.add_argument(a)
    pool = ModelPool([files["f16"], files["q8_0"]], budget_bytes=int(400e6), n_ctx=128, queue_limit=4)
    with _serving(pool) as (url, _loop):
        drv = webdriver.Chrome(service=Service(executable_path=chromedriver), options=opts)
        try:
            drv.get(url + "/")
            wait = WebDriverWait(drv, 60)
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#model-b option")) == 3)
            rows = [r.text for r in drv.find_elements(By.CSS_SELECTOR, "#models tbody tr")]
            assert len(rows) == 2 and any("F16" in r.upper() for r in rows) and any("Q8_0" in r.upper() for r in rows)
            Select(drv.find_element(By.ID, "model-a")).select_by_value("small-f16")
            Select(drv.find_element(By.ID, "model-b")).select_by_value("small-q8_0")
            drv.execute_script("""
                window.__texts = {a: [], b: []};
                for (const k of ['a', 'b']) {
                  new MutationObserver((records) => { for (const r of records) for (const n of r.addedNodes) {
                      const reply = n.nodeType === 3 ? n.parentElement : n;
                      if (reply && reply.className === 'reply') window.__texts[k].push(reply.textContent); } })
                    .observe(document.getElementById('log-' + k), {childList: true, subtree: true});
                }""")
            drv.find_element(By.ID, "max_tokens").clear()
            drv.find_element(By.ID, "max_tokens").send_keys("48")
            drv.find_element(By.ID, "prompt").send_keys("Tell me a story about the sea")
            drv.find_element(By.ID, "send").click()
            wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-replies") == "2")
            texts = drv.execute_script("return window.__texts")
            for k in ("a", "b"):
                log = drv.find_element(By.ID, f"log-{k}").text
                assert "you: Tell me a story about the sea" in log
                reply = drv.find_element(By.CSS_SELECTOR, f"#log-{k} .reply").text
                assert reply.strip(), f"pane {k}: empty reply"
                partial = [t for t in texts[k] if t and t != reply]
                assert len(set(partial)) >= 3, f"pane {k}: the reply did not stream ({texts[k]!r})"
                assert all(reply.startswith(t) for t in partial), f"pane {k}: partial texts are not prefixes"
                assert "tokens/s" in drv.find_element(By.ID, f"stats-{k}").text
            shot = tmp_path / "serve.png"
            drv.save_screenshot(str(shot))
            assert shot.stat().st_size > 10_000
            if os.environ.get("GPT2CUBE_SCREENSHOT"):
                shutil.copyfile(shot, os.environ["GPT2CUBE_SCREENSHOT"])
        finally:
            drv.quit()
