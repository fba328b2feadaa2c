"""Scoring jobs: the one library run behind ``speaker-sim score``, ``SpeakerSim.score`` and
Ray, between the front ends (cli/, api.py, serve.py) and the pipeline (pipeline.py, engine/).

Modules: ``setup`` (what a job is built from), ``items`` (the embedding stage), ``stage``
(the scoring stage, the swap point for streaming), ``report`` (:class:`ScoreReport`),
``events`` (progress), ``score`` (:class:`ScoreJob`), ``embed`` (:class:`EmbedJob`, behind
``speaker-sim embed``), ``evaluate`` (:class:`EvalJob`, behind ``speaker-sim eval``).
Imports point down only (to pipeline, engine, io, scoring, records, errors).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .events import Progress, ProgressFn
    from .report import PER_RUN_KEYS, ScoreReport
    from .score import ScoreJob
    from .setup import ModelSource, Outputs, ScoringSetup, TrialSource

# Imported on first use, so ``eval`` (job.evaluate) does not load the pipeline.
_WHERE = {
    "PER_RUN_KEYS": "report",
    "ModelSource": "setup",
    "Outputs": "setup",
    "Progress": "events",
    "ProgressFn": "events",
    "ScoreJob": "score",
    "ScoreReport": "report",
    "ScoringSetup": "setup",
    "TrialSource": "setup",
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)


__all__ = [
    "PER_RUN_KEYS",
    "ModelSource",
    "Outputs",
    "Progress",
    "ProgressFn",
    "ScoreJob",
    "ScoreReport",
    "ScoringSetup",
    "TrialSource",
]
