"""Turning a token stream into text as it arrives: UTF-8 characters split across tokens are held
until complete, and text that could be the start of a stop string is held until it is not."""

from __future__ import annotations


class Utf8Stream:
    def __init__(self) -> None:
        self._pending = b""

    def push(self, piece: bytes) -> str:
        self._pending += piece
        try:
            text = self._pending.decode("utf-8")
        except UnicodeDecodeError as e:
            if e.start > 0:  # complete characters first, the cut one stays pending
                text = self._pending[: e.start].decode("utf-8")
                self._pending = self._pending[e.start:]
                return text
            if len(self._pending) < 4 and e.reason == "unexpected end of data":
                return ""
            text = self._pending.decode("utf-8", errors="replace")
        self._pending = b""
        return text

    def flush(self) -> str:
        text, self._pending = self._pending.decode("utf-8", errors="replace"), b""
        return text


class StopMatcher:
    """push(text) -> (text safe to show, stopped). Stops at the first stop string, which is not shown."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = tuple(s for s in stops if s)
        self._held = ""

    def push(self, text: str) -> tuple[str, bool]:
        buf = self._held + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self._held = ""
            return buf[: min(hits)], True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), 0, -1):
                if buf.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        self._held = buf[len(buf) - hold:] if hold else ""
        return buf[: len(buf) - hold], False

    def flush(self) -> str:
        text, self._held = self._held, ""
        return text
