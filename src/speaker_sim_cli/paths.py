"""Where speaker-sim keeps things on disk."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """``$SPEAKER_SIM_CACHE`` or the user cache dir (e.g. ``~/.cache/speaker-sim``)."""
    env = os.environ.get("SPEAKER_SIM_CACHE")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("speaker-sim"))
