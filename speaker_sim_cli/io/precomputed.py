"""Embeddings computed earlier, scored like fresh ones: ``score --embeddings SRC``.

``SRC`` is what ``speaker-sim embed`` writes (a folder with ``embeddings.npy`` + ``index.csv``,
or ``xvector.scp`` + ``xvector.ark``), or a Kaldi / WeSpeaker ``xvector.scp`` from elsewhere.
Trial items are looked up by key (the index's ``key`` column, or the scp's first field), never
by file name. An item with no vector fails its trials with a reason, as a bad recording does.
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UsageError
from ..records import EmbedResult
from .kaldi_vectors import read_kaldi_vectors
from .trials import read_text

__all__ = ["PrecomputedEmbeddings"]


class PrecomputedEmbeddings:
    """Vectors by key, with the ``embed_paths`` of an Extractor (nothing is embedded)."""

    def __init__(self, vectors: dict[str, np.ndarray], source: Path, fmt: str) -> None:
        dims = {v.shape for v in vectors.values()}
        if len(dims) > 1:
            raise UsageError(f"{source}: vectors of different sizes {sorted(dims)}")
        if not vectors:
            raise UsageError(f"{source}: no embeddings in it")
        self.vectors = vectors
        self.source = source
        self.format = fmt
        self.dim = int(next(iter(dims))[0])
        meta = (source if source.is_dir() else source.parent) / "model.json"
        self.model: dict[str, Any] | None = None
        if meta.is_file():
            try:
                self.model = json.loads(meta.read_text())
            except (OSError, ValueError):
                self.model = None

    @classmethod
    def load(cls, src: str | Path) -> PrecomputedEmbeddings:
        p = Path(src)
        if not p.exists():
            raise UsageError(f"--embeddings {p}: not found")
        if p.is_dir():
            if (p / "embeddings.npy").is_file():
                return cls(_read_npy_folder(p), p, "npy")
            if (p / "xvector.scp").is_file():
                return cls(_read_scp(p / "xvector.scp"), p, "kaldi")
            raise UsageError(
                f"--embeddings {p}: no embeddings.npy + index.csv or xvector.scp in the folder "
                "(write one with speaker-sim embed)"
            )
        return cls(_read_scp(p), p, "kaldi")

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "embeddings": str(self.source),
            "format": self.format,
            "entries": len(self.vectors),
            "dim": self.dim,
        }
        if self.model is not None:
            out["model"] = self.model
        return out

    def embed_paths(
        self,
        paths: Sequence[str | Path],
        progress: Callable[[int, float], None] | None = None,
        on_start: Callable[[int, float], None] | None = None,
        stop_on_error: bool = False,
    ) -> EmbedResult:
        t0 = time.perf_counter()
        found: dict[str, np.ndarray] = {}
        failures: dict[str, str] = {}
        for p in dict.fromkeys(str(x) for x in paths):
            v = self.vectors.get(p)
            if v is None:
                failures[p] = f"no embedding with this key in {self.source}"
            else:
                found[p] = v
        return EmbedResult(found, failures, 0, len(found), time.perf_counter() - t0)


def _read_npy_folder(folder: Path) -> dict[str, np.ndarray]:
    index = folder / "index.csv"
    if not index.is_file():
        raise UsageError(f"{folder}: embeddings.npy without index.csv")
    try:
        mat = np.load(folder / "embeddings.npy", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise UsageError(f"{folder / 'embeddings.npy'}: cannot read ({exc})") from None
    rows = list(csv.reader(io.StringIO(read_text(index))))
    if not rows or [h.strip() for h in rows[0][:1]] != ["key"]:
        raise UsageError(f"{index}:1: expected a header starting with 'key'")
    keys = [r[0] for r in rows[1:] if r]
    if mat.ndim != 2 or len(keys) != mat.shape[0]:
        raise UsageError(f"{folder}: {len(keys)} keys in index.csv for a matrix of {mat.shape}")
    out: dict[str, np.ndarray] = {}
    for i, k in enumerate(keys):
        if k in out:
            raise UsageError(f"{index}:{i + 2}: key {k!r} appears twice")
        out[k] = np.asarray(mat[i], dtype=np.float32)
    return out


def _read_scp(scp: Path) -> dict[str, np.ndarray]:
    try:
        return read_kaldi_vectors(scp)
    except (OSError, ValueError) as exc:
        raise UsageError(f"{scp}: cannot read Kaldi vectors ({exc})") from None
