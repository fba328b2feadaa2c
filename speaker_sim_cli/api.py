"""``SpeakerSim``: the library entry point, over :class:`~speaker_sim_cli.pipeline.Extractor`;
its ``score`` runs the same :class:`~speaker_sim_cli.job.ScoreJob` as ``speaker-sim score``.

A model is loaded once; recordings are embedded through the engine (batched, padding-masked)
and cached twice: on disk (the content-keyed cache that ``speaker-sim score`` uses) and in a
bounded in-memory LRU keyed by the resolved path and its ``stat`` (size, mtime, inode), so a
recording asked for again costs a ``stat``, not a hash or a decode. Scores are the raw cosine
in float64, computed exactly as ``speaker-sim score`` computes them.

Not thread-safe: use one instance per thread (``speaker-sim serve`` calls it from one thread).
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np

from .errors import AudioError
from .models.registry import DEFAULT_MODEL

if TYPE_CHECKING:
    import pandas as pd

    from .job import ProgressFn, ScoreReport
    from .pipeline import Extractor
    from .records import EmbedResult

__all__ = ["MemoryLRU", "SpeakerSim"]

# One input to ``embed``: a file path, or a waveform (1-D samples) as a numpy array or tensor.
Input = Union[str, "os.PathLike[str]", np.ndarray, Any]

StatKey = tuple[str, int, int, int]


class MemoryLRU:
    """A bounded least-recently-used map ``key -> embedding``; ``capacity=0`` disables it."""

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError("capacity must be >= 0")
        self.capacity = capacity
        self._d: OrderedDict[Any, np.ndarray] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._d)

    def get(self, key: Any) -> np.ndarray | None:
        v = self._d.get(key)
        if v is None:
            self.misses += 1
            return None
        self._d.move_to_end(key)
        self.hits += 1
        return v

    def put(self, key: Any, value: np.ndarray) -> None:
        if self.capacity == 0:
            return
        self._d[key] = value
        self._d.move_to_end(key)
        while len(self._d) > self.capacity:
            self._d.popitem(last=False)
            self.evictions += 1


@dataclass
class Counts:
    """What a :class:`SpeakerSim` has done since it was made."""

    embedded: int = 0  # recordings the model ran on (files)
    arrays_embedded: int = 0  # in-memory waveforms the model ran on
    disk_hits: int = 0  # recordings found in the on-disk cache
    failed: int = 0  # failed file look-ups (each request for a bad file counts)


def stat_key(path: str | os.PathLike[str]) -> StatKey:
    """``(resolved path, size, mtime_ns, inode)``: changes whenever the file is replaced."""
    rp = os.path.realpath(path)
    st = os.stat(rp)
    return (rp, st.st_size, st.st_mtime_ns, st.st_ino)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine of two embeddings in float64, as ``speaker-sim score`` computes it."""
    from .scoring.cosine import cosine_pairs

    mat = np.stack([np.asarray(a), np.asarray(b)])
    return float(cosine_pairs(mat, np.array([0]), np.array([1]))[0])


def _is_single(x: Any) -> bool:
    return isinstance(x, str | os.PathLike | np.ndarray) or hasattr(x, "detach")


