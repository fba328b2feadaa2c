"""``--ray``: embed and score on a Ray cluster (one local in-process cluster for the module).

The cluster is ``ray.init(num_cpus=2)`` with a small object store, started once (10-25 s here)
and shut down at the end. Every test compares with the local engine on the same files: scores
within 1e-5, the same metrics, the same failures. The fault tests kill an actor process by its
pid while a job runs, and send SIGTERM to a driver in a subprocess, then resume.
"""

from __future__ import annotations

import csv
import http.server
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import (  # type: ignore[import-not-found]
    RAY_TOKEN,
    bucket_trials,
    moto_s3,
    score_map,
    store_count,
    store_entries,
)
from speaker_sim_cli.cli.main import app
from speaker_sim_cli.cli.ray_opt import split_ray_address
from speaker_sim_cli.errors import SpeakerSimError

ACTOR = "ray::EmbedActor"
BUCKET = "speaker-sim-ray"
SUBSET = 24  # recordings of the fault tests


# -- fast: no cluster ---------------------------------------------------------------------------
def test_ray_address_after_flag_is_read_positional_stays():
    assert split_ray_address(["t.csv", "--ray"]) == ["t.csv", "--ray"]
    assert split_ray_address(["--ray", "t.csv"]) == ["--ray", "t.csv"]
    assert split_ray_address(["--ray", "auto", "t.csv"]) == ["--ray", "--ray-address", "auto",
                                                             "t.csv"]  # fmt: skip
    assert split_ray_address(["--ray=10.0.0.5:6379"]) == ["--ray", "--ray-address",
                                                          "10.0.0.5:6379"]  # fmt: skip
    assert split_ray_address(["--", "--ray", "auto"]) == ["--", "--ray", "auto"]


def test_steady_rate_counts_only_while_every_actor_is_at_work():
    """The window runs from the last actor's first unit to the first actor's last one."""
    from speaker_sim_cli.engine.ray_engine import steady_rate

    # Actor 1 loads late (first unit at 5 s); actor 0 runs out of work at 9 s.
    t = [1.0, 2.0, 3.0, 5.0, 6.0, 7.0, 9.0, 9.5, 10.0]
    who = [0, 0, 0, 1, 0, 1, 0, 1, 1]
    n = [10, 10, 10, 8, 10, 8, 10, 8, 8]
    assert steady_rate(t, who, n) == ((10 + 8 + 10) / 4.0, 4.0, 28)
    assert steady_rate([1.0, 2.0], [0, 1], [5, 5]) is None  # one unit each: no window
    assert steady_rate([], [], []) is None
    assert steady_rate([1.0, 3.0, 4.0], [0, 0, 0], [2, 2, 3]) == (5 / 3.0, 3.0, 5)


def test_actor_rates_sum_each_actors_own_rate_past_its_first_unit():
    """Each actor: what it finished after its first unit over its first-to-last span, in
    recordings and audio seconds; the sum over actors (those with one unit left out)."""
    from speaker_sim_cli.engine.ray_engine import actor_rates

    t = [1.0, 2.0, 5.0, 3.0, 6.0, 9.0]
    who = [0, 0, 0, 1, 1, 2]
    n = [4, 4, 4, 10, 6, 7]
    audio = [8.0, 10.0, 14.0, 1.0, 30.0, 5.0]
    rec, xrt, k = actor_rates(t, who, n, audio)
    assert k == 2  # actor 2 ran one unit
    assert rec == pytest.approx(8 / 4.0 + 6 / 3.0) and xrt == pytest.approx(24 / 4.0 + 30 / 3.0)
    assert actor_rates([1.0, 2.0], [0, 1], [5, 5], [1.0, 1.0]) is None
    assert actor_rates([], [], [], []) is None


