"""speaker-sim: same speaker or not, at scale.

``from speaker_sim_cli import SpeakerSim`` is the library entry point. It is imported lazily,
so ``import speaker_sim_cli`` (and ``speaker-sim eval``) stays free of torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["SpeakerSim", "Voiceprints", "__version__"]

if TYPE_CHECKING:
    from .api import SpeakerSim
    from .voiceprints.library import Voiceprints


def __getattr__(name: str) -> Any:
    if name == "SpeakerSim":
        from .api import SpeakerSim

        return SpeakerSim
    if name == "Voiceprints":
        from .voiceprints.library import Voiceprints

        return Voiceprints
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), "SpeakerSim", "Voiceprints"])
