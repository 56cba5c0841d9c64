"""Atomic output: every file gpt2cube writes is made under a temporary name beside its target
and renamed over it only when complete, so a failure or an interrupt never leaves a half-written
GGUF, results.json, report or plot (an older complete file stays as it was)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

from .errors import OutputError


def temp_beside(out: Path) -> tuple[int, str]:
    """(fd, name) of a new hidden `.NAME.*.partial` file in out's directory."""
    try:
        return tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent)
    except OSError as e:
        raise OutputError(f"{out}: cannot create a file in {out.parent} ({e.strerror})") from None


def write_with(out: Path, write: Callable[[Path], None]) -> Path:
    """`write(tmp)` fills a temporary file, which then replaces `out` in one rename."""
    fd, name = temp_beside(out)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def write_text(out: Path, text: str) -> Path:
    return write_with(out, lambda tmp: tmp.write_text(text, encoding="utf-8"))
