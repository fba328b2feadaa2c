"""``Voiceprints``: a voiceprint library file with the model that embeds its recordings.

Recordings are embedded by :class:`~speaker_sim_cli.pipeline.Extractor` (the engine and
content-keyed cache that ``score`` uses: batched, each content once, failures per recording).
The library remembers the model it was built with and refuses another one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import UsageError
from . import prescan as _prescan_mod
from .search import AnnIndex, exact_top_k, unit_rows
from .store import (
    AddReport,
    Enrolment,
    LibraryError,
    ModelInfo,
    ModelMismatchError,
    SpeakerRow,
    VoiceprintStore,
)

if TYPE_CHECKING:
    from ..engine.config import EngineConfig
    from ..pipeline import Extractor

__all__ = ["Answer", "EnrollResult", "IdentifyResult", "Voiceprints"]

UNKNOWN = "unknown"
_DEFAULT: Any = object()  # "the model's published threshold"


@dataclass
class Answer:
    """Who one recording is: ``speaker`` is the best candidate, or ``"unknown"`` when its score
    is below the threshold; ``candidates`` are (speaker, cosine) best first."""

    recording: str
    speaker: str
    score: float
    candidates: list[tuple[str, float]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "recording": self.recording,
            "speaker": self.speaker,
            "score": self.score,
            "candidates": [{"speaker": s, "score": v} for s, v in self.candidates],
        }


@dataclass
class EnrollResult:
    """One enrolment: what was added, what was already there, what could not be embedded."""

    report: AddReport
    failures: dict[str, str] = field(default_factory=dict)  # recording as given -> reason
    embedded: int = 0
    cached: int = 0

    @property
    def added(self) -> int:
        return len(self.report.added)

    @property
    def duplicates(self) -> int:
        return len(self.report.duplicates)


@dataclass
class IdentifyResult:
    answers: list[Answer]
    failures: dict[str, str]
    threshold: float | None


#: The int8 pre-scan serves calls of at most this many queries (larger batches are matrix
#: products, compute-bound: the float32 scan suits them) on libraries of at least this many
#: speakers (below, the float32 scan is a few milliseconds and the int8 copy not worth making).
PRESCAN_MAX_QUERIES = 64
PRESCAN_MIN_ROWS = 50_000


class Voiceprints:
    """A voiceprint library file (created on first enrolment) and the model it uses.

    ``model`` defaults to the library's own model, or CAM++ zh-en for a new library; a library
    built with another model (id, checkpoint, front end or dimension) is refused.
    ``rule`` (new libraries only) is how a voiceprint is made from a speaker's recordings:
    ``unit-mean`` (default) or ``raw-mean`` (mvector's).
    """

    def __init__(
        self,
        path: str | Path,
        model: str | None = None,
        model_dir: str | Path | None = None,
        *,
        engine: EngineConfig | None = None,
        cache_dir: str | Path | None = None,
        use_cache: bool = True,
        create: bool = True,
        rule: str = "unit-mean",
    ) -> None:
        from ..models.registry import DEFAULT_MODEL
        from ..pipeline import Extractor

        self.path = Path(path)
        exists = self.path.exists() and self.path.stat().st_size > 0
        store = VoiceprintStore(self.path) if exists or not create else None
        try:
            wanted = model or (store.model.model if store else DEFAULT_MODEL)
            try:
                self._extractor: Extractor | None = Extractor(
                    wanted, model_dir, engine, cache_dir, use_cache=use_cache
                )
            except UsageError:
                if model is None and store is not None:
                    raise UsageError(
                        f"{self.path}: built with {wanted}, a model speaker-sim cannot run; "
                        "open it with Voiceprints.for_vectors to use its vectors"
                    ) from None
                raise
            info = ModelInfo.of(self._extractor.ingredients(), self._extractor.dim)
            if store is None:
                store = VoiceprintStore(self.path, create=info, rule=rule)
            store.check_model(info)
        except BaseException:
            if store is not None:
                store.close()
            raise
        self.store = store
        self._loaded: tuple[int, list[str], np.ndarray] | None = None
        self._ann: AnnIndex | None = None
        self._ann_gen = -1
        self._prescan: _prescan_mod.Int8Prescan | None = None
        self._prescan_gen = -1

    @classmethod
    def for_vectors(
        cls, path: str | Path, model: ModelInfo | None = None, rule: str = "unit-mean"
    ) -> Voiceprints:
        """A library of vectors embedded elsewhere (no model here): ``model`` names what made
        them (required for a new file, checked against an existing one)."""
        self = cls.__new__(cls)
        self.path = Path(path)
        self.store = VoiceprintStore(self.path, create=model, rule=rule)
        if model is not None:
            try:
                self.store.check_model(model)
            except BaseException:
                self.store.close()
                raise
        self._extractor = None
        self._loaded = None
        self._ann = None
        self._ann_gen = -1
        self._prescan = None
        self._prescan_gen = -1
        return self

    # -- plumbing --
    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> Voiceprints:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def extractor(self) -> Extractor:
        if self._extractor is None:
            raise UsageError(
                f"{self.path}: this library was opened for vectors only; open it with its "
                f"model ({self.store.model.model}) to embed audio"
            )
        return self._extractor

    @property
    def model(self) -> ModelInfo:
        return self.store.model

    @property
    def default_threshold(self) -> float | None:
        """The model's published threshold (registry), None when none is published."""
        from ..models.registry import MODELS

        for m in MODELS:
            if m.id == self.model.model:
                return m.threshold
        return None

    def _embed(
        self, audio: Sequence[str | Path], progress: Any = None, on_start: Any = None
    ) -> tuple[dict[str, np.ndarray], dict[str, str], dict[str, str], Any]:
        """Embeddings and content sha256 by the path as given, failures with reasons."""
        from ..audio.decode import is_command

        given = [str(a) for a in audio]
        resolved = {g: (g if is_command(g) else str(Path(g).expanduser().resolve())) for g in given}
        ex = self.extractor
        res = ex.embed_paths(list(dict.fromkeys(resolved.values())), progress, on_start)
        files = [r for r in dict.fromkeys(resolved.values()) if r in res.embeddings]
        hashes: dict[str, str] = {}
        for r, h in zip(files, ex.cache.file_hashes([Path(f) for f in files])):
            if isinstance(h, str):
                hashes[r] = h
            elif is_command(r):
                hashes[r] = hashlib.sha256(f"command:{r}".encode()).hexdigest()
        embs, shas, fails = {}, {}, {}
        for g, r in resolved.items():
            if r in res.embeddings and r in hashes:
                embs[g], shas[g] = res.embeddings[r], hashes[r]
            else:
                fails[g] = res.failures.get(r, "file changed while it was read")
        return embs, shas, fails, res

    # -- enrolment --
    def enroll(
        self, speaker: str, audio: Sequence[str | Path] | str | Path, **kw: Any
    ) -> EnrollResult:
        """Add recordings to ``speaker`` (created on first use); one transaction."""
        if isinstance(audio, str | Path):
            audio = [audio]
        return self.enroll_map({speaker: list(audio)}, **kw)

    def enroll_map(
        self,
        speakers: Mapping[str, Sequence[str | Path]],
        progress: Any = None,
        on_start: Any = None,
    ) -> EnrollResult:
        """Enrol several speakers' recordings in one transaction (embedding first, batched).

        A recording that cannot be embedded is left out with its reason; the rest is enrolled.
        Content already enrolled for that speaker is a no-op, reported in ``report.duplicates``.
        """
        for name in speakers:
            check_name(name)
        allaudio = [a for recs in speakers.values() for a in recs]
        embs, shas, fails, res = self._embed(allaudio, progress, on_start)
        items = [
            Enrolment(name, shas[str(a)], str(a), embs[str(a)])
            for name, recs in speakers.items()
            for a in recs
            if str(a) in embs
        ]
        report = self.store.add(items)
        return EnrollResult(report, fails, res.embedded, res.cached)

    def enroll_vectors(self, items: Sequence[Enrolment]) -> AddReport:
        """Add embeddings computed elsewhere (by this library's model); one transaction."""
        for it in items:
            check_name(it.speaker)
        return self.store.add(items)

    def import_mvector(
        self, audio_db: str | Path, vectors_from: str | Path | None = None
    ) -> EnrollResult:
        """Import mvector's ``audio_db`` folder; see :func:`import_mvector`."""
        from .mvector_import import import_mvector

        return import_mvector(self, Path(audio_db), vectors_from)

    # -- identification --
    def _matrix(self) -> tuple[int, list[str], np.ndarray]:
        gen = self.store.generation()
        if self._loaded is None or self._loaded[0] != gen:
            self._loaded = self.store.load()
        return self._loaded

    def load(self, prescan: bool = False) -> int:
        """Load (or refresh) the voiceprint matrix now; returns the speaker count. ``prescan``:
        also make the int8 copy single queries use (a server, before its first request)."""
        gen, names, mat = self._matrix()
        if prescan and len(names) >= PRESCAN_MIN_ROWS and _prescan_mod.available():
            self._prescan_for(gen, mat)
        return len(names)

    def build_ann(self, nlist: int | None = None, nprobe: int = 128, save: bool = True) -> AnnIndex:
        """Build the optional ANN index (faiss-cpu) and keep it in the library file."""
        gen, _, mat = self._matrix()
        idx = AnnIndex.build(mat, nlist, nprobe)
        if save:
            self.store.put_ann(AnnIndex.kind, gen, idx.params, idx.to_bytes())
        self._ann, self._ann_gen = idx, gen
        return idx

    def _ann_for(self, gen: int) -> AnnIndex:
        if self._ann is None or self._ann_gen != gen:
            got = self.store.get_ann(AnnIndex.kind)
            if got is not None and got[0] == gen:
                self._ann, self._ann_gen = AnnIndex.from_bytes(got[2], got[1]), gen
            else:  # none stored, or built before the last change
                return self.build_ann(save=True)
        assert self._ann is not None
        return self._ann

    def _prescan_for(self, gen: int, mat: np.ndarray) -> _prescan_mod.Int8Prescan | None:
        """The int8 copy for this generation, made now if it is not (12-17 s at 1 M speakers
        on one core); ``None`` (float32 scan) where this torch cannot make it."""
        if self._prescan_gen != gen:
            try:
                self._prescan = _prescan_mod.Int8Prescan(mat)
            except (RuntimeError, AttributeError):  # a torch without the quantised kernel
                self._prescan = None
            self._prescan_gen = gen
        return self._prescan

    def search(
        self,
        vectors: np.ndarray,
        top_k: int = 5,
        ann: bool = False,
        *,
        plain_scan: bool = False,
    ) -> tuple[list[str], np.ndarray, np.ndarray]:
        """(names, index (B, k), cosine (B, k)) of the best voiceprints for raw vectors (B, D).

        Exact unless ``ann``. A few queries against a large library go through the int8 scan
        with an exact re-rank (same answer, a quarter of the bytes read; see :mod:`.prescan`)
        when ``load(prescan=True)`` made its copy for the library as it is now; it is never
        made here, since making it (~13 s at 1 M speakers) costs more than ~100 float32
        scans. ``plain_scan`` forces the float32 scan.
        """
        q = unit_rows(vectors)
        if q.shape[1] != self.model.dim:
            raise UsageError(f"queries are {q.shape[1]}-dim, the library holds {self.model.dim}")
        gen, names, mat = self._matrix()
        if ann and len(names):
            idx, sc = self._ann_for(gen).search(q, top_k)
            return names, idx, sc
        got = None
        pre = self._prescan if self._prescan_gen == gen else None  # never made here: see load
        if pre is not None and not plain_scan and len(q) <= PRESCAN_MAX_QUERIES:
            got = pre.top_k(q, top_k)
        idx, sc = got if got is not None else exact_top_k(q, mat, top_k)
        return names, idx, sc

    def identify_vectors(
        self,
        vectors: np.ndarray,
        top_k: int = 5,
        threshold: float | None = _DEFAULT,
        keys: Sequence[str] | None = None,
        ann: bool = False,
    ) -> list[Answer]:
        """One :class:`Answer` per row of ``vectors`` (B, D) (raw embeddings of this model)."""
        thr = self.default_threshold if threshold is _DEFAULT else threshold
        names, idx, sc = self.search(vectors, max(1, top_k), ann)
        keys = list(keys) if keys is not None else [str(i) for i in range(len(idx))]
        out = []
        for key, ii, ss in zip(keys, idx, sc):
            cands = [(names[i], float(s)) for i, s in zip(ii, ss) if i >= 0][:top_k]
            if not cands:
                out.append(Answer(key, UNKNOWN, float("nan"), []))
                continue
            best = float(ss[0])
            who = cands[0][0] if thr is None or best >= thr else UNKNOWN
            out.append(Answer(key, who, best, cands))
        return out

    def identify(
        self,
        audio: Sequence[str | Path] | str | Path,
        top_k: int = 5,
        threshold: float | None = _DEFAULT,
        ann: bool = False,
        progress: Any = None,
        on_start: Any = None,
    ) -> IdentifyResult:
        """Who is speaking in each recording. ``threshold`` defaults to the model's published
        one (None: always the best candidate); below it the answer is ``"unknown"``."""
        if isinstance(audio, str | Path):
            audio = [audio]
        given = [str(a) for a in audio]
        embs, _, fails, _ = self._embed(given, progress, on_start)
        ok = [g for g in given if g in embs]
        thr = self.default_threshold if threshold is _DEFAULT else threshold
        answers: list[Answer] = []
        if ok:
            mat = np.stack([embs[g] for g in ok])
            answers = self.identify_vectors(mat, top_k, thr, ok, ann)
        return IdentifyResult(answers, fails, thr)

    # -- speakers --
    def speakers(self) -> list[SpeakerRow]:
        return self.store.speakers()

    def remove(self, name: str) -> int:
        return self.store.remove(name)

    def rename(self, old: str, new: str) -> None:
        check_name(new)
        self.store.rename(old, new)

    def info(self) -> dict[str, Any]:
        out = self.store.info()
        out["threshold"] = self.default_threshold
        return out


def check_name(name: str) -> None:
    if not isinstance(name, str) or not name.strip() or name != name.strip():
        raise UsageError(f"bad speaker name {name!r}: empty or with surrounding spaces")
    if name == UNKNOWN:
        raise UsageError(f"{UNKNOWN!r} is reserved for answers below the threshold")


__all__ += ["LibraryError", "ModelInfo", "ModelMismatchError"]
