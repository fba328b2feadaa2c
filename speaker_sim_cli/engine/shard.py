"""Several devices on one machine: recordings sharded across one process per device.

``--device cuda:0,cuda:1`` starts a spawned process per device; each loads the model on its
device and embeds its share (balanced by audio length), and the parent caches and collects the
results. ``cpu,cpu`` runs the same mechanism on the CPU.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path

import numpy as np

from .config import EngineConfig

Result = tuple[int, np.ndarray | None, str | None]


def split_devices(device: str) -> list[str]:
    """``"cuda:0, cuda:1"`` -> ``["cuda:0", "cuda:1"]``; a single device gives one item."""
    return [d.strip() for d in device.split(",") if d.strip()]


def balance(lengths: Sequence[int], n: int) -> list[list[int]]:
    """Indices split into ``n`` shards of near-equal total length (longest first, greedy)."""
    shards: list[list[int]] = [[] for _ in range(n)]
    load = [0] * n
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        k = load.index(min(load))
        shards[k].append(i)
        load[k] += max(int(lengths[i]), 1)
    return shards


def _embed_shard(
    model_id: str, model_dir: str, cfg: EngineConfig, files: list[str], est: list[int]
) -> list[Result]:
    import torch

    from ..models.registry import get_model
    from ..models.weights import load_checkpoint_into
    from .embedder import Embedder

    torch.set_num_threads(max(1, torch.get_num_threads()))
    spec = get_model(model_id)
    module = spec.build()
    load_checkpoint_into(module, Path(model_dir) / spec.checkpoint, spec.arch)
    embedder = Embedder(spec, module, cfg)
    return list(embedder.embed_files(files, est))


def embed_sharded(
    model_id: str,
    checkpoint: Path,
    cfg: EngineConfig,
    files: Sequence[str],
    est: Sequence[int],
    progress: Callable[[int, float], None] | None = None,
) -> Iterator[Result]:
    """Yield ``(index into files, embedding | None, reason | None)`` from every device."""
    devices = split_devices(cfg.device)
    shards = [s for s in balance(est, len(devices)) if s]
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(max_workers=len(shards), mp_context=ctx) as pool:
        futures: dict[Future[list[Result]], list[int]] = {}
        for dev, shard in zip(devices, shards):
            sub = dataclasses.replace(cfg, device=dev)
            fut = pool.submit(
                _embed_shard, model_id, str(checkpoint.parent), sub,
                [files[i] for i in shard], [int(est[i]) for i in shard],
            )  # fmt: skip
            futures[fut] = shard
        pending = set(futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                shard = futures[fut]
                results = fut.result()
                for j, emb, err in results:
                    yield shard[j], emb, err
                if progress is not None:
                    progress(len(results), 0.0)
