"""`gpt2cube chat`: a conversation in the terminal, tokens printed as they come."""

from __future__ import annotations

import dataclasses
import sys
import threading
import time
from typing import Callable, TextIO

from .conversation import Conversation
from .sampling import Sampling
from .text import StopMatcher

HELP = "/reset clears the history, /stats shows speed and context, /vertices toggles routed vertices, /quit ends"


def chat_loop(backend, conv: Conversation, sampling: Sampling, *, read: Callable[[], str] = input,
              out: TextIO = sys.stdout, show_vertices: bool = False) -> dict:
    """Reads messages until /quit or end of input; returns the last stats."""
    stats = {"turns": 0, "reply_tokens": 0, "tokens_per_s": 0.0, "context_used": 0, "n_ctx": backend.n_ctx,
             "dropped_turns": 0}
    print(f"chat with {backend.engine} (context {backend.n_ctx} tokens). {HELP}", file=out)
    turn = 0
    while True:
        try:
            line = read().strip()
        except (EOFError, KeyboardInterrupt):
            break
        if not line:
            continue
        if line.startswith("/"):
            cmd = line.split()[0].lower()
            if cmd in ("/quit", "/exit"):
                break
            if cmd == "/reset":
                conv.reset()
                print("[history cleared]", file=out)
            elif cmd == "/stats":
                print(f"[{stats['reply_tokens']} tokens at {stats['tokens_per_s']:.1f} tokens/s; context "
                      f"{stats['context_used']} / {stats['n_ctx']} tokens; {len(conv.turns)} turns kept, "
                      f"{stats['dropped_turns']} dropped to fit]", file=out)
            elif cmd == "/vertices":
                show_vertices = not show_vertices
                print(f"[vertices {'on' if show_vertices else 'off'}]", file=out)
            else:
                print(f"[unknown command {cmd}; {HELP}]", file=out)
            continue
        p = conv.prompt(backend.tokenize, line, backend.n_ctx - sampling.max_tokens)
        if p.dropped_turns:
            print(f"[{p.dropped_turns} oldest turn(s) left out to fit the {backend.n_ctx}-token context]", file=out)
        if p.truncated_tokens:
            print(f"[the message's first {p.truncated_tokens} tokens were cut to fit the context]", file=out)
        reply, verts, n = _reply(backend, p, dataclasses.replace(sampling, seed=sampling.seed + turn), out)
        turn += 1
        conv.add(line, reply)
        stats.update(turns=turn, reply_tokens=n["tokens"], tokens_per_s=n["tokens_per_s"],
                     context_used=len(p.ids) + n["tokens"], dropped_turns=p.dropped_turns)
        if show_vertices and verts:
            for text, v in verts:
                print(f"  {text!r:>14} -> vertices per layer {v}", file=out)
        elif show_vertices:
            print("[no vertices: the dense llama.cpp path, or a radius that covers the whole cube]", file=out)
    return stats


def _reply(backend, p, sampling: Sampling, out: TextIO):
    stop, matcher = threading.Event(), StopMatcher(p.stops)
    print("assistant:", end="", file=out, flush=True)
    parts, verts, count = [], [], 0
    t0 = time.perf_counter()
    try:
        for tok in backend.stream(p.ids, sampling, stop):
            count += tok.id >= 0
            if tok.vertices is not None:
                verts.append((tok.text, tok.vertices))
            text, stopped = matcher.push(tok.text)
            parts.append(text)
            print(text, end="", file=out, flush=True)
            if stopped:
                break
        else:
            parts.append(matcher.flush())
            print(parts[-1], end="", file=out)
    except KeyboardInterrupt:
        stop.set()
        print(" [stopped]", end="", file=out)
    secs = time.perf_counter() - t0
    print(file=out)
    return "".join(parts), verts, {"tokens": count, "tokens_per_s": count / secs if secs > 0 else 0.0}
