"""The micro-batcher: requests that arrive together share one forward pass.

Requests wait in a bounded queue (full: ``busy``, 503); a worker thread, off the event loop,
takes the first waiting job and gathers more until ``max_batch``, or until none has come for
``max_wait`` seconds (at most ``STRETCH * max_wait`` after the first), and runs them as one
batch. ``workers`` threads do this side by side (on a CPU, single-threaded forwards side by side
beat one forward on every core: engine.embedder's ``cpu_runners``), but gather one at a time,
so a burst of requests makes one full batch rather than two halves (CAM++ forwards of 1-4
3 s clips on one thread took ~25 % more CPU per clip than of 8-16). Stopping finishes every
job already queued.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future, InvalidStateError
from typing import Any, Generic, TypeVar

from .errors import ServiceError

T = TypeVar("T")
R = TypeVar("R")
_STOP = object()
#: A batch keeps gathering while requests keep coming (each arrival allows ``max_wait`` more),
#: up to this many times ``max_wait`` after its first request.
STRETCH = 4


class StageTimes:
    """Seconds spent per named stage, and how many times (thread-safe; for ``/v1/stats``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sum: dict[str, list[float]] = {}

    def add(self, stage: str, seconds: float, count: int = 1) -> None:
        with self._lock:
            got = self._sum.setdefault(stage, [0.0, 0])
            got[0] += seconds
            got[1] += count

    def as_dict(self) -> dict[str, dict[str, float]]:
        with self._lock:
            return {
                k: {"seconds": round(s, 3), "count": int(n), "mean_ms": round(1000 * s / n, 2)}
                for k, (s, n) in self._sum.items()
                if n
            }


class MicroBatcher(Generic[T, R]):
    """``process(items)`` returns one result (or an exception) per item, in order."""

    def __init__(
        self,
        process: Callable[[list[T]], Sequence[R | BaseException]],
        max_batch: int = 16,
        max_wait: float = 0.010,
        max_queue: int = 64,
        workers: int = 1,
    ) -> None:
        self.process = process
        self.max_batch = max_batch
        self.max_wait = max_wait
        self._q: queue.Queue[Any] = queue.Queue(max_queue)
        self.workers = max(1, workers)
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self.sizes: Counter[int] = Counter()  # batch size -> how many batches
        self.busy_seconds = 0.0
        self.times = StageTimes()  # queue (per item), gather and process (per batch)
        self._gathering = threading.Lock()  # one worker gathers at a time

    def start(self) -> None:
        while len(self._threads) < self.workers:
            t = threading.Thread(target=self._run, name=f"speaker-sim-batcher-{len(self._threads)}")
            t.daemon = True
            t.start()
            self._threads.append(t)

    def stop(self, timeout: float = 60.0) -> None:
        """Finish the queued jobs, then end the workers."""
        for _ in self._threads:
            self._q.put(_STOP)  # blocks while the queue is full: the workers are draining it
        for t in self._threads:
            t.join(timeout)
        self._threads = []

    async def submit(self, item: T) -> R:
        fut: Future[R] = Future()
        try:
            self._q.put_nowait((item, fut, time.perf_counter()))
        except queue.Full:
            raise ServiceError(
                "busy", "the model's queue is full; retry shortly", {"Retry-After": "1"}
            ) from None
        return await asyncio.wrap_future(fut)

    def stats(self) -> dict[str, Any]:
        n = sum(self.sizes.values())
        items = sum(k * v for k, v in self.sizes.items())
        return {
            "batches": n,
            "items": items,
            "mean_batch": items / n if n else 0.0,
            "max_batch": max(self.sizes, default=0),
            "batch_sizes": {str(k): v for k, v in sorted(self.sizes.items())},
            "queued": self._q.qsize(),
            "busy_seconds": round(self.busy_seconds, 3),
            "stages": self.times.as_dict(),
        }

    def _gather(self, first: Any) -> tuple[list[Any], bool]:
        batch, stop = [first], False
        t0 = time.perf_counter()
        start = time.monotonic()
        deadline = start + self.max_wait
        cap = start + STRETCH * self.max_wait
        while len(batch) < self.max_batch:
            left = deadline - time.monotonic()
            try:
                job = self._q.get(timeout=left) if left > 0 else self._q.get_nowait()
            except queue.Empty:
                break
            if job is _STOP:
                self._q.put(job)  # another worker's: hand it on after this batch
                stop = True
                break
            batch.append(job)
            deadline = min(cap, time.monotonic() + self.max_wait)
        now = time.perf_counter()
        self.times.add("gather", now - t0)
        self.times.add("queue", sum(now - job[2] for job in batch), len(batch))
        return batch, stop

    def _run(self) -> None:
        stop = False
        while not stop:
            with self._gathering:
                first = self._q.get()
                if first is _STOP:
                    break
                batch, stop = self._gather(first)
            t0 = time.perf_counter()
            try:
                results: Sequence[Any] = self.process([job[0] for job in batch])
            except BaseException as exc:  # a failure of the whole batch goes to each request
                results = [exc] * len(batch)
            took = time.perf_counter() - t0
            self.times.add("process", took)
            with self._lock:
                self.busy_seconds += took
                self.sizes[len(batch)] += 1
            for (_, fut, _), res in zip(batch, results):
                try:
                    if isinstance(res, BaseException):
                        fut.set_exception(res)
                    else:
                        fut.set_result(res)
                except InvalidStateError:  # the client went away
                    pass
