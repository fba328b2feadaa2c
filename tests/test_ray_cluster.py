"""``--ray`` on a multi-node cluster on this host: node loss, node added, driver killed, a node
that cannot reach the store or the weights, a recording that kills its worker.

One ``ray.cluster_utils.Cluster`` for the module: a head with 0 CPUs and 1-CPU worker nodes,
each its own raylet; tests add and remove nodes on it. Every job is compared with the local
engine on the same recordings: scores within 1e-5, one store entry per recording, the same
failures.
"""

from __future__ import annotations

import contextlib
import csv
import itertools
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import RAY_TOKEN, store_count, store_entries  # type: ignore[import-not-found]
from speaker_sim_cli.cli.main import app

pytestmark = [pytest.mark.slow, pytest.mark.shared, pytest.mark.weights]
ALL = 80  # recordings of dev_hard
STORE_MB = 100 * 2**20


@pytest.fixture(scope="module")
def cluster():
    """Head (0 CPUs) + two 1-CPU worker nodes; this process is connected to it."""
    import ray
    from ray.cluster_utils import Cluster

    keys = ("RAY_TMPDIR", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "SPEAKER_SIM_RAY_STALL_S")
    saved = {k: os.environ.get(k) for k in keys}
    tmp = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # Ray's socket paths must stay short
    (Path(tmp) / "ray").mkdir()
    os.environ["RAY_TMPDIR"] = tmp
    os.environ.pop("RAY_AUTH_MODE", None)
    os.environ["RAY_AUTH_TOKEN"] = RAY_TOKEN  # one per process (conftest); drivers inherit it
    os.environ["SPEAKER_SIM_RAY_STALL_S"] = "120"
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0,
                                                      "object_store_memory": STORE_MB})  # fmt: skip
    try:
        nodes = {k: c.add_node(num_cpus=1, object_store_memory=STORE_MB) for k in ("w1", "w2")}
        ray.init(address=c.address, logging_level="WARNING")
        yield c, nodes
    finally:
        ray.shutdown()
        c.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(autouse=True)
def two_workers(cluster):
    """Every test starts on two live 1-CPU worker nodes with both CPUs free; a driver process a
    test left running is killed after it. Once the cluster failed to come back, the tests
    after fail at once (not one wait each)."""
    if _BROKEN:
        pytest.fail(f"the cluster did not come back after an earlier test: {_BROKEN[0]}")
    try:
        _two_free_workers(*cluster)
    except BaseException as exc:
        _BROKEN.append(str(exc))
        raise
    yield
    for d in _DRIVERS:
        if d.is_alive():
            d.proc.kill()
    _DRIVERS.clear()


def _two_free_workers(c: Any, nodes: dict[str, Any], limit_s: float = 180) -> None:
    """A node an earlier test removed (or that Ray marked dead) is replaced; then wait until
    both worker CPUs are free (a killed driver's actors are gone)."""
    import ray

    alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
    for k in [k for k in nodes if nodes[k].node_id not in alive]:
        with contextlib.suppress(Exception):
            c.remove_node(nodes.pop(k), allow_graceful=False)
    while len(nodes) < 2:
        nodes[f"w{next(_NAMES)}"] = c.add_node(num_cpus=1, object_store_memory=STORE_MB)
    # A node a test removed stays alive for Ray until its health checks fail (seconds): wait
    # for that too, so that the next job sees the cluster the test means (head + two nodes).
    deadline = time.monotonic() + limit_s
    while True:
        alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
        free = ray.available_resources().get("CPU", 0.0)
        ours = {n.node_id for n in nodes.values()}
        if ours <= alive and len(alive - ours) == 1 and free >= 2:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"the cluster did not come back to two free worker nodes in "
                        f"{limit_s:.0f} s: {len(alive)} nodes alive, {free} CPUs free")  # fmt: skip
        time.sleep(0.2)


_NAMES = itertools.count(3)
_BROKEN: list[str] = []


def _score_args(shared: Path, trials: Path, cache: Path, out: Path, *extra: str) -> list[str]:
    return ["score", str(trials), "--root", str(shared), "--cache-dir", str(cache), "-o",
            str(out / "s.csv"), "--report", str(out / "r.json"), "-q", *extra]  # fmt: skip


