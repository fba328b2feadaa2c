"""The extractor: unique recordings -> content hashes -> cache lookup -> embed the misses on
the chosen engine (in-process, one process per device, or Ray) -> cache. Scoring lives above,
in :mod:`speaker_sim_cli.job`."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from .audio.decode import AudioInfo, is_command, probe
from .engine.cache import EmbeddingCache
from .engine.config import EngineConfig, EngineStats, choose_backend, fp32_submodules
from .engine.shard import embed_sharded, split_devices
from .errors import AudioError, UsageError
from .io.storage import as_url, is_url
from .models.registry import ModelSpec, resolve_model
from .models.weights import Found, checkpoint_hash, load_spec_checkpoint, resolve_checkpoint
from .paths import default_cache_dir, map_in_threads
from .records import EmbedResult
from .scoring.cosine import cosine_pairs, l2_normalize, trial_errors

# The cosine helpers' old home (scoring/cosine.py now): kept importable from here.
__all__ = [
    "EmbeddingSource",
    "Extractor",
    "cosine_pairs",
    "l2_normalize",
    "trial_errors",
]

if TYPE_CHECKING:
    from .engine.embedder import Embedder
    from .engine.ray_engine import RayOptions, RayRun

CACHE_FORMAT = 1


class Extractor:
    """A model with its cache: embeds recordings, each content once.

    The model (and torch with it) is loaded on the first recording the cache does not hold, so
    a fully cached run never imports torch. The cache key needs only the checkpoint's hash
    (memoised on its size and mtime), not its tensors: vectors cached under that hash came from
    those exact weights.
    """

    def __init__(
        self,
        model: str | ModelSpec,
        model_dir: str | Path | None = None,
        engine: EngineConfig | None = None,
        cache_dir: str | Path | None = None,
        use_cache: bool = True,
        eager: bool = False,
        model_config: str | Path | None = None,
        ray: RayOptions | None = None,
    ) -> None:
        # A zoo id/alias, or a family built from the user's files (--model mvector
        # --model-dir DIR --model-config FILE).
        if isinstance(model, str):
            model = resolve_model(model, model_dir, model_config)
        self.spec = model
        self.engine_cfg = engine or EngineConfig()
        self.found: Found = resolve_checkpoint(self.spec, model_dir)
        self.devices = split_devices(self.engine_cfg.device)
        self.fp32_modules = fp32_submodules(self.spec.arch, self.engine_cfg.precision)
        self.checkpoint_sha256 = checkpoint_hash(self.found.path)
        self._embedder: Embedder | None = None
        self.load_seconds = 0.0
        # Set when the model loads: "torch" or "onnxruntime", and why (--backend).
        self.backend = "not loaded"
        self.backend_reason = ""
        # Exported graphs stay on local disk when the cache is a URL (s3://...).
        local = bool(cache_dir) and not is_url(str(cache_dir))
        self.cache_root = Path(cache_dir).expanduser() if local and cache_dir else None
        root: Path | str = default_cache_dir()
        if cache_dir:
            root = as_url(cache_dir) if not local else Path(cache_dir).expanduser()
        self.cache = EmbeddingCache(root if use_cache else None, self.ingredients(), self.spec.dim)
        # --ray: the misses are embedded on a Ray cluster (engine/ray_engine.py), lazily too.
        self.ray = ray
        self._ray_run: RayRun | None = None
        if ray is not None and not use_cache:
            raise UsageError("--ray needs the embedding cache (the workers hand the embeddings "
                             "back through it): drop --no-cache")  # fmt: skip
        if eager:
            self.load()

    @property
    def loaded(self) -> bool:
        return self._embedder is not None

    @property
    def dim(self) -> int:
        return self.spec.dim

    def load(self, audio_seconds: float = 0.0) -> Embedder:
        """Build the model, load the checkpoint (strict) and place it on the device, once.

        ``audio_seconds``: how much audio this run will embed (``--backend auto`` weighs the
        one-time ONNX export against it: :func:`engine.config.choose_backend`).
        """
        if self._embedder is None:
            t0 = time.perf_counter()
            from .engine.embedder import Embedder

            module = self.spec.build()
            load_spec_checkpoint(module, self.found.path, self.spec)
            # With several devices the shards run in their own processes; this copy stays on
            # the CPU for in-process use (arrays, small requests).
            cfg = self.engine_cfg
            local = replace(cfg, device="cpu") if len(self.devices) > 1 else cfg
            embedder = Embedder(self.spec, self._backend_model(module, local, audio_seconds),
                                local)  # fmt: skip
            if embedder.fp32_modules != self.fp32_modules:  # a renamed submodule: key would lie
                raise RuntimeError(
                    f"{self.spec.id}: fp32 submodules {embedder.fp32_modules} found, "
                    f"{self.fp32_modules} expected"
                )
            self._embedder = embedder
            self.load_seconds = time.perf_counter() - t0
        return self._embedder

    def _backend_model(self, module: Any, cfg: EngineConfig, audio_seconds: float) -> Any:
        """``module`` itself (torch), or its exported graph in ONNX Runtime; sets
        :attr:`backend` and :attr:`backend_reason`."""
        from .engine.embedder import resolve_device
        from .engine.export import cached_export, export_path
        from .engine.onnx_backend import available

        root = self.cache_root or default_cache_dir()
        name, why = choose_backend(
            cfg, resolve_device(cfg.device).type, available(),
            export_path(self.spec, self.checkpoint_sha256, "onnx", root).is_file(), audio_seconds,
        )  # fmt: skip
        self.backend, self.backend_reason = name, why
        if name == "torch":
            return module
        from .engine.onnx_backend import OnnxModel

        path = cached_export(self.spec, "onnx", root, self.checkpoint_sha256, module)
        return OnnxModel(path, min_frames=int(getattr(module, "min_frames", 0) or 0))

    @property
    def embedder(self) -> Embedder:
        return self.load()

    @property
    def stats(self) -> EngineStats:
        """What the engine did; all zero when every embedding came from the cache."""
        if self.ray is not None:
            return self._ray_run.stats if self._ray_run is not None else EngineStats()
        return self._embedder.stats if self._embedder is not None else EngineStats()

    @property
    def device_label(self) -> str:
        if self.ray is not None:
            if self._ray_run is None:
                return "ray: not started, all from cache"
            info = self._ray_run.info
            return f"ray ({info.get('actors')} {info.get('actor_device')} actors)"
        if len(self.devices) > 1:
            return ",".join(self.devices)
        if self._embedder is None:
            return "model not loaded: all from cache"
        return str(self._embedder.device)

    def ingredients(self) -> dict[str, Any]:
        return {
            "format": CACHE_FORMAT,
            "model": self.spec.id,
            "checkpoint_sha256": self.checkpoint_sha256,
            "frontend": self.spec.frontend.to_dict(),
            **({"arch": self.spec.arch_def.kwargs} if self.spec.arch_def is not None else {}),
            "mode": self.engine_cfg.mode(),
            "precision": self.engine_cfg.precision,
            "fp32_modules": list(self.fp32_modules),
        }

    def engine_report(self) -> dict[str, Any]:
        """``{"engine": "local"}``, or ``{"engine": "ray", "ray": {address, actors, ...}}``."""
        if self.ray is None:
            return {"engine": "local"}
        if self._ray_run is None:
            return {"engine": "ray", "ray": {"address": self.ray.label(), "started": False}}
        return {"engine": "ray", "ray": self._ray_run.report()}

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.spec.id,
            "arch": self.spec.arch,
            "dim": self.spec.dim,
            "checkpoint": str(self.found.path),
            "checkpoint_sha256": self.checkpoint_sha256,
            "found_via": self.found.source,
            "device": self.device_label,
            "loaded": self.loaded,
            "precision": self.engine_cfg.precision,
            "mode": self.engine_cfg.mode(),
            "backend": self.backend,
            "backend_reason": self.backend_reason,
        }

    def embed_paths(
        self,
        paths: Sequence[str | Path],
        progress: Callable[[int, float], None] | None = None,
        on_start: Callable[[int, float], None] | None = None,
        stop_on_error: bool = False,
    ) -> EmbedResult:
        """Embed unique files. Failures never raise; they are returned with their reason.

        With ``stop_on_error`` the run stops at the first failure; what was embedded is kept.
        """
        t0 = time.perf_counter()
        embeddings: dict[str, np.ndarray] = {}
        failures: dict[str, str] = {}
        by_digest: dict[str, list[str]] = {}
        unique = list(dict.fromkeys(str(x) for x in paths))
        if self.ray is not None:  # the Ray workers hash, look up, decode, embed and store
            from .engine.ray_engine import RayRun
            from .engine.ray_readback import embed_unique

            self._ray_run = RayRun(self.ray, self.spec, self.found.path, self.engine_cfg,
                                   self.cache)  # fmt: skip
            on_ray = embed_unique(self._ray_run, unique, progress, on_start, stop_on_error)
            return EmbedResult(*on_ray, time.perf_counter() - t0)
        files = [p for p in unique if not is_command(p)]
        # Hashing (memoised: a stat and a small read when the file is known) in threads.
        hashed = dict(zip(files, self.cache.file_hashes([Path(p) for p in files])))
        for p in unique:
            got = hashed.get(p)
            if got is None:
                # A wav.scp command: keyed by its text (its output is not known in advance).
                digest = hashlib.sha256(f"command:{p}".encode()).hexdigest()
            elif isinstance(got, OSError):
                failures[p] = _read_failure(got)
                continue
            else:
                digest = got
            by_digest.setdefault(digest, []).append(p)
        misses: list[str] = []
        cached = 0
        digests = list(by_digest)
        hits, found = self.cache.get_many(digests)  # one index search for all of them
        for digest, hit, ok in zip(digests, hits, found):
            if not ok:
                misses.append(digest)
                continue
            for p in by_digest[digest]:
                embeddings[p] = hit
            cached += 1
        todo: list[str] = []
        est: list[int] = []
        limit = self.engine_cfg.max_duration
        for digest, info in zip(misses, _probe_all([by_digest[d][0] for d in misses])):
            ps = by_digest[digest]
            if isinstance(info, AudioError):
                for p in ps:
                    failures[p] = info.reason
                continue
            if limit and info.duration > limit:
                for p in ps:
                    failures[p] = (
                        f"too long: {info.duration:.0f} s > --max-duration {limit:g} s "
                        "(split it, or raise the limit)"
                    )
                continue
            todo.append(digest)
            est.append(int(info.duration * self.spec.sample_rate))
        if on_start is not None:
            on_start(len(todo), sum(est) / self.spec.sample_rate)
        embedded = 0
        if todo and not (stop_on_error and failures):
            files = [by_digest[d][0] for d in todo]
            if len(self.devices) > 1:
                stream = embed_sharded(
                    self.spec, self.found.path, self.engine_cfg, files, est, progress
                )
            else:
                loading = not self.loaded
                embedder = self.load(sum(est) / self.spec.sample_rate)
                if loading:  # the model load is reported on its own, not as embedding time
                    t0 += self.load_seconds
                stream = embedder.embed_files(files, est, progress)
            # Cache writes (~255 us each) run in a writer thread, off the thread that feeds
            # the device; every write is done before this returns, also after an error.
            with ThreadPoolExecutor(1, thread_name_prefix="speaker-sim-cache") as writer:
                try:
                    for i, emb, err in stream:
                        ps = by_digest[todo[i]]
                        if emb is None:
                            for p in ps:
                                failures[p] = err or "unknown error"
                            if stop_on_error:
                                break
                            continue
                        writer.submit(self.cache.put, todo[i], emb)
                        embedded += 1
                        for p in ps:
                            embeddings[p] = emb
                finally:
                    close = getattr(stream, "close", None)
                    if close is not None:  # stops shard processes when the run stops early
                        close()
            self.cache.flush()  # commit the buffered embeddings as one shard
        return EmbedResult(embeddings, failures, embedded, cached, time.perf_counter() - t0)


def _read_failure(exc: OSError) -> str:
    if isinstance(exc, FileNotFoundError):
        return "file not found"
    if isinstance(exc, IsADirectoryError):
        return "is a directory, not an audio file"
    return f"cannot read ({exc.strerror or exc})"


def _probe_all(paths: Sequence[str]) -> list[AudioInfo | AudioError]:
    """:func:`probe` each path (a header read; libsndfile releases the GIL), in threads. URL
    recordings are read from the bytes their hashing kept; any that were not kept (a run larger
    than the kept bytes' bound) are fetched many at once, a window at a time, and kept for the
    decode."""
    from .io import storage

    def one(p: str) -> AudioInfo | AudioError:
        try:
            return probe(p)
        except AudioError as exc:
            return exc

    if not any(storage.is_url(p) for p in paths):
        return map_in_threads(one, paths)
    out: list[AudioInfo | AudioError] = []
    for c in range(0, len(paths), 256):
        part = paths[c : c + 256]
        missing = [p for p in part if storage.is_url(p) and not storage.is_kept(p)]
        if missing:
            storage.read_many(missing, keep=True)
        out += map_in_threads(one, part)
    return out


class EmbeddingSource(Protocol):
    """What scoring needs: an :class:`Extractor`, or embeddings computed earlier."""

    @property
    def dim(self) -> int: ...

    def describe(self) -> dict[str, Any]: ...

    def embed_paths(
        self,
        paths: Sequence[str | Path],
        progress: Callable[[int, float], None] | None = None,
        on_start: Callable[[int, float], None] | None = None,
        stop_on_error: bool = False,
    ) -> EmbedResult: ...
