"""Batched inference: DataLoader -> (optional windows) -> fbank on the device -> model.

The architectures carry padding masks, so a recording's embedding does not depend on what it
is batched with. A recording longer than ``max_full_seconds`` (or every recording when
``chunk_seconds`` is set) is cut into windows whose embeddings are averaged, as 3D-Speaker's
infer_sv_batch.py does; the report says so.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..features import compute_features, num_frames
from ..models.registry import ModelSpec
from .data import AudioDataset, Loaded, collate, pad_rows, plan_batches

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Whole-recording embedding is exact up to this length; longer ones are embedded in windows.
DEFAULT_MAX_FULL_SECONDS = 300.0
DEFAULT_CHUNK_SECONDS = 10.0


def resolve_device(device: str) -> torch.device:
    """``auto`` -> first CUDA device when there is one, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return dev


def default_workers() -> int:
    n = os.cpu_count() or 1
    return max(0, min(8, n - 1))


@dataclass(frozen=True)
class EngineConfig:
    """How to run the model. ``mode()`` and ``precision`` are part of the cache key."""

    device: str = "auto"
    precision: str = "fp32"
    batch_size: int = 32
    batch_frames: int = 0  # 0: a default for the device
    workers: int = -1  # -1: default_workers()
    chunk_seconds: float | None = None
    max_full_seconds: float = DEFAULT_MAX_FULL_SECONDS
    min_duration: float = 0.3
    max_duration: float = 0.0  # 0: no limit

    def mode(self) -> str:
        if self.chunk_seconds:
            return f"chunk{self.chunk_seconds:g}s"
        return f"full<= {self.max_full_seconds:g}s else chunk{DEFAULT_CHUNK_SECONDS:g}s"


@dataclass
class EngineStats:
    recordings: int = 0
    failed: int = 0
    chunked: int = 0
    audio_seconds: float = 0.0
    frames: int = 0
    padded_frames: int = 0
    batches: int = 0
    model_seconds: float = 0.0
    wall_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


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
        self.model = model.to(self.device).eval()
        self.frontend = spec.frontend
        self.stats = EngineStats()
        frames = config.batch_frames or (200_000 if self.device.type == "cuda" else 12_000)
        self.batch_frames = frames

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
        self.stats.frames += int(n_frames.sum())
        self.stats.padded_frames += int(feats.shape[0] * feats.shape[1])
        if self.dtype == torch.float32:
            ctx: Any = nullcontext()
        else:
            ctx = torch.autocast(device_type=self.device.type, dtype=self.dtype)
        with ctx:
            emb = self.model(feats, n_frames)
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

        Order follows the batch plan, not the input. Decoding runs in DataLoader workers.
        """
        t_start = time.perf_counter()
        sr = self.frontend.sample_rate
        if est_samples is None:
            est_samples = [sr] * len(paths)
        est_frames = [max(int(num_frames(int(n), self.frontend)), 1) for n in est_samples]
        plan = plan_batches(est_frames, self.batch_frames, self.cfg.batch_size)
        dataset = AudioDataset(
            paths, sr, int(self.cfg.min_duration * sr), int(self.cfg.max_duration * sr)
        )
        workers = default_workers() if self.cfg.workers < 0 else self.cfg.workers
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
            for batch in loader:
                yield from self._embed_loaded(batch, progress)
        finally:
            self.stats.wall_seconds += time.perf_counter() - t_start

    def _embed_loaded(
        self, batch: list[Loaded], progress: Progress | None
    ) -> Iterator[tuple[int, np.ndarray | None, str | None]]:
        good = [b for b in batch if b.wave is not None]
        for b in batch:
            if b.wave is None:
                self.stats.failed += 1
                yield b.index, None, b.error
        if not good:
            return
        embs = self.embed_waves([b.wave for b in good if b.wave is not None])
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
