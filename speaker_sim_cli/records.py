"""Plain records passed between layers."""

from __future__ import annotations

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


@dataclass
class EmbedResult:
    """Embeddings by resolved path, failures by resolved path, and what it took."""

    embeddings: dict[str, np.ndarray]
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
