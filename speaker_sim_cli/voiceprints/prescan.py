"""Exact cosine top-k that streams a quarter of the bytes: an int8 scan of the voiceprints
(torch's quantised linear kernel), then an exact re-rank of every row the scan cannot rule out.

Exact by construction, not by luck: each int8 score is within a proven bound ``B`` of the true
dot product (the voiceprint's quantisation error, measured per row when the copy is made, plus
the worst case of the query's dynamic quantisation), so a row whose int8 score is more than
``2B`` below the k-th best int8 score cannot be in the true top k. Every other row is re-scored
in float64 from the float32 voiceprints, and the k best are returned (ties to the lower index),
as :func:`~speaker_sim_cli.voiceprints.search.exact_top_k` would.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

#: Queries scanned at once (int8 scores held: chunk x rows float32).
QUERY_CHUNK = 16
#: Beyond this share of the library left to re-rank, the plain exact scan is cheaper.
MAX_CANDIDATE_SHARE = 0.05
#: Rounding of the kernel's float32 output (integer accumulation is exact), generously.
SLACK = 1e-4


def available() -> bool:
    """Whether this torch has a CPU quantised linear kernel (fbgemm / x86)."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return False
    return bool({"fbgemm", "x86"} & set(torch.backends.quantized.supported_engines))


class Int8Prescan:
    """An int8 copy (per-row scale) of unit voiceprints, ``matrix`` (S, D) float32 kept by the
    caller for the re-rank; 1 byte per element instead of 4."""

    def __init__(self, matrix: np.ndarray) -> None:
        import torch

        self.matrix = matrix
        s, d = matrix.shape
        self.dim = d
        amax = np.abs(matrix).max(axis=1) if s else np.zeros(0, np.float32)
        scale = np.maximum(amax / np.float32(127.0), np.float32(1e-12)).astype(np.float32)
        inv = np.float32(1.0) / scale
        q = np.empty((s, d), dtype=np.int8)
        err = np.zeros(1, dtype=np.float64)
        step = 1 << 16
        for start in range(0, s, step):  # in blocks: no (S, D) temporaries
            sl = slice(start, start + step)
            q[sl] = np.clip(np.rint(matrix[sl] * inv[sl, None]), -127, 127).astype(np.int8)
            # ||dequantised - original|| per row, in float64, as the kernel will see the row.
            deq = q[sl].astype(np.float64) * scale[sl, None].astype(np.float64)
            dif = deq - matrix[sl]
            err = np.maximum(err, np.sqrt(np.einsum("ij,ij->i", dif, dif)).max(initial=0.0))
        self.row_err = float(err[0])
        with warnings.catch_warnings():  # torch deprecates quantised tensors (kernel kept)
            warnings.simplefilter("ignore")
            qt = torch._make_per_channel_quantized_tensor(
                torch.from_numpy(q),
                torch.from_numpy(scale.astype(np.float64)),
                torch.zeros(s, dtype=torch.long),
                0,
            )
            self._packed: Any = torch.ops.quantized.linear_prepack(qt, None)

    def bound(self, q: np.ndarray) -> np.ndarray:
        """Per query (B,), the most an int8 score can differ from the true dot product.

        |q'.w' - q.w| <= |q' - q| |w'| + |q| |w' - w|, with |w' - w| <= row_err, |w'| <= 1 +
        row_err, and |q' - q| <= sqrt(D) * step (the kernel's uint8 query grid spans the
        query's range and 0 in >= 127 steps; an element is off by at most one step).
        """
        lo = np.minimum(q.min(axis=1), 0.0).astype(np.float64)
        hi = np.maximum(q.max(axis=1), 0.0).astype(np.float64)
        qerr = np.sqrt(self.dim) * (hi - lo) / 127.0
        qnorm = np.linalg.norm(q.astype(np.float64), axis=1)
        return qerr * (1.0 + self.row_err) + qnorm * self.row_err + SLACK

    def scores(self, q: np.ndarray) -> np.ndarray:
        """Int8 scores (B, S) float32 of unit queries ``q`` (B, D)."""
        import torch

        with torch.inference_mode():
            out = torch.ops.quantized.linear_dynamic(torch.from_numpy(q), self._packed, True)
        return np.asarray(out.numpy())

    def top_k(
        self, queries: np.ndarray, k: int, max_share: float = MAX_CANDIDATE_SHARE
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """Like ``exact_top_k`` (same rows, same order); ``None`` where a query leaves more
        than ``max_share`` of the rows to re-rank (the caller then scans exactly)."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        b, s = len(q), len(self.matrix)
        k = min(int(k), s)
        if k < 1 or b == 0:
            return np.zeros((b, 0), np.int64), np.zeros((b, 0), np.float32)
        limit = max(4 * k, int(max_share * s))
        best_i = np.empty((b, k), np.int64)
        best_s = np.empty((b, k), np.float32)
        bounds = self.bound(q)
        for c0 in range(0, b, QUERY_CHUNK):
            approx = self.scores(q[c0 : c0 + QUERY_CHUNK])
            for j, row in enumerate(approx):
                qi = c0 + j
                kth = np.partition(row, s - k)[s - k]
                cand = np.flatnonzero(row >= kth - 2.0 * bounds[qi])
                if len(cand) > limit:
                    return None
                exact = self.matrix[cand].astype(np.float64) @ q[qi].astype(np.float64)
                sc32 = exact.astype(np.float32)  # the true score, correctly rounded
                order = np.lexsort((cand, -sc32))[:k]
                best_i[qi] = cand[order]
                best_s[qi] = sc32[order]
        return best_i, best_s
