"""The login service under load (bounded): 96 identify requests of 3 s clips from 16 concurrent
clients against a real server. Every answer must be right, and the micro-batcher must have put
concurrent requests into shared forward passes (batches > 1). p50/p99 latency and requests/s are
printed (figures for benchmarks/bench_voiceprint_service.py, not asserted)."""

from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from test_voiceprint_service import (
    ADMIN,
    CLIENT,
    ENROL,
    auth,
    httpx,
    post_audio,
    start_server,
    vctk,
    wav_bytes,
)

pytestmark = pytest.mark.slow
sf = pytest.importorskip("soundfile")
REQUESTS, CLIENTS = 96, 16


@pytest.fixture(scope="module")
def server(shared: Path, real_ckpt: Path, tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("load")
    srv = start_server(
        folder, ["--rate-limit", "100000/min", "--max-batch", "16", "--batch-wait-ms", "20"]
    )
    for spk in ("p225", "p226", "p227"):
        for n in ENROL:
            r = post_audio(f"{srv.url}/v1/speakers/{spk}/enrol",
                           vctk(shared, spk, n).read_bytes(), ADMIN)  # fmt: skip
            assert r.status_code == 200, r.text
    yield srv
    assert srv.stop() == 0, srv.tail()


def clips(shared: Path) -> list[tuple[str, bytes]]:
    """3 s clips (from 0.5 s in) of held-out recordings; p228 is not enrolled: unknown."""
    out = []
    for spk in ("p225", "p226", "p227", "p228"):
        for n in ("016", "019", "021", "022", "023"):
            wav, rate = sf.read(vctk(shared, spk, n), dtype="float32")
            cut = wav[rate // 2 : rate // 2 + 3 * rate]
            out.append((spk if spk != "p228" else "unknown", wav_bytes(cut, rate)))
    return out


def test_concurrent_identify_is_micro_batched(server, shared):
    work = clips(shared)
    jobs = [work[i % len(work)] for i in range(REQUESTS)]

    def one(job: tuple[str, bytes]) -> tuple[str, int, str, float]:
        want, data = job
        t0 = time.perf_counter()
        r = post_audio(f"{server.url}/v1/identify", data, CLIENT)
        dt = time.perf_counter() - t0
        return want, r.status_code, r.json().get("speaker", r.text), dt

    t0 = time.perf_counter()
    with ThreadPoolExecutor(CLIENTS) as pool:
        got = list(pool.map(one, jobs, timeout=600))
    wall = time.perf_counter() - t0
    errors = [g for g in got if g[1] != 200]
    assert not errors, errors[:3]
    wrong = [(w, s) for w, _, s, _ in got if w != s]
    assert not wrong, wrong[:5]
    lat = np.array([g[3] for g in got]) * 1000
    stats = httpx.get(f"{server.url}/v1/stats", headers=auth(ADMIN), timeout=30).json()
    b = stats["batching"]
    print(
        f"\n{REQUESTS} identify, {CLIENTS} clients: {REQUESTS / wall:.1f} req/s, "
        f"p50 {np.percentile(lat, 50):.0f} ms, p99 {np.percentile(lat, 99):.0f} ms; "
        f"batches {b['batches']}, mean size {b['mean_batch']:.2f}, max {b['max_batch']}, "
        f"sizes {b['batch_sizes']}"
    )
    shared_pass = sum(int(k) * v for k, v in b["batch_sizes"].items() if int(k) > 1)
    assert b["max_batch"] > 1 and shared_pass >= b["items"] / 2, b  # most shared a forward pass
    assert stats["inflight_peak"] <= 32


def test_sigterm_finishes_the_requests_in_flight(server, shared):
    """Requests in flight when SIGTERM arrives are answered; then the server exits 0."""
    data = clips(shared)[0][1]
    with ThreadPoolExecutor(8) as pool:
        futs = [pool.submit(post_audio, f"{server.url}/v1/identify", data, CLIENT)
                for _ in range(8)]  # fmt: skip
        deadline = time.monotonic() + 60
        while True:  # until the server holds at least 4 of them
            st = httpx.get(f"{server.url}/v1/stats", headers=auth(ADMIN), timeout=30).json()
            if st["inflight"] >= 4 or all(f.done() for f in futs):
                break
            assert time.monotonic() < deadline
            time.sleep(0.02)
        server.proc.send_signal(signal.SIGTERM)
        answers = [f.result(timeout=120) for f in futs]
    assert [a.status_code for a in answers] == [200] * 8
    assert {a.json()["speaker"] for a in answers} == {"p225"}
    assert server.proc.wait(60) == 0, server.tail()