def _scores(path: Path) -> dict[tuple[str, str], float]:
    with path.open() as f:
        return {(r["enrollment"], r["test"]): float(r["score"] or "nan") for r in csv.DictReader(f)}


def _subset(shared: Path, tmp: Path, n: int, extra: list[str] | None = None) -> Path:
    """dev_hard's trials among its first ``n`` recordings, plus ``extra`` (absolute paths) as
    test sides against the first one."""
    with (shared / "audio/dev_hard/trials.csv").open() as f:
        rows = list(csv.DictReader(f))
    keep = sorted({r[k] for r in rows for k in ("enrollment", "test")})[:n]
    rows = [r for r in rows if r["enrollment"] in keep and r["test"] in keep]
    rows += [{"enrollment": keep[0], "test": e, "label": "0"} for e in extra or []]
    path = tmp / "trials.csv"
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, ["enrollment", "test", "label"])
        w.writeheader()
        w.writerows(rows)
    return path


@pytest.fixture(scope="module")
def local(shared, real_ckpt, tmp_path_factory):
    """The local engine's scores on all of dev_hard: the reference."""
    d = tmp_path_factory.mktemp("local")
    res = CliRunner().invoke(app, _score_args(shared, shared / "audio/dev_hard/trials.csv",
                                              d / "cache", d))  # fmt: skip
    assert res.exit_code == 0, res.output
    return _scores(d / "s.csv")


def _close(got: dict, ref: dict) -> float:
    assert set(got) <= set(ref)
    return max(abs(got[k] - ref[k]) for k in got)


def test_node_removed_mid_run_and_node_added_mid_run(cluster, local, shared, tmp_path):
    """Remove a worker node (no grace) while both actors hold units, then add one: the job
    finishes, every recording has one store entry, scores equal the local engine's, nothing
    failed, and the new node got work. The units wait at the package's test hold (HOLD_ENV)
    until the new node's actor holds one too, so no step races the job; the job is a driver
    process of its own, so that a hang ends with it killed, not with a job left running."""
    c, nodes = cluster
    cache = tmp_path / "cache"
    hold = tmp_path / "hold"
    hold.touch()
    args = _score_args(shared, shared / "audio/dev_hard/trials.csv", cache, tmp_path, "--ray",
                       "--batch-size", "1")  # fmt: skip
    job = _Driver(args, tmp_path, hold)
    try:
        _remove_a_holding_node(c, nodes, hold, job)
        added = nodes[f"w{next(_NAMES)}"] = c.add_node(num_cpus=1, object_store_memory=STORE_MB)
        _held(hold, job, lambda ids: added.node_id in ids, "the added node's actor holding a unit")
    finally:
        hold.unlink(missing_ok=True)
    assert job.finish() == 0, job.output()
    assert _close(_scores(tmp_path / "s.csv"), local) <= 1e-5
    assert len(_scores(tmp_path / "s.csv")) == len(local)
    rep = json.loads((tmp_path / "r.json").read_text())
    counts = rep["counts"]
    assert counts["failed_recordings"] == 0
    # The lost node's actor held its first unit until it went: nothing of it was stored.
    assert counts["embedded"] == ALL and counts["from_cache"] == 0
    # One entry (distinct key) per recording, each row whole.
    entries = store_entries(cache)
    assert len(entries) == ALL and all(v.shape == (192,) for v in entries.values())
    ray = rep["ray"]
    assert ray["lost_actors"] >= 1
    per_node = {n["node"]: n for n in ray["per_node"]}
    assert per_node[added.node_id]["recordings"] >= 1, per_node
    assert sum(n["recordings"] + n["from_cache"] for n in per_node.values()) == ALL