def test_a_unit_travels_as_one_block_and_the_worker_resolves_it_against_the_drivers_cwd():
    from speaker_sim_cli.engine.ray_worker import absolute, pack_paths, unpack_paths

    odd = "caf\u00e9 \udcff.wav"  # non-ASCII and an undecodable byte (surrogate escape)
    paths = ["/a/b.wav", "rel/c.flac", "s3://bucket/d.wav", "sox e.sph -t wav - |", odd, ""]
    block = pack_paths(paths)
    assert isinstance(block, bytes) and unpack_paths(block) == paths
    assert [absolute(p, "/work/x") for p in paths[:5]] == [
        "/a/b.wav", "/work/x/rel/c.flac", "s3://bucket/d.wav", "sox e.sph -t wav - |",
        f"/work/x/{odd}"]  # fmt: skip
    assert absolute("../y/./z.wav", "/work/x") == "/work/y/z.wav"  # as os.path.abspath does
    with_nul = ["/a.wav", "/b\0c.wav"]  # no real path holds a NUL: it goes as the list
    assert pack_paths(with_nul) == with_nul and unpack_paths(with_nul) == with_nul


def test_without_ray_installed_ray_is_a_usage_error(monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec

    def find_spec(name: str, *a: Any) -> Any:
        return None if name.split(".")[0] == "ray" else real(name, *a)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    res = CliRunner().invoke(app, ["embed", str(tmp_path / "a.wav"), "-o", str(tmp_path / "o"),
                                   "--ray"])  # fmt: skip
    assert res.exit_code == 2, res.output
    assert "pip install 'speaker-sim[ray]'" in res.output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--ray", "--ray-actors", "2", "--no-cache"], "drop --no-cache"),
        (["--ray-actors", "2"], "need --ray"),
        (["--ray", "--device", "cuda:1"], "Ray assigns each actor its GPU"),
        (["--ray=not an address"], "not a cluster address"),
    ],
)
def test_bad_ray_options_are_usage_errors(shared, tmp_path, args, says):
    wav = shared / "audio" / "speechbrain_samples"
    files = sorted(str(p) for p in wav.glob("*.wav"))[:1]
    res = CliRunner().invoke(app, ["embed", *files, "-o", str(tmp_path / "o"), *args])
    assert res.exit_code == 2, res.output
    assert says in " ".join(res.output.split())


def test_nothing_listening_fails_fast_with_a_hint(shared, real_ckpt, tmp_path):
    """An address where nothing listens: exit 1 in seconds (Ray alone retries for minutes)."""
    import ray

    if ray.is_initialized():
        pytest.skip("this process already holds a Ray connection")
    wav = sorted(str(p) for p in (shared / "audio" / "speechbrain_samples").glob("*.wav"))[:1]
    t0 = time.perf_counter()
    res = CliRunner().invoke(app, ["embed", *wav, "-o", str(tmp_path / "o"), "--cache-dir",
                                   str(tmp_path / "c"), "--ray", "127.0.0.1:9"])  # fmt: skip
    assert res.exit_code == 1, res.output
    assert "nothing answers at 127.0.0.1:9" in " ".join(res.output.split())
    assert time.perf_counter() - t0 < 30


def test_refusal_message_names_token_auth(monkeypatch):
    from speaker_sim_cli.engine.ray_engine import _refused

    exc = ConnectionError("Failed to connect to Ray cluster at 10.0.0.5:6379")
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    msg = _refused("10.0.0.5:6379", exc)
    assert "RAY_AUTH_MODE=token" in msg and "RAY_AUTH_TOKEN" in msg
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    assert "token was most likely refused" in _refused("10.0.0.5:6379", exc)


def _actor(real_ckpt: Path, cache_root: Path, **change: Any) -> Any:
    """An EmbedActor built in this process (no Ray), as a worker node would build it."""
    from speaker_sim_cli.engine.config import EngineConfig
    from speaker_sim_cli.engine.ray_engine import EmbedActor
    from speaker_sim_cli.models.registry import DEFAULT_MODEL
    from speaker_sim_cli.pipeline import Extractor

    ex = Extractor(DEFAULT_MODEL, real_ckpt.parent, EngineConfig(device="cpu"), cache_root)
    ingredients = {**ex.cache.ingredients, **change}
    return EmbedActor(ex.spec, str(ex.found.path), EngineConfig(device="cpu"),
                      str(cache_root), ingredients)  # fmt: skip


