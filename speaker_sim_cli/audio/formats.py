"""File-name checks that need no decoding library."""

from __future__ import annotations

from pathlib import Path

AUDIO_SUFFIXES = frozenset({".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aiff", ".aif",
                            ".au", ".sph", ".nist", ".w64", ".rf64", ".caf"})  # fmt: skip


def is_audio_path(p: Path) -> bool:
    return p.suffix.lower() in AUDIO_SUFFIXES
