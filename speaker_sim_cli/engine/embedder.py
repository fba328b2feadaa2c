"""Batched inference: DataLoader -> (optional windows) -> fbank on the device -> model.

The architectures carry padding masks, so a recording's embedding does not depend on what it
is batched with. A recording longer than ``max_full_seconds`` (or every recording when
``chunk_seconds`` is set) is cut into windows whose embeddings are averaged, as 3D-Speaker's
infer_sv_batch.py does; the report says so.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..audio.features import compute_features, num_frames
from ..models.registry import ModelSpec
from . import precision as _precision
from .config import (
    DEFAULT_BATCH_FRAMES,
    DEFAULT_BATCH_ROWS,
    DEFAULT_CHUNK_SECONDS,
    DEFAULT_MAX_FULL_SECONDS,
    FP32_SUBMODULES,
    EngineConfig,
    EngineStats,
    default_workers,
    gpu_batch_frames,
)
from .data import (
    HostBatch,
    Loaded,
    Rows,
    plan_batches,
    windows,
)
from .device import (
    cpu_runners,
    engine_error,
    free_bytes,
    free_memory,
    is_oom,
    resolve_device,
    shm_plan,
)
from .loader import LoaderMixin
from .precision import PRECISIONS, fp32_scope, keep_fp32, tf32_off

__all__ = [
    "DEFAULT_BATCH_FRAMES",
    "DEFAULT_CHUNK_SECONDS",
    "DEFAULT_MAX_FULL_SECONDS",
    "FP32_SUBMODULES",
    "PRECISIONS",
    "Embedder",
    "EngineConfig",
    "EngineStats",
    "cpu_runners",
    "default_workers",
    "is_oom",
    "resolve_device",
    "shm_plan",
    "tf32_off",
]

Progress = Callable[[int, float], None]
Result = tuple[int, np.ndarray | None, str | None]

# Frame budgets learned from out-of-memory errors, by (arch, device, precision), for the rest of
# the process: a later Embedder of the same model on the same device starts from it.
_LEARNED_FRAMES: dict[tuple[str, str, str], int] = {}


@dataclass
class _Launched:
    """One model batch sent to the device: the embeddings' host copy (ready after ``event``),
    or why it failed."""

    rows: Rows
    host: torch.Tensor | None = None
    event: Any = None
    error: str | None = None


class Embedder(LoaderMixin):
    """A loaded model on a device, embedding waveforms in exact batches."""

    def __init__(
        self,
        spec: ModelSpec,
        model: torch.nn.Module | Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        config: EngineConfig,
    ) -> None:
        """``model``: a torch module, or any callable with its signature ``(feats, n_frames) ->
        (B, D)`` (e.g. engine/onnx_backend.py's OnnxModel, which may name its own CPU
        ``batch_frames``)."""
        self.spec = spec
        self.cfg = config
        self.device = resolve_device(config.device)
        if config.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}")
        self.dtype = PRECISIONS[config.precision]
        if isinstance(model, torch.nn.Module):
            model = model.to(self.device).eval()
        self.model = model
        # Submodules kept in fp32 at this precision (FP32_SUBMODULES), by name.
        kept = (
            keep_fp32(model, spec.arch, config.precision)
            if isinstance(model, torch.nn.Module)
            else {}
        )
        self.fp32_modules: tuple[str, ...] = tuple(kept)
        self._fp32_ids = frozenset(kept.values())
        self.frontend = spec.frontend
        self.stats = EngineStats()
        kind = self.device.type
        self._budget_key = (spec.arch, str(self.device), config.precision)
        if config.batch_frames:
            frames = config.batch_frames
        elif kind == "cuda":
            frames = gpu_batch_frames(spec.arch, free_bytes(self.device))
        else:
            frames = getattr(model, "batch_frames", 0) or DEFAULT_BATCH_FRAMES.get(kind, 2_400)
        # The budget is written in 10 ms fbank frames; a waveform front end counts samples.
        frames = self.frontend.budget_frames(frames)
        self.batch_frames = min(frames, _LEARNED_FRAMES.get(self._budget_key, frames))
        self.batch_size = config.batch_size or DEFAULT_BATCH_ROWS.get(kind, 32)
        self._lock = threading.Lock()  # stats, when CPU runners embed batches side by side
        self._loader: torch.utils.data.DataLoader[Any] | None = None
        self._loader_key: tuple[Any, ...] = ()
        self._loader_lock = threading.Lock()

    # -- waveforms -> embeddings ----------------------------------------------------------
    def _windows(self, wave: torch.Tensor) -> list[torch.Tensor]:
        return windows(wave, self.frontend.sample_rate, self.cfg.chunk_seconds,
                       self.cfg.max_full_seconds, DEFAULT_CHUNK_SECONDS)  # fmt: skip

    def _autocast(self) -> Any:
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    @torch.inference_mode()
    def _launch(self, rows: Rows) -> _Launched:
        """Upload one padded batch, compute its features and embeddings on the device.

        No host/device sync: the uploads come from pinned memory without blocking, frame counts
        come from the host's copy, and the embeddings are copied back into pinned memory without
        blocking; :meth:`_finish` waits for them (one batch stays in flight meanwhile).
        """
        cuda = self.device.type == "cuda"
        waves = rows.waves.to(self.device, non_blocking=cuda)
        lengths = rows.lengths.to(self.device, non_blocking=cuda)
        feats, n_frames = compute_features(waves, lengths, self.frontend)
        with self._autocast(), tf32_off(), fp32_scope(self._fp32_ids):
            emb = self.model(feats, n_frames)
        emb = emb.float()
        with self._lock:
            self.stats.frames += rows.valid_frames  # counted on the host, no device read
            self.stats.padded_frames += rows.padded_frames
            self.stats.batches += 1
        if not cuda:
            return _Launched(rows, emb)
        host = torch.empty(emb.shape, dtype=torch.float32, pin_memory=True)
        host.copy_(emb, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return _Launched(rows, host, event)

    def _launch_fitting(self, rows: Rows) -> list[_Launched]:
        """:meth:`_launch` within the current budget; on out-of-memory, free the cache, halve the
        frame budget (remembered for this arch and device), split the batch and retry. A single
        row that does not fit alone fails with the reason."""
        n = len(rows.owner)
        if n > 1 and (n > self.batch_size or rows.padded_frames > self.batch_frames):
            a, b = rows.split()
            return self._launch_fitting(a) + self._launch_fitting(b)
        try:
            return [self._launch(rows)]
        except Exception as exc:
            if not is_oom(exc):
                raise
        # Out of the except block: the traceback (and the tensors its frames hold) is gone.
        free_memory(self.device)
        with self._lock:
            self.stats.extra["oom_splits"] = self.stats.extra.get("oom_splits", 0) + 1
            if rows.padded_frames // 2 < self.batch_frames:
                self.batch_frames = max(1, rows.padded_frames // 2)
                _LEARNED_FRAMES[self._budget_key] = self.batch_frames
            self.stats.extra["batch_frames_after_oom"] = self.batch_frames
        if n == 1:
            frames = int(rows.frames[0])
            return [_Launched(rows, error=(
                f"out of memory on {self.device} even alone ({frames} frames); embed it in "
                "windows (--chunk-seconds) or on another device"))]  # fmt: skip
        a, b = rows.split()
        return self._launch_fitting(a) + self._launch_fitting(b)

    def _too_short(self, rows: Rows) -> tuple[Rows | None, _Launched | None]:
        """Rows (longest first) split into those the model can take and a failed part whose
        rows are under the model's ``min_frames`` (mvector's backbones have one: a row that
        short would raise inside the network and cost its whole batch)."""
        need = int(getattr(self.model, "min_frames", 0) or 0)
        ok, short = rows.split_at(int((rows.frames >= need).sum()) if need > 0 else len(rows.owner))
        if short is None:
            return ok, None
        unit = "samples" if self.frontend.kind == "waveform" else "feature frames"
        error = (
            f"too short for this model: under {need} {unit} "
            f"({self._min_seconds(need):.3f} s of audio), the least it takes"
        )
        return ok, _Launched(short, error=error)

    def _min_seconds(self, frames: int) -> float:
        """The shortest audio (seconds) whose front end gives ``frames`` frames."""
        lo, hi = 0, 600 * self.frontend.sample_rate
        while lo < hi:
            mid = (lo + hi) // 2
            if int(self.frontend.num_frames(mid)) >= frames:
                hi = mid
            else:
                lo = mid + 1
        return lo / self.frontend.sample_rate

    def _launch_batch(self, hb: HostBatch, on_error: str) -> list[_Launched]:
        try:
            out: list[_Launched] = []
            for rows in hb.rows:
                ok, short = self._too_short(rows)
                if short is not None:
                    out.append(short)
                if ok is not None:
                    out.extend(self._launch_fitting(ok))
            return out
        except Exception as exc:
            if on_error == "raise":
                raise
            return [_Launched(r, error=engine_error(self.device, exc)) for r in hb.rows]

    def _finish(
        self, hb: HostBatch, launched: list[_Launched], on_error: str = "raise"
    ) -> tuple[HostBatch, np.ndarray, list[str | None]]:
        """Wait for a batch's embeddings; average each recording's windows. Returns the batch,
        (items, D) float32 and each item's failure reason (None when embedded)."""
        sums = np.zeros((len(hb.items), self.spec.dim), dtype=np.float64)
        counts = np.zeros(len(hb.items), dtype=np.float64)
        errors = [it.error for it in hb.items]
        for x in launched:
            if x.error is None:
                try:
                    if x.event is not None:
                        x.event.synchronize()
                    assert x.host is not None
                    emb = x.host.numpy().astype(np.float64)
                except Exception as exc:
                    if on_error == "raise":
                        raise
                    x.error = engine_error(self.device, exc)
                else:
                    np.add.at(sums, x.rows.owner, emb)
                    np.add.at(counts, x.rows.owner, 1.0)
                    continue
            for o in x.rows.owner:
                errors[o] = errors[o] or x.error
        out = (sums / np.maximum(counts, 1.0)[:, None]).astype(np.float32)
        return hb, out, errors

    def _compute(
        self, hb: HostBatch, on_error: str = "raise"
    ) -> tuple[HostBatch, np.ndarray, list[str | None]]:
        t0 = time.perf_counter()
        try:
            return self._finish(hb, self._launch_batch(hb, on_error), on_error)
        finally:
            with self._lock:  # summed over CPU runners, so it can exceed the wall time
                self.stats.model_seconds += time.perf_counter() - t0

    def embed_waves(self, waves: Sequence[torch.Tensor]) -> np.ndarray:
        """Embed in-memory waveforms (at the model's rate). Returns (N, D) float32."""
        if not waves:
            return np.zeros((0, self.spec.dim), dtype=np.float32)
        hb = self._collator()([Loaded(i, w, None) for i, w in enumerate(waves)])
        if self.device.type == "cuda":
            hb.pin_memory()
        _, out, errors = self._compute(hb)
        with self._lock:
            self.stats.chunked += sum(1 for it in hb.items if it.windows > 1)
        bad = next((e for e in errors if e is not None), None)
        if bad is not None:
            raise RuntimeError(bad)
        return out

    # -- files -> embeddings --------------------------------------------------------------
    def embed_files(
        self,
        paths: Sequence[str],
        est_samples: Sequence[int] | None = None,
        progress: Progress | None = None,
        on_error: str = "raise",
    ) -> Iterator[Result]:
        """Yield ``(index, embedding, None)`` or ``(index, None, reason)`` for every path.

        Order follows the batch plan, not the input. Decoding, windows and padding run in
        persistent DataLoader workers. On a GPU one batch stays in flight while the next is
        launched. On a CPU, :func:`cpu_runners` batches are embedded at once by as many threads,
        each with one intra-op thread: torch's thread count is set to ``threads // runners``
        while this runs and restored after. ``on_error="fail"``: an error in a batch (other than
        out-of-memory, which is split and retried) fails that batch's recordings with the reason
        and the run goes on (shards use it); ``"raise"``: it propagates.
        """
        t_start = time.perf_counter()
        sr = self.frontend.sample_rate
        if est_samples is None:
            est_samples = [sr] * len(paths)
        est_frames = [max(int(num_frames(int(n), self.frontend)), 1) for n in est_samples]
        plan = plan_batches(est_frames, self.batch_frames, self.batch_size)
        runners = 1
        if self.device.type == "cpu":
            runners = self.cfg.runners if self.cfg.runners > 0 else cpu_runners()
            runners = min(runners, len(plan))
        workers = min(self.workers_for(runners), len(plan))
        if not plan:
            return
        # The persistent loader serves one call at a time; a concurrent call (threads sharing
        # this Embedder) gets a loader of its own, whose workers end with it.
        own = self._loader_lock.acquire(blocking=False)
        try:
            started = own and self._loader is not None
            if own:
                loader, sampler = self._get_loader(workers)
            else:
                loader, sampler = self._new_loader(workers, 2, persistent=False)
            sampler.plan = [[(i, str(paths[i])) for i in b] for b in plan]
            batches = self._timed(loader, t_start, started)
            if runners <= 1:
                yield from self._embed_in_flight(batches, progress, on_error)
            else:
                yield from self._embed_side_by_side(batches, runners, progress, on_error)
        finally:
            if own:
                self._loader_lock.release()
            self.stats.wall_seconds += time.perf_counter() - t_start

    def _timed(self, loader: Iterable[HostBatch], t0: float, warm: bool) -> Iterator[HostBatch]:
        """The loader's batches; the wait for the first is recorded apart (``first_batch_s``,
        with ``workers_warm``): worker start-up is no part of the throughput."""
        first = True
        for hb in loader:
            if first:
                self.stats.extra["first_batch_s"] = time.perf_counter() - t0
                self.stats.extra["workers_warm"] = warm
                first = False
            yield hb

    def _embed_in_flight(
        self, batches: Iterable[HostBatch], progress: Progress | None, on_error: str
    ) -> Iterator[Result]:
        """Launch batch k+1 before waiting for batch k's embeddings (a no-op on a CPU, where
        launching computes). ``model_seconds`` counts this thread's time in launching and in
        waiting for results (not its waits for decoded batches), without overlap."""
        pending: deque[tuple[HostBatch, list[_Launched]]] = deque()
        for hb in batches:
            t0 = time.perf_counter()
            pending.append((hb, self._launch_batch(hb, on_error)))
            self.stats.model_seconds += time.perf_counter() - t0
            while len(pending) > 1:
                yield from self._emit(*self._finish_timed(*pending.popleft(), on_error), progress)
        while pending:
            yield from self._emit(*self._finish_timed(*pending.popleft(), on_error), progress)

    def _finish_timed(
        self, hb: HostBatch, launched: list[_Launched], on_error: str
    ) -> tuple[HostBatch, np.ndarray, list[str | None]]:
        t0 = time.perf_counter()
        try:
            return self._finish(hb, launched, on_error)
        finally:
            self.stats.model_seconds += time.perf_counter() - t0

    def _embed_side_by_side(
        self, batches: Iterable[HostBatch], runners: int, progress: Progress | None,
        on_error: str,
    ) -> Iterator[Result]:  # fmt: skip
        """Embed loader batches ``runners`` at a time in threads; results in plan order."""
        threads = torch.get_num_threads()
        torch.set_num_threads(max(1, threads // runners))
        try:
            with ThreadPoolExecutor(runners, thread_name_prefix="speaker-sim-runner") as pool:
                pending: deque[Future[tuple[HostBatch, np.ndarray, list[str | None]]]] = deque()
                for hb in batches:
                    pending.append(pool.submit(self._compute, hb, on_error))
                    while pending and (len(pending) > runners or pending[0].done()):
                        yield from self._emit(*pending.popleft().result(), progress)
                while pending:
                    yield from self._emit(*pending.popleft().result(), progress)
        finally:
            torch.set_num_threads(threads)

    def _emit(
        self, hb: HostBatch, embs: np.ndarray, errors: list[str | None], progress: Progress | None
    ) -> Iterator[Result]:
        seconds = 0.0
        for it, e, err in zip(hb.items, embs, errors):
            if it.error is None:  # decoded: its audio counts, embedded or not
                seconds += it.seconds
                self.stats.recordings += 1
                self.stats.chunked += it.windows > 1
            if err is not None:
                self.stats.failed += 1
                yield it.index, None, err
            elif not np.isfinite(e).all():
                self.stats.failed += 1
                yield it.index, None, "the model produced a non-finite embedding"
            else:
                yield it.index, e, None
        self.stats.audio_seconds += seconds
        if progress is not None:
            progress(len(hb.items), seconds)


# Older names of what moved to engine/precision.py, kept importable from here.
_FP32 = _precision._FP32
_keep_fp32 = keep_fp32
_fp32_scope = fp32_scope
