"""Exceptions the library raises. The CLI maps them to messages and exit codes."""

from __future__ import annotations


class SpeakerSimError(Exception):
    """Base class: a problem the user can act on (message says what and where)."""


class UsageError(SpeakerSimError):
    """Bad input to a command: unreadable trial list, unknown model id, bad option (exit 2)."""


class AudioError(SpeakerSimError):
    """One recording could not be used. Costs only the trials that name it."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class WeightsNotFoundError(SpeakerSimError):
    """The checkpoint of a model is not on this machine and cannot be downloaded (exit 1)."""


class CheckpointMismatchError(SpeakerSimError):
    """A checkpoint file does not fit the architecture (missing / unexpected keys)."""