def test_poison_recording_is_retried_then_fails_alone(cluster, local, shared, tmp_path,
                                                      monkeypatch):  # fmt: skip
    """A file whose decoding kills the worker process (os._exit, via the package's test hook):
    tried MAX_CRASHES times, then failed alone with a reason; the rest is scored."""
    from speaker_sim_cli.engine.ray_pool import MAX_CRASHES
    from speaker_sim_cli.engine.ray_worker import CRASH_ENV

    src = sorted((shared / "audio/dev_hard").rglob("*.wav"))[0]
    poison = tmp_path / "poison-crash.wav"
    shutil.copy(src, poison)
    trials = _subset(shared, tmp_path, 16, [str(poison)])
    monkeypatch.setenv(CRASH_ENV, "poison-crash")
    res = CliRunner().invoke(app, _score_args(shared, trials, tmp_path / "cache", tmp_path,
                                              "--ray", "--batch-size", "4"))  # fmt: skip
    assert res.exit_code == 3, res.output
    rep = json.loads((tmp_path / "r.json").read_text())
    with trials.open() as f:
        used = {r[k] for r in csv.DictReader(f) for k in ("enrollment", "test")}
    counts = rep["counts"]
    assert counts["failed_recordings"] == 1
    # The crash can take with it the answer to the unit its actor had just finished (and
    # committed): that unit's retry finds its rows in the store. At most one unit per crash.
    assert counts["embedded"] + counts["from_cache"] == len(used) - 1
    assert counts["from_cache"] <= MAX_CRASHES * rep["ray"]["unit_rows"]
    assert len(store_entries(tmp_path / "cache")) == len(used) - 1  # the poison copy: none
    # Its own MAX_CRASHES tries, run alone; plus one when it first died beside other work (its
    # unit had several recordings, or another unit was queued): those are then retried alone.
    assert MAX_CRASHES <= rep["ray"]["worker_crashes"] <= MAX_CRASHES + 1
    text = json.dumps(rep)
    assert "poison-crash.wav" in text and "worker process died" in text
    got = _scores(tmp_path / "s.csv")
    ok = {k: v for k, v in got.items() if not np.isnan(v)}
    assert len(ok) == len(got) - 1 and _close(ok, local) <= 1e-5


@pytest.mark.parametrize("hide", ["store", "weights"])
def test_a_node_that_cannot_reach_the_store_or_weights_stops_the_job(
    cluster, shared, real_ckpt, tmp_path, hide
):
    """A node that does not see the store (or the checkpoint): exit 1 in bounded time with a
    message naming the node and the path; no score file, no report."""
    from speaker_sim_cli.engine.ray_worker import HIDE_ENV

    c, _nodes = cluster
    cache = tmp_path / "cache"
    path = str(cache.resolve()) if hide == "store" else str(real_ckpt.parent.resolve())
    bad = c.add_node(num_cpus=1, object_store_memory=STORE_MB, env_vars={HIDE_ENV: path})
    try:
        trials = _subset(shared, tmp_path, 12)
        t0 = time.monotonic()
        # One 1-CPU actor per node: the pool must place one on the bad node.
        res = CliRunner().invoke(app, _score_args(shared, trials, cache, tmp_path, "--ray",
                                                  "--ray-actors", "3"))  # fmt: skip
        took = time.monotonic() - t0
    finally:
        c.remove_node(bad, allow_graceful=False)
    assert res.exit_code == 1, res.output
    msg = " ".join(res.output.split())
    assert bad.node_id[:12] in msg and path in msg, msg
    assert took < 300  # a hang guard: the stall bound (120 s here) ends a stuck job first
    assert not (tmp_path / "s.csv").exists() and not (tmp_path / "r.json").exists()


