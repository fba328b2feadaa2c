"""Throughput and latency of ``speaker-sim serve`` on real shared audio.

Usage: ``python benchmarks/bench_serve.py [--out bench-results/serve.json] [--device auto]``

Starts ``speaker-sim serve`` as a harness does (a subprocess, requests on stdin, answers on
stdout) with an empty disk cache, then measures three phases:

- ``cold``: one request per recording (40 recordings of ../shared/audio), 16 in flight: the
  time to embed them all through the batching window.
- ``hot_inflight_1``: requests over those recordings, one at a time (send, wait, send).
- ``hot_inflight_16``: the same with 16 requests in flight.

Reports requests/s and p50/p99 latency (send to answer, milliseconds) for each; prints a
table to stderr and one JSON document to stdout, and writes it to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def find_shared() -> Path:
    return Path(os.environ.get("SPEAKER_SIM_SHARED", REPO.parent / "shared")).resolve()


def recordings(shared: Path, n: int) -> list[Path]:
    """The 3D-Speaker examples, the speechbrain samples, then VCTK: real speech, 16 kHz."""
    audio = shared / "audio"
    files = sorted((audio / "3dspeaker_examples").glob("*.wav"))
    files += sorted((audio / "speechbrain_samples").glob("*.wav"))
    files += sorted((audio / "vctk").glob("*/*.wav"))
    if len(files) < n:
        raise SystemExit(f"need {n} recordings under {audio}, found {len(files)}")
    return files[:n]


class Client:
    """Sends requests with at most ``inflight`` outstanding; times each one."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.sent: dict[str, float] = {}
        self.latency: dict[str, float] = {}
        self.bad: list[str] = []
        self._cv = threading.Condition()
        self._outstanding = 0
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            t = time.perf_counter()
            line = raw.decode("utf-8", "replace").rstrip("\n")
            rid = line.split("->", 1)[0]
            with self._cv:
                if line.startswith("Error:") or rid not in self.sent:
                    self.bad.append(line)
                else:
                    self.latency[rid] = t - self.sent[rid]
                self._outstanding -= 1
                self._cv.notify_all()

    def run(self, pairs: list[tuple[str, str]], inflight: int, tag: str) -> dict[str, float]:
        assert self.proc.stdin is not None
        ids = [f"{tag}-{k}" for k in range(len(pairs))]
        t0 = time.perf_counter()
        for rid, (a, b) in zip(ids, pairs, strict=True):
            with self._cv:
                while self._outstanding >= inflight:
                    self._cv.wait()
                self._outstanding += 1
                self.sent[rid] = time.perf_counter()
            self.proc.stdin.write(f"{rid}->{a},{b}\n".encode())
            self.proc.stdin.flush()
        with self._cv:
            while self._outstanding > 0:
                if not self._cv.wait(timeout=600):
                    raise SystemExit(f"{tag}: no answer in 600 s")
        wall = time.perf_counter() - t0
        if self.bad:
            raise SystemExit(f"{tag}: unexpected answers: {self.bad[:3]}")
        lat = np.array([self.latency[r] for r in ids]) * 1000
        return {
            "requests": len(pairs),
            "inflight": inflight,
            "seconds": round(wall, 3),
            "requests_per_s": round(len(pairs) / wall, 1),
            "p50_ms": round(float(np.percentile(lat, 50)), 3),
            "p99_ms": round(float(np.percentile(lat, 99)), 3),
            "max_ms": round(float(lat.max()), 3),
        }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "bench-results" / "serve.json")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--recordings", type=int, default=40)
    ap.add_argument("--requests-1", type=int, default=1000, help="requests with 1 in flight")
    ap.add_argument("--requests-16", type=int, default=5000, help="requests with 16 in flight")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    shared = find_shared()
    files = [str(p) for p in recordings(shared, args.recordings)]
    n = len(files)
    rng = np.random.default_rng(args.seed)

    def random_pairs(k: int) -> list[tuple[str, str]]:
        return [(files[i], files[j]) for i, j in rng.integers(0, n, (k, 2))]

    env = dict(os.environ)
    if "SPEAKER_SIM_PRETRAINED" not in env and (shared / "pretrained").is_dir():
        env["SPEAKER_SIM_PRETRAINED"] = str(shared / "pretrained")
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        stats_file = Path(tmp) / "stats.json"
        cmd = [
            sys.executable, "-c", "from speaker_sim_cli.cli.main import main; main()",
            "serve", "--device", args.device, "--cache-dir", str(Path(tmp) / "cache"),
            "--stats-file", str(stats_file), "--quiet",
        ]  # fmt: skip
        t_start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        client = Client(proc)
        results: dict[str, dict[str, float]] = {}
        # The first answer also waits for the model to load: time it apart.
        results["first_answer"] = client.run([(files[0], files[1])], 1, "first")
        results["first_answer"]["since_start_s"] = round(time.perf_counter() - t_start, 3)
        results["cold"] = client.run([(files[k], files[(k + 1) % n]) for k in range(n)], 16, "cold")
        results["hot_inflight_1"] = client.run(random_pairs(args.requests_1), 1, "one")
        results["hot_inflight_16"] = client.run(random_pairs(args.requests_16), 16, "sixteen")
        assert proc.stdin is not None
        proc.stdin.close()
        rc = proc.wait(timeout=120)
        if rc != 0:
            raise SystemExit(f"serve exited {rc}")
        server = json.loads(stats_file.read_text())

    doc = {
        "bench": "serve",
        "device": server["model"]["device"],
        "model": server["model"]["id"],
        "recordings": n,
        "embedded": server["embeddings"]["embedded"],
        "results": results,
        "server": server["serve"],
        "host": {"cpus": os.cpu_count(), "machine": platform.machine()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    err = sys.stderr
    print(f"serve on {doc['device']}: {n} recordings, {doc['embedded']} embedded", file=err)
    print(f"{'phase':<18}{'requests':>9}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}", file=err)
    for name, r in results.items():
        print(
            f"{name:<18}{r['requests']:>9}{r['requests_per_s']:>10.1f}"
            f"{r['p50_ms']:>10.2f}{r['p99_ms']:>10.2f}",
            file=err,
        )
    print(json.dumps(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
