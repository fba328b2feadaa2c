"""Verification metrics: DET curve, EER, minDCF, actual DCF (numpy only).

Definition (the NIST SRE16 scorer that 3D-Speaker's ``speakerlab`` and WeSpeaker share):

* sort the scores ascending; ``fnr = cumsum(is_target) / n_targets`` and
  ``fpr = 1 - cumsum(is_nontarget) / n_nontargets``, so the operating point at a sorted score
  ``s`` rejects every trial with ``score <= s``. A trial is *accepted* when ``score > threshold``.
* the curve starts at the accept-all point ``(fpr, fnr) = (1, 0)`` (threshold ``-inf``) and ends
  at the reject-all point ``(0, 1)`` (threshold = the largest score).
* tied scores are evaluated together: there is one operating point per *distinct* score, so
  the order in which equal scores happen to be sorted cannot change any result. Without ties
  this is exactly the reference scorer.
* EER is linearly interpolated between the last point with ``fnr < fpr`` and the first with
  ``fnr >= fpr``; its threshold is the score of the latter (as the reference scorer reports it).
* ``minDCF = min(c_miss * fnr * p + c_fa * fpr * (1 - p)) / min(c_miss * p, c_fa * (1 - p))``
  over all operating points.

Everything is O(n log n) time (one sort) and O(n) memory; no thresholds x trials matrix.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "DEFINITION",
    "Metrics",
    "compute_eer",
    "compute_min_dcf",
    "det_curve",
    "error_rates_at",
    "evaluate",
]

DEFINITION = (
    "NIST SRE16 scorer as shared by 3D-Speaker (speakerlab) and WeSpeaker: scores sorted "
    "ascending; fnr = cumsum(targets)/n_targets, fpr = 1 - cumsum(nontargets)/n_nontargets, "
    "starting at the accept-all point (fnr=0, fpr=1); one operating point per distinct score "
    "(ties evaluated together); a trial is accepted when score > threshold; EER linearly "
    "interpolated at the fnr=fpr crossing, threshold = score at the first point with fnr >= fpr; "
    "minDCF = min(c_miss*fnr*p + c_fa*fpr*(1-p)) / min(c_miss*p, c_fa*(1-p)); actual DCF uses "
    "the same normalisation at the given threshold"
)

FloatArray = npt.NDArray[np.float64]
ArrayLike = npt.ArrayLike


# ---------------------------------------------------------------------------------------------
# input checks and the shared sorted-count kernel
# ---------------------------------------------------------------------------------------------


def _check_inputs(
    scores: ArrayLike, labels: ArrayLike
) -> tuple[npt.NDArray[np.floating[Any]], npt.NDArray[np.bool_]]:
    """Validate and return ``(scores (n,) float, is_target (n,) bool)``."""
    s = np.asarray(scores)
    y = np.asarray(labels)
    if s.ndim != 1 or y.ndim != 1:
        raise ValueError(f"scores and labels must be 1-D, got shapes {s.shape} and {y.shape}")
    if s.shape[0] != y.shape[0]:
        raise ValueError(
            f"scores and labels have different lengths: {s.shape[0]} scores, {y.shape[0]} labels"
        )
    if s.shape[0] == 0:
        raise ValueError("no trials: scores and labels are empty")
    if s.dtype not in (np.float32, np.float64):
        if not (np.issubdtype(s.dtype, np.number) or s.dtype == np.bool_):
            raise ValueError(f"scores must be numeric, got dtype {s.dtype}")
        s = s.astype(np.float64)
    if np.isnan(s).any():
        n_nan = int(np.count_nonzero(np.isnan(s)))
        raise ValueError(f"scores contain {n_nan} NaN value(s); drop or fix those trials first")
    if y.dtype == np.bool_:
        is_target = y
    else:
        if not (np.issubdtype(y.dtype, np.number)):
            raise ValueError(f"labels must be 0/1 or boolean, got dtype {y.dtype}")
        is_target = y == 1
        if not np.all(is_target | (y == 0)):
            raise ValueError("labels must be 0 (non-target) or 1 (target)")
    n_t = int(np.count_nonzero(is_target))
    if n_t == 0:
        raise ValueError("no target trials (label 1): EER and DCF are undefined")
    if n_t == is_target.shape[0]:
        raise ValueError("no non-target trials (label 0): EER and DCF are undefined")
    return s, is_target


@dataclass(frozen=True)
class _Counts:
    """Cumulative counts at each distinct score, ascending. Arrays have shape (m,)."""

    values: npt.NDArray[np.floating[Any]]  # distinct scores, ascending
    tgt_le: npt.NDArray[np.int64]  # number of targets with score <= values[k]
    non_le: npt.NDArray[np.int64]  # number of non-targets with score <= values[k]
    n_targets: int
    n_nontargets: int


def _counts(s: npt.NDArray[np.floating[Any]], is_target: npt.NDArray[np.bool_]) -> _Counts:
    # A plain sort is several times faster than argsort + gather; the class counts per distinct
    # score are then recovered by locating the minority class's scores among the distinct ones.
    s_sorted = np.sort(s)
    n = s_sorted.shape[0]
    ends = np.flatnonzero(s_sorted[1:] != s_sorted[:-1])  # last index of each run of equal scores
    ends = np.append(ends, n - 1)
    values = s_sorted[ends]
    del s_sorted
    n_t = int(np.count_nonzero(is_target))
    targets_are_minority = n_t <= n - n_t
    minority = np.sort(s[is_target] if targets_are_minority else s[~is_target])
    group = np.searchsorted(values, minority, side="left")  # values holds every score exactly
    del minority
    minority_le = np.cumsum(np.bincount(group, minlength=values.shape[0]), dtype=np.int64)
    del group
    majority_le = ends + 1 - minority_le
    del ends
    if targets_are_minority:
        return _Counts(values, minority_le, majority_le, n_t, n - n_t)
    return _Counts(values, majority_le, minority_le, n_t, n - n_t)


def _rates(c: _Counts) -> tuple[FloatArray, FloatArray]:
    """``(fnr, fpr)`` of shape (m + 1,), starting with the accept-all point."""
    m = c.values.shape[0]
    fnr = np.empty(m + 1, dtype=np.float64)
    fpr = np.empty(m + 1, dtype=np.float64)
    fnr[0] = 0.0
    fpr[0] = 1.0
    np.divide(c.tgt_le, c.n_targets, out=fnr[1:])
    # 1 - cumsum/n exactly as the reference scorer writes it (bit-identical results)
    np.divide(c.non_le, c.n_nontargets, out=fpr[1:])
    np.subtract(1.0, fpr[1:], out=fpr[1:])
    return fnr, fpr


def _thresholds(c: _Counts) -> FloatArray:
    thr = np.empty(c.values.shape[0] + 1, dtype=np.float64)
    thr[0] = -np.inf
    thr[1:] = c.values
    return thr


def _eer_index(fnr: FloatArray, fpr: FloatArray) -> tuple[float, int]:
    diff = fnr - fpr  # non-decreasing from -1 to +1
    x1 = int(np.argmax(diff >= 0))  # first point with fnr >= fpr; x1 >= 1 as diff[0] = -1
    x2 = x1 - 1  # last point with fnr < fpr
    d1 = float(diff[x1])
    d2 = float(diff[x2])
    a = d1 / (d1 - d2)
    eer = float(fnr[x1] + a * (fnr[x2] - fnr[x1]))
    return eer, x1


def _check_dcf_params(p_target: float, c_miss: float, c_fa: float) -> None:
    if not 0.0 < p_target < 1.0:
        raise ValueError(f"p_target must be in (0, 1), got {p_target}")
    if not (c_miss > 0 and c_fa > 0):
        raise ValueError(f"c_miss and c_fa must be positive, got {c_miss} and {c_fa}")


def _min_dcf_index(
    fnr: FloatArray, fpr: FloatArray, p_target: float, c_miss: float, c_fa: float
) -> tuple[float, int]:
    cost = fnr * (c_miss * p_target)
    cost += fpr * (c_fa * (1.0 - p_target))
    k = int(np.argmin(cost))
    c_def = min(c_miss * p_target, c_fa * (1.0 - p_target))
    return float(cost[k]) / c_def, k


# ---------------------------------------------------------------------------------------------
# public functions
# ---------------------------------------------------------------------------------------------


def det_curve(scores: ArrayLike, labels: ArrayLike) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Detection error trade-off curve, one point per distinct score.

    Args:
        scores: (n,) trial scores (e.g. raw cosine in [-1, 1]); higher means "same speaker".
        labels: (n,) 1/True for target trials, 0/False for non-target trials.

    Returns:
        ``(fpr, fnr, thresholds)``, each of shape (m + 1,) where m is the number of distinct
        scores. Point k rejects every trial with ``score <= thresholds[k]`` (a trial is
        accepted when ``score > threshold``). Point 0 is accept-all (threshold ``-inf``,
        fpr = 1, fnr = 0); the last point is reject-all (fpr = 0, fnr = 1). ``thresholds`` is
        strictly increasing, fpr non-increasing, fnr non-decreasing.

    Raises:
        ValueError: empty input, different lengths, NaN scores, labels not 0/1, or only one
            class present.

    Example:
        >>> fpr, fnr, thr = det_curve([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
        >>> fpr.tolist()
        [1.0, 0.5, 0.5, 0.0, 0.0]
        >>> fnr.tolist()
        [0.0, 0.0, 0.5, 0.5, 1.0]
        >>> thr.tolist()
        [-inf, 0.1, 0.35, 0.4, 0.8]
    """
    s, is_target = _check_inputs(scores, labels)
    c = _counts(s, is_target)
    fnr, fpr = _rates(c)
    return fpr, fnr, _thresholds(c)


