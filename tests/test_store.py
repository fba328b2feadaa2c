"""The sharded embedding store: commits, a writer killed mid-shard, corruption, the index,
migration from per-file caches, prune, and fuzzing of the index and shard readers."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from conftest import fuzz_settings  # type: ignore[import-not-found]
from speaker_sim_cli.cli.main import app
from speaker_sim_cli.engine import store as store_mod
from speaker_sim_cli.engine import store_index as si
from speaker_sim_cli.engine.cache import EmbeddingCache, cache_info
from speaker_sim_cli.engine.store import ShardError, ShardStore, parse_shard, shard_bytes

DIM = 192
BASE = {"format": 1, "model": "test-model", "checkpoint_sha256": "c" * 64, "mode": "full"}
FUZZ = fuzz_settings(100)


def key(i: int | str) -> str:
    return hashlib.sha256(f"rec-{i}".encode()).hexdigest()


def vec(d: str) -> np.ndarray:
    return np.random.default_rng(int(d[:12], 16)).standard_normal(DIM).astype(np.float32)


def fill(cache: EmbeddingCache, keys: list[str], per_shard: int) -> None:
    for s in range(0, len(keys), per_shard):
        part = keys[s : s + per_shard]
        cache.put_many(part, np.stack([vec(k) for k in part]))
        cache.flush()


def test_round_trip_many_shards_compaction_and_reopen(tmp_path, monkeypatch):
    monkeypatch.setattr(store_mod, "COMPACT_AT", 4)
    keys = [key(i) for i in range(500)]
    cache = EmbeddingCache(tmp_path, BASE, DIM)
    fill(cache, keys[:450], 50)  # 9 shards: the index is compacted after the 4th and 8th
    cache.put_many(keys[450:], np.stack([vec(k) for k in keys[450:]]))  # buffered, uncommitted
    mat, found = cache.get_many([*keys, key("absent")])
    assert found[:500].all() and not found[500]
    np.testing.assert_array_equal(mat[:500], np.stack([vec(k) for k in keys]))
    np.testing.assert_array_equal(cache.get(keys[7]), vec(keys[7]))
    assert cache.get(key("absent")) is None
    cache.flush()
    st_dir = Path(cache.dir)
    assert len(list((st_dir / "shards").glob("*.arrow"))) == 10
    assert len(list((st_dir / "index").glob("*.idx"))) == 1  # older index files removed
    # A new reader: the index covers 8 shards, so opening it reads only the other two.
    opened: list[str] = []
    real_open = ShardStore.open_shard
    monkeypatch.setattr(
        ShardStore, "open_shard", lambda self, n: opened.append(n) or real_open(self, n)
    )
    other = EmbeddingCache(tmp_path, BASE, DIM)
    (row,) = cache_info(tmp_path)
    assert row["entries"] == 500 and row["shards"] == 10 and row["legacy_files"] == 0
    assert other.store is not None and other.store.entries() == 500
    assert len(set(opened)) <= 4  # cache_info's reader and this one: two uncovered shards each
    opened.clear()
    mat, found = other.get_many(keys[:50])  # all in the first shard
    assert found.all() and len(set(opened)) == 1
    np.testing.assert_array_equal(mat, np.stack([vec(k) for k in keys[:50]]))


def test_a_key_written_twice_returns_the_newest(tmp_path):
    cache = EmbeddingCache(tmp_path, BASE, DIM)
    k = key(1)
    cache.put(k, np.zeros(DIM, np.float32))
    cache.flush()
    cache.put(k, np.ones(DIM, np.float32))
    cache.flush()
    np.testing.assert_array_equal(EmbeddingCache(tmp_path, BASE, DIM).get(k), np.ones(DIM))


def test_keys_stored_twice_by_two_writers_are_one_entry_each(tmp_path):
    """Two writers (a Ray unit retried on another node) commit the same keys in their own
    shards: counted once, a reader opened before sees the later commit at once (the cheap
    lookup of the driver), prune and compact keep one row per key, the newest."""
    keys = [key(i) for i in range(6)]
    reader = EmbeddingCache(tmp_path, BASE, DIM)
    assert reader.get(keys[0]) is None  # lists the (empty) store
    first, retry = EmbeddingCache(tmp_path, BASE, DIM), EmbeddingCache(tmp_path, BASE, DIM)
    fill(first, keys[:4], 4)
    newer = np.stack([vec(k) + 1 for k in keys[2:]])
    retry.put_many(keys[2:], newer)
    retry.flush()
    got = reader.get(keys[5])  # committed by another writer after the reader listed
    assert got is not None
    np.testing.assert_array_equal(got, newer[-1])
    (row,) = cache_info(tmp_path)
    assert row["entries"] == 6 and row["shards"] == 2
    res = CliRunner().invoke(app, ["cache", "compact", "--cache-dir", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert store_mod.ShardStore(str(reader.dir), DIM).entries() == 6
    rows = [k for _, sh in store_mod.ShardStore(str(reader.dir), DIM).iter_shards()
            for k in sh.keys]  # fmt: skip
    assert len(rows) == 6  # the older copies of keys 2 and 3 are gone
    from speaker_sim_cli.engine.store_admin import prune

    fill(first, keys[2:4], 2)  # stored twice again, then pruned to what a list needs
    assert prune(tmp_path, set(keys[1:4])) == {"kept": 3, "removed": 3}
    mat, found = EmbeddingCache(tmp_path, BASE, DIM).get_many(keys)
    assert found.tolist() == [False, True, True, True, False, False]
    np.testing.assert_array_equal(mat[1:4], np.stack([vec(k) for k in keys[1:4]]))
    (row,) = cache_info(tmp_path)
    assert row["entries"] == 3 and row["shards"] == 1


# -- a writer killed mid-shard --------------------------------------------------------------------
KILLED_WRITER = """
import hashlib, sys
import numpy as np
import pytest
from pathlib import Path
from speaker_sim_cli.engine.cache import EmbeddingCache
root, base = Path(sys.argv[1]), {"format": 1, "model": "test-model",
                                  "checkpoint_sha256": "c" * 64, "mode": "full"}
