"""The scoring stage of a scoring job: trial keys + an embedding lookup in, one cosine score
per trial out (normalised when asked), handed to the score writer. The one place a streaming
scorer replaces.

Contract (what :class:`~speaker_sim_cli.job.score.ScoreJob` relies on; a chunked/streaming
stage keeps it):

* inputs: ``enroll`` and ``test`` (the trial keys, in input order), ``lookup``
  (:class:`~speaker_sim_cli.job.items.ItemVectors`: ``rows(keys)`` -> row or -1, ``matrix``,
  ``reasons`` item -> why it has no vector, ``cohort``), ``norm`` / ``top_n``, and ``write``;
* ``write(scores, errors) -> rows written`` is called with consecutive runs of trials in input
  order (this in-memory stage calls it once with all of them; a streaming one per chunk, and
  its writer then appends to one temp file renamed at the end);
* outputs (:class:`StageResult`): ``scores`` float64 (NaN where not scored), ``ok`` (bool,
  scored), ``written`` (rows written), ``errors`` (None or the reason, per trial; a streaming
  stage may keep only the failed ones) and ``info`` (what the report's ``scoring`` block adds).

Metrics are computed by the job from ``scores[ok]`` and the labels: two compact arrays.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from ..scoring.cosine import cosine_pairs, trial_errors
from .items import ItemVectors

ScoreWriter = Callable[[np.ndarray, list[str | None]], int]


class ScoringStage(Protocol):
    """The signature :class:`~speaker_sim_cli.job.score.ScoreJob` calls (``stage=``)."""

    def __call__(
        self,
        enroll: Sequence[str],
        test: Sequence[str],
        lookup: ItemVectors,
        write: ScoreWriter | None = None,
        norm: str | None = None,
        top_n: int = 300,
    ) -> StageResult: ...


@dataclass
class StageResult:
    """Scores per trial (NaN where not scored), which were scored, rows written, reasons."""

    scores: np.ndarray
    ok: np.ndarray
    written: int
    errors: list[str | None]
    info: dict[str, Any] = field(default_factory=dict)


def score_stage(
    enroll: Sequence[str],
    test: Sequence[str],
    lookup: ItemVectors,
    write: ScoreWriter | None = None,
    norm: str | None = None,
    top_n: int = 300,
) -> StageResult:
    """Cosine of each trial's two vectors (AS-norm / S-norm against ``lookup.cohort``)."""
    a, b = lookup.rows(enroll), lookup.rows(test)
    ok = (a >= 0) & (b >= 0)
    scores = np.full(len(enroll), np.nan)
    info: dict[str, Any] = {}
    if ok.any():
        scores[ok] = cosine_pairs(lookup.matrix, a[ok], b[ok])
        if norm:
            scores[ok] = normalise(scores[ok], np.stack([a[ok], b[ok]], 1), lookup, norm,
                                   top_n, info)  # fmt: skip
    errors = trial_errors(enroll, test, ok, lookup.reasons)
    written = write(scores, errors) if write is not None else 0
    return StageResult(scores, ok & ~np.isnan(scores), written, errors, info)


def score_pairs(pairs: Sequence[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Cosine of each pair of vectors: the scoring stage's arithmetic for ``serve``'s requests
    (exactly what ``score`` computes for the same two recordings)."""
    n = len(pairs)
    if not n:
        return np.zeros(0)
    mat = np.stack([e for ea, eb in pairs for e in (ea, eb)])
    return cosine_pairs(mat, np.arange(0, 2 * n, 2), np.arange(1, 2 * n, 2))


def normalise(
    scores: np.ndarray,
    pairs: np.ndarray,
    lookup: ItemVectors,
    norm: str,
    top_n: int,
    info: dict[str, Any],
) -> np.ndarray:
    """AS-norm or S-norm of ``scores`` (trials ``pairs``: rows of ``lookup.matrix``)."""
    from ..scoring.norm import asnorm, snorm

    cemb = lookup.cohort
    if cemb is None:
        raise ValueError("--cohort: none of its recordings could be embedded")
    info["norm"] = {"method": norm, "cohort": len(cemb), "top_n": min(top_n, len(cemb))}
    mat = lookup.matrix
    if norm == "snorm":
        return snorm(scores, pairs, mat, mat, cemb)
    if norm == "asnorm":
        return asnorm(scores, pairs, mat, mat, cemb, top_n=top_n)
    raise ValueError(f"unknown score normalisation {norm!r}: use asnorm or snorm")
