"""A conversation as a GPT-2 prompt, kept within the context window.

GPT-2s have no chat template. `transcript` (the default) writes a plain script that a model
trained on books continues naturally: an optional opening line, then "User: ..." and
"Assistant: ..." lines, the reply stopping at the next "\\nUser:". `dialogpt` is DialoGPT's own
format: each utterance followed by <|endoftext|>, the reply ending at <|endoftext|>.
When the prompt does not fit (context minus the tokens reserved for the reply), the oldest turns
are dropped whole; if the newest message alone does not fit, its beginning is cut. Both are
reported, never silent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ..constants import GPT2_EOT_ID
from ..errors import InputError

FORMATS = ("transcript", "dialogpt")
DEFAULT_SYSTEM = "A conversation between a user and a helpful assistant."


@dataclass
class Prompt:
    ids: list[int]
    dropped_turns: int  # oldest turns left out
    truncated_tokens: int  # tokens cut from the start of the newest message
    stops: tuple[str, ...]


@dataclass
class Conversation:
    fmt: str = "transcript"
    system: str = DEFAULT_SYSTEM
    turns: list[tuple[str, str]] = field(default_factory=list)  # (user, reply)

    def __post_init__(self) -> None:
        if self.fmt not in FORMATS:
            raise InputError(f"chat format {self.fmt!r}; expected one of {', '.join(FORMATS)}")

    def reset(self) -> None:
        self.turns.clear()

    def _turn_ids(self, tokenize: Callable[[str], list[int]], user: str, reply: str | None) -> list[int]:
        if self.fmt == "dialogpt":
            ids = tokenize(user) + [GPT2_EOT_ID]
            return ids + (tokenize(reply) + [GPT2_EOT_ID] if reply is not None else [])
        text = f"User: {user}\nAssistant:" + (f" {reply}\n" if reply is not None else "")
        return tokenize(text)

    def prompt(self, tokenize: Callable[[str], list[int]], message: str, budget: int) -> Prompt:
        """The prompt for `message` after the kept history, at most `budget` tokens."""
        if budget < 8:
            raise InputError(f"the context leaves {budget} tokens for the prompt; lower the reply length")
        head = tokenize(self.system + "\n\n") if self.system and self.fmt == "transcript" else []
        newest = self._turn_ids(tokenize, message, None)
        cut = 0
        room = budget - len(head)
        if len(newest) > room:  # keep the message's end (its question), say how much was cut
            cut = len(newest) - room
            if self.fmt == "transcript":  # keep the "Assistant:" cue intact
                cue = tokenize("\nAssistant:")
                newest = newest[: len(newest) - len(cue)][cut:] + cue
            else:
                newest = newest[cut:]
        kept: list[list[int]] = []
        used = len(head) + len(newest)
        for user, reply in reversed(self.turns):
            ids = self._turn_ids(tokenize, user, reply)
            if used + len(ids) > budget:
                break
            kept.insert(0, ids)
            used += len(ids)
        ids = head + [t for k in kept for t in k] + newest
        stops = ("\nUser:", "\nuser:") if self.fmt == "transcript" else ()
        return Prompt(ids, len(self.turns) - len(kept), cut, stops)

    def add(self, user: str, reply: str) -> None:
        self.turns.append((user, reply.strip()))