def compute_eer(scores: ArrayLike, labels: ArrayLike) -> tuple[float, float]:
    """Equal error rate, linearly interpolated at the fnr = fpr crossing.

    Args:
        scores: (n,) trial scores; labels: (n,) 1 = target, 0 = non-target.

    Returns:
        ``(eer, threshold)``: EER as a fraction in [0, 1] (not %), and the score of the first
        operating point with ``fnr >= fpr`` (accept when ``score > threshold``).

    Example:
        >>> eer, thr = compute_eer([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
        >>> round(eer, 6), thr
        (0.5, 0.35)
        >>> compute_eer([0.1, 0.2, 0.3, 0.9], [0, 0, 1, 1])
        (0.0, 0.2)
    """
    s, is_target = _check_inputs(scores, labels)
    c = _counts(s, is_target)
    fnr, fpr = _rates(c)
    eer, k = _eer_index(fnr, fpr)
    return eer, float(_thresholds_at(c, k))


def compute_min_dcf(
    scores: ArrayLike,
    labels: ArrayLike,
    p_target: float = 0.01,
    c_miss: float = 1.0,
    c_fa: float = 1.0,
) -> tuple[float, float]:
    """Normalised minimum detection cost over all operating points.

    Returns:
        ``(min_dcf, threshold)``: cost divided by ``min(c_miss*p, c_fa*(1-p))`` (so 1.0 is
        the cost of the best trivial system), and the threshold that reaches it (accept when
        ``score > threshold``; ``-inf`` means accept all).

    Example:
        >>> compute_min_dcf([0.1, 0.2, 0.3, 0.9], [0, 0, 1, 1])
        (0.0, 0.2)
    """
    _check_dcf_params(p_target, c_miss, c_fa)
    s, is_target = _check_inputs(scores, labels)
    c = _counts(s, is_target)
    fnr, fpr = _rates(c)
    dcf, k = _min_dcf_index(fnr, fpr, p_target, c_miss, c_fa)
    return dcf, float(_thresholds_at(c, k))