class SpeakerSim:
    """A speaker-embedding model, loaded once, with its caches.

    Args:
        model: ModelScope id (``iic/...`` or ``damo/...``) or alias; see ``speaker-sim models``.
        model_dir: folder holding the checkpoint under its official name (else the usual
            lookup: ``$SPEAKER_SIM_PRETRAINED``, ``./pretrained``, the ModelScope cache).
        device: ``auto`` (the GPU when there is one), ``cpu``, ``cuda`` or ``cuda:N``.
        precision: ``fp32``, ``bf16`` or ``fp16`` (part of the cache key).
        cache_dir: on-disk embedding cache [default: ``$SPEAKER_SIM_CACHE`` or the user cache].
        use_cache: read and write the on-disk cache.
        memory_cache: most embeddings kept in memory (LRU); 0 disables it.
        workers: decoding worker processes; 0 decodes in this process (best for the small
            batches of interactive use and ``serve``), -1 for cores - 1 (large jobs).
        batch_size, batch_frames, chunk_seconds, min_duration, max_duration: as the options
            of ``speaker-sim score`` (``max_duration=0``: no limit).
        model_config: the training config of a model described by the user's own files:
            mvector's ``config.yml`` with ``model="mvector"`` and ``model_dir`` its
            ``models/<Model>_<Feature>/best_model/`` folder.
    """

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        model_dir: str | os.PathLike[str] | None = None,
        device: str = "auto",
        *,
        precision: str = "fp32",
        cache_dir: str | os.PathLike[str] | None = None,
        use_cache: bool = True,
        memory_cache: int = 50_000,
        workers: int = 0,
        batch_size: int = 0,
        batch_frames: int = 0,
        chunk_seconds: float | None = None,
        min_duration: float = 0.3,
        max_duration: float = 0.0,
        model_config: str | os.PathLike[str] | None = None,
    ) -> None:
        from .engine.config import EngineConfig
        from .pipeline import Extractor

        engine = EngineConfig(
            device=device,
            precision=precision,
            batch_size=batch_size,
            batch_frames=batch_frames,
            workers=workers,
            chunk_seconds=chunk_seconds,
            min_duration=min_duration,
            max_duration=max_duration,
        )
        self.extractor: Extractor = Extractor(
            model,
            Path(model_dir) if model_dir is not None else None,
            engine,
            Path(cache_dir) if cache_dir is not None else None,
            use_cache=use_cache,
            model_config=Path(model_config) if model_config is not None else None,
        )
        self.memory = MemoryLRU(memory_cache)
        self.counts = Counts()

    # -- what it is -----------------------------------------------------------------------
    @property
    def model_id(self) -> str:
        return self.extractor.spec.id

    @property
    def dim(self) -> int:
        """Embedding size."""
        return self.extractor.spec.dim

    @property
    def sample_rate(self) -> int:
        """The rate (Hz) the model expects; arrays at another rate need ``sample_rate=``."""
        return self.extractor.spec.sample_rate

    @property
    def device(self) -> str:
        return str(self.extractor.embedder.device)

    def describe(self) -> dict[str, Any]:
        """Model id, architecture, checkpoint and its sha256, device, precision, mode."""
        return self.extractor.describe()

    def stats(self) -> dict[str, Any]:
        """Counters: recordings embedded, disk-cache hits, memory hits, failures."""
        eng = self.extractor.stats
        return {
            **asdict(self.counts),
            "memory_hits": self.memory.hits,
            "memory_misses": self.memory.misses,
            "memory_entries": len(self.memory),
            "memory_evictions": self.memory.evictions,
            "engine_recordings": eng.recordings,
            "engine_batches": eng.batches,
            "audio_seconds": round(eng.audio_seconds, 3),
            "model_seconds": round(eng.model_seconds, 3),
        }

    # -- files ----------------------------------------------------------------------------
    def cached(self, path: str | os.PathLike[str]) -> np.ndarray | None:
        """The embedding of ``path`` if it is in memory (no decode, no hashing), else None."""
        try:
            key = stat_key(path)
        except OSError:
            return None
        return self.memory.get(key)

    def lookup(
        self, paths: Iterable[str | os.PathLike[str]]
    ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        """Embed files, each content once: memory, then disk cache, then the model (batched).

        Returns ``(embeddings, failures)`` keyed by the path strings given: (D,) float32
        unnormalised embeddings, and the reason each failed path could not be used. Never
        raises for a bad file.
        """
        res = self.embed_paths(list(paths))
        emb = res.embeddings
        return emb if isinstance(emb, dict) else dict(emb), res.failures

    def embed_paths(
        self,
        paths: Sequence[str | os.PathLike[str]],
        progress: Callable[[int, float], None] | None = None,
        on_start: Callable[[int, float], None] | None = None,
        stop_on_error: bool = False,
    ) -> EmbedResult:
        """:meth:`lookup` as an embedding source of a scoring job (``pipeline.EmbeddingSource``):
        ``cached`` counts memory and disk-cache hits, ``embedded`` what the model ran on."""
        from .records import EmbedResult

        t0 = time.perf_counter()
        out: dict[str, np.ndarray] = {}
        failures: dict[str, str] = {}
        todo: dict[str, StatKey] = {}
        for p in dict.fromkeys(os.fspath(x) for x in paths):
            try:
                key = stat_key(p)
            except OSError:
                todo[p] = ("", 0, 0, 0)  # let the extractor name the problem
                continue
            hit = self.memory.get(key)
            if hit is not None:
                out[p] = hit
            else:
                todo[p] = key
        if not todo:
            return EmbedResult(out, failures, 0, len(out), time.perf_counter() - t0)
        # Embed by resolved path, so two spellings of one file are one recording.
        by_real: dict[str, list[str]] = {}
        for p, key in todo.items():
            by_real.setdefault(key[0] or p, []).append(p)
        res = self.extractor.embed_paths(list(by_real), progress, on_start, stop_on_error)
        self.counts.embedded += res.embedded
        self.counts.disk_hits += res.cached
        from_memory = len(out)
        for real, ps in by_real.items():
            emb = res.embeddings.get(real)
            if emb is None:
                if real not in res.failures:  # never reached (stop_on_error): no failure
                    continue
                self.counts.failed += len(ps)
                for p in ps:
                    failures[p] = res.failures[real]
                continue
            key = todo[ps[0]]
            if key[0]:
                self.memory.put(key, emb)
            for p in ps:
                out[p] = emb
        return EmbedResult(out, failures, res.embedded, res.cached + from_memory,
                           time.perf_counter() - t0)  # fmt: skip

    # -- the public verbs -----------------------------------------------------------------
    def embed(self, x: Input | Sequence[Input], sample_rate: int | None = None) -> np.ndarray:
        """Embed a path or waveform -> (D,), or a sequence of them -> (N, D); float32.

        Waveforms are 1-D float arrays (or tensors) of samples at ``sample_rate``
        [default: the model's rate, see :attr:`sample_rate`]; a 2-D array is a batch of
        equal-length waveforms (B, samples). Embeddings are unnormalised, as 3D-Speaker
        writes them. Raises :class:`~speaker_sim_cli.errors.AudioError` naming the first
        recording that cannot be used.
        """
        if _is_single(x):
            arr = None if isinstance(x, str | os.PathLike) else _as_array(x)
            if arr is not None and arr.ndim == 2:
                return self._embed_items(list(arr), sample_rate)
            return self._embed_items([x], sample_rate)[0]
        items = list(x)  # type: ignore[arg-type]
        if not items:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self._embed_items(items, sample_rate)

    def similarity(self, a: Input, b: Input, sample_rate: int | None = None) -> float:
        """Cosine similarity in [-1, 1] of two recordings (paths or waveforms)."""
        emb = self.embed([a, b], sample_rate)
        return cosine(emb[0], emb[1])

    def score(
        self,
        trials: Any,
        root: str | os.PathLike[str] | None = None,
        *,
        out: str | os.PathLike[str] | None = None,
        format: str = "csv",
        report: str | os.PathLike[str] | None = None,
        p_targets: Sequence[float] = (0.01, 0.05),
        progress: ProgressFn | None = None,
    ) -> pd.DataFrame:
        """Score trials by cosine, each unique recording embedded once.

        ``trials`` is a trial file (CSV with ``enrollment,test[,label]``, Kaldi trials or a
        VoxCeleb list), a DataFrame with those columns (else its first two columns, and a
        ``label`` column when present), or an iterable of ``(enrollment, test[, label])``.
        Relative paths resolve against ``root`` [default: the trial file's folder as
        ``speaker-sim score`` does, or the current folder for in-memory trials].
        ``out`` / ``format`` / ``report``: also write the score file and the JSON report,
        exactly as ``speaker-sim score --out --format --report`` would (see
        :meth:`score_report`). ``progress``: a callback for the job's
        :class:`~speaker_sim_cli.job.Progress` events.

        Returns a DataFrame with ``enrollment``, ``test``, ``label`` (when given), ``score``
        (float64; NaN where a recording failed) and ``error`` (the reason, else None).
        """
        import pandas as pd

        rep = self.score_report(trials, root, out=out, format=format, report=report,
                                p_targets=p_targets, progress=progress)  # fmt: skip
        tl = rep.trial_list
        assert tl is not None and rep.scores is not None
        cols: dict[str, Any] = {"enrollment": tl.enroll, "test": tl.test}
        if tl.labels is not None:
            cols["label"] = tl.labels.astype(np.int64)
        cols["score"] = rep.scores
        cols["error"] = pd.Series(rep.errors, dtype=object)  # None where scored
        return pd.DataFrame(cols)

    def score_report(
        self,
        trials: Any,
        root: str | os.PathLike[str] | None = None,
        *,
        out: str | os.PathLike[str] | None = None,
        format: str = "csv",
        report: str | os.PathLike[str] | None = None,
        p_targets: Sequence[float] = (0.01, 0.05),
        progress: ProgressFn | None = None,
        stream: bool = False,
    ) -> ScoreReport:
        """Run the scoring job of ``speaker-sim score`` on ``trials`` with this model and its
        caches; the :class:`~speaker_sim_cli.job.ScoreReport` (``to_dict()`` is the report
        ``score --report`` writes for the same list, apart from ``timing`` / ``invocation``).
        ``stream=True`` with a trial file scores it in chunks as ``score`` does (corpus-scale
        lists: scores go to ``out`` as they come; the report then has no per-trial arrays)."""
        from .io.trials import read_trials
        from .job import ModelSource, Outputs, ScoreJob, ScoringSetup, TrialSource
        from .job.setup import trials_from_memory

        base = Path(root) if root is not None else None
        if isinstance(trials, str | os.PathLike) and stream:
            src = TrialSource(Path(os.fspath(trials)), root=base)
        elif isinstance(trials, str | os.PathLike):
            src = TrialSource(trials=read_trials(os.fspath(trials)), root=base)
        else:
            src = TrialSource(trials=trials_from_memory(trials), root=base or Path.cwd())
        job = ScoreJob(
            src,
            ModelSource(source=self),
            ScoringSetup(p_targets=list(p_targets)),
            Outputs(Path(out) if out is not None else None, format,
                    Path(report) if report is not None else None, stream=stream),
        )  # fmt: skip
        return job.run(progress)

    # -- internals ------------------------------------------------------------------------
    def _embed_items(self, items: Sequence[Input], sample_rate: int | None) -> np.ndarray:
        out = np.zeros((len(items), self.dim), dtype=np.float32)
        paths: dict[int, str] = {}
        waves: dict[int, np.ndarray] = {}
        for i, it in enumerate(items):
            if isinstance(it, str | os.PathLike):
                paths[i] = os.fspath(it)
            else:
                waves[i] = self._prepare_wave(_as_array(it), sample_rate, i)
        if paths:
            embs, fails = self.lookup(paths.values())
            for i, p in paths.items():
                if p in fails:
                    raise AudioError(p, fails[p])
                out[i] = embs[p]
        if waves:
            import torch

            idx = list(waves)
            res = self.extractor.embedder.embed_waves([torch.from_numpy(waves[i]) for i in idx])
            for i, e in zip(idx, res, strict=True):
                if not np.isfinite(e).all():
                    raise AudioError(f"<array {i}>", "the model produced a non-finite embedding")
                out[i] = e
            self.counts.arrays_embedded += len(idx)
        return out

    def _prepare_wave(self, arr: np.ndarray, sample_rate: int | None, i: int) -> np.ndarray:
        from .audio.decode import resample
        from .audio.loudness import normalize_recording
        from .engine.data import check_wave

        if arr.ndim != 1:
            raise ValueError(
                f"waveform {i}: expected 1-D samples, got shape {arr.shape} "
                "(pick a channel: wav[:, 0])"
            )
        if arr.dtype.kind not in "fiu":
            raise ValueError(f"waveform {i}: expected numbers, got dtype {arr.dtype}")
        wav = np.ascontiguousarray(arr, dtype=np.float32)
        if not np.isfinite(wav).all():
            raise AudioError(f"<array {i}>", "contains NaN or Inf samples")
        sr = self.sample_rate
        if sample_rate is not None and sample_rate != sr:
            wav = resample(wav, int(sample_rate), sr, self.extractor.spec.frontend.resampler)
        cfg = self.extractor.engine_cfg
        try:
            check_wave(wav, sr, int(cfg.min_duration * sr), 0)
            loudness = self.extractor.spec.frontend.loudness_db
            if loudness is not None:  # per recording, as files get it at decode
                wav = normalize_recording(wav, loudness)
        except AudioError as exc:
            raise AudioError(f"<array {i}>", exc.reason) from None
        return wav


def _as_array(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().cpu().numpy()
    return np.asarray(x)