def test_driver_killed_then_rerun_runs_only_what_is_missing(cluster, local, shared, tmp_path):
    """SIGKILL the driver (a process of its own, on the cluster by address) mid-run: its actors
    go with it; a rerun against the same store embeds only the recordings not yet there."""
    n = 32
    trials = _subset(shared, tmp_path, n)
    cache = tmp_path / "cache"
    job = _Driver(_score_args(shared, trials, cache, tmp_path, "--ray", "--batch-size", "1"),
                  tmp_path)  # fmt: skip
    deadline = time.monotonic() + 300
    while job.is_alive() and time.monotonic() < deadline:
        if store_count(cache) >= 4:
            os.kill(job.proc.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    job.finish(60)
    assert job.proc.returncode == -signal.SIGKILL, f"the driver ended first: {job.output()}"
    assert not (tmp_path / "s.csv").exists()
    # Ray kills the dead driver's actors (it owned them); count the store once they are gone
    # (a unit one of them was running may still have been committed).
    _two_free_workers(*cluster)
    done = len(store_entries(cache))
    assert 4 <= done < n
    res = CliRunner().invoke(app, _score_args(shared, trials, cache, tmp_path, "--ray"))
    assert res.exit_code == 0, res.output
    counts = json.loads((tmp_path / "r.json").read_text())["counts"]
    assert counts["from_cache"] == done and counts["embedded"] == n - done
    assert len(store_entries(cache)) == n
    assert _close(_scores(tmp_path / "s.csv"), local) <= 1e-5
    print(f"driver killed after {done}/{n} stored; the rerun embedded {n - done}")


def test_a_node_lost_under_a_fixed_pool_finishes_on_the_node_left(cluster, local, shared,
                                                                  tmp_path):  # fmt: skip
    """--ray-actors 2 on two nodes, one removed while both hold units and none added: the pool
    re-creates the lost actor, which no node has room for; the job does not wait for it, it
    finishes on the node left with the local engine's scores."""
    c, nodes = cluster
    trials = _subset(shared, tmp_path, 24)
    cache = tmp_path / "cache"
    hold = tmp_path / "hold"
    hold.touch()
    args = _score_args(shared, trials, cache, tmp_path, "--ray", "--ray-actors", "2",
                       "--batch-size", "1")  # fmt: skip
    job = _Driver(args, tmp_path, hold)
    try:
        _remove_a_holding_node(c, nodes, hold, job)
    finally:
        hold.unlink(missing_ok=True)
    assert job.finish() == 0, job.output()
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["counts"]["failed_recordings"] == 0 and rep["ray"]["lost_actors"] >= 1
    got = _scores(tmp_path / "s.csv")
    assert len(got) and _close(got, local) <= 1e-5
    assert len(store_entries(cache)) == rep["counts"]["embedded"] + rep["counts"]["from_cache"]


_DRIVERS: list[_Driver] = []


class _Driver:
    """``speaker-sim`` as a driver process of its own on this cluster (by address), its units
    held while ``hold`` exists (the package's HOLD_ENV test hook). Its output goes to a file: a
    pipe nobody reads while the test waits could fill up and stall it."""

    def __init__(self, args: list[str], tmp: Path, hold: Path | None = None) -> None:
        import ray

        from speaker_sim_cli.engine.ray_worker import HOLD_ENV

        env = dict(os.environ)
        if hold is not None:
            env[HOLD_ENV] = str(hold)
            # Units wait at the hold for the test's steps: no stall bound may end the job.
            env["SPEAKER_SIM_RAY_STALL_S"] = "900"
        address = ray.get_runtime_context().gcs_address
        self.log = tmp / "driver.log"
        _DRIVERS.append(self)
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "speaker_sim_cli.cli.main", *args, "--ray-address",
                 address], stdout=out, stderr=subprocess.STDOUT, env=env)  # fmt: skip

    def is_alive(self) -> bool:
        return self.proc.poll() is None

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def finish(self, limit_s: float = 600) -> int:
        """Its exit status; past ``limit_s`` it is killed and the test fails."""
        try:
            return self.proc.wait(limit_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"the job hung ({limit_s:.0f} s); its output: {self.output()}")


def _held(hold: Path, job: _Driver, enough: Any, what: str, limit_s: float = 240) -> list[str]:
    """The nodes (oldest first) whose actors have held a unit, once ``enough(ids)``."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        marks = sorted(hold.parent.glob(hold.name + ".*"), key=lambda p: p.stat().st_mtime_ns)
        ids = [p.name[len(hold.name) + 1 :] for p in marks]
        if enough(ids):
            return ids
        if not job.is_alive():
            pytest.fail(f"the job ended before {what}: {job.output()}")
        time.sleep(0.05)
    job.proc.kill()
    pytest.fail(f"no {what} after {limit_s:.0f} s; the job's output: {job.output()}")


def _remove_a_holding_node(c: Any, nodes: dict[str, Any], hold: Path, job: _Driver) -> None:
    """Once both of the job's actors hold a unit, remove (no grace) the node of the first."""
    on = _held(hold, job, lambda ids: len(ids) == 2, "both actors holding a unit")
    gone = next(k for k in nodes if nodes[k].node_id == on[0])
    c.remove_node(nodes.pop(gone), allow_graceful=False)


