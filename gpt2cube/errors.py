"""Typed exceptions. Library code raises these; only the CLI turns them into exit codes.

Every message says what failed, the offending value, what was expected and, where useful, a hint.
"""

from __future__ import annotations


class Gpt2cubeError(Exception):
    """Base class; `exit_code` is what the CLI exits with."""

    exit_code = 1


class InputError(Gpt2cubeError):
    """The user's input (a path, a checkpoint, an option) is unusable."""

    exit_code = 2


class CheckpointNotFound(InputError):
    pass


class UnsupportedArchitecture(InputError):
    pass


class CorruptCheckpoint(InputError):
    pass


class ShapeMismatch(InputError):
    pass


class TokenizerError(InputError):
    pass


class OutputError(Gpt2cubeError):
    """The output cannot be written (exists without --force, unwritable directory)."""

    exit_code = 3


class GGUFFormatError(InputError):
    """A GGUF file is malformed or lacks what a command needs."""