def _thresholds_at(c: _Counts, k: int) -> float:
    return -math.inf if k == 0 else float(c.values[k - 1])


def error_rates_at(scores: ArrayLike, labels: ArrayLike, threshold: float) -> tuple[float, float]:
    """``(far, frr)`` at a fixed threshold: accept when ``score > threshold``.

    far = accepted non-targets / non-targets, frr = rejected targets / targets.

    Example:
        >>> error_rates_at([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1], 0.35)
        (0.5, 0.5)
    """
    s, is_target = _check_inputs(scores, labels)
    return _far_frr(s, is_target, threshold)


def _actual_dcf(
    ps: Iterable[float], c_miss: float, c_fa: float, far: float, frr: float
) -> dict[float, float]:
    """The normalised DCF at a fixed threshold's ``far`` / ``frr``, per target prior."""
    return {
        p: (c_miss * p * frr + c_fa * (1.0 - p) * far) / min(c_miss * p, c_fa * (1.0 - p))
        for p in ps
    }


def _far_frr(
    s: npt.NDArray[np.floating[Any]], is_target: npt.NDArray[np.bool_], threshold: float
) -> tuple[float, float]:
    if math.isnan(threshold):
        raise ValueError("threshold is NaN")
    accepted = s > threshold
    n_t = int(np.count_nonzero(is_target))
    n_n = is_target.shape[0] - n_t
    tgt_acc = int(np.count_nonzero(accepted & is_target))
    non_acc = int(np.count_nonzero(accepted)) - tgt_acc
    return non_acc / n_n, (n_t - tgt_acc) / n_t


def _pkey(p: float) -> str:
    return f"p{p:g}"


