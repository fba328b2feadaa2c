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
from contextlib import contextmanager, nullcontext
from typing import Any

import numpy as np
import torch

from ..audio.features import compute_features, num_frames
from ..errors import UsageError
from ..models.registry import ModelSpec
from .config import (
    DEFAULT_BATCH_FRAMES,
    DEFAULT_CHUNK_SECONDS,
    DEFAULT_MAX_FULL_SECONDS,
    FP32_SUBMODULES,
    EngineConfig,
    EngineStats,
    default_workers,
    fp32_submodules,
)
from .data import AudioDataset, Loaded, collate, pad_rows, plan_batches

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
    "resolve_device",
]

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str) -> torch.device:
    """``auto`` -> first CUDA device when there is one, else CPU. A CUDA device that is not
    there is a usage error that says why (a CPU-only torch build, or no such GPU)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UsageError(
            f"--device {device}: not a device (use auto, cpu, cuda or cuda:N)"
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = (
                "this torch is a CPU-only build"
                if torch.version.cuda is None
                else "no GPU is visible (check CUDA_VISIBLE_DEVICES and the driver)"
            )
            raise UsageError(f"--device {device}: CUDA is not available: {why} "
                             f"(torch {torch.__version__}); use --device cpu or auto")  # fmt: skip
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise UsageError(f"--device {device}: this machine has {n} GPU(s), cuda:0 to "
                             f"cuda:{n - 1}")  # fmt: skip
    return dev


def cpu_runners() -> int:
    """Batches a CPU embeds at once: one per intra-op thread, at most 4.

    Several single-threaded forwards side by side beat one forward on every core for these
    small convolutions (CAM++ on 2 cores: 7.7k frames/s as 2 x 1 thread, 5.1k as 1 x 2).
    """
    return max(1, min(4, torch.get_num_threads()))


Progress = Callable[[int, float], None]


class Embedder:
    """A loaded model on a device, embedding waveforms in exact batches."""

    def __init__(self, spec: ModelSpec, model: torch.nn.Module, config: EngineConfig) -> None:
        self.spec = spec
        self.cfg = config
        self.device = resolve_device(config.device)
        if config.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}")
        self.dtype = PRECISIONS[config.precision]
        if self.device.type == "cuda" and config.precision == "fp32":
            # fp32 means fp32: TF32 convolutions would move scores off the reference pipeline's.
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
        self.model = model.to(self.device).eval()
        # Submodules kept in fp32 at this precision (FP32_SUBMODULES), by name.
        kept = _keep_fp32(self.model, spec.arch, config.precision)
        self.fp32_modules: tuple[str, ...] = tuple(kept)
        self._fp32_ids = frozenset(kept.values())
        self.frontend = spec.frontend
        self.stats = EngineStats()
        frames = config.batch_frames or DEFAULT_BATCH_FRAMES.get(self.device.type, 2_400)
        # The budget is written in 10 ms fbank frames; a waveform front end counts samples.
        frames = self.frontend.budget_frames(frames)
        self.batch_frames = frames
        self._lock = threading.Lock()  # stats, when CPU runners embed batches side by side

    # -- waveforms -> embeddings ----------------------------------------------------------
    def _windows(self, wave: torch.Tensor) -> list[torch.Tensor]:
        sr = self.frontend.sample_rate
        seconds = wave.shape[0] / sr
        chunk = self.cfg.chunk_seconds
        if chunk is None and seconds <= self.cfg.max_full_seconds:
            return [wave]
        step = int((chunk or DEFAULT_CHUNK_SECONDS) * sr)
        wins = [wave[s : s + step] for s in range(0, wave.shape[0], step)]
        # A short tail is merged into the previous window rather than embedded alone.
        if len(wins) > 1 and wins[-1].shape[0] < step // 2:
            tail = wins.pop()
            wins[-1] = torch.cat([wins[-1], tail])
        return wins

    @torch.inference_mode()
    def _forward_rows(self, rows: Sequence[torch.Tensor]) -> torch.Tensor:
        """Embed 1-D waveforms (one batch, already within the budget). Returns (B, D) fp32."""
        waves, lengths = pad_rows(rows)
        if self.device.type == "cuda":
            waves = waves.pin_memory().to(self.device, non_blocking=True)
        else:
            waves = waves.to(self.device)
        lengths = lengths.to(self.device)
        feats, n_frames = compute_features(waves, lengths, self.frontend)
        with self._lock:
            self.stats.frames += int(n_frames.sum())
            self.stats.padded_frames += int(feats.shape[0] * feats.shape[1])
        if self.dtype == torch.float32:
            ctx: Any = nullcontext()
        else:
            ctx = torch.autocast(device_type=self.device.type, dtype=self.dtype)
        with ctx, _fp32_scope(self._fp32_ids):
            emb = self.model(feats, n_frames)
        with self._lock:
            self.stats.batches += 1
        return emb.float()

    def embed_waves(self, waves: Sequence[torch.Tensor]) -> np.ndarray:
        """Embed in-memory waveforms (at the model's rate). Returns (N, D) float32."""
        if not waves:
            return np.zeros((0, self.spec.dim), dtype=np.float32)
        rows: list[torch.Tensor] = []
        owner: list[int] = []
        for i, w in enumerate(waves):
            wins = self._windows(w)
            if len(wins) > 1:
                with self._lock:
                    self.stats.chunked += 1
            rows.extend(wins)
            owner.extend([i] * len(wins))
        frames = [max(int(num_frames(r.shape[0], self.frontend)), 1) for r in rows]
        out = torch.zeros(len(waves), self.spec.dim, dtype=torch.float64)
        counts = torch.zeros(len(waves), dtype=torch.float64)
        t0 = time.perf_counter()
        for batch in plan_batches(frames, self.batch_frames, self.cfg.batch_size):
            emb = self._forward_rows([rows[j] for j in batch]).double().cpu()
            idx = torch.tensor([owner[j] for j in batch])
            out.index_add_(0, idx, emb)
            counts.index_add_(0, idx, torch.ones(len(batch), dtype=torch.float64))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        with self._lock:  # summed over CPU runners, so it can exceed the wall time
            self.stats.model_seconds += time.perf_counter() - t0
        return (out / counts[:, None]).numpy().astype(np.float32)

    # -- files -> embeddings --------------------------------------------------------------
    def embed_files(
        self,
        paths: Sequence[str],
        est_samples: Sequence[int] | None = None,
        progress: Progress | None = None,
    ) -> Iterator[tuple[int, np.ndarray | None, str | None]]:
        """Yield ``(index, embedding, None)`` or ``(index, None, reason)`` for every path.

        Order follows the batch plan, not the input. Decoding runs in DataLoader workers. On a
        CPU, :func:`cpu_runners` batches are embedded at once by as many threads, each with one
        intra-op thread: torch's thread count is set to ``threads // runners`` while this runs
        and restored after.
        """
        t_start = time.perf_counter()
        sr = self.frontend.sample_rate
        if est_samples is None:
            est_samples = [sr] * len(paths)
        est_frames = [max(int(num_frames(int(n), self.frontend)), 1) for n in est_samples]
        plan = plan_batches(est_frames, self.batch_frames, self.cfg.batch_size)
        dataset = AudioDataset(
            paths,
            sr,
            int(self.cfg.min_duration * sr),
            int(self.cfg.max_duration * sr),
            self.frontend.channel,
            self.frontend.loudness_db,
            self.frontend.resampler,
        )
        runners = 1
        if self.device.type == "cpu":
            runners = self.cfg.runners if self.cfg.runners > 0 else cpu_runners()
            runners = min(runners, len(plan))
        workers = self.cfg.workers
        if workers < 0:
            # CPU runners keep every core busy and decoding is ~2 % of their work: decode in
            # this thread, between batches (2 cores: 6.1-6.4 s instead of 7.1-9.1 s with one
            # worker process for ../shared/audio).
            workers = 0 if runners > 1 else default_workers()
        workers = min(workers, len(plan))
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=plan,
            num_workers=workers,
            collate_fn=collate,
            worker_init_fn=_worker_init if workers else None,
            prefetch_factor=4 if workers else None,
            multiprocessing_context="spawn" if workers and self.device.type == "cuda" else None,
        )
        try:
            if runners <= 1:
                for batch in loader:
                    yield from self._embed_loaded(batch, progress)
            else:
                yield from self._embed_side_by_side(loader, runners, progress)
        finally:
            self.stats.wall_seconds += time.perf_counter() - t_start

    def _embed_side_by_side(
        self, loader: Iterable[list[Loaded]], runners: int, progress: Progress | None
    ) -> Iterator[tuple[int, np.ndarray | None, str | None]]:
        """Embed loader batches ``runners`` at a time in threads; results in plan order."""
        threads = torch.get_num_threads()
        torch.set_num_threads(max(1, threads // runners))
        try:
            with ThreadPoolExecutor(runners, thread_name_prefix="speaker-sim-runner") as pool:
                pending: deque[Future[tuple[list[Loaded], np.ndarray | None]]] = deque()
                for batch in loader:
                    pending.append(pool.submit(self._compute_loaded, batch))
                    while pending and (len(pending) > runners or pending[0].done()):
                        yield from self._emit_loaded(*pending.popleft().result(), progress)
                while pending:
                    yield from self._emit_loaded(*pending.popleft().result(), progress)
        finally:
            torch.set_num_threads(threads)

    def _embed_loaded(
        self, batch: list[Loaded], progress: Progress | None
    ) -> Iterator[tuple[int, np.ndarray | None, str | None]]:
        yield from self._emit_loaded(*self._compute_loaded(batch), progress)

    def _compute_loaded(self, batch: list[Loaded]) -> tuple[list[Loaded], np.ndarray | None]:
        """The embeddings (N_good, D) of the batch's decoded recordings, or None if none."""
        waves = [b.wave for b in batch if b.wave is not None]
        return batch, self.embed_waves(waves) if waves else None

    def _emit_loaded(
        self, batch: list[Loaded], embs: np.ndarray | None, progress: Progress | None
    ) -> Iterator[tuple[int, np.ndarray | None, str | None]]:
        good = [b for b in batch if b.wave is not None]
        for b in batch:
            if b.wave is None:
                self.stats.failed += 1
                yield b.index, None, b.error
        if not good or embs is None:
            return
        seconds = 0.0
        for b, e in zip(good, embs):
            assert b.wave is not None
            seconds += b.wave.shape[0] / self.frontend.sample_rate
            self.stats.recordings += 1
            if not np.isfinite(e).all():
                self.stats.failed += 1
                yield b.index, None, "the model produced a non-finite embedding"
            else:
                yield b.index, e, None
        self.stats.audio_seconds += seconds
        if progress is not None:
            progress(len(batch), seconds)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


def _keep_fp32(model: torch.nn.Module, arch: str, precision: str) -> dict[str, int]:
    """The :data:`FP32_SUBMODULES` of ``arch`` at ``precision``, by name -> ``id(module)``.

    Each gets (once) a pair of forward hooks that, while an Embedder that asked for it is
    running (:func:`_fp32_scope`) under autocast, turn autocast off for the submodule and cast
    its floating inputs to fp32, and turn it back on after. Otherwise the hooks do nothing.
    """
    out: dict[str, int] = {}
    for name in fp32_submodules(arch, precision):
        try:
            sub = model.get_submodule(name)
        except AttributeError:
            continue
        if not getattr(sub, "_speaker_sim_fp32_hooks", False):
            sub.register_forward_pre_hook(_fp32_enter)
            sub.register_forward_hook(_fp32_exit)
            sub._speaker_sim_fp32_hooks = True  # type: ignore[assignment]
        out[name] = id(sub)
    return out


_FP32 = threading.local()  # .active: ids of submodules to run in fp32; .stacks: entered contexts


@contextmanager
def _fp32_scope(ids: frozenset[int]) -> Iterator[None]:
    """Within: the hooked submodules in ``ids`` run in fp32. On the way out (also after an
    error inside one of them) every context they entered is left, innermost first."""
    _FP32.active, _FP32.stacks = ids, {}
    try:
        yield
    finally:
        for stack in _FP32.stacks.values():
            while stack:
                stack.pop().__exit__(None, None, None)
        _FP32.active = frozenset()


def _autocast_on(device_type: str) -> bool:
    try:
        return bool(torch.is_autocast_enabled(device_type))
    except TypeError:  # torch < 2.4: no device argument
        if device_type == "cpu":
            return bool(torch.is_autocast_cpu_enabled())
        return bool(torch.is_autocast_enabled())


def _fp32_enter(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    if id(module) not in getattr(_FP32, "active", ()):
        return None
    tensor = next((a for a in args if isinstance(a, torch.Tensor)), None)
    device_type = tensor.device.type if tensor is not None else "cpu"
    if not _autocast_on(device_type):
        return None
    ctx = torch.autocast(device_type, enabled=False)
    ctx.__enter__()
    _FP32.stacks.setdefault(id(module), []).append(ctx)
    return tuple(
        a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args
    )


def _fp32_exit(module: torch.nn.Module, _args: Any, _out: Any) -> None:
    stack = getattr(_FP32, "stacks", {}).get(id(module))
    if stack:
        stack.pop().__exit__(None, None, None)
