"""The voiceprint login service under concurrent load, against the offline batched identify.

Usage: ``python benchmarks/bench_voiceprint_service.py [--speakers 100000] [--clients 32]
[--requests 320] [--max-batch 16] [--batch-wait-ms 10] [--out FILE.json]``

1. A library: three real VCTK speakers (p225-p227, three recordings each) and ``--speakers``
   random unit voiceprints (synthetic, so identify searches a library of that size).
2. The service (``speaker-sim voiceprints serve``) in a subprocess on 127.0.0.1; ``--clients``
   threads send ``--requests`` identify requests of 3 s clips of held-out recordings (p225-p228;
   p228 is not enrolled: unknown). Reported: errors, wrong answers, requests/s, p50/p99 latency,
   and the micro-batcher's batch sizes.
3. Offline: the server stopped, the same clips identified in-process with
   ``Voiceprints.identify`` (the batched path ``speaker-sim identify`` takes), clips/s.
   ``ratio`` = service requests/s / offline clips/s (the issue's target: >= 0.7).

The machine may be shared: the load average is recorded before and after; compare the ratio,
not the absolute figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = Path(os.environ.get("SPEAKER_SIM_SHARED", REPO.parent / "shared"))
VCTK = SHARED / "audio" / "vctk"
ADMIN = "bench-admin-key-0123456789"
CLIENT = "bench-client-key-0123456789"


def build_library(db: Path, n_random: int) -> None:
    from speaker_sim_cli.voiceprints.library import Voiceprints
    from speaker_sim_cli.voiceprints.search import unit_rows
    from speaker_sim_cli.voiceprints.store import Enrolment

    with Voiceprints(db, use_cache=False) as lib:
        lib.enroll_map(
            {s: [str(VCTK / s / f"{s}_{n}.wav") for n in ("003", "008", "011")]
             for s in ("p225", "p226", "p227")}
        )  # fmt: skip
        dim = lib.model.dim
        for start in range(0, n_random, 100_000):
            n = min(100_000, n_random - start)
            vecs = unit_rows(np.random.default_rng(start).standard_normal((n, dim)))
            lib.enroll_vectors(
                [Enrolment(f"synthetic-{start + i:07d}", f"{start + i:064x}", "synthetic", v)
                 for i, v in enumerate(vecs)]
            )  # fmt: skip


def clips(folder: Path) -> list[tuple[str, Path]]:
    import soundfile as sf

    out = []
    for spk in ("p225", "p226", "p227", "p228"):
        for n in ("016", "019", "021", "022", "023"):
            wav, rate = sf.read(VCTK / spk / f"{spk}_{n}.wav", dtype="float32")
            path = folder / f"{spk}_{n}_3s.wav"
            sf.write(path, wav[rate // 2 : rate // 2 + 3 * rate], rate, subtype="PCM_16")
            out.append((spk if spk != "p228" else "unknown", path))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve(db: Path, args: argparse.Namespace, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    import httpx

    port = free_port()
    env = {**os.environ, "SPEAKER_SIM_ADMIN_KEY": ADMIN, "SPEAKER_SIM_CLIENT_KEY": CLIENT,
           "PYTHONPATH": str(REPO)}  # fmt: skip
    cmd = [sys.executable, "-m", "speaker_sim_cli.cli.main", "voiceprints", "serve",
           "--library", str(db), "--port", str(port), "--rate-limit", "1000000/min",
           "--max-batch", str(args.max_batch), "--batch-wait-ms", str(args.batch_wait_ms),
           "--max-inflight", str(max(32, args.clients)), "--quiet"]  # fmt: skip
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"the server exited {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    proc.kill()
    sys.exit("the server was not ready in 300 s")


def load(url: str, work: list[tuple[str, bytes]], args: argparse.Namespace) -> dict[str, Any]:
    import httpx

    jobs = [work[i % len(work)] for i in range(args.requests)]
    headers = {"Authorization": f"Bearer {CLIENT}", "Content-Type": "audio/wav"}

    def one(job: tuple[str, bytes], client: httpx.Client) -> tuple[bool, bool, float]:
        t0 = time.perf_counter()
        try:
            r = client.post(f"{url}/v1/identify", content=job[1], headers=headers)
            ok = r.status_code == 200
            right = ok and r.json()["speaker"] == job[0]
        except httpx.HTTPError:
            ok = right = False
        return ok, right, time.perf_counter() - t0

    clients = [httpx.Client(timeout=600) for _ in range(args.clients)]
    with ThreadPoolExecutor(args.clients) as pool:  # warm: one request per client
        list(pool.map(one, jobs[: args.clients], clients))
    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.clients) as pool:
        got = list(pool.map(one, jobs, [clients[i % args.clients] for i in range(len(jobs))]))
    wall = time.perf_counter() - t0
    stats = httpx.get(f"{url}/v1/stats", headers={"Authorization": f"Bearer {ADMIN}"}).json()
    for c in clients:
        c.close()
    lat = np.array([g[2] for g in got]) * 1000
    return {
        "requests": len(got),
        "errors": sum(not g[0] for g in got),
        "wrong": sum(g[0] and not g[1] for g in got),
        "wall_s": round(wall, 3),
        "requests_per_s": round(len(got) / wall, 2),
        "p50_ms": round(float(np.percentile(lat, 50)), 1),
        "p99_ms": round(float(np.percentile(lat, 99)), 1),
        "batching": stats["batching"],
    }


def offline(db: Path, paths: list[Path], reps: int) -> dict[str, Any]:
    from speaker_sim_cli.voiceprints.library import Voiceprints

    with Voiceprints(db, use_cache=False) as lib:
        lib.load()
        lib.identify([str(p) for p in paths[:4]], threshold=0.6)  # model load and warm-up
        work = [str(p) for p in paths] * reps
        t0 = time.perf_counter()
        # Each repetition is new content for the engine (no cache): the batched identify path.
        lib.identify(work, threshold=0.6)
        wall = time.perf_counter() - t0
    return {"clips": len(work), "wall_s": round(wall, 3), "clips_per_s": round(len(work) / wall, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--speakers", type=int, default=100_000)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=320)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--batch-wait-ms", type=float, default=10.0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if not VCTK.is_dir():
        sys.exit(f"{VCTK}: VCTK speech not found (set SPEAKER_SIM_SHARED)")
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-vp-service-") as tmp:
        folder = Path(tmp)
        db = folder / "voices.db"
        t0 = time.perf_counter()
        build_library(db, args.speakers)
        built = time.perf_counter() - t0
        work = clips(folder)
        proc, url = serve(db, args, folder / "server.log")
        try:
            served = load(url, [(w, p.read_bytes()) for w, p in work], args)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(120)
        reps = max(1, args.requests // len(work))
        base = offline(db, [p for _, p in work], reps)
    result = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "load_before": load_before,
            "load_after": os.getloadavg(),
        },
        "library": {"speakers": args.speakers + 3, "build_s": round(built, 1)},
        "clients": args.clients,
        "clip_seconds": 3.0,
        "service": served,
        "offline_identify": base,
        "ratio": round(served["requests_per_s"] / base["clips_per_s"], 3),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
