"""Voiceprint library: speakers enrolled once in one SQLite file, recordings identified 1:N.

``store`` (the SQLite file, torch-free), ``search`` (exact blocked cosine top-k, optional ANN),
``metrics`` (identification accuracy and open-set rates), ``mvector_import`` (mvector's
``audio_db``), ``library`` (:class:`Voiceprints`: the store with an embedding model).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .library import Voiceprints

__all__ = ["Voiceprints"]


def __getattr__(name: str) -> Any:
    if name == "Voiceprints":
        from .library import Voiceprints

        return Voiceprints
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
