"""EER / minDCF / DET: hand-computed cases, ties, sklearn and brute-force cross-checks,
the reference fixtures, error cases."""

from __future__ import annotations

import csv
import doctest
import json
import math
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from speaker_sim_cli.scoring import metrics
from speaker_sim_cli.scoring.metrics import (
    Metrics,
    compute_eer,
    compute_min_dcf,
    det_curve,
    error_rates_at,
    evaluate,
)

# scores / labels with a tie at 0.2 between a target and a non-target
TIE_S = [0.1, 0.2, 0.2, 0.3, 0.4]
TIE_Y = [0, 1, 0, 0, 1]


def read_scores(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    scores = np.array([float(r["score"]) for r in rows])
    labels = np.array([int(r["label"]) for r in rows])
    return scores, labels


def brute_force(scores, labels):
    """O(n * m) definition: thresholds -inf and every distinct score, accept score > t."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels).astype(bool)
    thr = np.concatenate([[-np.inf], np.unique(s)])
    fnr = np.array([np.mean(s[y] <= t) for t in thr])
    fpr = np.array([np.mean(s[~y] > t) for t in thr])
    return fpr, fnr, thr


def test_doctests() -> None:
    res = doctest.testmod(metrics, optionflags=doctest.ELLIPSIS)
    assert res.attempted > 0 and res.failed == 0


# ---------------------------------------------------------------------- hand-computed cases


def test_det_curve_no_ties_by_hand() -> None:
    fpr, fnr, thr = det_curve([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    np.testing.assert_array_equal(fpr, [1.0, 0.5, 0.5, 0.0, 0.0])
    np.testing.assert_array_equal(fnr, [0.0, 0.0, 0.5, 0.5, 1.0])
    np.testing.assert_array_equal(thr, [-np.inf, 0.1, 0.35, 0.4, 0.8])
    assert compute_eer([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == (0.5, 0.35)


def test_det_curve_with_ties_by_hand() -> None:
    fpr, fnr, thr = det_curve(TIE_S, TIE_Y)
    # one point per distinct score (0.1, 0.2, 0.3, 0.4) plus accept-all
    np.testing.assert_allclose(fpr, [1, 2 / 3, 1 / 3, 0, 0])
    np.testing.assert_allclose(fnr, [0, 0, 0.5, 0.5, 1])
    np.testing.assert_array_equal(thr, [-np.inf, 0.1, 0.2, 0.3, 0.4])


def test_eer_interpolation_with_ties_by_hand() -> None:
    # crossing between (fpr 2/3, fnr 0) and (fpr 1/3, fnr 1/2): a = (1/6)/(5/6) = 1/5,
    # eer = 1/2 + 1/5 * (0 - 1/2) = 0.4 (and fpr there = 1/3 + 1/5 * 1/3 = 0.4 too)
    eer, thr = compute_eer(TIE_S, TIE_Y)
    assert eer == pytest.approx(0.4, abs=1e-15)
    assert thr == 0.2


def test_min_dcf_by_hand() -> None:
    # p=0.01: normalised costs 99, 66, 33.5, 0.5, 1 -> 0.5 at threshold 0.3
    assert compute_min_dcf(TIE_S, TIE_Y, p_target=0.01) == (pytest.approx(0.5), 0.3)
    # p=0.5: fnr + fpr = 1, 2/3, 5/6, 1/2, 1 -> 0.5 at 0.3
    assert compute_min_dcf(TIE_S, TIE_Y, p_target=0.5) == (pytest.approx(0.5), 0.3)
    # c_miss = 10, p = 0.1: c_def = min(1, 0.9) = 0.9;
    # costs 0.9, 0.6, 0.5+0.3, 0.5, 1 -> min 0.5 / 0.9 at threshold 0.3
    dcf, thr = compute_min_dcf(TIE_S, TIE_Y, p_target=0.1, c_miss=10, c_fa=1)
    assert dcf == pytest.approx(0.5 / 0.9)
    assert thr == 0.3


def test_perfect_separation() -> None:
    s = [0.1, 0.2, 0.3, 0.9]
    y = [0, 0, 1, 1]
    assert compute_eer(s, y) == (0.0, 0.2)
    assert compute_min_dcf(s, y) == (0.0, 0.2)


def test_all_scores_tied() -> None:
    # only accept-all and reject-all exist: EER = 0.5 whatever the order
    for y in ([1, 0, 1, 0], [0, 0, 1, 1], [1, 1, 0, 0]):
        fpr, fnr, _ = det_curve([0.5] * 4, y)
        np.testing.assert_array_equal(fpr, [1, 0])
        np.testing.assert_array_equal(fnr, [0, 1])
        assert compute_eer([0.5] * 4, y) == (0.5, 0.5)


def test_fully_inverted_scores() -> None:
    eer, _ = compute_eer([0.9, 0.8, 0.1, 0.2], [0, 0, 1, 1])
    assert eer == 1.0


@pytest.mark.parametrize("seed", range(5))
def test_ties_are_order_independent(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 500
    y = rng.random(n) < 0.3
    s = np.round(rng.normal(y * 1.0, 1.0), 1)  # heavy ties
    ref = evaluate(s, y, p_targets=(0.01, 0.05, 0.5))
    for _ in range(5):
        p = rng.permutation(n)
        assert evaluate(s[p], y[p], p_targets=(0.01, 0.05, 0.5)) == ref


@pytest.mark.parametrize("seed", range(5))
def test_matches_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 300
    y = rng.random(n) < 0.4
    s = np.round(rng.normal(y * 1.5, 1.0), 2)
    fpr, fnr, thr = det_curve(s, y)
    bf_fpr, bf_fnr, bf_thr = brute_force(s, y)
    np.testing.assert_array_equal(thr, bf_thr)
    np.testing.assert_allclose(fpr, bf_fpr, atol=1e-15)
    np.testing.assert_allclose(fnr, bf_fnr, atol=1e-15)
    for p in (0.01, 0.05, 0.3):
        cost = p * bf_fnr + (1 - p) * bf_fpr
        dcf, t = compute_min_dcf(s, y, p_target=p)
        assert dcf == pytest.approx(cost.min() / min(p, 1 - p), abs=1e-12)
        k = int(np.argmin(cost))
        assert t == bf_thr[k]


@pytest.mark.parametrize("seed", range(4))
def test_matches_sklearn_det_curve(seed: int) -> None:
    skm = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(seed)
    n = 400
    y = rng.random(n) < 0.25
    s = np.round(rng.normal(y * 1.0, 1.0), 1)
    fpr, fnr, _ = det_curve(s, y)
    sk_fpr, sk_fnr, _ = skm.det_curve(y, s, drop_intermediate=False)
    ours = set(zip(np.round(fpr, 12), np.round(fnr, 12), strict=True))
    theirs = set(zip(np.round(sk_fpr, 12), np.round(sk_fnr, 12), strict=True))
    # sklearn trims the flat tails where fpr or fnr is already 0; otherwise the same points
    assert theirs <= ours
    assert all(a == 0 or b == 0 for a, b in ours - theirs)


def test_matches_nist_reference_implementation_without_ties() -> None:
    """Our EER and minDCF equal the reference scorer's formula (no ties -> same points)."""
    rng = np.random.default_rng(7)
    n = 2000
    y = rng.random(n) < 0.2
    s = rng.normal(y * 2.0, 1.0)
    o = np.argsort(s)
    ly = y[o]
    fnr = np.cumsum(ly) / ly.sum()
    fpr = 1 - np.cumsum(~ly) / (~ly).sum()
    d = fnr - fpr
    x1 = np.flatnonzero(d >= 0)[0]
    x2 = np.flatnonzero(d < 0)[-1]
    a = (fnr[x1] - fpr[x1]) / (fpr[x2] - fpr[x1] - (fnr[x2] - fnr[x1]))
    ref_eer = fnr[x1] + a * (fnr[x2] - fnr[x1])
    m = evaluate(s, y)
    assert m.eer == ref_eer
    assert m.eer_threshold == np.sort(s)[x1]
    for p in (0.01, 0.05):
        assert m.min_dcf[p] == min(fnr * p + fpr * (1 - p)) / min(p, 1 - p)


# ---------------------------------------------------------------------- reference fixtures


@pytest.mark.shared
@pytest.mark.parametrize("name", ["dev_hard", "dev_trials"])
def test_reference_fixtures(shared: Path, name: str) -> None:
    ref_dir = shared / "fixtures" / "reference"
    expected = json.loads((ref_dir / f"{name}_campplus_zh_en_advanced.metrics.json").read_text())
    scores, labels = read_scores(ref_dir / f"{name}_campplus_zh_en_advanced.scores.csv")
    m = evaluate(scores, labels)
    assert m.n_targets == expected["targets"]
    assert m.n_nontargets == expected["nontargets"]
    assert m.eer == pytest.approx(expected["eer"], abs=1e-12)
    assert m.min_dcf[0.01] == pytest.approx(expected["min_dcf_p0.01"], abs=1e-12)
    assert m.min_dcf[0.05] == pytest.approx(expected["min_dcf_p0.05"], abs=1e-12)
    # the CSV stores scores to 6 decimals; the reference threshold is the unrounded score
    assert m.eer_threshold == pytest.approx(expected["eer_threshold"], abs=5e-7)
    # and shuffling the trials (with the CSV's few tied scores) changes nothing
    p = np.random.default_rng(0).permutation(len(scores))
    assert evaluate(scores[p], labels[p]) == m


# ---------------------------------------------------------------------- threshold metrics


def test_far_frr_actual_dcf_at_threshold() -> None:
    # accept score > 0.2: 0.3 (non-target) and 0.4 (target) -> far 1/3, frr 1/2
    m = evaluate(TIE_S, TIE_Y, p_targets=(0.01, 0.5), threshold=0.2)
    assert m.far == pytest.approx(1 / 3)
    assert m.frr == pytest.approx(1 / 2)
    assert m.actual_dcf is not None
    assert m.actual_dcf[0.01] == pytest.approx((0.01 * 0.5 + 0.99 / 3) / 0.01)
    assert m.actual_dcf[0.5] == pytest.approx(0.5 + 1 / 3)
    for p in (0.01, 0.5):
        assert m.actual_dcf[p] >= m.min_dcf[p]
    assert error_rates_at(TIE_S, TIE_Y, 0.2) == (m.far, m.frr)


def test_far_frr_at_min_dcf_threshold_reach_min_dcf() -> None:
    rng = np.random.default_rng(3)
    y = rng.random(1000) < 0.3
    s = np.round(rng.normal(y * 1.0, 1.0), 2)
    m = evaluate(s, y)
    t = m.min_dcf_threshold[0.01]
    m2 = evaluate(s, y, threshold=t)
    assert m2.actual_dcf is not None
    assert m2.actual_dcf[0.01] == pytest.approx(m.min_dcf[0.01], abs=1e-12)
    # the EER threshold gives the first point with fnr >= fpr
    far, frr = error_rates_at(s, y, m.eer_threshold)
    assert frr >= far
    assert min(far, frr) <= m.eer <= max(far, frr)


def test_no_threshold_leaves_threshold_fields_empty() -> None:
    m = evaluate(TIE_S, TIE_Y)
    assert m.threshold is None and m.far is None and m.frr is None and m.actual_dcf is None
    d = m.to_dict()
    assert "far" not in d and "threshold" not in d


def test_to_dict_is_json_and_round_trips() -> None:
    m = evaluate(TIE_S, TIE_Y, threshold=0.25)
    d = m.to_dict()
    assert "NIST SRE16" in d["definition"]
    assert d["min_dcf_p0.01"] == m.min_dcf[0.01]
    assert d["actual_dcf_p0.05"] == m.actual_dcf[0.05]  # type: ignore[index]
    text = json.dumps(d, allow_nan=False)
    assert Metrics.from_dict(json.loads(text)) == m


def test_accept_all_threshold_is_minus_inf_and_null_in_json() -> None:
    # inverted system at p=0.5: accept-all (cost 1) ties reject-all and wins as the first point
    m = evaluate([0.9, 0.1], [0, 1], p_targets=(0.5,))
    assert m.min_dcf[0.5] == 1.0
    assert m.min_dcf_threshold[0.5] == -math.inf
    d = m.to_dict()
    assert d["min_dcf_threshold_p0.5"] is None
    json.dumps(d, allow_nan=False)
    assert Metrics.from_dict(d) == m


def test_float32_bool_and_list_inputs_agree() -> None:
    rng = np.random.default_rng(1)
    y = rng.random(200) < 0.5
    s = np.round(rng.normal(y * 1.0, 1.0), 3).astype(np.float32)
    a = evaluate(s, y)
    b = evaluate(s.tolist(), y.astype(int).tolist())  # float64 of the same float32 values
    assert a == b


def test_infinite_scores_are_allowed() -> None:
    eer, thr = compute_eer([-np.inf, 0.0, np.inf, 1.0], [0, 0, 1, 1])
    assert eer == 0.0
    assert thr == 0.0


def test_memory_is_linear_not_quadratic() -> None:
    rng = np.random.default_rng(0)
    n = 1_000_000
    y = rng.random(n) < 0.01
    s = rng.normal(y * 1.0, 1.0)
    tracemalloc.start()
    evaluate(s, y)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 100 * n  # ~55 bytes per trial measured; a matrix would need n * m


# ---------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("scores", "labels", "match"),
    [
        ([], [], "empty"),
        ([0.1, 0.2], [1], "different lengths"),
        ([0.1, float("nan"), 0.3], [1, 0, 1], "NaN"),
        ([0.1, 0.2], [1, 1], "no non-target"),
        ([0.1, 0.2], [0, 0], "no target"),
        ([0.1, 0.2], [0, 2], "0 .non-target. or 1"),
        ([[0.1, 0.2]], [[0, 1]], "1-D"),
        (["a", "b"], [0, 1], "numeric"),
        ([0.1, 0.2], ["x", "y"], "labels"),
    ],
)
def test_bad_input_raises(scores, labels, match: str) -> None:
    for fn in (det_curve, compute_eer, compute_min_dcf, evaluate):
        with pytest.raises(ValueError, match=match):
            fn(scores, labels)


@pytest.mark.parametrize("p", [0.0, 1.0, -0.1, 2.0])
def test_bad_p_target_raises(p: float) -> None:
    with pytest.raises(ValueError, match="p_target"):
        compute_min_dcf(TIE_S, TIE_Y, p_target=p)
    with pytest.raises(ValueError, match="p_target"):
        evaluate(TIE_S, TIE_Y, p_targets=(0.01, p))


def test_bad_costs_and_threshold_raise() -> None:
    with pytest.raises(ValueError, match="c_miss"):
        compute_min_dcf(TIE_S, TIE_Y, c_miss=0)
    with pytest.raises(ValueError, match="NaN"):
        evaluate(TIE_S, TIE_Y, threshold=float("nan"))
