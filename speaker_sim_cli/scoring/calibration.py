"""Score calibration to log-likelihood ratios, Cllr and minCllr (numpy only).

* :func:`fit_calibration` learns ``llr = slope * score + offset`` by logistic regression that
  minimises the prior-weighted cross-entropy at an effective target prior (BOSARIS /
  pyllr style), with a damped Newton method (no scipy).
* :func:`cllr` is the log-likelihood-ratio cost in bits (prior 0.5): 0 is perfect, 1 is the
  cost of an uninformative system that always outputs llr = 0.
* :func:`min_cllr` is the Cllr after the best monotone calibration, found by the
  pool-adjacent-violators algorithm (PAV); ``cllr - min_cllr`` is the calibration loss.

All LLRs use the natural logarithm.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from speaker_sim_cli.scoring.metrics import _check_inputs

__all__ = ["Calibration", "cllr", "fit_calibration", "min_cllr", "pav_llr"]

_LOG2 = math.log(2.0)


def _softplus(x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """log(1 + exp(x)), stable for large |x| and for +-inf."""
    return np.logaddexp(0.0, x)


def _sigmoid(x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _logit(p: float) -> float:
    return math.log(p) - math.log1p(-p)


@dataclass(frozen=True)
class Calibration:
    """Affine score -> natural-log LLR map, ``llr = slope * score + offset``.

    ``prior`` is the effective target prior the map was trained at; ``cllr`` (bits) is the
    training-set Cllr after calibration, for reference.
    """

    slope: float
    offset: float
    prior: float = 0.5
    cllr: float | None = None

    def apply(self, scores: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """(n,) scores -> (n,) LLRs (float64)."""
        return self.slope * np.asarray(scores, dtype=np.float64) + self.offset

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "affine-logreg",
            "slope": self.slope,
            "offset": self.offset,
            "prior": self.prior,
            "cllr": self.cllr,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Calibration:
        kind = d.get("kind", "affine-logreg")
        if kind != "affine-logreg":
            raise ValueError(f"unknown calibration kind {kind!r}")
        c = d.get("cllr")
        return cls(
            slope=float(d["slope"]),
            offset=float(d["offset"]),
            prior=float(d.get("prior", 0.5)),
            cllr=None if c is None else float(c),
        )


def _weighted_ce(
    z: npt.NDArray[np.float64], is_target: npt.NDArray[np.bool_], w_t: float, w_n: float
) -> float:
    """Prior-weighted cross-entropy (nats) of posterior log-odds z."""
    return float(w_t * _softplus(-z[is_target]).sum() + w_n * _softplus(z[~is_target]).sum())


def fit_calibration(
    scores: npt.ArrayLike,
    labels: npt.ArrayLike,
    prior: float = 0.5,
    max_iter: int = 100,
    tol: float = 1e-10,
) -> Calibration:
    """Fit ``llr = slope * score + offset`` by prior-weighted logistic regression.

    Minimises ``prior * mean_tgt log(1 + exp(-(llr + logit(prior))))
    + (1 - prior) * mean_non log(1 + exp(llr + logit(prior)))``, which is convex; Newton
    steps with backtracking, on standardised scores.

    Args:
        scores: (n,) raw scores; labels: (n,) 1 = target, 0 = non-target.
        prior: effective target prior in (0, 1).

    Returns:
        A :class:`Calibration` (its ``cllr`` is the training Cllr of the calibrated LLRs).

    Example:
        >>> cal = fit_calibration([-2.0, -1.0, 0.5, -0.5, 1.0, 2.0], [0, 0, 0, 1, 1, 1])
        >>> bool(cal.slope > 0), round(cal.offset, 6) == 0.0
        (True, True)
    """
    if not 0.0 < prior < 1.0:
        raise ValueError(f"prior must be in (0, 1), got {prior}")
    s, is_target = _check_inputs(scores, labels)
    s = s.astype(np.float64, copy=False)
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite to fit a calibration")
    n_t = int(np.count_nonzero(is_target))
    n_n = s.shape[0] - n_t
    w_t = prior / n_t
    w_n = (1.0 - prior) / n_n
    w = np.where(is_target, w_t, w_n)
    y = is_target.astype(np.float64)
    lo = _logit(prior)

    mu = float(s.mean())
    sd = float(s.std()) or 1.0
    x = (s - mu) / sd
    theta = np.zeros(2)  # llr = theta[0] * x + theta[1]
    loss = _weighted_ce(np.full_like(x, lo), is_target, w_t, w_n)
    for _ in range(max_iter):
        z = theta[0] * x + theta[1] + lo
        p = _sigmoid(z)
        r = w * (p - y)
        g = np.array([float(r @ x), float(r.sum())])
        if np.max(np.abs(g)) < tol:
            break
        h = w * p * (1.0 - p)
        hxx = float(h @ (x * x))
        hx = float(h @ x)
        h1 = float(h.sum())
        hess = np.array([[hxx, hx], [hx, h1]])
        det = hxx * h1 - hx * hx
        if det > 1e-300 and h1 > 0:
            step = -np.linalg.solve(hess, g)
        else:  # separable data: the Hessian vanishes; fall back to a gradient step
            step = -g / max(float(np.max(np.abs(g))), 1e-300)
        t = 1.0
        while t > 1e-12:
            cand = theta + t * step
            new = _weighted_ce(cand[0] * x + cand[1] + lo, is_target, w_t, w_n)
            if new <= loss:
                break
            t *= 0.5
        else:
            break
        converged = loss - new <= tol * max(1.0, abs(loss)) and t * np.max(np.abs(step)) < 1e-9
        theta, loss = cand, new
        if converged:
            break
    slope = float(theta[0] / sd)
    offset = float(theta[1] - theta[0] * mu / sd)
    cal = Calibration(slope=slope, offset=offset, prior=float(prior))
    return Calibration(slope, offset, float(prior), cllr(cal.apply(s), is_target))


def cllr(llr: npt.ArrayLike, labels: npt.ArrayLike) -> float:
    """Log-likelihood-ratio cost in bits (Brümmer), prior 0.5.

    ``0.5 / ln 2 * (mean_tgt log(1 + exp(-llr)) + mean_non log(1 + exp(llr)))``.

    Args:
        llr: (n,) natural-log LLRs (+-inf allowed); labels: (n,) 1 = target, 0 = non-target.

    Example:
        >>> cllr([0.0, 0.0], [1, 0])
        1.0
    """
    x_in, is_target = _check_inputs(llr, labels)
    x = np.asarray(x_in, dtype=np.float64)
    c_t = float(_softplus(-x[is_target]).mean())
    c_n = float(_softplus(x[~is_target]).mean())
    return 0.5 * (c_t + c_n) / _LOG2


def _pav(y: npt.NDArray[np.float64], w: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Weighted isotonic (non-decreasing) regression of y (m,) with weights w (m,) > 0."""
    m = y.shape[0]
    val: list[float] = []
    wt: list[float] = []
    cnt: list[int] = []
    for yi, wi in zip(y.tolist(), w.tolist(), strict=True):
        v, ww, c = yi, wi, 1
        while val and val[-1] >= v:
            pw = wt.pop()
            v = (val.pop() * pw + v * ww) / (pw + ww)
            ww += pw
            c += cnt.pop()
        val.append(v)
        wt.append(ww)
        cnt.append(c)
    out = np.repeat(np.asarray(val), np.asarray(cnt, dtype=np.intp))
    assert out.shape[0] == m
    return out


