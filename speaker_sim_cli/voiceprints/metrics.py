"""Identification figures from ranked answers and true speakers (numpy only).

Closed set (queries whose true speaker is enrolled): top-1 and top-k accuracy. Open set (the
ISO/IEC 19795-1 and NIST reading): at a threshold t, the detection-and-identification rate
DIR(t) is the fraction of enrolled-speaker queries whose best candidate is right *and* scores
>= t; the false-alarm rate FAR(t) is the fraction of queries from speakers not enrolled whose
best score is >= t. With n such queries FAR moves in steps of 1/n, so DIR is reported at FAR 0
and at the usual rates that are at least 1/n.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

FAR_POINTS = (0.001, 0.01, 0.05, 0.1)


def identification_metrics(
    ranked: Sequence[Sequence[str]],
    best_scores: Sequence[float],
    truth: Sequence[str],
    enrolled: set[str],
    threshold: float | None = None,
) -> dict[str, Any]:
    """Figures for queries with candidates ``ranked`` (best first), the best candidate's score
    and the true speaker of each.

    >>> m = identification_metrics([["a", "b"], ["b", "a"], ["a", "b"]], [0.8, 0.3, 0.5],
    ...                            ["a", "a", "zed"], {"a", "b"}, threshold=0.4)
    >>> m["top1_accuracy"], m["topk_accuracy"], m["open_set"]["far"], m["open_set"]["dir"]
    (0.5, 1.0, 1.0, 0.5)
    >>> [(p["far"], p["dir"]) for p in m["open_set"]["dir_at_far"]]
    [(0.0, 0.5)]
    """
    ranked = [list(r) for r in ranked]
    best = np.asarray(best_scores, dtype=np.float64)
    known = np.array([t in enrolled for t in truth], dtype=bool)
    correct1 = np.array([bool(r) and r[0] == t for r, t in zip(ranked, truth)], dtype=bool)
    in_k = np.array([t in r for r, t in zip(ranked, truth)], dtype=bool)
    k = max((len(r) for r in ranked), default=0)
    n_known, n_unknown = int(known.sum()), int((~known).sum())
    out: dict[str, Any] = {
        "queries": len(truth),
        "enrolled_speaker_queries": n_known,
        "unknown_speaker_queries": n_unknown,
        "k": k,
        "top1_accuracy": float(correct1[known].mean()) if n_known else None,
        "topk_accuracy": float(in_k[known].mean()) if n_known else None,
    }
    open_set: dict[str, Any] = {"threshold": threshold}
    if threshold is not None:
        accept = best >= threshold
        open_set["dir"] = float((correct1 & accept)[known].mean()) if n_known else None
        open_set["far"] = float(accept[~known].mean()) if n_unknown else None
        # Of the enrolled-speaker queries, how many the threshold turned away as unknown.
        open_set["rejected_known"] = float((~accept)[known].mean()) if n_known else None
    points = []
    if n_known and n_unknown:
        imp = np.sort(best[~known])[::-1]  # unknown queries' best scores, high first
        for far in (0.0, *FAR_POINTS):
            if far and far * n_unknown < 1:
                continue
            allowed = int(np.floor(far * n_unknown + 1e-9))  # false alarms allowed
            # Accept strictly above the (allowed+1)-th highest impostor score.
            t = float(imp[allowed]) if allowed < n_unknown else -np.inf
            ok = correct1 & (best > t)
            points.append(
                {"far": allowed / n_unknown, "threshold": t, "dir": float(ok[known].mean())}
            )
    open_set["dir_at_far"] = points
    out["open_set"] = open_set
    return out
