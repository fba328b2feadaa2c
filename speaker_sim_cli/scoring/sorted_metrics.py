"""The metrics of :func:`.metrics.evaluate` from the target and non-target scores kept apart and
sorted, walking the DET curve in blocks: the same numbers, bit for bit, in memory of the scores
alone (``evaluate`` holds five arrays as long as the list of distinct scores). numpy only.
"""

from __future__ import annotations

import math
import tempfile
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from .metrics import Metrics, _actual_dcf, _check_dcf_params, evaluate

# Up to this many trials the streamed scorer calls evaluate itself (about 40 bytes a trial);
# past it, the sorted twin below (the scores' own 8 bytes a trial).
EXACT_LIMIT = 4_000_000
BLOCK = 1 << 20


class ScoreCollector:
    """Scores of scored, labelled trials, kept per class as float arrays (no labels, no
    Python object per trial)."""

    def __init__(
        self, dtype: type = np.float64, targets: int | None = None, nontargets: int | None = None,
        capacity: int | None = None, spill: str | Path | None = None,
    ) -> None:  # fmt: skip
        """``targets`` / ``nontargets``: at most how many of each will come (a first pass
        counted them): one array each, filled in place, instead of chunks joined at the end
        (which would hold the scores twice). ``capacity``: about how many will come, classes
        unknown (a list read once): one array, targets filled from its start and non-targets
        from its end, so only what is filled takes memory; past it, chunks are joined.
        ``spill``: a folder where the scores are written as they come instead (two unnamed
        temp files, gone when closed or when the process dies), read back by
        :meth:`evaluate`: a scorer's vectors and the scores are then never in memory at once.
        """
        self.dtype = dtype
        self._spill: list[BinaryIO] | None = None
        if spill is not None:
            self._spill = [tempfile.TemporaryFile(dir=spill, prefix=".speaker-sim-scores.")  # noqa: SIM115 (closed by evaluate / close)
                           for _ in range(2)]  # fmt: skip
            targets = nontargets = capacity = None
        self._t: list[np.ndarray] = []
        self._n: list[np.ndarray] = []
        self._fixed = targets is not None and nontargets is not None
        if self._fixed:
            self._t = [np.empty(targets or 0, dtype)]
            self._n = [np.empty(nontargets or 0, dtype)]
        self._both: np.ndarray | None = None
        if capacity and not self._fixed:
            self._both = np.empty(capacity, dtype)
        self._fill = [0, 0]
        self.count = 0

    def add(self, scores: np.ndarray, labels: np.ndarray) -> None:
        s: np.ndarray = scores.astype(self.dtype, copy=False)
        is_t = labels == 1
        t, n = s[is_t], s[~is_t]
        if self._spill is not None:
            for f, part, k in ((self._spill[0], t, 0), (self._spill[1], n, 1)):
                f.write(np.ascontiguousarray(part).data)
                self._fill[k] += len(part)
            self.count += len(s)
            return
        b = self._both
        if b is not None and self._fill[0] + self._fill[1] + len(s) <= len(b):
            lo, hi = self._fill[0], len(b) - self._fill[1]
            b[lo : lo + len(t)] = t
            b[hi - len(n) : hi] = n
            self._fill[0] += len(t)
            self._fill[1] += len(n)
        else:
            for k, (parts, part) in enumerate(((self._t, t), (self._n, n))):
                if self._fixed:
                    lo = self._fill[k]
                    parts[0][lo : lo + len(part)] = part
                    self._fill[k] = lo + len(part)
                else:
                    parts.append(part)
        self.count += len(s)

    def _take(self, k: int) -> np.ndarray:
        if self._spill is not None:
            f = self._spill[k]
            f.seek(0)
            out: np.ndarray = np.fromfile(f, self.dtype, self._fill[k])
            f.close()
            if len(out) != self._fill[k]:
                raise OSError(f"spilled scores: {len(out)} of {self._fill[k]} read back")
            return out
        parts = self._t if k == 0 else self._n
        if self._fixed:
            return parts[0][: self._fill[k]]
        b = self._both
        if b is not None:
            mine = b[: self._fill[0]] if k == 0 else b[len(b) - self._fill[1] :]
            if not parts:
                return mine
            parts = [mine, *parts]
        return np.concatenate(parts) if parts else np.empty(0, self.dtype)

    def evaluate(
        self,
        p_targets: Iterable[float] = (0.01, 0.05),
        c_miss: float = 1.0,
        c_fa: float = 1.0,
        threshold: float | None = None,
    ) -> Metrics:
        """EER / minDCF as :func:`evaluate` gives them for these scores; the chunks are freed."""
        t, n = self._take(0), self._take(1)
        self._t, self._n, self._both, self._spill = [], [], None, None
        if len(t) + len(n) <= EXACT_LIMIT:
            labels = np.zeros(len(t) + len(n), dtype=np.int8)
            labels[: len(t)] = 1
            return evaluate(np.concatenate([t, n]), labels, p_targets, c_miss, c_fa, threshold)
        runs = _sort_in_two(t, n)
        return evaluate_sorted(t, runs, p_targets, c_miss, c_fa, threshold)

    def close(self) -> None:
        """Let go of the scores (and remove spilled ones) without evaluating them."""
        for f in self._spill or []:
            f.close()
        self._t, self._n, self._both, self._spill = [], [], None, None


