"""The ``score``/``embed`` side of a Ray run: the vectors the workers stored, read back.

:func:`embed_unique` is ``Extractor.embed_paths`` on Ray. The workers send one small row per
unit (status bytes and the 32-byte keys they stored under); this module turns those into one
matrix in the order of the paths, reading the store many keys at a time on a thread beside the
one that hands out work.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from ..errors import SpeakerSimError
from ..records import RowEmbeddings
from .ray_engine import RayRun
from .ray_worker import CACHE_HINT, FAILED, OK

__all__ = ["READBACK_ROWS", "embed_unique"]

#: The driver reads the workers' vectors back from the store this many recordings at a time.
READBACK_ROWS = 65_536


def embed_unique(
    run: RayRun,
    unique: Sequence[str],
    progress: Callable[[int, float], None] | None = None,
    on_start: Callable[[int, float], None] | None = None,
    stop_on_error: bool = False,
) -> tuple[Mapping[str, Any], dict[str, str], int, int]:
    """``Extractor.embed_paths`` on Ray: (embeddings by path, failures, embedded, from store).

    The workers hash, look up, decode and embed; this process reads the vectors back from the
    store by the keys the workers sent, many at a time and without a Python object per
    recording, into one matrix in the order of ``unique``
    (:class:`~speaker_sim_cli.records.RowEmbeddings`). The first unit's are read at once (a
    driver that cannot read the store stops the job then, not at the end); the rest, in
    batches of ``READBACK_ROWS``, on a thread of their own while this one goes on handing out
    work (numpy lets go of the GIL for the reads, gathers and checks, so the scheduling is not
    held up by them; ``run.info["readback_cpu_s"]`` is that thread's CPU). Two paths with the
    same content count once as embedded.
    """
    cache = run.cache
    failures: dict[str, str] = {}
    pending: list[tuple[int, bytes, bytes]] = []  # units not read back: (lo, status, keys)
    fresh: list[np.ndarray] = []  # keys of the recordings embedded now (status OK)
    got = {"rows": 0, "cpu": 0.0}
    have = np.zeros(len(unique), dtype=bool)
    out: list[np.ndarray] = []  # the (len(unique), dim) matrix, made at the first read

    def read_back(batch: list[tuple[int, bytes, bytes]]) -> None:
        c0 = time.thread_time()
        at = np.concatenate([np.arange(lo, lo + len(st)) for lo, st, _ in batch])
        status = np.frombuffer(b"".join(st for _, st, _ in batch), np.uint8)
        keys = np.frombuffer(b"".join(d[: 32 * len(st)] for _, st, d in batch), np.uint8)
        live = status != FAILED
        at, status, keys = at[live], status[live], keys.reshape(-1, 32)[live]
        if not out:
            out.append(np.empty((len(unique), cache.dim), np.float32))
        _, found = cache.get_many(keys, out=out[0], dest=at)  # straight into the matrix
        if not found.all():
            path = unique[int(at[np.flatnonzero(~found)[0]])]
            raise SpeakerSimError(f"{path}: embedded by a Ray worker under {cache.root}, but "
                                  f"this process cannot read it there; {CACHE_HINT}")  # fmt: skip
        have[at] = True
        fresh.append(keys[status == OK])
        got["rows"] += len(at)
        got["cpu"] += time.thread_time() - c0

    if on_start is not None:
        on_start(len(unique), 0.0)  # durations are only known on the workers
    held, first = 0, True
    with (
        ThreadPoolExecutor(1, thread_name_prefix="speaker-sim-readback") as reader,
        contextlib.closing(run.embed_units(unique, progress)) as units,
    ):
        busy: Future[None] | None = None

        def hand_over(wait: bool) -> None:
            nonlocal busy
            if busy is not None:
                busy.result()  # one batch at a time; its error stops the run here
            busy = reader.submit(read_back, pending[:]) if pending else None
            pending.clear()
            if wait and busy is not None:
                busy.result()

        for lo, status, digest, reasons in units:
            stop = len(status)
            if FAILED in status:
                for j in [j for j, s in enumerate(status) if s == FAILED]:
                    failures[unique[lo + j]] = reasons.get(j) or "unknown error"
                    if stop_on_error:
                        stop = j
                        break
            pending.append((lo, bytes(status[:stop]), digest))
            held += stop
            if first or held >= READBACK_ROWS or stop < len(status):
                hand_over(wait=first)
                held, first = 0, False
            if stop < len(status):
                break
        hand_over(wait=True)
    run.info["readback_cpu_s"] = round(got["cpu"], 3)
    embedded = _distinct(np.concatenate(fresh)) if fresh else 0
    matrix = out[0] if out else np.zeros((len(unique), cache.dim), np.float32)
    return RowEmbeddings(unique, matrix, have), failures, embedded, int(got["rows"]) - embedded


def _distinct(keys: np.ndarray) -> int:
    """How many different keys among ``keys`` ((n, 32) uint8; by their first 16 bytes, as the
    store's index tells them apart)."""
    return int(np.unique(np.ascontiguousarray(keys[:, :16]).view("V16")).size)
