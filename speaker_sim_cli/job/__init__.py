"""Scoring jobs: the one library run behind ``speaker-sim score``, ``SpeakerSim.score`` and
Ray, between the front ends (cli/, api.py, serve.py) and the pipeline (pipeline.py, engine/).

Modules: ``setup`` (what a job is built from), ``items`` (the embedding stage), ``stage``
(the scoring stage, the swap point for streaming), ``report`` (:class:`ScoreReport`),
``events`` (progress), ``score`` (:class:`ScoreJob`). Imports point down only.
"""

from .events import Progress, ProgressFn
from .report import PER_RUN_KEYS, ScoreReport
from .score import ScoreJob
from .setup import ModelSource, Outputs, ScoringSetup, TrialSource

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