def _sort_in_two(t: np.ndarray, n: np.ndarray) -> list[np.ndarray]:
    """Sort ``t`` in place, and ``n`` as two halves in place (the runs returned): two threads
    (numpy's sort releases the GIL) each sort about half of all the scores."""
    h = max(0, (len(n) - len(t)) // 2)
    a, b = n[:h], n[h:]

    def first() -> None:
        t.sort()
        a.sort()

    th = threading.Thread(target=first, name="speaker-sim-sort")
    th.start()
    try:
        b.sort()
    finally:
        th.join()
    return [a, b]


def evaluate_sorted(
    targets: np.ndarray | Sequence[np.ndarray],
    nontargets: np.ndarray | Sequence[np.ndarray],
    p_targets: Iterable[float] = (0.01, 0.05),
    c_miss: float = 1.0,
    c_fa: float = 1.0,
    threshold: float | None = None,
) -> Metrics:
    """:func:`evaluate` of ``targets`` (label 1) and ``nontargets`` (label 0), each sorted
    ascending, or each given as several sorted runs (e.g. the halves of an array that two
    threads sorted). Same definition, same floating-point operations, the same result."""
    ps = tuple(float(p) for p in p_targets)
    for p in ps:
        _check_dcf_params(p, c_miss, c_fa)
    T = [targets] if isinstance(targets, np.ndarray) else list(targets)
    N = [nontargets] if isinstance(nontargets, np.ndarray) else list(nontargets)
    n_t, n_n = sum(len(r) for r in T), sum(len(r) for r in N)
    if n_t + n_n == 0:
        raise ValueError("no trials: scores and labels are empty")
    bad = sum(int(np.count_nonzero(np.isnan(r))) for r in (*T, *N))
    if bad:
        raise ValueError(f"scores contain {bad} NaN value(s); drop or fix those trials first")
    if n_t == 0:
        raise ValueError("no target trials (label 1): EER and DCF are undefined")
    if n_n == 0:
        raise ValueError("no non-target trials (label 0): EER and DCF are undefined")
    c_def = {p: min(c_miss * p, c_fa * (1.0 - p)) for p in ps}
    best = {p: (math.inf, 0.0) for p in ps}  # cost, threshold
    eer: float | None = None
    eer_thr = 0.0
    prev: tuple[float, float] | None = None  # (fnr, fpr) of the last point of the last block
    runs = [*T, *N]
    pos = [0] * len(runs)
    blocks: list[tuple[list[np.ndarray], int, int, int]] = []  # parts, targets, ti, ni
    ti = ni = 0  # targets / non-targets at or below the last block's largest score
    while any(p < len(r) for p, r in zip(pos, runs)):
        # Every score up to ub, from every run: at most BLOCK from each, all of a tie at once.
        ub = min(r[min(p + BLOCK, len(r)) - 1] for p, r in zip(pos, runs) if p < len(r))
        parts = []
        for k, r in enumerate(runs):
            j = int(np.searchsorted(r, ub, side="right"))
            parts.append(r[pos[k] : j])
            pos[k] = j
        n_tb = sum(len(x) for x in parts[: len(T)])
        blocks.append((parts, n_tb, ti, ni))
        ti += n_tb
        ni += sum(len(x) for x in parts) - n_tb

    def walk(i: int) -> _Block:
        parts, n_tb, ti, ni = blocks[i]
        return _walk_block(parts, n_tb, ti, ni, n_t, n_n, i == 0, ps, c_miss, c_fa)

    # The blocks are walked by two threads (numpy releases the GIL), their results joined in
    # order: the same points, the same first crossing, the same first minimum.
    with ThreadPoolExecutor(2, thread_name_prefix="speaker-sim-det") as pool:
        done = list(pool.map(walk, range(len(blocks))))
    for b in done:
        if eer is None and b.hit is not None:
            f1, d1, thr1, before = b.hit
            if before is None:
                assert prev is not None
                before = prev
            f2, p2 = before
            d2 = float(f2 - p2)
            a = d1 / (d1 - d2)
            eer = float(f1 + a * (f2 - f1))
            eer_thr = thr1
        for p in ps:
            if b.best[p][0] < best[p][0]:
                best[p] = b.best[p]
        prev = b.last
    assert eer is not None  # the reject-all point has fnr 1 >= fpr 0
    far = frr = None
    actual: dict[float, float] | None = None
    if threshold is not None:
        if math.isnan(threshold):
            raise ValueError("threshold is NaN")
        tgt_acc = n_t - sum(int(np.searchsorted(r, threshold, side="right")) for r in T)
        non_acc = n_n - sum(int(np.searchsorted(r, threshold, side="right")) for r in N)
        far, frr = non_acc / n_n, (n_t - tgt_acc) / n_t
        actual = _actual_dcf(ps, c_miss, c_fa, far, frr)
    return Metrics(
        eer=eer,
        eer_threshold=eer_thr,
        min_dcf={p: best[p][0] / c_def[p] for p in ps},
        min_dcf_threshold={p: best[p][1] for p in ps},
        n_targets=n_t,
        n_nontargets=n_n,
        c_miss=float(c_miss),
        c_fa=float(c_fa),
        threshold=None if threshold is None else float(threshold),
        far=far,
        frr=frr,
        actual_dcf=actual,
    )


@dataclass
class _Block:
    """What one block of the DET walk gives: its first point at or past the EER crossing (fnr,
    fnr - fpr, threshold, the point before it or None when that is the last block's last),
    each p's lowest cost and its threshold, and its last point."""

    hit: tuple[Any, float, float, tuple[Any, Any] | None] | None
    best: dict[float, tuple[float, float]]
    last: tuple[Any, Any]


def _walk_block(
    parts: list[np.ndarray], n_tb: int, ti: int, ni: int, n_t: int, n_n: int, first: bool,
    ps: tuple[float, ...], c_miss: float, c_fa: float,
) -> _Block:  # fmt: skip
    """One block of :func:`evaluate_sorted`'s walk: ``parts`` are the sorted runs' scores in
    it, targets' first (``n_tb`` of them); ``ti`` / ``ni`` targets / non-targets lie below."""
    # The sorted runs merged (a stable sort of sorted runs is a merge), each score's class
    # kept by its place in the concatenation; the curve's points are the last of each tie.
    both = np.concatenate(parts)
    order = np.argsort(both, kind="stable")
    merged = both[order]
    last = np.empty(len(merged), dtype=bool)
    np.not_equal(merged[1:], merged[:-1], out=last[:-1])
    last[-1] = True
    ends = np.flatnonzero(last)
    is_t = np.cumsum(order < n_tb)[ends]
    vals = merged[ends]
    tgt_le = ti + is_t
    non_le = ni + (ends + 1 - is_t)
    del both, order, merged, last, ends, is_t
    k0 = 1 if first else 0  # the accept-all point opens the first block
    m = len(vals) + k0
    fnr = np.empty(m, dtype=np.float64)
    fpr = np.empty(m, dtype=np.float64)
    thr = np.empty(m, dtype=np.float64)
    if first:
        fnr[0], fpr[0], thr[0] = 0.0, 1.0, -math.inf
    np.divide(tgt_le, n_t, out=fnr[k0:])
    np.divide(non_le, n_n, out=fpr[k0:])
    np.subtract(1.0, fpr[k0:], out=fpr[k0:])
    thr[k0:] = vals
    hit = None
    diff = fnr - fpr
    crossed = diff >= 0
    if crossed.any():
        x1 = int(np.argmax(crossed))
        before = (fnr[x1 - 1], fpr[x1 - 1]) if x1 > 0 else None
        hit = (fnr[x1], float(diff[x1]), float(thr[x1]), before)
    best = {}
    for p in ps:
        cost = fnr * (c_miss * p)
        cost += fpr * (c_fa * (1.0 - p))
        k = int(np.argmin(cost))
        best[p] = (float(cost[k]), float(thr[k]))
    return _Block(hit, best, (fnr[-1], fpr[-1]))