def _json_float(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


@dataclass(frozen=True)
class Metrics:
    """Summary metrics of one scored trial list (rates are fractions, not %).

    ``min_dcf`` and ``min_dcf_threshold`` map p_target -> value. ``threshold``, ``far``,
    ``frr`` and ``actual_dcf`` are set only when :func:`evaluate` was given a threshold.
    """

    eer: float
    eer_threshold: float
    min_dcf: dict[float, float]
    min_dcf_threshold: dict[float, float]
    n_targets: int
    n_nontargets: int
    c_miss: float = 1.0
    c_fa: float = 1.0
    threshold: float | None = None
    far: float | None = None
    frr: float | None = None
    actual_dcf: dict[float, float] | None = None
    definition: str = field(default=DEFINITION, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """Flat JSON-able dict (``min_dcf_p0.01`` style keys; non-finite floats -> None)."""
        out: dict[str, Any] = {
            "eer": self.eer,
            "eer_threshold": _json_float(self.eer_threshold),
        }
        for p, v in self.min_dcf.items():
            out[f"min_dcf_{_pkey(p)}"] = v
        for p, v in self.min_dcf_threshold.items():
            out[f"min_dcf_threshold_{_pkey(p)}"] = _json_float(v)
        out["n_targets"] = self.n_targets
        out["n_nontargets"] = self.n_nontargets
        out["c_miss"] = self.c_miss
        out["c_fa"] = self.c_fa
        if self.threshold is not None:
            out["threshold"] = _json_float(self.threshold)
            out["far"] = self.far
            out["frr"] = self.frr
            for p, v in (self.actual_dcf or {}).items():
                out[f"actual_dcf_{_pkey(p)}"] = v
        out["definition"] = self.definition
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Metrics:
        """Inverse of :meth:`to_dict`."""

        def by_p(prefix: str) -> dict[float, float]:
            res: dict[float, float] = {}
            for k, v in d.items():
                if k.startswith(prefix + "p"):
                    res[float(k[len(prefix) + 1 :])] = -math.inf if v is None else float(v)
            return res

        thr = d.get("threshold")
        return cls(
            eer=float(d["eer"]),
            eer_threshold=float(d["eer_threshold"]),
            min_dcf=by_p("min_dcf_"),
            min_dcf_threshold=by_p("min_dcf_threshold_"),
            n_targets=int(d["n_targets"]),
            n_nontargets=int(d["n_nontargets"]),
            c_miss=float(d.get("c_miss", 1.0)),
            c_fa=float(d.get("c_fa", 1.0)),
            threshold=None if thr is None else float(thr),
            far=None if thr is None else float(d["far"]),
            frr=None if thr is None else float(d["frr"]),
            actual_dcf=None if thr is None else by_p("actual_dcf_"),
            definition=str(d.get("definition", DEFINITION)),
        )


def evaluate(
    scores: ArrayLike,
    labels: ArrayLike,
    p_targets: Iterable[float] = (0.01, 0.05),
    c_miss: float = 1.0,
    c_fa: float = 1.0,
    threshold: float | None = None,
) -> Metrics:
    """EER, minDCF at each p_target and, given a threshold, FAR / FRR / actual DCF there.

    One sort for everything: O(n log n) time, O(n) memory.

    Args:
        scores: (n,) trial scores; labels: (n,) 1 = target, 0 = non-target.
        p_targets: prior(s) of a target trial for the DCF.
        c_miss, c_fa: costs of a miss and of a false alarm.
        threshold: optional decision threshold (accept when ``score > threshold``).

    Example:
        >>> m = evaluate([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1], threshold=0.35)
        >>> m.eer, m.far, m.frr
        (0.5, 0.5, 0.5)
    """
    ps = tuple(float(p) for p in p_targets)
    for p in ps:
        _check_dcf_params(p, c_miss, c_fa)
    s, is_target = _check_inputs(scores, labels)
    c = _counts(s, is_target)
    fnr, fpr = _rates(c)
    eer, k_eer = _eer_index(fnr, fpr)
    min_dcf: dict[float, float] = {}
    min_thr: dict[float, float] = {}
    for p in ps:
        v, k = _min_dcf_index(fnr, fpr, p, c_miss, c_fa)
        min_dcf[p] = v
        min_thr[p] = _thresholds_at(c, k)
    del fnr, fpr
    far = frr = None
    actual: dict[float, float] | None = None
    if threshold is not None:
        far, frr = _far_frr(s, is_target, float(threshold))
        actual = _actual_dcf(ps, c_miss, c_fa, far, frr)
    return Metrics(
        eer=eer,
        eer_threshold=_thresholds_at(c, k_eer),
        min_dcf=min_dcf,
        min_dcf_threshold=min_thr,
        n_targets=c.n_targets,
        n_nontargets=c.n_nontargets,
        c_miss=float(c_miss),
        c_fa=float(c_fa),
        threshold=None if threshold is None else float(threshold),
        far=far,
        frr=frr,
        actual_dcf=actual,
    )
