"""The login service's micro-batcher on its own (no model, no server): answers in order, errors
to the right requests, a burst gathered into one batch by one worker, a batch that keeps
gathering while requests keep coming, and the per-stage times /v1/stats reports."""

from __future__ import annotations

import asyncio
import threading

import pytest

from speaker_sim_cli.voiceprints.service.batching import STRETCH, MicroBatcher
from speaker_sim_cli.voiceprints.service.errors import ServiceError


class Recorder:
    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.lock = threading.Lock()

    def __call__(self, items: list[int]) -> list[int | BaseException]:
        with self.lock:
            self.batches.append(list(items))
        return [ValueError(f"bad {i}") if i < 0 else i * 10 for i in items]


def test_answers_in_order_and_errors_to_their_request() -> None:
    rec = Recorder()
    b: MicroBatcher[int, int] = MicroBatcher(rec, max_batch=4, max_wait=0.05, workers=2)
    b.start()

    async def main() -> list[object]:
        return await asyncio.gather(
            *(b.submit(i) for i in [1, 2, -3, 4, 5, 6, 7]), return_exceptions=True
        )

    try:
        got = asyncio.run(main())
    finally:
        b.stop()
    assert got[:2] == [10, 20] and got[3:] == [40, 50, 60, 70]
    assert isinstance(got[2], ValueError) and str(got[2]) == "bad -3"
    assert all(len(x) <= 4 for x in rec.batches)
    assert sorted(i for x in rec.batches for i in x) == [-3, 1, 2, 4, 5, 6, 7]
    stats = b.stats()
    assert stats["items"] == 7 and stats["max_batch"] <= 4
    assert {"gather", "queue", "process"} <= set(stats["stages"])
    assert stats["stages"]["queue"]["count"] == 7


def test_a_burst_is_one_batch_with_two_idle_workers() -> None:
    """Both workers idle, one request, then eleven more while the first waits: one worker
    gathers all of them (the other waits for its turn to gather) instead of the other taking
    some of the burst as a batch of its own."""
    rec = Recorder()
    b: MicroBatcher[int, int] = MicroBatcher(rec, max_batch=12, max_wait=2.0, workers=2)
    b.start()

    async def later(i: int) -> int:
        await asyncio.sleep(0.03)
        return await b.submit(i)

    async def main() -> list[int]:
        return await asyncio.gather(b.submit(0), *(later(i) for i in range(1, 12)))

    try:
        got = asyncio.run(main())
    finally:
        b.stop()
    assert got == [i * 10 for i in range(12)]
    assert [len(x) for x in rec.batches] == [12], rec.batches


def test_a_batch_keeps_gathering_while_requests_keep_coming() -> None:
    """Requests 0.6 x max_wait apart: each one extends the wait, so the third (1.2 x max_wait
    after the first, past a fixed deadline) still joins the first batch; the wait is capped."""
    rec = Recorder()
    wait = 1.0
    b: MicroBatcher[int, int] = MicroBatcher(rec, max_batch=3, max_wait=wait, workers=1)
    b.start()

    async def late(i: int, after: float) -> int:
        await asyncio.sleep(after)
        return await b.submit(i)

    async def main() -> list[int]:
        return await asyncio.gather(*(late(i, 0.6 * wait * i) for i in range(3)))

    try:
        got = asyncio.run(main())
    finally:
        b.stop()
    assert got == [0, 10, 20]
    assert rec.batches == [[0, 1, 2]], rec.batches
    assert 1.2 < STRETCH <= 8
    assert b.stats()["stages"]["gather"]["mean_ms"] < 1000 * STRETCH * wait


def test_a_full_queue_is_busy() -> None:
    gate = threading.Event()

    def slow(items: list[int]) -> list[int]:
        gate.wait(10)
        return items

    b: MicroBatcher[int, int] = MicroBatcher(slow, max_batch=1, max_wait=0.0, max_queue=1)
    b.start()

    async def main() -> None:
        first = asyncio.ensure_future(b.submit(1))  # taken by the worker, which then blocks
        for _ in range(100):
            await asyncio.sleep(0.01)
            if b.stats()["queued"] == 0:
                break
        second = asyncio.ensure_future(b.submit(2))  # fills the queue
        await asyncio.sleep(0)
        with pytest.raises(ServiceError) as err:
            await b.submit(3)
        assert err.value.code == "busy"
        gate.set()
        assert await first == 1 and await second == 2

    try:
        asyncio.run(main())
    finally:
        gate.set()
        b.stop()
