"""The decode side of the engine: a DataLoader over the files (worker processes sized to the
shared memory, kept warm across calls) that hands the Embedder length-planned batches."""

from __future__ import annotations

import logging
import threading
from typing import Any

import torch

from .config import DEFAULT_CHUNK_SECONDS, EngineConfig, EngineStats, default_workers
from .data import Collator, FileDataset, PlanSampler
from .device import shm_plan, worker_init


class LoaderMixin:
    """The Embedder's DataLoader: built once per settings, its workers persistent."""

    cfg: EngineConfig
    device: torch.device
    frontend: Any
    stats: EngineStats
    batch_frames: int
    batch_size: int
    _loader: torch.utils.data.DataLoader[Any] | None
    _loader_key: tuple[Any, ...]
    _loader_lock: threading.Lock

    def _collator(self) -> Collator:
        return Collator(
            self.frontend.sample_rate, self.frontend.num_frames, self.cfg.chunk_seconds,
            self.cfg.max_full_seconds, self.batch_frames, self.batch_size, DEFAULT_CHUNK_SECONDS,
        )  # fmt: skip

    def workers_for(self, runners: int) -> int:
        """Decode worker processes: ``cfg.workers``, or (-1) one per core but the feeding one
        (:func:`default_workers`), none when CPU runners already keep every core busy."""
        if self.cfg.workers >= 0:
            return self.cfg.workers
        # CPU runners keep every core busy and decoding is ~2 % of their work: decode in this
        # thread, between batches (2 cores: 6.1-6.4 s instead of 7.1-9.1 s with one worker
        # process for ../shared/audio).
        return 0 if runners > 1 else default_workers()

    def _get_loader(self, workers: int) -> tuple[torch.utils.data.DataLoader[Any], PlanSampler]:
        """The DataLoader, built once and kept with its worker processes (persistent) for every
        later ``embed_files`` call with the same settings; start-up is paid once."""
        workers, prefetch, note = shm_plan(workers, 4, self._batch_bytes())
        if note:
            self.stats.extra.setdefault("notes", []).append(note)
            logging.getLogger("speaker_sim").warning(note)
        key = (workers, prefetch, self.batch_frames, self.batch_size)
        if self._loader is not None and key == self._loader_key:
            return self._loader, self._loader.batch_sampler  # type: ignore[return-value]
        self.close()
        self._loader, sampler = self._new_loader(workers, prefetch, persistent=workers > 0)
        self._loader_key = key
        self.stats.extra["workers"] = workers
        return self._loader, sampler

    def _new_loader(
        self, workers: int, prefetch: int, persistent: bool
    ) -> tuple[torch.utils.data.DataLoader[Any], PlanSampler]:
        sr = self.frontend.sample_rate
        cuda = self.device.type == "cuda"
        sampler = PlanSampler()
        dataset = FileDataset(sr, int(self.cfg.min_duration * sr), int(self.cfg.max_duration * sr),
                              self.frontend.channel, self.frontend.loudness_db,
                              self.frontend.resampler)  # fmt: skip
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=sampler,
            num_workers=workers,
            collate_fn=self._collator(),
            pin_memory=cuda,
            worker_init_fn=worker_init if workers else None,
            prefetch_factor=prefetch if workers else None,
            persistent_workers=persistent and workers > 0,
            multiprocessing_context="spawn" if workers and cuda else None,
        )
        return loader, sampler

    def _batch_bytes(self) -> int:
        """Bytes of one padded batch of waveforms at the frame budget (float32)."""
        sr = self.frontend.sample_rate
        per_frame = 10 * sr / max(1, int(self.frontend.num_frames(10 * sr)))
        return int(self.batch_frames * per_frame * 4)

    def close(self) -> None:
        """Stop the persistent decode workers (they also stop with the Embedder)."""
        loader, self._loader = self._loader, None
        it = getattr(loader, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
