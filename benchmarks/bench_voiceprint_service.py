"""The voiceprint login service under concurrent load, against the offline batched identify.

Usage: ``python benchmarks/bench_voiceprint_service.py [--speakers 100000] [--clients 32]
[--requests 320] [--max-batch 16] [--batch-wait-ms 10] [--library FILE.db]
[--baseline-tree DIR [--baseline-last]] [--variant LABEL:VAR=VALUE] [--out FILE.json]``

1. A library: three real VCTK speakers (p225-p227, three recordings each) and ``--speakers``
   random unit voiceprints (synthetic, so identify searches a library of that size).
   ``--library``: kept there and reused by later runs (built when missing or of another size).
2. The clips: 3 s of 20 held-out recordings (p225-p228, five each; p228 is not enrolled:
   ``unknown``), ``--requests`` files in all, each repetition of a clip a distinct file (one
   sample moved by one LSB), because the offline path embeds each content once.
3. The service (``speaker-sim voiceprints serve``) in a subprocess on 127.0.0.1; ``--clients``
   threads of this process (http.client, one keep-alive connection each, bodies read before
   the clock starts) send the clips as identify requests, each client its next one as soon as
   its answer is back. Reported: errors, wrong answers, requests/s, p50/p99 latency, the
   micro-batcher's batch sizes and where its time went (``/v1/stats``), and the CPU seconds the
   server, the clients (this process) and everything else on the machine used meanwhile.
   ``--baseline-tree DIR`` first runs the service from another checkout (e.g. the commit
   before a change), same library, same clips, same command (``--baseline-last``: after);
   ``--variant LABEL:VAR=VALUE,...`` adds a run of this tree with those environment variables.
4. Offline: the same clip files identified in-process with ``Voiceprints.identify`` (the
   batched path ``speaker-sim identify`` takes: DataLoader decoding, batched forwards, one
   search), before and after the service runs. ``ratio`` = service requests/s / the mean
   offline clips/s (the issue's target: >= 0.7); ``cpu_ratio`` = offline CPU per clip / the
   service's (server + clients) CPU per request, what ``ratio`` tends to when both keep every
   core busy, and much less sensitive to other jobs on a shared machine.

The machine may be shared: the load average and the CPU others used are recorded; compare the
ratio, not the absolute figures.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = Path(os.environ.get("SPEAKER_SIM_SHARED", REPO.parent / "shared"))
VCTK = SHARED / "audio" / "vctk"
ADMIN = "bench-admin-key-0123456789"
CLIENT = "bench-client-key-0123456789"
TICK = os.sysconf("SC_CLK_TCK")


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


def library(args: argparse.Namespace, tmp: Path) -> tuple[Path, float]:
    """The library to use, and the seconds building it took (0 when reused)."""
    from speaker_sim_cli.voiceprints.library import Voiceprints

    db = args.library or tmp / "voices.db"
    if db.exists():
        with Voiceprints(db, use_cache=False) as lib:
            if lib.load() == args.speakers + 3:
                return db, 0.0
        db.unlink()
    db.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    build_library(db, args.speakers)
    return db, time.perf_counter() - t0


def clips(folder: Path, n: int) -> tuple[list[tuple[str, Path]], list[Path]]:
    """``n`` distinct 3 s clip files (expected answer, path), and the 20 source clips."""
    import soundfile as sf

    sources: list[tuple[str, np.ndarray, int]] = []
    originals = []
    for spk in ("p225", "p226", "p227", "p228"):
        for num in ("016", "019", "021", "022", "023"):
            wav, rate = sf.read(VCTK / spk / f"{spk}_{num}.wav", dtype="int16")
            cut = wav[rate // 2 : rate // 2 + 3 * rate].copy()
            sources.append((spk if spk != "p228" else "unknown", cut, rate))
            path = folder / f"{spk}_{num}_3s.wav"
            sf.write(path, cut, rate, subtype="PCM_16")
            originals.append(path)
    out = []
    for i in range(n):
        want, cut, rate = sources[i % len(sources)]
        rep = i // len(sources)
        wav = cut.copy()
        wav[rep % len(wav)] ^= 1  # one LSB: new content for the offline engine's dedup
        path = folder / f"clip{i:05d}.wav"
        sf.write(path, wav, rate, subtype="PCM_16")
        out.append((want, path))
    return out, originals


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(port: int, path: str, key: str | None = None, timeout: float = 5.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {key}"} if key else {})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def serve(
    db: Path, tree: Path, args: argparse.Namespace, log: Path, extra: dict[str, str]
) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    env = {**os.environ, "SPEAKER_SIM_ADMIN_KEY": ADMIN, "SPEAKER_SIM_CLIENT_KEY": CLIENT,
           "PYTHONPATH": str(tree), **extra}  # fmt: skip
    cmd = [sys.executable, "-m", "speaker_sim_cli.cli.main", "voiceprints", "serve",
           "--library", str(db), "--port", str(port), "--rate-limit", "1000000/min",
           "--max-batch", str(args.max_batch), "--batch-wait-ms", str(args.batch_wait_ms),
           "--max-inflight", str(max(32, args.clients)), "--quiet"]  # fmt: skip
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=tree)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"the server exited {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            if get(port, "/readyz", timeout=2)[0] == 200:
                return proc, port
        except OSError:
            pass
        time.sleep(0.3)
    proc.kill()
    sys.exit("the server was not ready in 300 s")


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def machine_cpu() -> float:
    """CPU seconds the whole machine has been busy (all cores), from /proc/stat."""
    v = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return (sum(v[:8]) - idle) / TICK


def tree_cpu(pid: int) -> float:
    """CPU seconds of a process and of its live descendants (e.g. DataLoader workers)."""
    total = 0.0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            total += proc_cpu(p)
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            pass
    return total


def run_load(port: int, work: list[tuple[str, bytes]], clients: int, pid: int) -> dict[str, Any]:
    """``clients`` threads, each with one keep-alive connection, send every job once."""
    headers = {"Authorization": f"Bearer {CLIENT}", "Content-Type": "audio/wav"}
    lock = threading.Lock()
    nxt = [0]
    got: list[tuple[bool, bool, float]] = []

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        try:
            while True:
                with lock:
                    i = nxt[0]
                    nxt[0] += 1
                if i >= len(work):
                    return
                want, body = work[i]
                t0 = time.perf_counter()
                try:
                    conn.request("POST", "/v1/identify", body=body, headers=headers)
                    r = conn.getresponse()
                    data = r.read()
                    ok = r.status == 200
                    right = ok and json.loads(data)["speaker"] == want
                except (OSError, http.client.HTTPException):
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
                    ok = right = False
                with lock:
                    got.append((ok, right, time.perf_counter() - t0))
        finally:
            conn.close()

    cpu0, srv0, mach0 = time.process_time(), proc_cpu(pid), machine_cpu()
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    srv = proc_cpu(pid) - srv0
    mach = machine_cpu() - mach0
    lat = np.array([g[2] for g in got]) * 1000
    n = max(1, len(got))
    return {
        "requests": len(got),
        "errors": sum(not g[0] for g in got),
        "wrong": sum(g[0] and not g[1] for g in got),
        "wall_s": round(wall, 3),
        "requests_per_s": round(len(got) / wall, 2),
        "p50_ms": round(float(np.percentile(lat, 50)), 1),
        "p99_ms": round(float(np.percentile(lat, 99)), 1),
        "cpu_s": {
            "server": round(srv, 2),
            "server_ms_per_request": round(1000 * srv / n, 1),
            "clients": round(cpu, 2),
            "clients_ms_per_request": round(1000 * cpu / n, 2),
            "others": round(max(0.0, mach - srv - cpu), 2),
            "machine_cores": os.cpu_count(),
            "machine_busy_share": round(mach / (wall * (os.cpu_count() or 1)), 3),
        },
    }


def service(
    db: Path, tree: Path, work: list[tuple[str, bytes]], args: argparse.Namespace, log: Path,
    extra: dict[str, str],
) -> dict[str, Any]:  # fmt: skip
    proc, port = serve(db, tree, args, log, extra)
    try:
        warm = [work[i % len(work)] for i in range(args.clients)]
        run_load(port, warm, args.clients, proc.pid)  # one request per client
        out = run_load(port, work, args.clients, proc.pid)
        status, body = get(port, "/v1/stats", ADMIN)
        out["batching"] = json.loads(body)["batching"] if status == 200 else None
        out["load_after"] = os.getloadavg()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    # The warm-up's batches are in the server's counters too; they are a small share.
    return out


def offline(db: Path, paths: list[Path], want: list[str], warm: list[Path]) -> dict[str, Any]:
    from speaker_sim_cli.voiceprints.library import Voiceprints

    todo: list[int] = []
    with Voiceprints(db, use_cache=False) as lib:
        lib.load()
        lib.identify([str(p) for p in warm[:4]], threshold=0.6)  # model load and warm-up
        me, dead = os.getpid(), os.times()
        cpu0, mach0 = tree_cpu(me), machine_cpu()
        t0 = time.perf_counter()
        res = lib.identify(
            [str(p) for p in paths], threshold=0.6, on_start=lambda n, _s: todo.append(n)
        )
        wall = time.perf_counter() - t0
        done = os.times()  # + children that ended and were waited for meanwhile
        cpu = tree_cpu(me) - cpu0 + (done[2] + done[3]) - (dead[2] + dead[3])
        mach = machine_cpu() - mach0
    wrong = sum(a.speaker != w for a, w in zip(res.answers, want))
    return {
        "clips": len(paths),
        "embedded": todo[0] if todo else None,
        "wrong": wrong + len(res.failures),
        "wall_s": round(wall, 3),
        "clips_per_s": round(len(paths) / wall, 2),
        "cpu_s": round(cpu, 2),
        "cpu_ms_per_clip": round(1000 * cpu / len(paths), 1),
        "others_cpu_s": round(max(0.0, mach - cpu), 2),
        "load": os.getloadavg(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--speakers", type=int, default=100_000)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=320)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--batch-wait-ms", type=float, default=10.0)
    ap.add_argument("--library", type=Path, default=None, help="keep (and reuse) it here")
    ap.add_argument("--baseline-tree", type=Path, default=None)
    ap.add_argument("--baseline-last", action="store_true", help="run this tree's service first")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--variant", action="append", default=[], help="LABEL:VAR=VALUE[,VAR=VALUE]")
    args = ap.parse_args()
    if not VCTK.is_dir():
        sys.exit(f"{VCTK}: VCTK speech not found (set SPEAKER_SIM_SHARED)")
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-vp-service-") as tmp:
        folder = Path(tmp)
        db, built = library(args, folder)
        work, originals = clips(folder, args.requests)
        bodies = [(w, p.read_bytes()) for w, p in work]
        paths, want = [p for _, p in work], [w for w, _ in work]
        base = [offline(db, paths, want, originals)]
        runs: dict[str, Any] = {}
        trees: list[tuple[str, Path, dict[str, str]]] = []
        if args.baseline_tree:
            trees.append(("baseline", args.baseline_tree, {}))
        trees.insert(0 if args.baseline_last else len(trees), ("service", REPO, {}))
        for v in args.variant:
            label, _, envs = v.partition(":")
            trees.append((label, REPO, dict(e.split("=", 1) for e in envs.split(",") if e)))
        for name, tree, extra in trees:
            runs[name] = service(db, tree.resolve(), bodies, args, folder / f"{name}.log", extra)
        base.append(offline(db, paths, want, originals))
    mean_offline = float(np.mean([b["clips_per_s"] for b in base]))
    result: dict[str, Any] = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "load_before": load_before,
            "load_after": os.getloadavg(),
        },
        "library": {"speakers": args.speakers + 3, "build_s": round(built, 1)},
        "clients": args.clients,
        "clip_seconds": 3.0,
        "max_batch": args.max_batch,
        "batch_wait_ms": args.batch_wait_ms,
        "offline_identify": base,
        "offline_clips_per_s": round(mean_offline, 2),
    }
    offline_cpu = float(np.mean([b["cpu_ms_per_clip"] for b in base]))
    for name, r in runs.items():
        result[name] = r
        result[f"{name}_ratio"] = round(r["requests_per_s"] / mean_offline, 3)
        # CPU per answer, offline / service (server + clients): what the throughput ratio
        # tends to when both keep every core busy, less sensitive to other jobs' load.
        used = r["cpu_s"]["server_ms_per_request"] + r["cpu_s"]["clients_ms_per_request"]
        result[f"{name}_cpu_ratio"] = round(offline_cpu / used, 3) if used else None
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
