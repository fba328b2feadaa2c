"""mvector's EER, MinDCF and threshold (``mvector.metric.metrics``), for its users' numbers.

mvector 1.1's ``evaluate`` sorts the scores, takes ``fnr = cumsum(targets)/n_targets`` and
``fpr = 1 - cumsum(nontargets)/n_nontargets``, finds ``x1``, the first index where
``fnr - fpr >= 0``, and ``x2``, the last where it is negative, and interpolates
``EER = fnr[x1] + a (fnr[x2] - fnr[x1])`` with ``a = (fnr[x1]-fpr[x1]) / (fpr[x2]-fpr[x1]-
(fnr[x2]-fnr[x1]))``. Its threshold is ``sorted_scores[x1]``, the score at the first crossing
(no sweep); MinDCF is ``min(0.01 fnr + 0.99 fpr) / 0.01``. It prints them as
``threshold:{:.5f}, EER:{:.5f}, MinDCF:{:.5f}`` and stores them in ``model.state``.

The EER equals ours (:mod:`.metrics`, the NIST interpolation) up to tie handling; the threshold
is what mvector users compare against, and what ``model.state``'s ``threshold`` holds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["MvectorMetrics", "mvector_metrics"]


@dataclass(frozen=True)
class MvectorMetrics:
    """mvector's evaluation figures (fractions; the threshold is on raw cosine)."""

    eer: float
    min_dcf: float
    threshold: float

    def to_dict(self) -> dict[str, object]:
        return {
            "eer": self.eer,
            "min_dcf": self.min_dcf,
            "threshold": self.threshold,
            "definition": "mvector 1.1 evaluate(): threshold = score at the first index where "
            "FNR >= FPR; EER interpolated between it and the last index before; "
            "MinDCF p_target 0.01, c_miss = c_fa = 1",
        }


def mvector_metrics(scores: np.ndarray, labels: np.ndarray) -> MvectorMetrics:
    """mvector's EER, MinDCF(0.01) and threshold of ``scores`` (N,) with ``labels`` (N,) 1/0.

    Scores are taken as float32, as mvector holds them. Raises ValueError without both classes.

    >>> m = mvector_metrics(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1]))
    >>> round(m.eer, 3), round(m.min_dcf, 3), round(m.threshold, 3)
    (0.5, 0.5, 0.35)
    """
    s = np.asarray(scores, dtype=np.float32).ravel()
    y = np.asarray(labels).ravel()
    if s.shape != y.shape:
        raise ValueError(f"scores {s.shape} and labels {y.shape} differ in length")
    tgt = (y == 1).astype(np.float64)
    imp = (y == 0).astype(np.float64)
    if not tgt.any() or not imp.any():
        raise ValueError("mvector's metrics need both target and non-target trials")
    order = np.argsort(s)  # quicksort, as mvector's compute_fnr_fpr
    thresholds = s[order]
    fnr = np.cumsum(tgt[order]) / tgt.sum()
    fpr = 1 - np.cumsum(imp[order]) / imp.sum()
    diff = fnr - fpr
    x1 = int(np.flatnonzero(diff >= 0)[0])
    below = np.flatnonzero(diff < 0)
    if below.size == 0:  # mvector would fail here (empty index): every score separates
        eer = float(fnr[x1])
    else:
        x2 = int(below[-1])
        a = (fnr[x1] - fpr[x1]) / (fpr[x2] - fpr[x1] - (fnr[x2] - fnr[x1]))
        eer = float(fnr[x1] + a * (fnr[x2] - fnr[x1]))
    min_dcf = float(np.min(fnr * 0.01 + fpr * (1 - 0.01)) / min(0.01, 1 - 0.01))
    return MvectorMetrics(eer, min_dcf, float(thresholds[x1]))
