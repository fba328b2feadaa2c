"""Score normalisation with a cohort, as in the WeSpeaker recipes (numpy only).

Each side of a trial (enrollment e, test t) is compared with cohort embeddings by cosine;
the mean ``mu`` and population standard deviation ``std`` of those cohort scores give

    s_norm = 0.5 * ((s - mu_e) / std_e + (s - mu_t) / std_t)

* S-norm uses the whole cohort for every embedding.
* AS-norm (adaptive) uses only the ``top_n`` highest cohort scores of each embedding
  (default 300, capped at the cohort size).

Statistics are computed once per unique embedding (rows of ``enroll`` / ``test``), in row
chunks so that memory stays ``O(chunk * n_cohort)``, then gathered per trial.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np
import numpy.typing as npt

__all__ = [
    "asnorm",
    "cohort_stats",
    "l2_normalize",
    "normalize_scores",
    "snorm",
    "speaker_mean_cohort",
    "subtract_mean",
]

FloatArray = npt.NDArray[np.floating]

_CHUNK = 1024


def l2_normalize(emb: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Rows scaled to unit L2 norm. (n, D) -> (n, D) float64. Zero rows raise ValueError."""
    x = np.asarray(emb, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be 2-D (n, D), got shape {x.shape}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if np.any(norms == 0) or not np.all(np.isfinite(norms)):
        raise ValueError("embeddings contain zero or non-finite rows; cannot L2-normalise")
    return x / norms


def cohort_stats(
    emb: npt.ArrayLike, cohort: npt.ArrayLike, top_n: int | None = None
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Mean and population std of each embedding's cosine scores against the cohort.

    Args:
        emb: (n, D) embeddings (normalised here, so raw or L2-normalised both work).
        cohort: (n_c, D) cohort embeddings.
        top_n: keep only the ``top_n`` highest cohort scores per row (AS-norm); ``None`` keeps
            all (S-norm). Capped at ``n_c``; must be >= 2.

    Returns:
        ``(mean, std)``, each (n,) float64.
    """
    e = l2_normalize(emb)
    c = l2_normalize(cohort)
    if e.shape[1] != c.shape[1]:
        raise ValueError(
            f"embedding dimension {e.shape[1]} does not match cohort dimension {c.shape[1]}"
        )
    n_c = c.shape[0]
    if n_c < 2:
        raise ValueError(f"the cohort needs at least 2 embeddings, got {n_c}")
    k = n_c if top_n is None else min(int(top_n), n_c)
    if k < 2:
        raise ValueError(f"top_n must be at least 2, got {top_n}")
    mean = np.empty(e.shape[0])
    std = np.empty(e.shape[0])
    for lo in range(0, e.shape[0], _CHUNK):
        sc = e[lo : lo + _CHUNK] @ c.T  # (chunk, n_c)
        if k < n_c:
            # the k largest per row, in no particular order (mean / std do not need it)
            sc = np.partition(sc, n_c - k, axis=1)[:, n_c - k :]
        mean[lo : lo + _CHUNK] = sc.mean(axis=1)
        std[lo : lo + _CHUNK] = sc.std(axis=1)
    return mean, std


def _check_trials(
    scores: npt.ArrayLike, pairs: npt.ArrayLike, n_enroll: int, n_test: int
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.intp], npt.NDArray[np.intp]]:
    s = np.asarray(scores, dtype=np.float64)
    p = np.asarray(pairs)
    if s.ndim != 1:
        raise ValueError(f"scores must be 1-D (n_trials,), got shape {s.shape}")
    if p.ndim != 2 or p.shape[1] != 2 or p.shape[0] != s.shape[0]:
        raise ValueError(f"pairs must have shape (n_trials, 2) = ({s.shape[0]}, 2), got {p.shape}")
    if p.size and not np.issubdtype(p.dtype, np.integer):
        raise ValueError(f"pairs must hold integer row indices, got dtype {p.dtype}")
    ei = p[:, 0].astype(np.intp)
    ti = p[:, 1].astype(np.intp)
    if ei.size and (ei.min() < 0 or ei.max() >= n_enroll):
        raise ValueError(f"enrollment index out of range [0, {n_enroll})")
    if ti.size and (ti.min() < 0 or ti.max() >= n_test):
        raise ValueError(f"test index out of range [0, {n_test})")
    return s, ei, ti


def normalize_scores(
    scores: npt.ArrayLike,
    pairs: npt.ArrayLike,
    enroll_stats: tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]],
    test_stats: tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]],
) -> npt.NDArray[np.float64]:
    """Apply ``0.5 * ((s - mu_e) / std_e + (s - mu_t) / std_t)`` per trial.

    Args:
        scores: (n_trials,) raw cosine scores.
        pairs: (n_trials, 2) int rows: ``[enroll_row, test_row]``.
        enroll_stats, test_stats: ``(mean, std)`` per enrollment / test row, from
            :func:`cohort_stats`.

    Returns:
        (n_trials,) normalised scores (float64).
    """
    mu_e, sd_e = enroll_stats
    mu_t, sd_t = test_stats
    s, ei, ti = _check_trials(scores, pairs, len(mu_e), len(mu_t))
    if np.any(sd_e[ei] == 0) or np.any(sd_t[ti] == 0):
        raise ValueError("a cohort score std is 0 (degenerate cohort); cannot normalise")
    return 0.5 * ((s - mu_e[ei]) / sd_e[ei] + (s - mu_t[ti]) / sd_t[ti])


def snorm(
    scores: npt.ArrayLike,
    pairs: npt.ArrayLike,
    enroll: npt.ArrayLike,
    test: npt.ArrayLike,
    cohort: npt.ArrayLike,
) -> npt.NDArray[np.float64]:
    """Symmetric score normalisation against the whole cohort.

    Args:
        scores: (n_trials,) raw cosine scores of the trials.
        pairs: (n_trials, 2) int ``[enroll_row, test_row]`` into ``enroll`` / ``test``.
        enroll: (n_e, D) unique enrollment embeddings; test: (n_t, D); cohort: (n_c, D).

    Returns:
        (n_trials,) S-normalised scores.

    Example:
        >>> E = [[1.0, 0.0]]; T = [[0.0, 1.0]]; C = [[1.0, 0.0], [0.0, 1.0]]
        >>> snorm([0.0], [[0, 0]], E, T, C).tolist()  # mu = std = 0.5 on both sides
        [-1.0]
    """
    return normalize_scores(scores, pairs, cohort_stats(enroll, cohort), cohort_stats(test, cohort))


def asnorm(
    scores: npt.ArrayLike,
    pairs: npt.ArrayLike,
    enroll: npt.ArrayLike,
    test: npt.ArrayLike,
    cohort: npt.ArrayLike,
    top_n: int = 300,
) -> npt.NDArray[np.float64]:
    """Adaptive symmetric normalisation: stats of each side's ``top_n`` best cohort scores.

    Same shapes as :func:`snorm`; ``top_n`` is capped at the cohort size (then it equals
    S-norm).
    """
    return normalize_scores(
        scores,
        pairs,
        cohort_stats(enroll, cohort, top_n),
        cohort_stats(test, cohort, top_n),
    )


def speaker_mean_cohort(
    emb: npt.ArrayLike, spk_ids: Sequence[Hashable]
) -> tuple[list[Hashable], npt.NDArray[np.float64]]:
    """One cohort vector per speaker: the mean of its L2-normalised embeddings, re-normalised.

    Args:
        emb: (n, D) embeddings; spk_ids: (n,) speaker id of each row.

    Returns:
        ``(speakers, means)``: speakers in first-seen order, means (n_spk, D) unit-norm.
    """
    x = l2_normalize(emb)
    if len(spk_ids) != x.shape[0]:
        raise ValueError(f"{len(spk_ids)} speaker ids for {x.shape[0]} embeddings")
    index: dict[Hashable, int] = {}
    rows = np.fromiter((index.setdefault(s, len(index)) for s in spk_ids), np.intp, len(spk_ids))
    sums = np.zeros((len(index), x.shape[1]))
    np.add.at(sums, rows, x)
    return list(index), l2_normalize(sums)


def subtract_mean(emb: npt.ArrayLike, mean: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """``(emb - mean)`` re-normalised to unit length. emb (n, D), mean (D,) -> (n, D).

    The mean is usually that of a large cohort / training set (e.g. ``cohort.mean(axis=0)``).
    Scores must be recomputed from the returned embeddings.
    """
    x = np.asarray(emb, dtype=np.float64)
    m = np.asarray(mean, dtype=np.float64)
    if x.ndim != 2 or m.shape != (x.shape[1],):
        raise ValueError(f"expected emb (n, D) and mean (D,), got {x.shape} and {m.shape}")
    return l2_normalize(x - m)