def pav_llr(
    scores: npt.ArrayLike, labels: npt.ArrayLike
) -> tuple[
    npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.int64], npt.NDArray[np.int64]
]:
    """Optimal monotone score -> LLR map on this data (PAV), per distinct score.

    Tied scores are pooled first, so they always receive the same LLR.

    Returns:
        ``(values, llr, n_tgt, n_non)``, each (m,) for the m distinct scores ascending: the
        LLR (may be +-inf at the extremes) and the number of target / non-target trials there.
    """
    s, is_target = _check_inputs(scores, labels)
    values, inverse = np.unique(s, return_inverse=True)
    m = values.shape[0]
    n_tgt = np.bincount(inverse, weights=is_target, minlength=m).astype(np.int64)
    n_all = np.bincount(inverse, minlength=m).astype(np.int64)
    n_non = n_all - n_tgt
    post = _pav(n_tgt / n_all, n_all.astype(np.float64))
    n_t = int(n_tgt.sum())
    n_n = int(n_non.sum())
    with np.errstate(divide="ignore"):
        llr = np.log(post) - np.log1p(-post) - (math.log(n_t) - math.log(n_n))
    return values, llr, n_tgt, n_non


def min_cllr(scores: npt.ArrayLike, labels: npt.ArrayLike) -> float:
    """Cllr (bits) after the optimal monotone calibration (PAV) of the scores.

    Lower bound of :func:`cllr` over all monotone score -> LLR maps; 0 for perfectly
    separated scores, at most 1. The PAV loop is pure Python: about a second per million
    distinct scores.

    Example:
        >>> min_cllr([0.1, 0.2, 0.3, 0.9], [0, 0, 1, 1])
        0.0
    """
    _, llr, n_tgt, n_non = pav_llr(scores, labels)
    # zero-count groups contribute nothing (and may carry an infinite LLR: avoid 0 * inf)
    t = n_tgt > 0
    n = n_non > 0
    c_t = float((n_tgt[t] * _softplus(-llr[t])).sum()) / float(n_tgt.sum())
    c_n = float((n_non[n] * _softplus(llr[n])).sum()) / float(n_non.sum())
    return 0.5 * (c_t + c_n) / _LOG2
