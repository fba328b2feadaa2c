"""Embedding store and object-storage figures for issue #23.

1. store: ``--entries`` random 192-dim float32 vectors in shards; time to open the store (no
   shard read), to look up ``--lookups`` present keys (``get_many``), disk overhead above the raw
   vectors, and how many shards one lookup opens. Targets at 10 M entries: 1 M lookups <= 10 s,
   overhead <= 10 %. (10 M entries is 7.7 GB; ``--entries`` scales it down on a small machine.)
2. ``--formats``: Arrow IPC (the store's format) vs Parquet vs Lance on the same vectors:
   bytes on disk and the time to fetch random rows by position.
3. ``--s3``: decode ``--recordings`` recordings from a local S3 server (moto, in a subprocess
   on 127.0.0.1; fetched ``--chunk`` at a time by ``storage.read_many``) vs from local disk,
   decoded ``storage.FETCH_THREADS`` at a time; for each ``--fetch`` mode (``fsspec``: the old
   path, one object per thread through s3fs; ``batch``: presigned GETs over aiohttp,
   ``--in-flight`` at once), in one process. Wall time, and the CPU of this process and of
   moto's server. Target <= 1.5x. ``--entries 0`` skips the store part.
4. ``--http``: the same from a local HTTP server with keep-alive (aiohttp's static files), whose
   CPU per request is far below moto's: what the client costs when the server is not the
   bottleneck.

Prints one JSON document (and writes it to ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from speaker_sim_cli.engine.store import ShardStore, shard_bytes
from speaker_sim_cli.io import storage

DIM = 192
SHARED = Path(os.environ.get("SPEAKER_SIM_SHARED", Path(__file__).resolve().parents[2] / "shared"))


def keys_of(start: int, n: int) -> np.ndarray:
    """(n, 32) uint8 content-like keys, deterministic."""
    rng = np.random.default_rng(start)
    return rng.integers(0, 256, (n, 32), dtype=np.uint8)


def bench_store(root: Path, entries: int, lookups: int, shard_rows: int) -> dict:
    """Build (or, when ``root`` holds a finished build of the same size, reuse) and measure."""
    done = root / f"built-{entries}-{shard_rows}"
    build = not done.exists()
    if build:
        shutil.rmtree(root, ignore_errors=True)
    t0 = time.perf_counter()
    st = ShardStore(str(root), DIM, shard_rows=shard_rows)
    sample_keys, sample_rows = [], []
    rng = np.random.default_rng(0)
    for s in range(0, entries, shard_rows):
        n = min(shard_rows, entries - s)
        keys = keys_of(s, n)
        vecs = rng.standard_normal((n, DIM), dtype=np.float32)
        if build:
            st.put_many([k.tobytes().hex() for k in keys], vecs)
            st.flush()
        pick = rng.choice(n, size=min(n, max(1, lookups * n // entries + 1)), replace=False)
        sample_keys.append(keys[pick])
        sample_rows.append(vecs[pick])
    if build:
        st.compact()
        done.touch()
    build_s = time.perf_counter() - t0
    qkeys = np.concatenate(sample_keys)[:lookups]
    want = np.concatenate(sample_rows)[:lookups]
    order = rng.permutation(len(qkeys))
    qkeys, want = qkeys[order], want[order]
    digests = [k.tobytes().hex() for k in qkeys]
    shard_bytes_total = sum(f.stat().st_size for f in (root / "shards").glob("*.arrow"))
    index_bytes = sum(f.stat().st_size for f in (root / "index").glob("*.idx"))
    raw = entries * DIM * 4

    # A new reader (as a new run): open = list the shards and load the index.
    opened: list[str] = []
    real = ShardStore.open_shard
    ShardStore.open_shard = lambda self, n: opened.append(n) or real(self, n)  # type: ignore[method-assign]
    try:
        t0 = time.perf_counter()
        reader = ShardStore(str(root), DIM)
        reader.refresh()
        open_s = time.perf_counter() - t0
        opened_on_open = len(opened)
        _, f1 = reader.get_many(digests[:1])
        opened_one = len(set(opened))
        t0, c0 = time.perf_counter(), time.process_time()
        mat, found = reader.get_many(digests)
        lookup_s, lookup_cpu = time.perf_counter() - t0, time.process_time() - c0
    finally:
        ShardStore.open_shard = real  # type: ignore[method-assign]
    assert found.all() and f1.all(), "a stored key was not found"
    assert np.array_equal(mat, want), "a wrong vector came back"
    return {
        "entries": entries,
        "shards": len(list((root / "shards").glob("*.arrow"))),
        "shard_rows": shard_rows,
        "build_s": round(build_s, 1) if build else "reused",
        "open_s": round(open_s, 3),
        "shards_read_to_open": opened_on_open,
        "shards_read_for_one_key": opened_one,
        "lookups": len(digests),
        "lookup_s": round(lookup_s, 2),
        "lookup_cpu_s": round(lookup_cpu, 2),  # this process's CPU time (the host is shared)
        "lookups_per_s": round(len(digests) / lookup_s),
        "bytes_shards": shard_bytes_total,
        "bytes_index": index_bytes,
        "bytes_raw_vectors": raw,
        "overhead": round((shard_bytes_total + index_bytes) / raw - 1, 4),
        "index_bytes_per_entry": round(index_bytes / entries, 1),
    }


def bench_index(entries: int, lookups: int) -> dict:
    """The key index alone at ``entries`` (e.g. 10 M, which the full store build is too big to
    run on a shared 2-core host): memory, and the CPU time of looking up ``lookups`` keys."""
    from speaker_sim_cli.engine import store_index as si
    from speaker_sim_cli.engine.store import digests_to_keys

    rng = np.random.default_rng(5)
    parts = []
    for s in range(0, entries, 1 << 20):
        n = min(1 << 20, entries - s)
        parts.append(si.Index.from_keys(rng.integers(0, 256, (n, 32), dtype=np.uint8), s >> 20))
    index = si.Index.merge(parts)
    pick = rng.choice(len(index), lookups, replace=False)
    hi, lo = index.hi[pick], index.lo[pick]
    # As the store receives them: hex digests (the remaining 16 bytes do not matter here).
    raw = np.zeros((lookups, 32), np.uint8)
    raw[:, :8] = hi.astype(">u8").view(np.uint8).reshape(-1, 8)
    raw[:, 8:16] = lo.astype(">u8").view(np.uint8).reshape(-1, 8)
    digests = [bytes(r).hex() for r in raw]
    c0 = time.process_time()
    keys = digests_to_keys(digests)
    c1 = time.process_time()
    pos = index.find(*si.split_keys(keys))
    c2 = time.process_time()
    assert (pos == pick).all()
    nbytes = sum(a.nbytes for a in (index.hi, index.lo, index.shard, index.row))
    return {
        "entries": entries,
        "lookups": lookups,
        "bytes_in_memory": nbytes,
        "hex_to_keys_cpu_s": round(c1 - c0, 2),
        "find_cpu_s": round(c2 - c1, 2),
    }


def bench_formats(root: Path, n: int = 200_000, take: int = 20_000) -> dict:
    """The same vectors as Arrow IPC, Parquet and Lance: size and random row fetch time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(1)
    keys = keys_of(7, n)
    vecs = rng.standard_normal((n, DIM), dtype=np.float32)
    rows = np.sort(rng.choice(n, take, replace=False))
    out: dict = {"rows": n, "fetched": take}
    ipc = root / "v.arrow"
    ipc.write_bytes(shard_bytes(keys, vecs))
    t0 = time.perf_counter()
    batch = pa.ipc.open_file(pa.memory_map(str(ipc))).get_batch(0)
    got = batch.column("vec").flatten().to_numpy().reshape(n, DIM)[rows]
    out["arrow_ipc"] = {"bytes": ipc.stat().st_size, "fetch_s": round(time.perf_counter() - t0, 4)}
    assert np.array_equal(got, vecs[rows])
    table = pa.ipc.open_file(pa.memory_map(str(ipc))).read_all()
    pqf = root / "v.parquet"
    pq.write_table(table, pqf, row_group_size=16384)
    t0 = time.perf_counter()
    got = pq.read_table(pqf, columns=["vec"]).column("vec").take(pa.array(rows))
    out["parquet"] = {"bytes": pqf.stat().st_size, "fetch_s": round(time.perf_counter() - t0, 4)}
    try:
        import lance
    except ImportError:
        out["lance"] = "not installed (pip install pylance)"
        return out
    ds_path = root / "v.lance"
    lance.write_dataset(table, str(ds_path))
    size = sum(f.stat().st_size for f in ds_path.rglob("*") if f.is_file())
    ds = lance.dataset(str(ds_path))
    t0 = time.perf_counter()
    got = ds.take(rows.tolist(), columns=["vec"])
    out["lance"] = {
        "bytes": size,
        "fetch_s": round(time.perf_counter() - t0, 4),
        "version": lance.__version__,
    }
    assert got.num_rows == take
    return out


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


