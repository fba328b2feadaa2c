"""The embedding stage of a scoring job: every trial item (a recording, or an enrolment
speaker of an enroll map) to one vector, each unique recording embedded once, with the reason
for every item that has none. Its output is the lookup the scoring stage reads."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from ..io.storage import as_url
from ..pipeline import EmbeddingSource
from ..records import EmbedResult, Failure, Recording, TrialList

StopReason = "not embedded: the run stopped at the first failure"


@dataclass
class ScoringOptions:
    """How trials are scored beyond plain cosine.

    enroll_map: enrolment speaker -> its recordings (Kaldi spk2utt); a trial whose enrolment
        item is such a speaker scores against the L2-normalised mean of their embeddings.
    norm: "asnorm" or "snorm" against ``cohort`` (WeSpeaker's recipe); ``cohort_speakers``
        (one id per cohort recording) averages the cohort per speaker first.
    mean_from: recordings whose mean embedding is subtracted from every embedding.
    """

    enroll_map: dict[str, list[Recording]] | None = None
    norm: str | None = None
    cohort: list[Recording] | None = None
    cohort_speakers: list[str] | None = None
    top_n: int = 300
    mean_from: list[Recording] | None = None


@dataclass
class ItemVectors:
    """The embedding lookup of the scoring stage.

    ``keys[i]`` (a trial item) has the vector ``matrix[i]`` (float64, mean-subtracted when
    ``--mean-from`` is used, not normalised); ``reasons`` says why each other item has none.
    ``cohort`` is the normalisation cohort's matrix (speaker means when asked), or None
    (no normalisation, or none of its recordings embedded).
    """

    keys: list[str]
    matrix: np.ndarray
    reasons: dict[str, str]
    cohort: np.ndarray | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @cached_property
    def _index(self) -> dict[str, int]:
        return {k: i for i, k in enumerate(self.keys)}

    def rows(self, items: Sequence[str]) -> np.ndarray:
        """Row of each item (int64; -1 where it has no vector)."""
        index = self._index  # built once: the stage looks up the enrolment and test sides
        return np.fromiter((index.get(x, -1) for x in items), dtype=np.int64, count=len(items))


@dataclass
class Embedded:
    """What the embedding stage hands on: the lookup, the failures and the engine's result."""

    vectors: ItemVectors
    failures: list[Failure]
    result: EmbedResult
    recordings: int


def embed_items(
    trials: TrialList,
    recordings: dict[str, Recording],
    missing: dict[str, str],
    source: EmbeddingSource,
    progress: Callable[[int, float], None] | None = None,
    on_start: Callable[[int, float], None] | None = None,
    stop_on_error: bool = False,
    options: ScoringOptions | None = None,
) -> Embedded:
    """Embed every unique recording once (trials, enroll map, cohort, mean) and map items to
    vectors. A recording that fails costs only the items that need it."""
    opt = options or ScoringOptions()
    enroll_map = opt.enroll_map or {}
    extra = [r for rs in enroll_map.values() for r in rs]
    extra += list(opt.cohort or []) + list(opt.mean_from or [])
    own = [str(r.path) for k, r in recordings.items() if k not in enroll_map]
    paths = list(dict.fromkeys(own + [str(r.path) for r in extra]))
    res = source.embed_paths(paths, progress, on_start, stop_on_error)

    def reason_of(path: str) -> str | None:
        if path in res.failures:
            return res.failures[path]
        if path not in res.embeddings:
            return StopReason
        return None

    mean = None
    info: dict[str, Any] = {}
    if opt.mean_from:
        got = [res.embeddings[str(r.path)] for r in opt.mean_from if str(r.path) in res.embeddings]
        if not got:
            raise ValueError("--mean-from: none of its recordings could be embedded")
        mean = np.mean(np.stack(got).astype(np.float64), axis=0)
        info["mean_from"] = len(got)

    def vec(path: str) -> np.ndarray:
        v = res.embeddings[path].astype(np.float64)
        return v - mean if mean is not None else v

    vectors: dict[str, np.ndarray] = {}
    enroll_side = set(trials.enroll)
    # An enrolment speaker of enroll_map is no recording: not being one (e.g. not in wav.scp)
    # is no failure.
    item_reason = {k: why for k, why in missing.items()
                   if not (k in enroll_map and k in enroll_side)}  # fmt: skip
    for k in trials.items():
        if k in item_reason:
            continue
        if k in enroll_map and k in enroll_side:
            bad = [(r.key, reason_of(str(r.path))) for r in enroll_map[k]]
            bad = [(key, why) for key, why in bad if why is not None]
            if bad:
                item_reason[k] = "enrolment recording " + "; ".join(f"{a}: {b}" for a, b in bad)
            else:
                # The mean of the raw embeddings; cosine scoring normalises it.
                vectors[k] = np.mean([vec(str(r.path)) for r in enroll_map[k]], axis=0)
            continue
        rec = recordings.get(k)
        if rec is None:
            item_reason[k] = "not a recording or an enrolment speaker"
            continue
        why = reason_of(str(rec.path))
        if why is not None:
            item_reason[k] = why
        else:
            vectors[k] = vec(str(rec.path))
    good = list(vectors)
    mat = np.stack([vectors[k] for k in good]) if good else np.zeros((0, source.dim))
    cohort = _cohort(opt, res, vec) if opt.norm else None
    failures = [Failure(k, as_url(recordings[k].path) if k in recordings else k, r)
                for k, r in item_reason.items()]  # fmt: skip
    seen = {f.path for f in failures}
    for r in extra:  # enrolment-map, cohort and mean recordings that failed
        why = res.failures.get(str(r.path))
        if why is not None and as_url(r.path) not in seen:
            failures.append(Failure(r.key, as_url(r.path), why))
            seen.add(as_url(r.path))
    return Embedded(ItemVectors(good, mat, item_reason, cohort, info), failures, res, len(paths))


def _cohort(
    opt: ScoringOptions, res: EmbedResult, vec: Callable[[str], np.ndarray]
) -> np.ndarray | None:
    """The cohort's vectors (speaker means with ``cohort_speakers``); None when none embedded."""
    from ..scoring.norm import speaker_mean_cohort

    cohort = opt.cohort or []
    keep = [i for i, r in enumerate(cohort) if str(r.path) in res.embeddings]
    if not keep:
        return None
    cemb = np.stack([vec(str(cohort[i].path)) for i in keep])
    if opt.cohort_speakers is not None:
        _, cemb = speaker_mean_cohort(cemb, [opt.cohort_speakers[i] for i in keep])
    return cemb
