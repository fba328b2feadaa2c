"""Object storage and URLs: a real S3-compatible server (moto's standalone server, in a
subprocess on 127.0.0.1) and a local HTTP server, against the same scores from local files;
missing objects, transient errors, and fuzzing of URL parsing."""

from __future__ import annotations

import csv
import http.server
import json
import os
import threading
from pathlib import Path
from typing import ClassVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from conftest import (  # type: ignore[import-not-found]
    bucket_trials,
    fuzz_settings,
    moto_s3,
    score_map,
)
from speaker_sim_cli.cli.main import app
from speaker_sim_cli.io import storage

FUZZ = fuzz_settings(100)
BUCKET = "speaker-sim-test"


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server on a free port; the storage options and fake credentials point at it."""
    with moto_s3(BUCKET) as server:
        yield server


@pytest.fixture(scope="module")
def speech(shared) -> list[Path]:
    return sorted((shared / "audio" / "vctk").rglob("*.wav"))[::10][:4]


def run(args: list[str], options: str | None = None) -> object:
    pre = ["--storage-options", options] if options else []
    return CliRunner().invoke(app, [*pre, *args])


@pytest.mark.slow
@pytest.mark.weights
def test_s3_round_trip_gives_the_scores_of_local_files(s3, speech, real_ckpt, tmp_path):
    fs = s3["fs"]
    local = tmp_path / "local"
    pairs = bucket_trials(fs, f"{BUCKET}/rt", speech, local)
    common = ["--model-dir", str(real_ckpt.parent), "--device", "cpu", "--workers", "0", "-q"]
    ref = run(["score", str(local / "trials.csv"), "--cache-dir", str(tmp_path / "c"), *common])
    assert ref.exit_code == 0, ref.output
    want = score_map(ref.stdout)
    assert len(want) == len(pairs)
    url = f"s3://{BUCKET}/rt"
    from speaker_sim_cli.io import fetch

    for attempt in ("cold", "warm"):
        before = dict(fetch.COUNTS)
        res = run(
            [
                "score",
                f"{url}/trials.csv",
                "--out",
                f"{url}/out/scores.csv",
                "--report",
                f"{url}/out/report.json",
                "--cache-dir",
                f"{url}/cache",
                *common,
            ],
            s3["options"],
        )
        assert res.exit_code == 0, res.output
        # cold: one signed GET per recording (hash, header and decode share it); warm: a HEAD
        assert fetch.COUNTS["fetched"] - before["fetched"] == len(speech)
        assert fetch.COUNTS["fallback"] == before["fallback"]
        got = score_map(fs.cat_file(f"{BUCKET}/rt/out/scores.csv").decode())
        assert got.keys() == want.keys()
        for k in want:
            assert abs(got[k] - want[k]) < 1e-6, (k, got[k], want[k])
        report = json.loads(fs.cat_file(f"{BUCKET}/rt/out/report.json"))
        counts = report["counts"]
        if attempt == "cold":
            assert counts["embedded"] == len(speech) and counts["from_cache"] == 0
        else:  # every vector comes back from the store in the bucket
            assert counts["embedded"] == 0 and counts["from_cache"] == len(speech)
    shards = fs.glob(f"{BUCKET}/rt/cache/emb/*/shards/*.arrow")
    assert len(shards) == 1
    assert not fs.glob(f"{BUCKET}/rt/out/.*"), "temp objects left in the bucket"
    info = run(["cache", "info", "--json", "--cache-dir", f"{url}/cache"], s3["options"])
    assert info.exit_code == 0 and json.loads(info.stdout)["entries"] == len(speech)


@pytest.mark.slow
@pytest.mark.weights
def test_a_missing_object_fails_only_its_trials_with_its_url(s3, speech, real_ckpt, tmp_path):
    fs = s3["fs"]
    for p in speech[:2]:
        fs.put_file(str(p), f"{BUCKET}/miss/{p.name}")
    a, b = (f"s3://{BUCKET}/miss/{p.name}" for p in speech[:2])
    gone = f"s3://{BUCKET}/miss/not-there.wav"
    trials = tmp_path / "t.csv"
    trials.write_text(f"enrollment,test\n{a},{b}\n{a},{gone}\n")
    out = tmp_path / "s.csv"
    res = run(
        [
            "score",
            str(trials),
            "-o",
            str(out),
            "--cache-dir",
            str(tmp_path / "c"),
            "--model-dir",
            str(real_ckpt.parent),
            "--device",
            "cpu",
            "--workers",
            "0",
        ],
        s3["options"],
    )
    assert res.exit_code == 3, res.output
    flat = " ".join(res.output.split())
    assert gone in flat and "not found" in flat
    rows = list(csv.DictReader(out.open()))
    assert rows[0]["score"] and not rows[0]["error"]
    assert not rows[1]["score"] and gone in rows[1]["error"]


def test_a_missing_trial_list_in_a_bucket_is_a_usage_error(s3):
    res = run(["score", f"s3://{BUCKET}/nothing/trials.csv"], s3["options"])
    assert res.exit_code == 2 and f"s3://{BUCKET}/nothing/trials.csv" in res.output


def test_bad_storage_options_are_a_usage_error():
    res = run(["score", "x.csv"], "{not json")
    assert res.exit_code == 2 and "--storage-options" in res.output


def test_storage_options_from_a_config_file(tmp_path, monkeypatch):
    monkeypatch.delenv(storage.ENV, raising=False)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("storage_options:\n  s3:\n    endpoint_url: http://127.0.0.1:1\n")
    res = run(["cache", "info", "--json", "--config", str(cfg), "--cache-dir", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert json.loads(os.environ[storage.ENV]) == {"s3": {"endpoint_url": "http://127.0.0.1:1"}}
    cfg.write_text("storage_options: 3\n")
    res = run(["cache", "info", "--config", str(cfg)])
    assert res.exit_code == 2 and "storage_options" in res.output


def test_atomic_output_to_a_bucket_is_all_or_nothing(s3):
    fs = s3["fs"]
    url = f"s3://{BUCKET}/atomic/out.txt"
    with pytest.raises(RuntimeError), storage.atomic_output(url) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert not fs.exists(f"{BUCKET}/atomic/out.txt")
    with storage.atomic_output(url) as tmp:
        tmp.write_text("whole")
    assert fs.cat_file(f"{BUCKET}/atomic/out.txt") == b"whole"


def test_read_many_fetches_s3_objects_in_one_batch(s3, monkeypatch):
    from speaker_sim_cli.io import fetch

    fs = s3["fs"]
    want = {f"s3://{BUCKET}/many/a b+{i}.bin": os.urandom(500 + i) for i in range(30)}
    for url, data in want.items():
        fs.pipe_file(url[5:], data)
    gone = f"s3://{BUCKET}/many/not-there.bin"
    urls = [*want, gone]
    before = dict(fetch.COUNTS)
    got = storage.read_many(urls, in_flight=4)
    assert fetch.COUNTS["fetched"] - before["fetched"] == len(urls)  # signed GETs, no s3fs
    assert fetch.COUNTS["fallback"] == before["fallback"]
    assert got[:-1] == list(want.values())
    assert isinstance(got[-1], FileNotFoundError) and got[-1].filename == gone
    monkeypatch.setenv(fetch.ENV_MODE, "fsspec")  # the old path gives the same
    old = storage.read_many(urls)
    assert old[:-1] == got[:-1] and isinstance(old[-1], FileNotFoundError)


def test_s3_options_the_signer_does_not_know_go_through_s3fs(s3):
    from speaker_sim_cli.io import fetch

    fs = s3["fs"]
    fs.pipe_file(f"{BUCKET}/opt/a.bin", b"via s3fs")
    url = f"s3://{BUCKET}/opt/a.bin"
    try:
        storage.set_options({"s3": {"endpoint_url": s3["endpoint"], "default_block_size": 1 << 20}})
        before = dict(fetch.COUNTS)
        assert storage.read_many([url, f"{url}.gone"])[0] == b"via s3fs"
        assert fetch.COUNTS["fallback"] - before["fallback"] == 2
        assert fetch.COUNTS["fetched"] == before["fetched"]
    finally:
        storage.set_options(s3["options"])


class S3Flaky(http.server.BaseHTTPRequestHandler):
    """A proxy in front of moto whose first answer for each object is 503."""

    upstream = ""
    failed: ClassVar[set[str]] = set()
    lock = threading.Lock()

    def _forward(self) -> None:
        import http.client

        key = self.path.split("?", 1)[0]
        with self.lock:
            first = key not in self.failed
            self.failed.add(key)
        if first:
            self.send_error(503, "Slow Down")
            return
        conn = http.client.HTTPConnection(self.upstream, timeout=30)
        conn.request(self.command, self.path, headers=dict(self.headers.items()))
        r = conn.getresponse()
        body = r.read()
        conn.close()
        self.send_response(r.status)
        for k, v in r.getheaders():
            if k.lower() not in ("connection", "transfer-encoding", "server", "date"):
                self.send_header(k, v)
        self.end_headers()
        if self.command == "GET":
            self.wfile.write(body)

    do_GET = do_HEAD = _forward

    def log_message(self, *args: object) -> None:
        pass


def test_s3_batch_reads_retry_a_503(s3):
    from speaker_sim_cli.io import fetch

    fs = s3["fs"]
    want = {f"s3://{BUCKET}/slow/{i}.bin": os.urandom(300 + i) for i in range(8)}
    for url, data in want.items():
        fs.pipe_file(url[5:], data)
    S3Flaky.upstream = s3["endpoint"].split("://", 1)[1]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), S3Flaky)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        storage.set_options({"s3": {"endpoint_url": f"http://127.0.0.1:{port}"}})
        before = dict(fetch.COUNTS)
        got = storage.read_many(list(want))  # every object: 503, then signed again, 200
        assert got == list(want.values())
        assert fetch.COUNTS["fetched"] - before["fetched"] == len(want)
        assert fetch.COUNTS["fallback"] == before["fallback"]
        assert len(S3Flaky.failed) == len(want)
    finally:
        storage.set_options(s3["options"])
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_batch_content_hashes_match_the_one_at_a_time_ones(s3, tmp_path):
    import hashlib

    from speaker_sim_cli.engine.hash_memo import HashMemo
    from speaker_sim_cli.io import fetch

    fs = s3["fs"]
    data = {f"s3://{BUCKET}/hash/{i}.bin": os.urandom(700 + i) for i in range(6)}
    for url, d in data.items():
        fs.pipe_file(url[5:], d)
    urls = list(data)
    gone = f"s3://{BUCKET}/hash/gone.bin"
    memo = HashMemo(tmp_path / "files.sqlite", None)
    got = storage.content_sha256_many([*urls, gone], memo)
    memo.commit()
    assert got[:-1] == [hashlib.sha256(d).hexdigest() for d in data.values()]
    assert isinstance(got[-1], FileNotFoundError) and got[-1].filename == gone
    # The stamp remembered from the GET is the one the one-at-a-time path (HEAD) finds.
    assert all(memo.known(u) for u in urls)
    os.environ[fetch.ENV_MODE] = "fsspec"
    try:
        fs.invalidate_cache()
        assert all(storage.is_kept(u) for u in urls)  # the GETs' bytes, kept for the decode
        before = dict(fetch.COUNTS)
        assert storage.read_many(urls) == list(data.values())  # taken, not fetched again
        assert [storage.content_sha256(u, memo) for u in urls] == got[:-1]
        assert not any(storage.is_kept(u) for u in urls)  # from the memo: nothing fetched
    finally:
        os.environ.pop(fetch.ENV_MODE)
    assert before == fetch.COUNTS
    # A changed object is hashed again (its ETag moved), through the batch path.
    fs.pipe_file(urls[0][5:], b"changed")
    again = storage.content_sha256_many(urls, memo)
    assert again[0] == hashlib.sha256(b"changed").hexdigest() and again[1:] == got[1:-1]


# -- HTTP -----------------------------------------------------------------------------------------
class FlakyHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder; the first GET of each path answers 503 (a transient error); a path
    under /reset/ has its first connection closed without an answer; one under /down/ is 503
    every time. Every GET is counted by path."""

    seen: ClassVar[dict[str, int]] = {}
    lock = threading.Lock()

    def do_GET(self) -> None:
        with self.lock:
            n = self.seen.get(self.path, 0)
            self.seen[self.path] = n + 1
        if self.path.startswith("/reset/") and n == 0:
            self.close_connection = True  # no status line: the client sees a dropped connection
            return
        if (n == 0 and not self.path.startswith("/reset/")) or self.path.startswith("/down/"):
            self.send_error(503, "try again")
            return
        super().do_GET()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def http_root(tmp_path_factory):
    pytest.importorskip("aiohttp")
    root = tmp_path_factory.mktemp("www")
    handler = lambda *a, **k: FlakyHandler(*a, directory=str(root), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_http_reads_retry_a_transient_error(http_root):
    root, base = http_root
    (root / "retry.txt").write_bytes(b"payload")
    assert storage.read_bytes(f"{base}/retry.txt") == b"payload"  # 503 first, then 200
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(f"{base}/absent.txt")


def test_read_many_over_http_retries_and_fails_per_url(http_root, monkeypatch):
    from speaker_sim_cli.io import fetch

    root, base = http_root
    for d in ("many", "reset", "down"):
        (root / d).mkdir(exist_ok=True)
    want = {f"{base}/many/{i}.bin": os.urandom(1000 + i) for i in range(40)}
    for url, data in want.items():
        (root / "many" / url.rsplit("/", 1)[1]).write_bytes(data)
    (root / "reset" / "r.bin").write_bytes(b"after a reset")
    (root / "down" / "d.bin").write_bytes(b"never served")
    monkeypatch.setattr(storage, "RETRIES", 3)
    bad = [f"{base}/many/absent.bin", f"{base}/down/d.bin"]
    urls = [*want, f"{base}/reset/r.bin", *bad]
    before = dict(fetch.COUNTS)
    got = storage.read_many(urls, in_flight=8)
    assert fetch.COUNTS["fetched"] - before["fetched"] == len(urls)  # no URL left to fsspec
    assert fetch.COUNTS["fallback"] == before["fallback"]
    assert got[: len(want)] == list(want.values())  # each after a 503
    assert got[len(want)] == b"after a reset"
    absent, down = got[-2:]
    assert isinstance(absent, FileNotFoundError) and absent.filename == bad[0]
    assert isinstance(down, OSError) and not isinstance(down, FileNotFoundError)
    assert down.filename == bad[1] and "503" in str(down)
    assert FlakyHandler.seen["/down/d.bin"] == 3  # bounded: RETRIES tries, then the error
    assert FlakyHandler.seen["/many/absent.bin"] == 2  # 503, then 404 (not retried)


def test_the_decode_plan_carries_fetched_bytes(http_root, tmp_path):
    from speaker_sim_cli.engine.data import with_bytes

    root, base = http_root
    (root / "plan").mkdir(exist_ok=True)
    for i in range(5):
        (root / "plan" / f"{i}.bin").write_bytes(bytes([i]) * 10)
    local = tmp_path / "l.wav"
    plan = [
        [(0, f"{base}/plan/0.bin"), (1, str(local))],
        [(2, f"{base}/plan/1.bin"), (3, f"{base}/plan/2.bin")],
        [(4, f"{base}/plan/absent.bin")],
        [(5, str(local))],
        [(6, f"{base}/plan/3.bin"), (7, f"{base}/plan/4.bin")],
    ]
    got = list(with_bytes(plan, window=2))
    assert [[r[:2] for r in b] for b in got] == plan  # same batches, same order
    flat = {r[0]: r for b in got for r in b}
    assert len(flat[1]) == 2 and len(flat[5]) == 2  # local files are read by the worker
    for i, k in ((0, 0), (2, 1), (3, 2), (6, 3), (7, 4)):
        assert flat[i][2] == bytes([k]) * 10
    assert isinstance(flat[4][2], FileNotFoundError)


@pytest.mark.slow
@pytest.mark.weights
@pytest.mark.parametrize("workers", [0, 1])
def test_http_recordings_score_as_local_files(http_root, speech, real_ckpt, tmp_path, workers):
    """Decoded in this process, or in a worker process that gets the bytes with its request."""
    from speaker_sim_cli.io import fetch

    root, base = http_root
    for p in speech[:3]:
        (root / p.name).write_bytes(p.read_bytes())
    trials = tmp_path / "t.csv"
    trials.write_text(
        "enrollment,test\n"
        + "".join(
            f"{base}/{a.name},{base}/{b.name}\n" for a in speech[:3] for b in speech[:3] if a < b
        )
    )
    local = tmp_path / "l.csv"
    local.write_text(
        "enrollment,test\n" + "".join(f"{a},{b}\n" for a in speech[:3] for b in speech[:3] if a < b)
    )
    common = [
        "--model-dir",
        str(real_ckpt.parent),
        "--device",
        "cpu",
        "--workers",
        str(workers),
        "-q",
    ]
    ref = run(["score", str(local), *common, "--cache-dir", str(tmp_path / "c")])
    before = dict(fetch.COUNTS)
    got = run(["score", str(trials), *common, "--cache-dir", str(tmp_path / "u")])
    assert ref.exit_code == 0 and got.exit_code == 0, got.output
    assert score_map(got.stdout) == pytest.approx(score_map(ref.stdout), abs=1e-6)
    assert fetch.COUNTS["fetched"] - before["fetched"] == 3  # each object fetched once
    assert fetch.COUNTS["fallback"] == before["fallback"]


# -- URL parsing ----------------------------------------------------------------------------------
SEGMENT = st.from_regex(r"[A-Za-z0-9._~-]{1,12}", fullmatch=True).filter(
    lambda s: s not in (".", "..")
)


@FUZZ
@given(st.text(max_size=80))
def test_url_parsing_garbage(text):
    assert isinstance(storage.is_url(text), bool)
    try:
        scheme, _ = storage.parse_url(text)
    except ValueError:
        return
    assert scheme in storage.SCHEMES and storage.is_url(text)


@FUZZ
@given(
    st.sampled_from([s for s in storage.SCHEMES if s != "memory"]),
    st.from_regex(r"[a-z0-9][a-z0-9.-]{0,20}", fullmatch=True),
    st.lists(SEGMENT, min_size=1, max_size=4),
)
def test_url_survives_pathlib_and_joins(scheme, bucket, parts):
    url = f"{scheme}://{bucket}/" + "/".join(parts)
    assert storage.is_url(url) and storage.parse_url(url) == (scheme, url.split("://", 1)[1])
    assert storage.as_url(Path(url)) == url  # Path folds "//"; as_url restores it
    assert storage.join(storage.url_parent(url), parts[-1]) == url
    assert storage.join(url, "/abs/local.wav") == "/abs/local.wav"
    assert not storage.is_url(f"{bucket}/{parts[0]}")


def test_wav_scp_and_trial_items_keep_their_urls(tmp_path):
    from speaker_sim_cli.io.trials import read_trials, read_wav_scp, resolve_trial_items
    from speaker_sim_cli.records import TrialList

    scp = tmp_path / "wav.scp"
    scp.write_text("u1 s3://bucket/a/u1.wav\nu2 https://host:8080/x/u2.flac\nu3 rel/u3.wav\n")
    table = read_wav_scp(scp)
    tl = TrialList(["u1", "u1"], ["u2", "u3"], None, str(tmp_path / "t.txt"), "kaldi")
    recs, missing = resolve_trial_items(tl, None, table, "s3://bucket/lists")  # type: ignore[arg-type]
    assert not missing
    got = {k: storage.as_url(r.path) for k, r in recs.items()}
    assert got == {
        "u1": "s3://bucket/a/u1.wav",
        "u2": "https://host:8080/x/u2.flac",
        "u3": "s3://bucket/lists/rel/u3.wav",
    }
    local = tmp_path / "t.csv"
    local.write_text("enrollment,test\ns3://bucket/a/u1.wav,b.wav\n")
    recs, _ = resolve_trial_items(read_trials(local))
    assert storage.as_url(recs["s3://bucket/a/u1.wav"].path) == "s3://bucket/a/u1.wav"
    assert recs["b.wav"].path == tmp_path / "b.wav"


def test_kept_bytes_stay_within_their_bound(monkeypatch):
    monkeypatch.setattr(storage, "_KEPT_MAX", 1000)
    monkeypatch.setattr(storage, "_KEPT", type(storage._KEPT)())
    monkeypatch.setattr(storage, "_KEPT_BYTES", 0)
    for i in range(20):
        storage._keep(f"http://h.invalid/{i}", bytes([i]) * 100)
    storage._keep("http://h.invalid/19", b"y" * 100)  # kept again: counted once
    assert storage._KEPT_BYTES == sum(map(len, storage._KEPT.values())) == 1000
    assert not storage.is_kept("http://h.invalid/5")  # the oldest went first
    assert storage.read_bytes("http://h.invalid/19") == b"y" * 100  # taken, not fetched
    assert storage._KEPT_BYTES == 900 and not storage.is_kept("http://h.invalid/19")


@settings(max_examples=40, deadline=None, derandomize=True, database=None, print_blob=False)
@given(
    st.lists(st.lists(st.booleans(), min_size=1, max_size=5), max_size=12),
    st.integers(1, 8),
)
def test_the_decode_plan_keeps_every_batch_whatever_the_window(shape, window):
    """memory:// objects (read through fsspec) and local paths mixed in any plan."""
    import fsspec

    from speaker_sim_cli.engine.data import with_bytes

    mem = fsspec.filesystem("memory")
    plan, n = [], 0
    for batch in shape:
        rows = []
        for is_url in batch:
            path = f"memory://plan-fuzz/{n}.bin" if is_url else f"/nowhere/{n}.wav"
            if is_url:
                mem.pipe_file(f"/plan-fuzz/{n}.bin", str(n).encode())
            rows.append((n, path))
            n += 1
        plan.append(rows)
    got = list(with_bytes(plan, window=window))
    assert [[r[:2] for r in b] for b in got] == plan
    for b in got:
        for r in b:
            if r[1].startswith("memory://"):
                assert r[2] == str(r[0]).encode()
            else:
                assert len(r) == 2
