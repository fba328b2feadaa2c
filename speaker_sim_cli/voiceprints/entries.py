"""The library's value types (what a model is, one recording to enrol, one speaker row, what an
enrolment did) and the voiceprint rule: how a speaker's voiceprint is made from its embeddings.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: unit-mean: unit length of the mean of unit-length embeddings (the default);
#: raw-mean: unit length of the mean of raw embeddings (mvector's ``recognition``).
RULES = ("unit-mean", "raw-mean")


@dataclass(frozen=True)
class ModelInfo:
    """What a library's vectors came from: they are comparable only under the same four."""

    model: str
    checkpoint_sha256: str
    frontend: dict[str, Any]
    dim: int

    @classmethod
    def of(cls, ingredients: dict[str, Any], dim: int) -> ModelInfo:
        """From :meth:`pipeline.Extractor.ingredients` and its dimension."""
        return cls(
            ingredients["model"], ingredients["checkpoint_sha256"], ingredients["frontend"], dim
        )

    def describe(self) -> str:
        fe = json.dumps(self.frontend, sort_keys=True)
        return f"{self.model} (checkpoint sha256 {self.checkpoint_sha256[:12]}, {self.dim}-dim, front end {fe})"  # noqa: E501

    def differences(self, other: ModelInfo) -> list[str]:
        out = []
        if self.model != other.model:
            out.append("model")
        if self.checkpoint_sha256 != other.checkpoint_sha256:
            out.append("checkpoint")
        if self.frontend != other.frontend:
            out.append("front end")
        if self.dim != other.dim:
            out.append("dimension")
        return out


@dataclass(frozen=True)
class Enrolment:
    """One recording to add: its speaker, content sha256, path as given, raw embedding (D,);
    optionally its net speech seconds (counted towards a complete enrolment) and its audio
    bytes (kept only when the login service runs with ``--retain-audio``)."""

    speaker: str
    sha256: str
    path: str
    embedding: np.ndarray
    seconds: float | None = None
    audio: bytes | None = None


@dataclass
class AddReport:
    """What one enrolment transaction did."""

    added: list[Enrolment] = field(default_factory=list)
    #: (the enrolment, the path already enrolled with that content for that speaker)
    duplicates: list[tuple[Enrolment, str]] = field(default_factory=list)
    new_speakers: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class SpeakerRow:
    name: str
    recordings: int
    enrolled: str
    #: When the speaker was last enrolled, verified or identified (None: never since).
    last_seen: str | None = None
    #: Net speech enrolled through the login service (None: enrolled by other means).
    speech_seconds: float | None = None


def voiceprint(embeddings: np.ndarray, rule: str = "unit-mean") -> np.ndarray:
    """A speaker's voiceprint from its recordings' raw embeddings ``(n, D)``: float32 ``(D,)``,
    unit length.

    ``unit-mean`` (default) averages unit-length embeddings, so every recording counts the same
    whatever its embedding's norm (which varies with duration and loudness and means nothing
    to cosine scoring), and the result is the direction closest on average (in cosine) to the
    speaker's recordings. ``raw-mean`` averages raw embeddings, as mvector does.

    >>> voiceprint(np.array([[3.0, 0.0], [0.0, 1.0]])).round(4)
    array([0.7071, 0.7071], dtype=float32)
    >>> voiceprint(np.array([[3.0, 0.0], [0.0, 1.0]]), "raw-mean").round(4)
    array([0.9487, 0.3162], dtype=float32)
    """
    e = np.asarray(embeddings)
    return voiceprints(e, np.zeros(len(e), dtype=np.int64), 1, rule)[0]


def voiceprints(
    embeddings: np.ndarray, group: np.ndarray, n_groups: int, rule: str = "unit-mean"
) -> np.ndarray:
    """:func:`voiceprint` of each group at once: rows ``embeddings[group == g]`` give row g of
    the ``(n_groups, D)`` float32 result (the definition lives here)."""
    e = np.asarray(embeddings, dtype=np.float64)
    if rule == "unit-mean":
        e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    elif rule != "raw-mean":
        raise ValueError(f"unknown voiceprint rule {rule!r}: use one of {', '.join(RULES)}")
    sums = np.zeros((n_groups, e.shape[1]), dtype=np.float64)
    np.add.at(sums, group, e)
    # The mean's direction is the sum's: unit length of the sum is unit length of the mean.
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    return (sums / np.maximum(norms, 1e-12)).astype(np.float32)


def _chunks(xs: list[Any], n: int) -> Iterator[list[Any]]:
    for i in range(0, len(xs), n):
        yield xs[i : i + n]


def _blob(v: np.ndarray) -> bytes:
    """A vector as the library stores it: little-endian float32 bytes."""
    return np.ascontiguousarray(v, dtype="<f4").tobytes()
