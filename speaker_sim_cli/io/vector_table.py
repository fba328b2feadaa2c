"""Precomputed embeddings as one key column and one matrix, for streamed scoring at corpus
scale: an ``embed`` folder's ``embeddings.npy`` (memory-mapped) and ``index.csv`` (read by
Arrow), with no Python object per vector. numpy / pyarrow only.

This is the seam the sharded embedding store plugs into: anything that gives ``keys`` (an
Arrow string array) and ``matrix`` (rows in the same order) can feed the streamed scorer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import UsageError


@dataclass
class KeyedMatrix:
    """``matrix[i]`` is the vector of ``keys[i]``; ``describe`` is PrecomputedEmbeddings'."""

    keys: pa.Array
    matrix: np.ndarray
    source: Path
    model: dict[str, Any] | None = None

    @property
    def dim(self) -> int:
        return int(self.matrix.shape[1])

    def release(self) -> None:
        """Drop the matrix (unmap the file) once scoring is done; describe() still works."""
        self.matrix = np.empty((0, self.dim), self.matrix.dtype)

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"embeddings": str(self.source), "format": "npy",
                               "entries": len(self.keys), "dim": self.dim}  # fmt: skip
        if self.model is not None:
            out["model"] = self.model
        return out

    def reason(self) -> str:
        return f"no embedding with this key in {self.source}"


def is_npy_folder(src: Path) -> bool:
    return src.is_dir() and (src / "embeddings.npy").is_file()


def load_npy_folder(folder: Path) -> KeyedMatrix:
    """The folder's keys and memory-mapped matrix; the same checks and messages as
    :class:`.precomputed.PrecomputedEmbeddings` (one header ``key``, one key per row, no key
    twice)."""
    import pyarrow.csv as pacsv

    index = folder / "index.csv"
    if not index.is_file():
        raise UsageError(f"{folder}: embeddings.npy without index.csv")
    try:
        mat = np.load(folder / "embeddings.npy", mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise UsageError(f"{folder / 'embeddings.npy'}: cannot read ({exc})") from None
    try:
        tab = pacsv.read_csv(index, convert_options=pacsv.ConvertOptions(
            column_types={"key": pa.string()}, strings_can_be_null=False))  # fmt: skip
    except (pa.ArrowException, OSError):
        tab = None
    if tab is None or not tab.column_names or tab.column_names[0].strip() != "key":
        from .precomputed import _read_npy_folder

        _read_npy_folder(folder)  # its message names the problem
        raise UsageError(f"{index}:1: expected a header starting with 'key'")
    keys = tab.column(0).combine_chunks().cast(pa.string())
    if mat.ndim != 2 or len(keys) != mat.shape[0]:
        raise UsageError(f"{folder}: {len(keys)} keys in index.csv for a matrix of {mat.shape}")
    if len(pc.unique(keys)) != len(keys):
        seen: set[str] = set()
        for i, k in enumerate(keys.to_pylist()):
            if k in seen:
                raise UsageError(f"{index}:{i + 2}: key {k!r} appears twice")
            seen.add(k)
    model = None
    meta = folder / "model.json"
    if meta.is_file():
        try:
            model = json.loads(meta.read_text())
        except (OSError, ValueError):
            model = None
    if mat.dtype != np.float32:  # as PrecomputedEmbeddings reads them
        mat = np.asarray(mat, dtype=np.float32)
    return KeyedMatrix(keys, mat, folder, model)
