"""Plain records passed between layers."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Recording:
    """One audio file to embed: ``key`` as the user wrote it, ``path`` the file read."""

    key: str
    path: Path

    def to_dict(self) -> dict[str, str]:
        return {"key": self.key, "path": str(self.path)}


class RowEmbeddings(Mapping[str, np.ndarray]):
    """Embeddings by path held as one matrix: row ``i`` is ``paths[i]``'s where ``have[i]``.
    What a run over millions of recordings hands back without a Python object per vector; a
    read-only mapping like the dict it stands for (its path index is built on first use)."""

    def __init__(self, paths: Sequence[str], matrix: np.ndarray, have: np.ndarray) -> None:
        self.paths, self.matrix, self.have = paths, matrix, have
        self._ix: dict[str, int] | None = None

    def _index(self) -> dict[str, int]:
        if self._ix is None:
            self._ix = dict(zip(self.paths, range(len(self.paths)), strict=True))
        return self._ix

    def __getitem__(self, path: str) -> np.ndarray:
        i = self._index().get(path)
        if i is None or not self.have[i]:
            raise KeyError(path)
        return self.matrix[i]

    def __contains__(self, path: object) -> bool:
        i = self._index().get(path) if isinstance(path, str) else None
        return i is not None and bool(self.have[i])

    def __iter__(self) -> Iterator[str]:
        return (self.paths[i] for i in np.flatnonzero(self.have).tolist())

    def __len__(self) -> int:
        return int(np.count_nonzero(self.have))


@dataclass
class EmbedResult:
    """Embeddings by resolved path, failures by resolved path, and what it took."""

    embeddings: Mapping[str, np.ndarray]
    failures: dict[str, str]
    embedded: int = 0
    cached: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class Failure:
    """A recording that could not be embedded, and why."""

    key: str
    path: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass
class TrialList:
    """Trials in input order. ``labels`` is int8 (1 target, 0 non-target) or None."""

    enroll: list[str]
    test: list[str]
    labels: np.ndarray | None
    source: str
    format: str
    line_numbers: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.enroll)

    def items(self) -> list[str]:
        """Unique items (paths or utterance ids) in first-seen order."""
        return list(dict.fromkeys(chain.from_iterable(zip(self.enroll, self.test))))

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"source": self.source, "format": self.format, "trials": len(self)}
        if self.labels is not None:
            out["targets"] = int(self.labels.sum())
            out["nontargets"] = int(len(self.labels) - self.labels.sum())
        return out
