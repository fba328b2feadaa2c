"""Rescaled scores some older pipelines report, written beside the raw cosine (numpy only).

``funasr``: FunASR 0.x's speaker-verification pipeline turned the cosine of its x-vector into
``max(cos - 0.9465, 0) / (1 - 0.9465) * 100`` (0.9465: the CN-Celeb EER threshold), a
percentage that is 0 for every pair below the threshold. From March 2023 it returned the same
value divided by 100 as ``scores[0]`` beside ``label ['Same', 'Different']``. Raw cosine stays
speaker-sim's score; the rescaled column is for comparing with outputs of that pipeline.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

FUNASR_THRESHOLD = 0.9465


def funasr_percent(cos: np.ndarray | float) -> np.ndarray:
    """FunASR 0.x's pair score in [0, 100] from raw cosine; NaN (a failed trial) stays NaN."""
    c = np.asarray(cos, dtype=np.float64)
    return np.maximum(c - FUNASR_THRESHOLD, 0.0) / (1.0 - FUNASR_THRESHOLD) * 100.0


#: name -> (score-file column, function of the raw cosine)
SCALES: dict[str, tuple[str, Callable[[np.ndarray | float], np.ndarray]]] = {
    "funasr": ("score_funasr", funasr_percent),
}


def rescaled_columns(name: str | None, scores: np.ndarray) -> dict[str, np.ndarray]:
    """The extra score-file column for ``--score-scale name`` (none when name is None)."""
    if name is None:
        return {}
    column, fn = SCALES[name]
    return {column: fn(scores)}
