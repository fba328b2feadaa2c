"""Progress events of a scoring or embedding job: what the CLI draws as a Rich bar and the
API ignores or forwards to the caller's callback."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

Stage = Literal["embed", "score"]


@dataclass(frozen=True)
class Progress:
    """One step of a job.

    ``event="start"``: ``n`` items (recordings to embed, trials to score) and ``seconds`` of
    audio are about to be processed; ``event="advance"``: ``n`` more items (and ``seconds``
    more audio) are done; ``event="done"``: the stage ended.
    """

    stage: Stage
    event: Literal["start", "advance", "done"]
    n: int = 0
    seconds: float = 0.0


ProgressFn = Callable[[Progress], None]


def embed_callbacks(
    progress: ProgressFn | None,
) -> tuple[Callable[[int, float], None] | None, Callable[[int, float], None] | None]:
    """The engine's ``(progress, on_start)`` callbacks, as events for ``progress``."""
    if progress is None:
        return None, None
    fn = progress

    def advance(n: int, seconds: float) -> None:
        fn(Progress("embed", "advance", n, seconds))

    def start(n: int, seconds: float) -> None:
        fn(Progress("embed", "start", n, seconds))

    return advance, start
