"""S-norm / AS-norm on a 2-D cohort whose statistics can be worked out by hand."""

from __future__ import annotations

import doctest
import math

import numpy as np
import pytest

from speaker_sim_cli.scoring import norm
from speaker_sim_cli.scoring.norm import (
    asnorm,
    cohort_stats,
    l2_normalize,
    normalize_scores,
    snorm,
    speaker_mean_cohort,
    subtract_mean,
)

# cohort at 0, 90 and 180 degrees
C = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
E = np.array([[1.0, 0.0]])  # cohort cosines 1, 0, -1: mean 0, std sqrt(2/3); top-2: 1, 0
T = np.array([[0.0, 1.0]])  # cohort cosines 0, 1, 0: mean 1/3, std sqrt(2)/3; top-2: 1, 0


def test_doctests() -> None:
    res = doctest.testmod(norm)
    assert res.failed == 0


def test_cohort_stats_by_hand() -> None:
    mu, sd = cohort_stats(np.vstack([E, T]), C)
    np.testing.assert_allclose(mu, [0.0, 1 / 3], atol=1e-15)
    np.testing.assert_allclose(sd, [math.sqrt(2 / 3), math.sqrt(2) / 3])
    mu, sd = cohort_stats(np.vstack([E, T]), C, top_n=2)
    np.testing.assert_allclose(mu, [0.5, 0.5])
    np.testing.assert_allclose(sd, [0.5, 0.5])


def test_snorm_by_hand() -> None:
    # s = cos(E, T) = 0: 0.5 * (0 / sqrt(2/3) + (0 - 1/3) / (sqrt(2)/3)) = -1 / (2 sqrt(2))
    out = snorm([0.0], [[0, 0]], E, T, C)
    np.testing.assert_allclose(out, [-1 / (2 * math.sqrt(2))])


def test_asnorm_by_hand() -> None:
    # top-2 on both sides: mean 0.5, std 0.5 -> 0.5 * (-1 + -1) = -1
    np.testing.assert_allclose(asnorm([0.0], [[0, 0]], E, T, C, top_n=2), [-1.0])
    # a score of 0.5 sits exactly at both means
    np.testing.assert_allclose(asnorm([0.5], [[0, 0]], E, T, C, top_n=2), [0.0])


def test_asnorm_top_n_capped_equals_snorm() -> None:
    a = asnorm([0.0, 0.3], [[0, 0], [0, 0]], E, T, C, top_n=300)
    b = snorm([0.0, 0.3], [[0, 0], [0, 0]], E, T, C)
    np.testing.assert_allclose(a, b)


def test_unnormalised_inputs_give_the_same_stats() -> None:
    a = cohort_stats(E * 5.0, C * np.array([[2.0], [3.0], [0.5]]))
    b = cohort_stats(E, C)
    np.testing.assert_allclose(a, b)


def naive_asnorm(scores, pairs, enroll, test, cohort, top_n):
    """Per-trial reference: sort all cohort scores descending, take top_n (WeSpeaker style)."""
    e = enroll / np.linalg.norm(enroll, axis=1, keepdims=True)
    t = test / np.linalg.norm(test, axis=1, keepdims=True)
    c = cohort / np.linalg.norm(cohort, axis=1, keepdims=True)
    out = []
    for s, (i, j) in zip(scores, pairs, strict=True):
        se = np.sort(c @ e[i])[::-1][:top_n]
        st = np.sort(c @ t[j])[::-1][:top_n]
        out.append(0.5 * ((s - se.mean()) / se.std() + (s - st.mean()) / st.std()))
    return np.array(out)


@pytest.mark.parametrize("top_n", [2, 7, 50, 1000])
def test_matches_naive_per_trial(top_n: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(norm, "_CHUNK", 3)  # exercise the chunked loop
    rng = np.random.default_rng(0)
    enroll = rng.normal(size=(8, 16))
    test = rng.normal(size=(10, 16))
    cohort = rng.normal(size=(60, 16))
    pairs = np.stack([rng.integers(0, 8, 40), rng.integers(0, 10, 40)], axis=1)
    e = l2_normalize(enroll)
    t = l2_normalize(test)
    scores = np.sum(e[pairs[:, 0]] * t[pairs[:, 1]], axis=1)
    got = asnorm(scores, pairs, enroll, test, cohort, top_n=top_n)
    want = naive_asnorm(scores, pairs, enroll, test, cohort, min(top_n, 60))
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_normalize_scores_gathers_per_trial() -> None:
    stats_e = (np.array([0.0, 1.0]), np.array([1.0, 2.0]))
    stats_t = (np.array([0.5]), np.array([0.5]))
    out = normalize_scores([1.0, 1.0], [[0, 0], [1, 0]], stats_e, stats_t)
    np.testing.assert_allclose(out, [0.5 * (1.0 + 1.0), 0.5 * (0.0 + 1.0)])


def test_speaker_mean_cohort() -> None:
    emb = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])
    spk, means = speaker_mean_cohort(emb, ["a", "a", "b"])
    assert spk == ["a", "b"]
    r = 1 / math.sqrt(2)
    np.testing.assert_allclose(means, [[r, r], [1.0, 0.0]])


def test_subtract_mean() -> None:
    out = subtract_mean([[2.0, 1.0], [0.0, 1.0]], [1.0, 1.0])
    np.testing.assert_allclose(out, [[1.0, 0.0], [-1.0, 0.0]])


def test_errors() -> None:
    with pytest.raises(ValueError, match="dimension"):
        cohort_stats(E, np.ones((3, 3)))
    with pytest.raises(ValueError, match="at least 2"):
        cohort_stats(E, C[:1])
    with pytest.raises(ValueError, match="top_n"):
        cohort_stats(E, C, top_n=1)
    with pytest.raises(ValueError, match="zero"):
        l2_normalize([[0.0, 0.0]])
    with pytest.raises(ValueError, match="2-D"):
        l2_normalize([1.0, 0.0])
    with pytest.raises(ValueError, match="out of range"):
        snorm([0.0], [[0, 1]], E, T, C)
    with pytest.raises(ValueError, match="shape"):
        snorm([0.0, 1.0], [[0, 0]], E, T, C)
    with pytest.raises(ValueError, match="std is 0"):
        snorm([0.0], [[0, 0]], E, T, np.array([[1.0, 0.0], [1.0, 0.0]]))
    with pytest.raises(ValueError, match="speaker ids"):
        speaker_mean_cohort(C, ["a"])
    with pytest.raises(ValueError, match="mean"):
        subtract_mean(C, [1.0, 2.0, 3.0])