def _standin_pool(ray: Any, cls: Any, stall_s: float, **options: Any) -> Any:
    """An ActorPool of stand-in actors (``cls``, built like EmbedActor) on the cluster."""
    from speaker_sim_cli.engine.config import EngineConfig
    from speaker_sim_cli.engine.ray_pool import ActorPool

    remote = ray.remote(cls).options(max_restarts=0, max_task_retries=0, **options)
    kwargs = {"spec": None, "checkpoint": "/none", "cfg": EngineConfig(device="cpu"),
              "cache_root": "/none", "ingredients": {}, "standin": True}  # fmt: skip
    return ActorPool(ray, lambda: remote.remote(**kwargs), lambda: 1, stall_s,
                     lambda: "the cluster, described")  # fmt: skip


def _units(n: int) -> list[Any]:
    from speaker_sim_cli.engine.ray_pool import Unit
    from speaker_sim_cli.engine.ray_worker import pack_paths

    return [Unit(k, 1, pack_paths([f"/corpus/{k}.wav"])) for k in range(n)]


def test_an_actor_no_node_has_room_for_stops_the_job_after_the_stall_bound(cluster):
    """No node can place the pool's actor (it asks for more CPUs than any node has): the job
    stops with a message after ``stall_s`` without progress; it never hangs."""
    import ray

    from speaker_sim_cli.engine.ray_worker import EmbedActor
    from speaker_sim_cli.errors import SpeakerSimError

    pool = _standin_pool(ray, EmbedActor, 3.0, num_cpus=64)
    t0 = time.monotonic()
    try:
        with pytest.raises(SpeakerSimError) as err:
            list(pool.run(iter(_units(4))))
    finally:
        pool.shutdown()
    assert time.monotonic() - t0 < 60
    msg = str(err.value)
    assert "no progress for 3 s" in msg and "1 waiting for a node with room" in msg, msg
    assert "the cluster, described" in msg


def test_an_actor_that_fails_to_start_is_recreated_with_back_off(cluster):
    """Every actor creation fails at once (the actor is bound to a node Ray does not have): the
    pool re-creates it after a doubling back-off, not at once, and stops after the stall bound.
    Re-creating at once made ~25,000 actors in 120 s and flooded Ray's control store."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from speaker_sim_cli.engine.ray_pool import START_BACKOFF_S
    from speaker_sim_cli.engine.ray_worker import EmbedActor
    from speaker_sim_cli.errors import SpeakerSimError

    stall_s = 4.0
    nowhere = NodeAffinitySchedulingStrategy(node_id=secrets.token_hex(28), soft=False)
    pool = _standin_pool(ray, EmbedActor, stall_s, num_cpus=1, scheduling_strategy=nowhere)
    try:
        with pytest.raises(SpeakerSimError) as err:
            list(pool.run(iter(_units(4))))
    finally:
        pool.shutdown()
    # Creations at 0, 0.25, 0.75, 1.75, 3.75, 7.75 s at most (each also takes its start-up
    # time); the stall may wait up to 2 x stall_s for an actor Ray has placed.
    first, _ = START_BACKOFF_S
    bound = 2 + sum(1 for k in range(20) if first * (2**k - 1) <= 2 * stall_s)
    assert 1 <= pool.lost_actors <= bound, (pool.lost_actors, bound)
    assert "no progress for 4 s" in str(err.value)


def test_an_actor_still_loading_its_model_is_not_given_up(cluster):
    """An actor placed on a node whose ``setup()`` (the model load) outlasts ``stall_s``: the
    pool waits for it (up to ``stall_s`` more) and the job finishes."""
    import ray

    from speaker_sim_cli.engine.ray_worker import EmbedActor

    load_s, stall_s = 12.0, 10.0

    class SlowLoad(EmbedActor):
        loaded = False

        def setup(self) -> dict[str, Any]:
            if not self.loaded:  # once, as EmbedActor's own setup() loads once
                time.sleep(load_s)
                self.loaded = True
            return super().setup()

    pool = _standin_pool(ray, SlowLoad, stall_s, num_cpus=1)
    try:
        rows = list(pool.run(iter(_units(6))))
    finally:
        pool.shutdown()
    assert sorted(r["lo"] for r in rows) == list(range(6))
    assert all(len(r["digest"]) == 32 and not r["fatal"] for r in rows)