@pytest.mark.shared
@pytest.mark.weights
def test_a_worker_refuses_an_unwritable_cache_or_another_checkpoint(real_ckpt, tmp_path):
    """What a worker on another node says when it cannot serve: the job stops with it."""
    not_a_dir = tmp_path / "cache-is-a-file"
    not_a_dir.write_text("")
    actor = _actor(real_ckpt, not_a_dir)
    # Constructed = placed on a node: ready() answers at once, nothing is loaded or checked yet.
    assert actor.ready()["fatal"] == "" and actor.embedder is None
    said = actor.setup()
    assert "cannot write the cache" in actor.fatal and "every node" in actor.fatal
    assert said["fatal"] == actor.ready()["fatal"] == actor.fatal
    assert actor.run(0, [str(tmp_path / "a.wav")])["fatal"] == actor.fatal
    other = _actor(real_ckpt, tmp_path / "cache", checkpoint_sha256="f" * 64)
    assert other.run(0, [str(tmp_path / "a.wav")])["fatal"] == other.fatal  # run() sets up
    assert "differs from the driver's" in other.fatal and other.embedder is None


# -- the cluster ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster():
    import ray

    saved = {k: os.environ.get(k) for k in ("RAY_TMPDIR", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # Ray's socket paths must stay short
    os.environ["RAY_TMPDIR"] = tmp
    # Token auth, which Ray turns on for a new cluster when RAY_AUTH_MODE is unset (it sets
    # RAY_AUTH_MODE=token then), with a token of our own: nothing is written to ~/.ray, and the
    # subprocess driver below inherits both.
    os.environ.pop("RAY_AUTH_MODE", None)
    os.environ["RAY_AUTH_TOKEN"] = RAY_TOKEN  # one token per process (conftest)
    ctx = ray.init(num_cpus=2, object_store_memory=250 * 2**20, include_dashboard=False,
                   _temp_dir=tmp, logging_level="WARNING")  # fmt: skip
    try:
        yield ctx.address_info["gcs_address"]
    finally:
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(tmp, ignore_errors=True)


def _invoke(args: list[str]) -> Any:
    return CliRunner().invoke(app, args)


def _score_args(shared: Path, cache: Path, out: Path, *extra: str, trials: Path | None = None
                ) -> list[str]:  # fmt: skip
    """score dev_hard (or ``trials``) -> OUT/s.csv and OUT/r.json."""
    return ["score", str(trials or shared / "audio/dev_hard/trials.csv"), "--root", str(shared),
            "--cache-dir", str(cache), "-o", str(out / "s.csv"), "--report",
            str(out / "r.json"), "-q", *extra]  # fmt: skip


def _subset(shared: Path, tmp: Path, n: int = SUBSET) -> tuple[Path, set[tuple[str, str]]]:
    """The dev_hard trials among its first ``n`` recordings (fault tests: a shorter job)."""
    with (shared / "audio/dev_hard/trials.csv").open() as f:
        rows = list(csv.DictReader(f))
    keep = sorted({r[k] for r in rows for k in ("enrollment", "test")})[:n]
    rows = [r for r in rows if r["enrollment"] in keep and r["test"] in keep]
    path = tmp / "trials.csv"
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, ["enrollment", "test", "label"])
        w.writeheader()
        w.writerows(rows)
    return path, {(r["enrollment"], r["test"]) for r in rows}


def _scores(path: Path) -> dict[tuple[str, str], float]:
    with path.open() as f:
        return {(r["enrollment"], r["test"]): float(r["score"]) for r in csv.DictReader(f)}


def _ancestors(pid: int) -> set[int]:
    out = set()
    while pid > 1:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        pid = int(stat.rsplit(")", 1)[1].split()[1])
        out.add(pid)
    return out


def _actor_pids() -> list[int]:
    """Our cluster's embedding actors (descendants of this test process), by their title."""
    me, pids = os.getpid(), []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if ACTOR in cmd and me in _ancestors(int(d.name)):
            pids.append(int(d.name))
    return pids


@pytest.fixture(scope="module")
def local(shared, real_ckpt, tmp_path_factory):
    """The local engine's scores and report on dev_hard: the reference for every case."""
    d = tmp_path_factory.mktemp("local")
    res = _invoke(_score_args(shared, d / "cache", d))
    assert res.exit_code == 0, res.output
    return _scores(d / "s.csv"), json.loads((d / "r.json").read_text())


def _close(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(abs(a[k] - b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.shared
@pytest.mark.weights
def test_score_on_ray_equals_the_local_engine(cluster, local, shared, tmp_path):
    ref, ref_report = local
    res = _invoke(_score_args(shared, tmp_path / "cache", tmp_path, "--ray", "--ray-actors", "2"))
    assert res.exit_code == 0, res.output
    got = _scores(tmp_path / "s.csv")
    assert _close(got, ref) <= 1e-5
    rep = json.loads((tmp_path / "r.json").read_text())
    for k in ("eer", "min_dcf"):
        assert rep["metrics"][k] == pytest.approx(ref_report["metrics"][k], abs=1e-9)
    assert rep["engine"] == "ray" and ref_report["engine"] == "local"
    ray = rep["ray"]
    assert ray["actors"] == 2 and ray["address"] == cluster and not ray["started_here"]
    assert sum(a["recordings"] for a in ray["per_actor"]) == 80
    assert all(a["x_realtime"] > 0 for a in ray["per_actor"] if a["recordings"])
    # Each actor's CPU time is its worker process's (no more than its busy time can hold,
    # with one model thread and one decode thread); the steady window is inside the job.
    assert all(0 < a["cpu_s"] <= 2.5 * a["busy_s"] for a in ray["per_actor"] if a["recordings"])
    if "steady_window_s" in ray:
        assert 0 < ray["steady_window_s"] <= ray["embed_s"] and 0 < ray["steady_recordings"] < 80
    assert rep["counts"]["embedded"] == 80 and len(store_entries(tmp_path / "cache")) == 80
    # Warm: the workers find everything in the store (the driver hashes nothing itself).
    warm = tmp_path / "warm"
    warm.mkdir()
    again = _invoke(_score_args(shared, tmp_path / "cache", warm, "--ray"))
    assert again.exit_code == 0, again.output
    rep2 = json.loads((warm / "r.json").read_text())
    assert rep2["counts"]["from_cache"] == 80 and rep2["counts"]["embedded"] == 0
    assert sum(a["from_cache"] for a in rep2["ray"]["per_actor"]) == 80
    assert _scores(warm / "s.csv") == got


@pytest.mark.slow
@pytest.mark.shared
@pytest.mark.weights
def test_embed_on_ray_equals_embed_and_bad_files_fail_alike(cluster, shared, tmp_path):
    """Same matrix, index and failures.csv as the local engine; bad files cost only themselves."""
    audio = (p for p in sorted((shared / "audio" / "dev_hard").rglob("*")) if p.is_file())
    good = [p for p in audio if p.suffix != ".csv"][:14]
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk" * 4)
    short = tmp_path / "short.wav"
    import soundfile as sf

    sf.write(short, np.full(800, 0.1, np.float32), 16000)  # 0.05 s < --min-duration
    listing = tmp_path / "list.txt"
    files = [str(p) for p in good[:7]] + [str(bad)] + [str(p) for p in good[7:]] + [str(short)]
    listing.write_text("\n".join(files) + "\n")
    outs = {}
    for name, extra in (("local", []), ("ray", ["--ray", "--ray-actors", "1"])):
        out = tmp_path / name
        res = _invoke(["embed", str(listing), "-o", str(out), "--cache-dir",
                       str(tmp_path / f"cache-{name}"), "-q", *extra])  # fmt: skip
        assert res.exit_code == 3, res.output  # partial: two recordings failed
        outs[name] = out
    a, b = (np.load(outs[n] / "embeddings.npy") for n in ("local", "ray"))
    assert a.shape == b.shape == (len(good), 192)
    rel = np.linalg.norm(a - b, axis=1) / np.linalg.norm(a, axis=1)
    assert rel.max() <= 1e-5
    for f in ("index.csv", "failures.csv"):
        assert (outs["ray"] / f).read_text() == (outs["local"] / f).read_text()
    fails = (outs["ray"] / "failures.csv").read_text()
    assert "broken.wav" in fails and "too short" in fails
    model = json.loads((outs["ray"] / "model.json").read_text())
    assert model["engine"] == "ray" and model["ray"]["per_actor"][0]["failed"] >= 1


class _Counting(http.server.SimpleHTTPRequestHandler):
    """Serves a folder; counts GETs and the most requests it held at once (each held 50 ms)."""

    lock = threading.Lock()
    active = peak = gets = 0

    def do_GET(self) -> None:
        cls = type(self)
        with cls.lock:
            cls.active += 1
            cls.gets += 1
            cls.peak = max(cls.peak, cls.active)
        try:
            time.sleep(0.05)
            super().do_GET()
        finally:
            with cls.lock:
                cls.active -= 1

    def log_message(self, *args: Any) -> None:
        pass


@pytest.mark.slow
@pytest.mark.shared
@pytest.mark.weights
def test_a_worker_fetches_the_urls_of_its_unit_many_at_a_time(cluster, local, shared, tmp_path):
    """Trials whose recordings are http:// URLs on a local server, on Ray: a worker fetches the
    objects of its unit together (several requests open at once, where one request per decode
    thread would hold one), each object once (its bytes serve the hash and the decode), and
    the scores are the local engine's on the same files."""
    import functools

    ref, _ = local
    trials, pairs = _subset(shared, tmp_path, 12)
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_Counting, directory=str(shared))
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}/"
    try:
        with trials.open() as f:
            rows = list(csv.DictReader(f))
        for r in rows:
            r["enrollment"], r["test"] = base + r["enrollment"], base + r["test"]
        urls = tmp_path / "urls.csv"
        with urls.open("w", newline="") as f:
            w = csv.DictWriter(f, ["enrollment", "test", "label"])
            w.writeheader()
            w.writerows(rows)
        res = _invoke(["score", str(urls), "--cache-dir", str(tmp_path / "cache"), "-o",
                       str(tmp_path / "s.csv"), "--report", str(tmp_path / "r.json"), "-q",
                       "--ray", "--ray-actors", "1", "--batch-size", "12"])  # fmt: skip
    finally:
        server.shutdown()
        server.server_close()
    assert res.exit_code == 0, res.output
    got = {(a[len(base) :], b[len(base) :]): v for (a, b), v in _scores(tmp_path / "s.csv").items()}
    assert set(got) == pairs
    assert _close(got, {k: ref[k] for k in pairs}) <= 1e-5
    n = len({x for pair in pairs for x in pair})
    assert _Counting.gets == n, (_Counting.gets, n)
    assert _Counting.peak >= 2, _Counting.peak


@pytest.fixture
def s3():
    with moto_s3(BUCKET) as server:
        yield server


@pytest.mark.slow
@pytest.mark.shared
@pytest.mark.weights
def test_a_job_in_a_bucket_runs_on_ray(cluster, s3, shared, real_ckpt, tmp_path):
    """Trial list, recordings, store and score file in an S3 bucket (moto's server on
    127.0.0.1), ``--ray``: the workers, whose environment holds neither the endpoint nor the
    keys, read the recordings and write the store with the driver's ``--storage-options``; the
    scores are those of the same files on local disk."""
    fs = s3["fs"]
    speech = sorted((shared / "audio" / "vctk").rglob("*.wav"))[::10][:4]
    local = tmp_path / "local"
    pairs = bucket_trials(fs, f"{BUCKET}/ray", speech, local)
    common = ["--model-dir", str(real_ckpt.parent), "--device", "cpu", "-q"]
    ref = _invoke(["score", str(local / "trials.csv"), "--cache-dir", str(tmp_path / "c"),
                   *common])  # fmt: skip
    assert ref.exit_code == 0, ref.output
    want = score_map(ref.stdout)
    opts = json.dumps({"s3": {"endpoint_url": s3["endpoint"], "key": "testing",
                              "secret": "testing",
                              "client_kwargs": {"region_name": "us-east-1"}}})  # fmt: skip
    url = f"s3://{BUCKET}/ray"
    res = _invoke(["--storage-options", opts, "score", f"{url}/trials.csv", "--cache-dir",
                   f"{url}/store", "-o", f"{url}/scores.csv", "--report", f"{url}/r.json",
                   "--ray", "--ray-actors", "1", *common])  # fmt: skip
    assert res.exit_code == 0, res.output
    got = score_map(fs.cat_file(f"{BUCKET}/ray/scores.csv").decode())
    assert set(got) == set(want) == set(pairs)
    assert _close(got, want) <= 1e-5
    report = json.loads(fs.cat_file(f"{BUCKET}/ray/r.json"))
    assert report["engine"] == "ray" and report["counts"]["embedded"] == len(speech)
    assert any("/shards/" in k for k in fs.find(f"{BUCKET}/ray/store"))


@pytest.mark.slow
@pytest.mark.shared
@pytest.mark.weights
def test_the_driver_reads_vectors_back_in_batches_and_stops_at_the_first_failure(
    cluster, shared, real_ckpt, tmp_path, monkeypatch
):
    """``Extractor.embed_paths`` on Ray reads the workers' vectors back from the store many
    keys at a time (here 3, with 2-recording units: the first unit alone, then batches that
    span units): the same vectors as the local engine, two paths of one content counted once.
    With ``stop_on_error`` it stops at the first failure and keeps what came before it."""
    from speaker_sim_cli.engine import ray_engine, ray_readback
    from speaker_sim_cli.engine.config import EngineConfig
    from speaker_sim_cli.pipeline import Extractor

    monkeypatch.setattr(ray_readback, "READBACK_ROWS", 3)
    wavs = sorted(str(p) for p in (shared / "audio/dev_hard").rglob("*.wav"))[:9]
    twin = tmp_path / "twin.wav"
    shutil.copy(wavs[0], twin)
    missing = str(tmp_path / "missing.wav")
    files = [*wavs, str(twin)]

    def extractor(name: str, ray: Any = None) -> Extractor:
        return Extractor("campplus-zh-en", model_dir=real_ckpt.parent,
                         engine=EngineConfig(device="cpu", batch_size=2),
                         cache_dir=tmp_path / f"cache-{name}", ray=ray)  # fmt: skip

    ref = extractor("local").embed_paths(files)
    opts = ray_engine.RayOptions(address=cluster, actors=1, device="cpu")
    got = extractor("ray", opts).embed_paths(files)
    assert sorted(got.embeddings) == sorted(files) and not got.failures
    assert got.embedded == 9 and got.cached == 1  # the twin is the same content
    for f in files:
        a, b = ref.embeddings[f], got.embeddings[f]
        assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(a), f
    # One actor, 2-recording units in list order: the failure is in the third unit; the
    # units after it are not waited for.
    some = [*wavs[:5], missing, *wavs[5:]]
    stopped = extractor("stop", opts).embed_paths(some, stop_on_error=True)
    assert list(stopped.failures) == [missing] and "not found" in stopped.failures[missing]
    assert set(wavs[:5]) <= set(stopped.embeddings) and missing not in stopped.embeddings
    assert len(stopped.embeddings) < len(wavs)
    # A later batch this process cannot read back (read on the read-back thread): the run
    # stops with the path and the store named, not a result with holes.
    blind = extractor("blind", opts)
    real_get = blind.cache.get_many
    calls: list[int] = []

    def get_many(keys: Any, out: Any = None, dest: Any = None) -> Any:
        calls.append(len(keys))
        mat, found = real_get(keys, out=out, dest=dest)
        return mat, found & (len(calls) == 1)  # the first unit reads; later batches miss

    monkeypatch.setattr(blind.cache, "get_many", get_many)
    with pytest.raises(SpeakerSimError, match="cannot read it there") as err:
        blind.embed_paths(wavs)
    assert str(blind.cache.root) in str(err.value) and len(calls) >= 2


@pytest.mark.slow
@pytest.mark.shared
@pytest.mark.weights
def test_a_killed_actor_costs_nothing(cluster, local, shared, tmp_path):
    """SIGKILL one actor mid-run: Ray restarts it and retries its unit; the job finishes with
    every recording embedded once in the cache and the scores of a clean run."""
    trials, keys = _subset(shared, tmp_path)
    ref = {k: v for k, v in local[0].items() if k in keys}
    cache = tmp_path / "cache"
    args = _score_args(shared, cache, tmp_path, "--ray", "--ray-actors", "2", "--batch-size", "1",
                       trials=trials)  # fmt: skip
    box: dict[str, Any] = {}
    job = threading.Thread(target=lambda: box.setdefault("res", _invoke(args)))
    job.start()
    killed = None
    deadline = time.monotonic() + 240
    while job.is_alive() and time.monotonic() < deadline:
        n = store_count(cache)  # rows are committed when a worker ends its unit
        pids = _actor_pids()
        if 2 <= n < SUBSET - 6 and pids:
            killed = pids[0]
            os.kill(killed, signal.SIGKILL)
            break
        time.sleep(0.02)
    job.join(300)
    assert killed is not None, "the job ended before an actor could be killed"
    res = box["res"]
    assert res.exit_code == 0, res.output
    assert _close(_scores(tmp_path / "s.csv"), ref) <= 1e-5
    rep = json.loads((tmp_path / "r.json").read_text())
    counts = rep["counts"]
    # The killed actor may have committed its unit to the store before Ray got its answer: the
    # retried unit then finds that row there (from_cache), as in the node-loss test.
    assert counts["embedded"] + counts["from_cache"] == SUBSET and counts["from_cache"] <= 2
    assert counts["failed_recordings"] == 0
    entries = store_entries(cache)  # each row whole, copies of a retried unit's key equal
    assert len(entries) == SUBSET  # one entry (distinct key) per recording
    assert all(v.shape == (192,) for v in entries.values())
    assert not Path(f"/proc/{killed}").exists() or killed not in _actor_pids()


@pytest.mark.slow
@pytest.mark.shared
@pytest.mark.weights
def test_sigterm_leaves_nothing_partial_and_a_rerun_resumes(cluster, local, shared, tmp_path):
    """A driver in its own process, on the cluster by address (token auth): SIGTERM mid-run ->
    exit 130, no score file, no report; the rerun embeds only what is missing."""
    trials, keys = _subset(shared, tmp_path)
    ref = {k: v for k, v in local[0].items() if k in keys}
    cache = tmp_path / "cache"
    out, report = tmp_path / "s.csv", tmp_path / "r.json"
    cmd = [sys.executable, "-m", "speaker_sim_cli.cli.main", "score", str(trials), "--root",
           str(shared), "--ray", cluster, "--ray-actors", "1", "--batch-size", "1", "--cache-dir",
           str(cache), "-o", str(out), "--report", str(report), "-q"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline:
            if store_count(cache) >= 2:
                proc.send_signal(signal.SIGTERM)
                break
            time.sleep(0.02)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted" in err
    assert not out.exists() and not report.exists()
    deadline = time.monotonic() + 60  # the driver's actors go with it
    while _actor_pids() and time.monotonic() < deadline:
        time.sleep(0.1)
    done = len(store_entries(cache))
    assert 2 <= done < SUBSET
    res = _invoke(_score_args(shared, cache, tmp_path, "--ray", "--ray-actors", "2", trials=trials))
    assert res.exit_code == 0, res.output
    counts = json.loads(report.read_text())["counts"]
    assert counts["from_cache"] == done and counts["embedded"] == SUBSET - done
    assert _close(_scores(out), ref) <= 1e-5


class _FakeRay:
    """What RayRun's sizing asks of Ray: the cluster's resources."""

    def __init__(self, **res: float) -> None:
        self.res = res

    def cluster_resources(self) -> dict[str, float]:
        return dict(self.res)


@pytest.mark.parametrize(
    ("gpus_per_actor", "res", "actors", "cpus"),
    [
        (None, {"CPU": 8.0}, 8, 1.0),  # CPU only: one actor per CPU, decoding in line
        (None, {"CPU": 32.0, "GPU": 4.0}, 4, 4.0),  # one per GPU, 4 decode threads each
        (0.5, {"CPU": 32.0, "GPU": 4.0}, 8, 4.0),  # two per GPU
        (0.5, {"CPU": 12.0, "GPU": 4.0}, 3, 4.0),  # as far as the decode CPUs go
    ],
)
def test_pool_sizing_follows_the_cluster(gpus_per_actor, res, actors, cpus):
    from speaker_sim_cli.engine.config import EngineConfig
    from speaker_sim_cli.engine.ray_connect import Connection
    from speaker_sim_cli.engine.ray_engine import RayOptions, RayRun

    run = RayRun(RayOptions(gpus_per_actor=gpus_per_actor), None, Path("/x"),
                 EngineConfig(device="cpu"), None)  # fmt: skip
    ray = _FakeRay(**res)
    conn = Connection(ray, "h:1", False, res["CPU"], res.get("GPU", 0.0), 1)
    gpa, got_cpus, device, _threads = run._sizing(conn)
    assert got_cpus == cpus and device == ("cuda" if "GPU" in res else "cpu")
    assert run._want(ray, gpa, got_cpus) == actors


@pytest.mark.shared
@pytest.mark.weights
def test_a_worker_hashes_decodes_embeds_and_finds_its_work_in_the_store(shared, real_ckpt,
                                                                        tmp_path):  # fmt: skip
    """The file work on the worker side, without Ray: one unit of good, missing and broken
    files -> status bytes, digests, reasons, store entries; the same unit again -> all cached."""
    from speaker_sim_cli.engine.ray_worker import CACHED, FAILED, OK

    good = sorted(str(p) for p in (shared / "audio/dev_hard").rglob("*.wav"))[:3]
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk" * 4)
    paths = [good[0], str(tmp_path / "missing.wav"), good[1], str(broken), good[2]]
    cache = tmp_path / "cache"
    actor = _actor(real_ckpt, cache)
    assert actor.ready()["fatal"] == ""
    row = actor.run(7, paths)
    assert row["lo"] == 7 and row["n"] == 5 and not row["fatal"]
    assert list(row["status"]) == [OK, FAILED, OK, FAILED, OK]
    from speaker_sim_cli.audio.decode import probe
    from speaker_sim_cli.errors import AudioError

    with pytest.raises(AudioError) as local_reason:  # the local engine's reason for it
        probe(broken)
    assert row["reasons"][1] == "file not found" and row["reasons"][3] == local_reason.value.reason
    entries = store_entries(cache)  # the worker committed its unit's shard
    assert len(entries) == 3 and row["audio_s"] > 0
    digests = [row["digest"][32 * j : 32 * j + 32].hex() for j in (0, 2, 4)]
    assert set(entries) == set(digests)
    assert all(v.shape == (192,) for v in entries.values())
    again = actor.run(0, paths)
    assert list(again["status"]) == [CACHED, FAILED, CACHED, FAILED, CACHED]
    assert again["digest"] == row["digest"] and again["audio_s"] == 0.0
