"""Several devices on one machine: recordings sharded across one process per device.

``--device cuda:0,cuda:1`` starts a spawned process per device; each makes its device current,
loads the model on it and embeds its share (balanced by audio length), streaming every batch's
results back through a queue as they finish, so that the parent caches them as they arrive and
one shard's failure costs only what that shard had not yet sent. Decode workers are split
across the shards. ``cpu,cpu`` runs the same mechanism on the CPU.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import queue
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .config import EngineConfig, default_workers

if TYPE_CHECKING:
    from ..models.registry import ModelSpec

Result = tuple[int, np.ndarray | None, str | None]
ModelHook = Callable[[int, Any], Any]


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
    shard: int,
    model: ModelSpec | str,
    checkpoint: str,
    cfg: EngineConfig,
    files: list[str],
    est: list[int],
    out: Any,
    model_hook: ModelHook | None = None,
) -> None:
    """A shard process: embed ``files`` on ``cfg.device`` and stream to ``out`` (a queue) as each
    batch finishes: ``("result", shard, j, emb, err)`` per recording, ``("progress", shard, n,
    seconds)`` per batch, ``("error", shard, text)`` if the shard itself fails, and always
    ``("done", shard)`` last. A batch's error fails only that batch (``on_error="fail"``)."""
    try:
        import torch

        from ..models.registry import get_model
        from ..models.weights import load_spec_checkpoint
        from .embedder import Embedder

        dev = torch.device(cfg.device)
        if dev.type == "cuda" and dev.index is not None:
            # Kernels, caches and the allocator default to the current device: make it ours.
            torch.cuda.set_device(dev)
        spec = get_model(model) if isinstance(model, str) else model
        module = spec.build()
        load_spec_checkpoint(module, Path(checkpoint), spec)
        if model_hook is not None:
            module = model_hook(shard, module)
        embedder = Embedder(spec, module, cfg)

        def progress(n: int, seconds: float) -> None:
            out.put(("progress", shard, n, seconds))

        for j, emb, err in embedder.embed_files(files, est, progress, on_error="fail"):
            out.put(("result", shard, j, emb, err))
        embedder.close()
    except BaseException as exc:  # reported to the parent, which keeps the other shards' work
        out.put(("error", shard, f"{type(exc).__name__}: {exc}"))
    finally:
        out.put(("done", shard))


def embed_sharded(
    model: ModelSpec | str,
    checkpoint: Path,
    cfg: EngineConfig,
    files: Sequence[str],
    est: Sequence[int],
    progress: Callable[[int, float], None] | None = None,
    model_hook: ModelHook | None = None,
) -> Iterator[Result]:
    """Yield ``(index into files, embedding | None, reason | None)`` from every device as each
    shard's batches finish (so the caller caches them as they arrive).

    A shard that fails (its process raising or dying) costs only what it had not yet sent:
    those recordings are failed with the reason, the other shards' results all arrive.
    ``progress(n, seconds)`` gets recordings and audio seconds per batch. ``model_hook(shard,
    module) -> module`` (a top-level function) is applied in each shard process after loading.
    """
    devices = split_devices(cfg.device)
    shards = [s for s in balance(est, len(devices)) if s]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    workers = cfg.workers if cfg.workers >= 0 else default_workers(len(shards))
    procs = []
    for k, (dev, shard) in enumerate(zip(devices, shards)):
        sub = dataclasses.replace(cfg, device=dev, workers=workers)
        args = (k, model, str(checkpoint), sub, [files[i] for i in shard],
                [int(est[i]) for i in shard], out, model_hook)  # fmt: skip
        p = ctx.Process(target=_embed_shard, args=args, name=f"speaker-sim-shard-{dev}")
        p.start()
        procs.append(p)
    sent: list[set[int]] = [set() for _ in shards]
    errors: dict[int, str] = {}
    done: set[int] = set()
    try:
        while len(done) < len(shards):
            try:
                msg = out.get(timeout=0.5)
            except queue.Empty:
                for k, p in enumerate(procs):
                    if k not in done and not p.is_alive() and out.empty():
                        # Died without a word (killed, or a crash in native code).
                        errors.setdefault(k, f"its process exited with code {p.exitcode}")
                        done.add(k)
                continue
            kind, k = msg[0], msg[1]
            if kind == "result":
                _, _, j, emb, err = msg
                sent[k].add(j)
                yield shards[k][j], emb, err
            elif kind == "progress":
                if progress is not None:
                    progress(msg[2], msg[3])
            elif kind == "error":
                errors[k] = msg[2]
            elif kind == "done":
                done.add(k)
        for k, shard in enumerate(shards):
            if k in errors:
                why = f"not embedded: the shard on {devices[k]} failed ({errors[k]})"
                for j, i in enumerate(shard):
                    if j not in sent[k]:
                        yield i, None, why
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
                p.join()
