"""Logistic-regression calibration, Cllr and PAV minCllr."""

from __future__ import annotations

import csv
import doctest
import json
import math
from pathlib import Path

import numpy as np
import pytest

from speaker_sim_cli.scoring import calibration
from speaker_sim_cli.scoring.calibration import (
    Calibration,
    _pav,
    cllr,
    fit_calibration,
    min_cllr,
    pav_llr,
)


def gaussian_trials(seed: int, n: int = 100_000, p: float = 0.3):
    """Targets ~ N(1, 1), non-targets ~ N(-1, 1): the true LLR is exactly 2 * score."""
    rng = np.random.default_rng(seed)
    y = rng.random(n) < p
    s = rng.normal(np.where(y, 1.0, -1.0), 1.0)
    return s, y


def test_doctests() -> None:
    res = doctest.testmod(calibration)
    assert res.attempted > 0 and res.failed == 0


def test_cllr_limits() -> None:
    assert cllr([0.0, 0.0, 0.0], [1, 0, 0]) == 1.0  # uninformative: exactly 1 bit
    assert cllr([1e6, -1e6], [1, 0]) == 0.0  # perfect, huge LLRs
    assert cllr([np.inf, -np.inf], [1, 0]) == 0.0
    assert cllr([-np.inf, np.inf], [1, 0]) == np.inf
    # by hand: llr = ln 3 for a target: log2(1 + 1/3); llr = 0 for the non-target: 1 bit
    assert cllr([math.log(3), 0.0], [1, 0]) == pytest.approx(0.5 * (math.log2(4 / 3) + 1.0))


def test_pav_by_hand() -> None:
    np.testing.assert_allclose(_pav(np.array([1.0, 3.0, 2.0, 4.0]), np.ones(4)), [1, 2.5, 2.5, 4])
    # weights pull the pooled value: (3*1 + 2*3) / 4
    np.testing.assert_allclose(_pav(np.array([3.0, 2.0]), np.array([1.0, 3.0])), [2.25, 2.25])
    np.testing.assert_allclose(_pav(np.array([4.0, 3.0, 2.0]), np.ones(3)), [3, 3, 3])


def test_pav_llr_pools_ties() -> None:
    # the tie at 0.5 holds one target and one non-target: it gets one shared LLR
    values, llr, n_t, n_n = pav_llr([0.1, 0.5, 0.5, 0.9], [0, 1, 0, 1])
    np.testing.assert_array_equal(values, [0.1, 0.5, 0.9])
    np.testing.assert_array_equal(n_t, [0, 1, 1])
    np.testing.assert_array_equal(n_n, [1, 1, 0])
    # posteriors 0, 1/2, 1 with empirical prior 1/2 -> llr -inf, 0, inf
    assert llr.tolist() == [-np.inf, 0.0, np.inf]


def test_min_cllr_limits() -> None:
    assert min_cllr([0.1, 0.2, 0.3, 0.9], [0, 0, 1, 1]) == 0.0
    # a useless (inverted) score: the best monotone map is a constant -> 1 bit
    assert min_cllr([0.9, 0.8, 0.1, 0.2], [0, 0, 1, 1]) == pytest.approx(1.0)
    assert min_cllr([0.5] * 4, [0, 1, 0, 1]) == pytest.approx(1.0)


def test_fit_recovers_the_true_llr() -> None:
    s, y = gaussian_trials(0, n=200_000)
    cal = fit_calibration(s, y)
    assert cal.slope == pytest.approx(2.0, abs=0.03)
    assert cal.offset == pytest.approx(0.0, abs=0.03)
    # and the result does not depend on the class proportions (prior-weighted objective)
    s2, y2 = gaussian_trials(1, n=200_000, p=0.05)
    cal2 = fit_calibration(s2, y2)
    assert cal2.slope == pytest.approx(2.0, abs=0.05)
    assert cal2.offset == pytest.approx(0.0, abs=0.05)


def test_fit_matches_sklearn_weighted_logistic_regression() -> None:
    lm = pytest.importorskip("sklearn.linear_model")
    s, y = gaussian_trials(2, n=5000, p=0.2)
    s = 0.1 * s + 0.3  # cosine-like range
    prior = 0.3
    cal = fit_calibration(s, y, prior=prior)
    w = np.where(y, prior / y.sum(), (1 - prior) / (~y).sum()) * len(y)
    ref = lm.LogisticRegression(C=1e12, solver="newton-cholesky", tol=1e-12).fit(
        s[:, None], y, sample_weight=w
    )
    logit = math.log(prior / (1 - prior))
    assert cal.slope == pytest.approx(ref.coef_[0, 0], rel=1e-5)
    assert cal.offset == pytest.approx(ref.intercept_[0] - logit, abs=1e-5)


def test_calibration_is_optimal_among_affine_maps() -> None:
    s, y = gaussian_trials(3, n=20_000)
    cal = fit_calibration(s, y)
    best = cllr(cal.apply(s), y)
    assert cal.cllr == pytest.approx(best)
    for da, db in [(0.05, 0), (-0.05, 0), (0, 0.05), (0, -0.05)]:
        assert cllr((cal.slope + da) * s + cal.offset + db, y) > best


def test_separable_data_does_not_blow_up() -> None:
    cal = fit_calibration([0.0, 1.0, 2.0, 3.0], [0, 0, 1, 1])
    assert math.isfinite(cal.slope) and cal.slope > 0
    assert cal.cllr is not None and cal.cllr < 1e-3


def test_to_dict_round_trip() -> None:
    cal = fit_calibration(*gaussian_trials(4, n=2000), prior=0.1)
    d = json.loads(json.dumps(cal.to_dict()))
    assert d["kind"] == "affine-logreg" and d["prior"] == 0.1
    assert Calibration.from_dict(d) == cal
    np.testing.assert_array_equal(Calibration.from_dict(d).apply([0.5]), cal.apply([0.5]))
    with pytest.raises(ValueError, match="kind"):
        Calibration.from_dict({"kind": "pav", "slope": 1, "offset": 0})


def test_errors() -> None:
    with pytest.raises(ValueError, match="prior"):
        fit_calibration([0.1, 0.2], [0, 1], prior=1.0)
    with pytest.raises(ValueError, match="finite"):
        fit_calibration([0.1, np.inf, 0.3], [0, 1, 1])
    with pytest.raises(ValueError, match="NaN"):
        cllr([0.1, np.nan], [0, 1])
    with pytest.raises(ValueError, match="no target"):
        min_cllr([0.1, 0.2], [0, 0])


@pytest.mark.shared
def test_reference_scores_calibrate(shared: Path) -> None:
    path = shared / "fixtures" / "reference" / "dev_hard_campplus_zh_en_advanced.scores.csv"
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    s = np.array([float(r["score"]) for r in rows])
    y = np.array([int(r["label"]) for r in rows])
    raw = cllr(s, y)  # raw cosine used as if it were an LLR: badly calibrated
    cal = fit_calibration(s, y)
    calibrated = cllr(cal.apply(s), y)
    floor = min_cllr(s, y)
    assert 0.0 < floor <= calibrated < raw
    assert calibrated < 1.0  # better than the uninformative system