def _serve(cmd: list[str]) -> tuple[subprocess.Popen, int]:
    """Start ``cmd`` (with the free port appended) and wait until it listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([*cmd, str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc, port
        time.sleep(0.1)
    proc.terminate()
    raise RuntimeError(f"{cmd[:3]}: nothing listens on 127.0.0.1:{port} after 60 s")


def _measure(proc: subprocess.Popen, files: list[Path], urls: list[str], modes: list[str],
             chunk: int) -> dict:  # fmt: skip
    """Read and decode ``files`` and then ``urls`` (each fetch mode); wall and CPU."""
    from speaker_sim_cli.audio.decode import load
    from speaker_sim_cli.io import fetch
    from speaker_sim_cli.paths import map_in_threads

    threads = storage.FETCH_THREADS
    n = len(files)

    def run(items: list) -> float:
        """Fetch ``chunk`` objects at once (the bytes kept, as the pipeline's hashing keeps
        them), then decode them ``threads`` at a time from memory."""
        t0 = time.perf_counter()
        got = []
        for c in range(0, len(items), chunk):
            part = items[c : c + chunk]
            if storage.is_url(part[0]):
                fetched = storage.read_many(part, keep=True)
                assert all(isinstance(b, bytes) for b in fetched), "a fetch failed"
            got += map_in_threads(lambda x: load(x, 16000).shape[0], part, threads)
        assert all(g > 0 for g in got)
        return time.perf_counter() - t0

    def timed(items: list, reps: int = 2) -> dict:
        """Best wall time of ``reps`` runs; this process's and the server's CPU per run."""
        cpu0, client0 = _cpu_seconds(proc.pid), time.process_time()
        wall = min(run(items) for _ in range(reps))
        server = (_cpu_seconds(proc.pid) - cpu0) / reps
        client = (time.process_time() - client0) / reps
        return {
            "s": round(wall, 2),
            "client_cpu_s": round(client, 2),
            "server_cpu_s": round(server, 2),
            "server_cpu_ms_per_object": round(1000 * server / len(items), 2),
        }

    out: dict = {"recordings": n, "fetched_at_once": chunk, "decode_threads": threads,
                 "in_flight": fetch.in_flight(), "load_before": os.getloadavg()}  # fmt: skip
    run(files[:50])
    out["local"] = timed(files)
    for mode in modes:  # the baseline (fsspec, one object per thread) and the batch path
        os.environ[fetch.ENV_MODE] = mode
        try:
            run(urls[:50])  # warm (imports, the signer, connections)
            before = dict(fetch.COUNTS)
            out[mode] = timed(urls)
        finally:
            os.environ.pop(fetch.ENV_MODE, None)
        out[mode]["objects_via_batch_path_per_run"] = (
            fetch.COUNTS["fetched"] - before["fetched"]
        ) // 2
        out[mode]["ratio_to_local"] = round(out[mode]["s"] / out["local"]["s"], 2)
        # this process's CPU per object above the local run's (the decode is in both)
        extra = out[mode]["client_cpu_s"] - out["local"]["client_cpu_s"]
        out[mode]["client_cpu_ms_per_object_above_local"] = round(1000 * extra / n, 2)
    out["load_after"] = os.getloadavg()
    return out


def bench_s3(root: Path, n: int, modes: list[str], chunk: int) -> dict:
    """Decode ``n`` recordings from moto's S3 server vs local disk, for each fetch mode
    (``fsspec``: one object per thread through s3fs, the old path; ``batch``: presigned GETs
    over aiohttp, :data:`fetch.IN_FLIGHT` in flight)."""
    files = _copies(root, n)
    if not files:
        return {"skipped": f"no speech under {SHARED}/audio/vctk"}
    proc, port = _serve([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p"])
    try:
        os.environ.update(
            AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1"
        )
        storage.set_options({"s3": {"endpoint_url": f"http://127.0.0.1:{port}"}})
        fs, _ = storage.filesystem("s3://bench")
        fs.mkdir("bench")
        fs.put([str(p) for p in files], "bench/rec/")
        urls = [f"s3://bench/rec/{p.name}" for p in files]
        return {"server": "moto (werkzeug, Python)", **_measure(proc, files, urls, modes, chunk)}
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
    proc, port = _serve([sys.executable, "-c", _STATIC, str(files[0].parent)])
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entries", type=int, default=2_000_000)
    ap.add_argument("--lookups", type=int, default=1_000_000)
    ap.add_argument("--shard-rows", type=int, default=65536)
    ap.add_argument("--formats", action="store_true", help="Arrow IPC vs Parquet vs Lance")
    ap.add_argument(
        "--index-entries",
        type=int,
        default=10_000_000,
        help="size of the index-only measurement (0: skip)",
    )
    ap.add_argument("--s3", action="store_true", help="local S3 server vs local disk")
    ap.add_argument("--http", action="store_true", help="local HTTP server vs local disk")
    ap.add_argument("--recordings", type=int, default=1000)
    ap.add_argument(
        "--fetch",
        default="fsspec,batch",
        help="fetch modes to measure, comma-separated: fsspec (the old one-object-per-thread "
        "path, the baseline), batch (signed GETs, many in flight)",
    )
    ap.add_argument("--chunk", type=int, default=500, help="objects fetched per read_many")
    ap.add_argument("--in-flight", type=int, default=None, help="requests in flight (batch)")
    ap.add_argument("--dir", type=Path, default=None, help="work folder (default: a temp dir)")
    ap.add_argument(
        "--keep",
        type=Path,
        default=None,
        help="build the store here and keep it (a rerun of the same size reuses it)",
    )
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    if a.in_flight:
        os.environ["SPEAKER_SIM_FETCH_IN_FLIGHT"] = str(a.in_flight)
    work = Path(tempfile.mkdtemp(prefix="bench-store-", dir=a.dir))
    doc: dict = {"load": os.getloadavg(), "cpus": os.cpu_count()}
    try:
        if a.entries:
            where = a.keep if a.keep is not None else work / "store"
            doc["store"] = bench_store(where, a.entries, min(a.lookups, a.entries), a.shard_rows)
            print(json.dumps(doc["store"]), file=sys.stderr)
        if a.index_entries:
            doc["index"] = bench_index(a.index_entries, min(a.lookups, a.index_entries))
            print(json.dumps(doc["index"]), file=sys.stderr)
        if a.formats:
            (work / "fmt").mkdir()
            doc["formats"] = bench_formats(work / "fmt")
            print(json.dumps(doc["formats"]), file=sys.stderr)
        if a.s3:
            doc["s3"] = bench_s3(work, a.recordings, a.fetch.split(","), a.chunk)
            print(json.dumps(doc["s3"]), file=sys.stderr)
        if a.http:
            doc["http"] = bench_http(work, a.recordings, a.fetch.split(","), a.chunk)
            print(json.dumps(doc["http"]), file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    doc["load_after"] = os.getloadavg()
    text = json.dumps(doc, indent=2)
    print(text)
    if a.out is not None:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