key = lambda i: hashlib.sha256(f"rec-{i}".encode()).hexdigest()
vec = lambda d: np.random.default_rng(int(d[:12], 16)).standard_normal(192).astype(np.float32)
cache = EmbeddingCache(root, base, 192, shard_rows=10**9)
for b in range(5):  # five committed shards of 100 rows
    ks = [key(b * 100 + i) for i in range(100)]
    cache.put_many(ks, np.stack([vec(k) for k in ks]))
    cache.flush()
    print("committed", b, flush=True)
# A large shard whose write the test interrupts.
ks = [key(1000 + i) for i in range(120_000)]
cache.put_many(ks, np.random.default_rng(0).standard_normal((len(ks), 192)).astype(np.float32))
print("writing", flush=True)
cache.flush()
print("finished", flush=True)
"""


def test_a_writer_killed_mid_shard_keeps_every_committed_entry(tmp_path):
    env = {**os.environ, "SPEAKER_SIM_STORE_COMMIT_SECONDS": "3600"}
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(tmp_path)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    lines = [proc.stdout.readline().strip() for _ in range(6)]
    assert lines[-1] == "writing", (lines, proc.stderr.read() if proc.stderr else "")
    shards = next(tmp_path.glob("emb/*/shards"))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(
        p.name.endswith(".tmp") for p in shards.iterdir()
    ):
        time.sleep(0.0005)
    os.kill(proc.pid, signal.SIGKILL)  # mid-shard: its temp file is being written
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    cache = EmbeddingCache(tmp_path, BASE, DIM)
    committed = [key(i) for i in range(500)]
    mat, found = cache.get_many(committed)
    assert found.all()
    np.testing.assert_array_equal(mat, np.stack([vec(k) for k in committed]))
    # Of the interrupted shard: all or nothing (the kill may land just after its rename).
    n_big = int(cache.get_many([key(1000 + i) for i in range(120_000)])[1].sum())
    assert n_big in (0, 120_000)
    assert cache.store is not None and cache.store.corrupt == 0
    checked = CliRunner().invoke(app, ["cache", "verify", "--cache-dir", str(tmp_path)])
    assert checked.exit_code == 0, checked.output
    assert len(list(shards.glob("*.arrow"))) == 5 + (n_big > 0)


# -- corruption -----------------------------------------------------------------------------------
def test_a_corrupted_shard_is_a_miss_and_verify_names_it(tmp_path):
    cache = EmbeddingCache(tmp_path, BASE, DIM)
    keys = [key(i) for i in range(60)]
    fill(cache, keys, 20)
    shards = sorted(Path(cache.dir, "shards").glob("*.arrow"))
    bad = shards[1]
    data = bytearray(bad.read_bytes())
    where = data.find(vec(keys[25]).tobytes())  # flip one byte inside a stored vector
    assert where > 0
    data[where + 5] ^= 0x40
    bad.write_bytes(bytes(data))
    fresh = EmbeddingCache(tmp_path, BASE, DIM)
    mat, found = fresh.get_many(keys)  # every row of each shard: its vectors read whole
    assert not found[25] and found.sum() == 59 and fresh.stats.corrupt == 1
    np.testing.assert_array_equal(mat[found], np.stack([vec(k) for k in keys])[found])
    # One row at a time: through the memory map, not the whole-shard read; the same verdicts.
    monkey = EmbeddingCache(tmp_path, BASE, DIM)
    for i in (24, 25, 26):
        got = monkey.get(keys[i])
        assert (got is None) == (i == 25)
        if got is not None:
            np.testing.assert_array_equal(got, vec(keys[i]))
    assert monkey.stats.corrupt == 1
    runner = CliRunner()
    res = runner.invoke(app, ["cache", "verify", "--cache-dir", str(tmp_path)])
    assert res.exit_code == 1 and bad.name in res.output.replace("\n", "")
    assert "row 5 fails its checksum" in res.output
    # A truncated shard: every entry of it is a miss, the others are intact.
    shards[2].write_bytes(shards[2].read_bytes()[:500])
    third = EmbeddingCache(tmp_path, BASE, DIM)
    _, found = third.get_many(keys)
    assert found[:20].all() and not found[40:].any()
    res = runner.invoke(app, ["cache", "verify", "--remove", "--cache-dir", str(tmp_path)])
    assert res.exit_code == 1 and "2 bad (removed)" in " ".join(res.output.split())
    assert runner.invoke(app, ["cache", "verify", "--cache-dir", str(tmp_path)]).exit_code == 0
    # Recomputed entries go to a new shard and are found again.
    fourth = EmbeddingCache(tmp_path, BASE, DIM)
    fourth.put_many(keys[20:], np.stack([vec(k) for k in keys[20:]]))
    fourth.flush()
    assert EmbeddingCache(tmp_path, BASE, DIM).get_many(keys)[1].all()


# -- legacy per-file caches -----------------------------------------------------------------------
def legacy_cache(root: Path, keys: list[str]) -> Path:
    """A cache as older versions wrote it: meta.json and one .npy per recording."""
    from speaker_sim_cli.engine.cache import setting_key

    d = root / "emb" / setting_key(BASE)
    for k in keys:
        (d / k[:2]).mkdir(parents=True, exist_ok=True)
        np.save(d / k[:2] / f"{k}.npy", vec(k))
    (d / "meta.json").write_text(json.dumps({**BASE, "dim": DIM}))
    return d


def test_migrate_moves_a_per_file_cache_into_shards(tmp_path):
    keys = [key(i) for i in range(40)]
    d = legacy_cache(tmp_path, keys)
    (d / keys[0][:2] / f"{keys[0]}.npy").write_bytes(b"not numpy")  # left in place, a miss
    cache = EmbeddingCache(tmp_path, BASE, DIM)
    mat, found = cache.get_many(keys)  # read through the fallback before migration
    assert found[1:].all() and not found[0]
    runner = CliRunner()
    info = json.loads(
        runner.invoke(app, ["cache", "info", "--json", "--cache-dir", str(tmp_path)]).stdout
    )
    assert info["legacy_files"] == 40 and info["shards"] == 0
    res = runner.invoke(app, ["cache", "migrate", "--cache-dir", str(tmp_path)])
    assert res.exit_code == 0 and "moved 39" in res.output and "1 unreadable" in res.output
    assert [p.name for p in d.glob("*/*.npy")] == [f"{keys[0]}.npy"]
    info = json.loads(
        runner.invoke(app, ["cache", "info", "--json", "--cache-dir", str(tmp_path)]).stdout
    )
    assert info["legacy_files"] == 1 and info["shards"] == 1 and info["entries"] == 40
    after, found = EmbeddingCache(tmp_path, BASE, DIM).get_many(keys)
    assert found[1:].all()
    np.testing.assert_array_equal(after[1:], mat[1:])


def test_prune_keeps_what_a_trial_list_needs(tmp_path):
    audio = tmp_path / "audio"
    audio.mkdir()
    files = []
    for i in range(3):
        f = audio / f"r{i}.wav"
        f.write_bytes(f"fake audio {i}".encode())  # content hashes are all prune needs
        files.append(f)
    digests = [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]
    others = [key(i) for i in range(30)]
    cache = EmbeddingCache(tmp_path / "cache", BASE, DIM)
    fill(cache, digests + others, 11)
    legacy_cache(tmp_path / "cache", [key("old")])
    trials = tmp_path / "trials.csv"
    trials.write_text("enrollment,test\naudio/r0.wav,audio/r1.wav\n")
    res = CliRunner().invoke(
        app, ["cache", "prune", "--keep-list", str(trials), "--cache-dir", str(tmp_path / "cache")]
    )
    assert res.exit_code == 0, res.output
    assert "kept 2" in res.output and "removed 32" in res.output
    fresh = EmbeddingCache(tmp_path / "cache", BASE, DIM)
    _, found = fresh.get_many(digests + others + [key("old")])
    assert found.tolist() == [True, True] + [False] * 32
    (row,) = cache_info(tmp_path / "cache")
    assert row["entries"] == 2 and row["shards"] == 1


def test_compact_merges_small_shards_keeping_the_newest_copy(tmp_path):
    keys = [key(i) for i in range(90)]
    cache = EmbeddingCache(tmp_path, BASE, DIM)
    fill(cache, keys, 10)  # nine small shards
    cache.put(keys[3], np.full(DIM, 7, np.float32))  # a newer copy of one key
    cache.flush()
    res = CliRunner().invoke(app, ["cache", "compact", "--cache-dir", str(tmp_path)])
    assert res.exit_code == 0 and "merged 10 small shard(s) into 1" in res.output
    assert len(list(Path(cache.dir, "shards").glob("*.arrow"))) == 1
    mat, found = EmbeddingCache(tmp_path, BASE, DIM).get_many(keys)
    assert found.all()
    want = np.stack([vec(k) for k in keys])
    want[3] = 7
    np.testing.assert_array_equal(mat, want)


# -- fuzzing: the index file and shard readers ----------------------------------------------------
def _valid_index(n: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    keys = rng.integers(0, 256, (n, 32), dtype=np.uint8)
    parts = [si.Index.from_keys(keys[i::3], i) for i in range(3)]
    return si.encode(["a.arrow", "b.arrow", "c.arrow"], si.Index.merge(parts))


@FUZZ
@given(st.binary(max_size=600))
def test_index_reader_garbage(data):
    try:
        shards, idx = si.decode(si.MAGIC + data if data[:1] == b"+" else data)
    except si.IndexFileError:
        return
    assert len(idx.shard) == len(idx.row) == len(idx.hi) and all(isinstance(s, str) for s in shards)


@FUZZ
@given(
    st.integers(0, 40),
    st.integers(0, 2**31),
    st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=4),
    st.booleans(),
)
def test_index_reader_near_valid(n, seed, flips, truncate):
    data = bytearray(_valid_index(n, seed))
    for at, value in flips:
        data[at % len(data)] = value
    if truncate:
        data = data[: flips[0][0] % len(data)]
    try:
        shards, idx = si.decode(bytes(data))
    except si.IndexFileError:
        return
    # Accepted only with the content that was written (a flip may only touch JSON spacing).
    want_shards, want = si.decode(_valid_index(n, seed))
    assert shards == want_shards and len(idx) == n
    for a, b in zip((idx.hi, idx.lo, idx.shard, idx.row), (want.hi, want.lo, want.shard, want.row)):
        np.testing.assert_array_equal(a, b)


def test_row_checks_are_the_defined_sum_mod_2_32():
    """The uint32 computation equals the definition (odd weights x 32-bit words, summed in
    unbounded integers, mod 2^32), also for words near 2^32."""
    from speaker_sim_cli.engine.store_shard import _weights, row_checks

    rng = np.random.default_rng(5)
    keys = rng.integers(0, 256, (9, 32), dtype=np.uint8)
    keys[0] = 255
    vecs = rng.standard_normal((9, DIM)).astype(np.float32)
    vecs[1] = np.frombuffer(np.full(DIM, 0xFFFFFFFF, np.uint32).tobytes(), np.float32)
    w = [int(x) for x in _weights(8 + DIM)]
    got = row_checks(keys, vecs, block=4)  # blocks of 4: the last one short
    for r in range(9):
        words = [*keys[r].view("<u4").tolist(), *vecs[r].view("<u4").tolist()]
        assert int(got[r]) == sum(a * b for a, b in zip(words, w, strict=True)) % 2**32


def test_index_find_agrees_with_a_dict():
    rng = np.random.default_rng(3)
    keys = rng.integers(0, 256, (5000, 32), dtype=np.uint8)
    keys[1::7, :8] = keys[0, :8]  # many keys share their first 8 bytes
    idx = si.Index.from_keys(keys, 0)
    queries = np.concatenate([keys, rng.integers(0, 256, (500, 32), dtype=np.uint8)])
    pos = idx.find(*si.split_keys(queries))
    truth = {bytes(k[:16]): i for i, k in enumerate(keys)}
    for q, p in zip(queries, pos):
        want = truth.get(bytes(q[:16]))
        assert (p >= 0) == (want is not None)
        if want is not None:
            assert idx.row[p] == want


SHARD_KEYS = np.frombuffer(b"".join(bytes.fromhex(key(i)) for i in range(12)), np.uint8)
SHARD_VECS = np.stack([vec(key(i)) for i in range(12)])
SHARD = shard_bytes(SHARD_KEYS.reshape(12, 32), SHARD_VECS)


@FUZZ
@given(
    st.lists(
        st.tuples(st.integers(0, len(SHARD) - 1), st.integers(0, 255)), min_size=1, max_size=3
    ),
    st.integers(0, len(SHARD)),
)
def test_a_damaged_shard_never_gives_a_wrong_vector(tmp_path_factory, flips, cut):
    import pyarrow as pa

    data = bytearray(SHARD)
    for at, value in flips:
        data[at] = value
    data = data[: max(cut, len(data) - 64)]  # sometimes a truncated tail too
    try:
        sh = parse_shard("x.arrow", pa.BufferReader(bytes(data)), DIM)
    except ShardError:
        return
    # Parsed: the store's row checks must reject every row that differs from what was written.
    root = tmp_path_factory.mktemp("fz")
    st_ = ShardStore(str(root), DIM)
    (root / "shards").mkdir()
    (root / "shards" / "x.arrow").write_bytes(bytes(data))
    mat, found = st_.get_many([key(i) for i in range(12)])
    np.testing.assert_array_equal(mat[found], SHARD_VECS[found])
    assert len(sh.vec) == 12 or not found.any() or found.sum() <= len(sh.vec)


@pytest.mark.weights
def test_score_recomputes_the_entries_of_a_corrupted_shard(shared, real_ckpt, tmp_path):
    files = sorted((shared / "audio" / "vctk").rglob("*.wav"))[::10][:3]
    trials = tmp_path / "t.csv"
    trials.write_text("enrollment,test\n" + "".join(f"{a},{b}\n" for a in files for b in files
                                                    if a < b))  # fmt: skip
    cache = tmp_path / "cache"
    runner = CliRunner()

    def score(name: str) -> tuple[str, dict]:
        out, report = tmp_path / f"{name}.csv", tmp_path / f"{name}.json"
        res = runner.invoke(app, ["score", str(trials), "-o", str(out), "--report", str(report),
                                  "--cache-dir", str(cache), "--model-dir", str(real_ckpt.parent),
                                  "--device", "cpu", "--workers", "0", "-q"])  # fmt: skip
        assert res.exit_code == 0, res.output
        return out.read_text(), json.loads(report.read_text())["counts"]

    first, counts = score("cold")
    assert counts["embedded"] == 3
    (shard,) = cache.glob("emb/*/shards/*.arrow")
    data = bytearray(shard.read_bytes())
    where = data.find(bytes.fromhex(hashlib.sha256(files[1].read_bytes()).hexdigest()))
    assert where > 0
    data[where + 3] ^= 0xFF  # the stored key of the second recording no longer matches its row
    shard.write_bytes(bytes(data))
    res = runner.invoke(app, ["cache", "verify", "--cache-dir", str(cache)])
    assert res.exit_code == 1 and shard.name in res.output.replace("\n", "")
    again, counts = score("warm")
    assert (counts["embedded"], counts["from_cache"]) == (1, 2)
    assert again == first


def test_raw_keys_go_straight_into_a_callers_matrix(tmp_path):
    """``get_many`` of raw (n, 32) keys with ``out``/``dest`` (the Ray read-back): each found
    vector lands in its row, rows not asked for or not found are untouched; and the
    mapping over that matrix behaves like the dict it replaces."""
    from speaker_sim_cli.engine.store_shard import digests_to_keys
    from speaker_sim_cli.records import RowEmbeddings

    cache = EmbeddingCache(tmp_path, BASE, DIM)
    keys = [key(i) for i in range(40)]
    fill(cache, keys[:30], 10)  # 10 keys are never stored
    cache.put_many(keys[30:32], np.stack([vec(k) for k in keys[30:32]]))  # pending, uncommitted
    want = [5, 31, 35, 12, 0, 29]
    out = np.full((10, DIM), 7.0, np.float32)
    dest = np.array([9, 0, 3, 4, 6, 2])
    mat, found = cache.get_many(digests_to_keys([keys[i] for i in want]), out=out, dest=dest)
    assert mat is out and found.tolist() == [True, True, False, True, True, True]
    for q, i in enumerate(want):
        if found[q]:
            np.testing.assert_array_equal(out[dest[q]], vec(keys[i]))
    untouched = sorted(set(range(10)) - set(dest[found].tolist()))
    assert (out[untouched] == 7.0).all()
    paths = [f"/p/{r}.wav" for r in range(10)]
    have = np.zeros(10, bool)
    have[dest[found]] = True
    emb = RowEmbeddings(paths, out, have)
    assert len(emb) == 5 and list(emb) == [paths[r] for r in np.flatnonzero(have)]
    assert "/p/3.wav" not in emb and "/p/9.wav" in emb and 3 not in emb
    assert emb.get("/p/3.wav") is None and emb.get("/nope") is None
    np.testing.assert_array_equal(emb["/p/0.wav"], vec(keys[31]))
    assert dict(emb).keys() == set(emb)
