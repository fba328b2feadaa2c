"""Cosine top-k of queries against voiceprints: exact (numpy, in blocks), or an optional ANN
index (faiss-cpu, the ``speaker-sim[ann]`` extra).

Both take unit-length float32 rows, so cosine is a dot product. The exact search multiplies
the queries by one block of voiceprints at a time (at most ``block_elems`` scores in memory),
and keeps each query's k best: after the first block only scores above a query's current k-th
best are looked at, so the cost is the matrix product plus one comparison per score.
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: Scores held at once by the exact search (float32): 4 M = 16 MB.
BLOCK_ELEMS = 1 << 22


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length, float32 ``(N, D)``; zero rows stay zero."""
    x = np.atleast_2d(np.asarray(x, dtype=np.float32))
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(n, 1e-12)


def exact_top_k(
    queries: np.ndarray, matrix: np.ndarray, k: int, block_elems: int = BLOCK_ELEMS
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` rows of ``matrix`` (S, D) with the largest dot product with each query (B, D).

    Returns ``(index (B, k') int64, score (B, k') float32)`` with k' = min(k, S), best first;
    ties go to the lower index.

    >>> m = np.eye(4, dtype=np.float32)
    >>> q = np.array([[0.1, 0.9, 0.3, 0.0]], dtype=np.float32)
    >>> idx, sc = exact_top_k(q, m, 2, block_elems=2)   # blocks of 2 rows
    >>> idx.tolist(), [round(float(x), 2) for x in sc[0]]
    ([[1, 2]], [0.9, 0.3])
    """
    q = np.ascontiguousarray(queries, dtype=np.float32)
    b, s = len(q), len(matrix)
    k = min(int(k), s)
    if k < 1 or b == 0:
        return np.zeros((b, 0), np.int64), np.zeros((b, 0), np.float32)
    block = max(k, min(s, block_elems // max(b, 1)))
    best_s = np.full((b, k), -np.inf, dtype=np.float32)
    best_i = np.full((b, k), -1, dtype=np.int64)
    rows_all = np.repeat(np.arange(b), k)
    for start in range(0, s, block):
        sims = q @ matrix[start : start + block].T  # (B, block)
        floor = best_s[:, -1]  # kept sorted: the k-th best so far
        hit = sims > floor[:, None] if start else None
        n_hit = int(np.count_nonzero(hit)) if hit is not None else sims.size
        if n_hit == 0:
            continue
        if n_hit > 4 * b * k and sims.shape[1] > k:
            # Many candidates (the first block): only those at or above each row's k-th best
            # in this block (ties included, so the lower index can win below).
            col = sims.shape[1] - k
            kth = np.partition(sims, col, axis=1)[:, col]
            mask = sims >= kth[:, None]
            if hit is not None:
                mask &= hit
            c_rows, c_cols = np.nonzero(mask)
        elif hit is None:
            c_rows, c_cols = np.divmod(np.arange(sims.size), sims.shape[1])
        else:
            c_rows, c_cols = np.nonzero(hit)
        cand_s = sims[c_rows, c_cols]
        all_r = np.concatenate([rows_all, c_rows])
        all_s = np.concatenate([best_s.ravel(), cand_s])
        all_i = np.concatenate([best_i.ravel(), c_cols.astype(np.int64) + start])
        # Sort by row, then score (high first), then index (low first); keep k per row.
        order = np.lexsort((all_i, -all_s, all_r))
        counts = np.bincount(all_r, minlength=b)
        starts = np.cumsum(counts) - counts
        rank = np.arange(len(order)) - np.repeat(starts, counts)
        keep = order[rank < k]
        best_s = all_s[keep].reshape(b, k)
        best_i = all_i[keep].reshape(b, k)
    return best_i, best_s


class AnnIndex:
    """An inverted-file index (faiss ``IndexIVFFlat``, inner product) over unit rows.

    Approximate: a query looks only at the ``nprobe`` lists whose centroids are closest to it
    (default 128 of ~sqrt(N) lists: at 1 M random 192-d voiceprints, 94 % of identify-like
    queries get exact search's best speaker, at ~1/10 of its single-query cost; 32 lists: 71 %,
    256: 99 %; see benchmarks/bench_voiceprints.py).
    Built from the library's voiceprints; serialised into the library with the generation it
    was built from, so a stale index is never used.
    """

    kind = "faiss-ivfflat"

    def __init__(self, index: Any, params: dict[str, Any]) -> None:
        self.index = index
        self.params = params

    @staticmethod
    def _faiss() -> Any:
        try:
            import faiss
        except ImportError:
            from ..errors import UsageError

            raise UsageError(
                "the ANN index needs faiss-cpu: pip install 'speaker-sim[ann]' "
                "(exact search needs nothing)"
            ) from None
        return faiss

    @classmethod
    def build(
        cls, matrix: np.ndarray, nlist: int | None = None, nprobe: int = 128, seed: int = 0
    ) -> AnnIndex:
        faiss = cls._faiss()
        s, d = matrix.shape
        if nlist is None:
            nlist = int(max(1, min(4096, round(np.sqrt(s)))))
        nlist = max(1, min(nlist, s))
        quant = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quant, d, nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(seed)
        n_train = min(s, 40 * nlist)
        train = matrix[np.sort(rng.choice(s, n_train, replace=False))] if n_train < s else matrix
        index.cp.seed = seed
        index.train(np.ascontiguousarray(train, dtype=np.float32))
        for start in range(0, s, 1 << 18):
            index.add(np.ascontiguousarray(matrix[start : start + (1 << 18)], dtype=np.float32))
        index.nprobe = min(nprobe, nlist)
        return cls(index, {"nlist": nlist, "nprobe": index.nprobe, "rows": s})

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Like :func:`exact_top_k`; index -1 (score -inf) where fewer than k were found."""
        k = min(int(k), int(self.index.ntotal))
        if k < 1:
            b = len(queries)
            return np.zeros((b, 0), np.int64), np.zeros((b, 0), np.float32)
        sc, idx = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        sc = np.where(idx < 0, -np.inf, sc).astype(np.float32)
        return idx.astype(np.int64), sc

    def to_bytes(self) -> bytes:
        return bytes(self._faiss().serialize_index(self.index).tobytes())

    @classmethod
    def from_bytes(cls, blob: bytes, params: dict[str, Any]) -> AnnIndex:
        faiss = cls._faiss()
        index = faiss.deserialize_index(np.frombuffer(blob, dtype=np.uint8))
        index.nprobe = int(params.get("nprobe", 128))
        return cls(index, params)


def recall_at_k(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean fraction of each exact top-k row found in the approximate top-k row.

    >>> recall_at_k(np.array([[1, 2], [3, 9]]), np.array([[2, 1], [3, 4]]))
    0.75
    """
    k = exact.shape[1]
    if k == 0 or len(exact) == 0:
        return 1.0
    hits = sum(len(set(a.tolist()) & set(e.tolist())) for a, e in zip(approx, exact))
    return hits / (k * len(exact))
