"""The int8 pre-scan with exact re-rank returns exactly the exact search's top k (ids and scores),
including near-ties and exact ties far inside its error bound; its error bound holds."""

from __future__ import annotations

import numpy as np
import pytest

from speaker_sim_cli.voiceprints import library as library_mod
from speaker_sim_cli.voiceprints import prescan
from speaker_sim_cli.voiceprints.library import Voiceprints
from speaker_sim_cli.voiceprints.search import exact_top_k, unit_rows
from speaker_sim_cli.voiceprints.store import Enrolment, ModelInfo

pytestmark = pytest.mark.skipif(not prescan.available(), reason="no quantised CPU kernel")

S, D = 20_000, 192


@pytest.fixture(scope="module")
def lib() -> tuple[np.ndarray, prescan.Int8Prescan]:
    m = unit_rows(np.random.default_rng(0).standard_normal((S, D)))
    return m, prescan.Int8Prescan(m)


def _queries(m: np.ndarray, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    like = unit_rows(m[rng.integers(0, len(m), n)] + unit_rows(rng.standard_normal((n, D))))
    rand = unit_rows(rng.standard_normal((n, D)))
    spiky = np.zeros((4, D), np.float32)  # a wide query range: the largest query error
    spiky[:, 0], spiky[:, 1:] = 1.0, 1e-3
    return np.vstack([like, rand, -like[:5], unit_rows(spiky + rng.standard_normal((4, D)) * 1e-3)])


def _same_as_exact(m: np.ndarray, q: np.ndarray, got: tuple, k: int) -> None:
    ei, es = exact_top_k(q, m, k)
    pi, ps = got
    assert pi.shape == ei.shape == (len(q), min(k, len(m)))
    np.testing.assert_array_equal(pi, ei)
    np.testing.assert_allclose(ps, es, rtol=0, atol=1e-6)
    recomputed = np.einsum("bkd,bd->bk", m[pi], q)  # float32 recompute
    np.testing.assert_allclose(ps, recomputed, rtol=0, atol=1e-6)


@pytest.mark.parametrize("k", [1, 5, 40])
def test_same_top_k_as_exact(lib, k):
    m, pre = lib
    q = _queries(m, 40, seed=k)
    # identify-like and random (a small library re-ranks a larger share than 1 M speakers)
    got = pre.top_k(q[:80], k, max_share=1.0)
    assert got is not None
    _same_as_exact(m, q[:80], got, k)
    for one in q[80:]:  # wide-range queries: exact, or None (too many rows: plain scan)
        got = pre.top_k(one[None], k)
        if got is not None:
            _same_as_exact(m, one[None], got, k)
    assert pre.top_k(q[40:41], k, max_share=0.0) is None  # a random query: many near k-th


def test_error_bound_holds(lib):
    m, pre = lib
    q = _queries(m, 20, seed=7)
    err = np.abs(pre.scores(q).astype(np.float64) - q.astype(np.float64) @ m.T.astype(np.float64))
    bound = pre.bound(q)
    assert (err.max(axis=1) <= bound).all(), (err.max(axis=1) / bound).max()
    assert err.max() > 1e-4  # the scan really is approximate: the re-rank matters


def test_near_ties_and_exact_ties():
    """Rows 1e-5 apart in score (far below the int8 error) and exact duplicates: the same
    order as exact search (ties to the lower index)."""
    rng = np.random.default_rng(3)
    base = unit_rows(rng.standard_normal((1, D)))[0]
    m = unit_rows(rng.standard_normal((5000, D)))
    pos = rng.permutation(5000)[:60]
    other = unit_rows(rng.standard_normal((1, D)))[0]
    other -= other @ base * base
    other /= np.linalg.norm(other)
    for j, r in enumerate(pos[:30]):  # cos to base: 0.9 - j * 1e-5, nearly tied
        c = 0.9 - j * 1e-5
        m[r] = c * base + np.sqrt(1 - c * c) * other
    m[pos[30:45]] = m[pos[5]]  # exact duplicates of a top row, at other indices
    m[pos[45:]] = m[pos[29]]  # and of the row at the edge of the top 30
    m = unit_rows(m)
    pre = prescan.Int8Prescan(m)
    q = np.vstack([base, unit_rows(base + 1e-4 * rng.standard_normal(D))[0]])
    for k in (1, 5, 20, 30, 50):
        got = pre.top_k(q, k, max_share=1.0)
        assert got is not None
        _same_as_exact(m, q, got, k)


def test_library_search_uses_prescan_and_tracks_changes(tmp_path, monkeypatch):
    monkeypatch.setattr(library_mod, "PRESCAN_MIN_ROWS", 0)
    info = ModelInfo("test/prescan", "b" * 64, {"kind": "none"}, 32)
    rng = np.random.default_rng(5)
    items = [
        Enrolment(f"s{i}", f"h{i}", f"p{i}", rng.standard_normal(32).astype("f4"))
        for i in range(400)
    ]
    with Voiceprints.for_vectors(tmp_path / "lib.db", info) as vp:
        vp.enroll_vectors(items)
        assert vp.load(prescan=True) == 400 and vp._prescan is not None
        q = rng.standard_normal((3, 32)).astype(np.float32)
        names, idx, sc = vp.search(q, 5)
        assert vp._prescan is not None
        _, idx2, sc2 = vp.search(q, 5, plain_scan=True)
        np.testing.assert_array_equal(idx, idx2)
        np.testing.assert_allclose(sc, sc2, atol=1e-6)
        stale = vp._prescan
        vp.enroll_vectors([Enrolment("new", "hn", "pn", q[1] * 3)])
        names, idx, sc = vp.search(q, 5)  # a new generation: the stale copy is not used
        assert names[idx[1, 0]] == "new" and sc[1, 0] == pytest.approx(1.0, abs=1e-6)
        assert vp._prescan is stale  # search never makes a copy (load(prescan=True) does)
        assert vp.load(prescan=True) == 401 and vp._prescan is not stale
        names, idx, sc = vp.search(q, 5)  # through the new copy
        assert names[idx[1, 0]] == "new" and sc[1, 0] == pytest.approx(1.0, abs=1e-6)
        answers = vp.identify_vectors(q[1:2], top_k=3, threshold=None)
        assert answers[0].speaker == "new"
