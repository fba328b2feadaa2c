"""Past one machine: embed recordings on a Ray cluster (``--ray``); the driver's entry point.

The driver (the ``speaker-sim`` process) does no file work: it cuts the list of recordings into
*work units* (consecutive paths, made lazily) and hands them to a pool of model actors
(:mod:`.ray_pool`). Each actor (:mod:`.ray_worker`) stats and content-hashes its files, looks
them up in the embedding store, decodes and embeds the misses and writes them to the store,
then answers with one small row per unit: a status byte, a 32-byte digest and a reason per
recording. The driver's memory and CPU per recording stay small and flat; it reads a vector
back from the store only when the caller asks for it, which is why the store (``--cache-dir``)
must be a location every node and the driver reach.

Node loss: this module used Ray Data (CPU decode tasks, then ``ActorPoolStrategy(size=N)``
with Ray-level ``max_restarts`` / ``max_task_retries``). On a head + two 1-CPU nodes that
made no progress at all with two actors (0.75 CPU each, one per node, left 0.25 CPU where the
0.5-CPU decode tasks needed 0.5), and a node removed under the one actor spent the task
retries against the restarting actor ("temporarily unavailable") and failed the job, or, as
first reported, waited for a restart in place. The pool here creates actors with no Ray-level
restarts and owns the retry policy: it knows which units a lost actor held, replaces the actor
wherever there is room (a node added later included), and stops with a message after
``stall_s`` without progress. No waveform travels through the object store (the actors decode
themselves) and result rows are small, so no object is lost with a node.
Connecting lives in :mod:`.ray_connect`; every Ray call of the project is in these modules
(the tested range is :data:`RAY_SPEC`).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import time
from array import array
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import SpeakerSimError, UsageError
from .config import EngineConfig, EngineStats
from .ray_connect import INSTALL_HINT, Connection, _refused, connect
from .ray_pool import IN_FLIGHT, ActorPool, Unit
from .ray_worker import (
    CACHED,
    CRASH_ENV,
    FAILED,
    HOLD_ENV,
    EmbedActor,
    pack_paths,
)

__all__ = ["RAY_SPEC", "EmbedActor", "RayOptions", "RayRun", "_refused", "load_weights"]

#: The Ray this adapter is tested with (the ``speaker-sim[ray]`` extra pins the same range).
RAY_SPEC = "ray[data]>=2.60,<2.61"
# A unit (one actor call) holds at most --batch-size recordings (default per device); it is the
# scheduling grain only (the actor embeds it in sub-batches), and the driver's cost per
# recording falls with it: Ray's own cost of an actor call is ~0.5-1 ms of driver CPU here.
# benchmarks/bench_ray.py --driver, same host, 10^5-3x10^6 items: 1.29 CPU-us per recording at
# 1024, 0.49 at 4096 (one driver core then feeds ~1,650 GPUs of CAM++ at 10,000x realtime, 8 s
# recordings). A GPU embeds 4096 such recordings in ~3 s: the tail of a job, and what a lost
# node re-runs, stay a few seconds per actor; each unit's shard is 3 MB.
UNIT_ROWS = {"cpu": 32, "cuda": 4096}
# No result and no new actor for this long stops the job (a lost cluster, no room for any
# actor): a message, never a hang. $SPEAKER_SIM_RAY_STALL_S overrides it.
STALL_S = 600.0
# Ray's task events (``ray list tasks``, the dashboard's timeline) for the actors' units: off.
# The pool keeps its own account (the report); off, the driver spends ~6 % less CPU per unit
# (0.96 vs 1.03 us per recording at 1024-recording units, 3 alternating runs, load 6).
TASK_EVENTS = False
# Threads that hash, probe and decode in each actor; GPU actors reserve as many CPUs.
DECODE_THREADS = {"cpu": 1, "cuda": 4}
LOG_EVERY_S = 10.0
log = logging.getLogger("speaker_sim.ray")
_HOSTPORT = r"(\[[0-9a-fA-F:]+\]|[A-Za-z0-9_.-]+):\d{1,5}"


@dataclass(frozen=True)
class RayOptions:
    """``--ray [ADDRESS]``, ``--ray-actors``, ``--ray-gpus-per-actor`` (checked, Ray-free).

    address: None for ``--ray`` alone (``$RAY_ADDRESS`` if set, else a local in-process Ray),
        ``"local"`` (a local in-process Ray even when ``$RAY_ADDRESS`` is set),
        ``"auto"`` (the cluster this machine belongs to), ``HOST:PORT`` or ``ray://HOST:PORT``.
    actors: 0 for the default: one per GPU (at ``gpus_per_actor``), else the cluster's CPUs
        but one (one CPU is left to decoding).
    gpus_per_actor: None for the default: 1 when the cluster has GPUs, 0 when it has none.
    device: ``auto``, ``cpu`` or ``cuda`` (what ``--device`` asked of the actors).
    decode_threads: threads that hash and decode in each actor (the CPU stage; 0 for the
        default, 1 per CPU actor, 4 per GPU actor, which reserves a CPU for each).
    """

    address: str | None = None
    actors: int = 0
    gpus_per_actor: float | None = None
    device: str = "auto"
    decode_threads: int = 0

    @classmethod
    def from_cli(
        cls,
        address: str | None,
        actors: int,
        gpus_per_actor: float | None,
        device: str,
        decode_threads: int = 0,
    ) -> RayOptions:
        """Check the options before any work; raises UsageError with what to do."""
        if address is not None:
            address = address.strip()
            if address == "":
                address = None
            elif address not in ("auto", "local") and not re.fullmatch(
                _HOSTPORT, address.removeprefix("ray://")
            ):
                raise UsageError(
                    f"--ray {address}: not a cluster address (use --ray alone, --ray auto or "
                    "--ray HOST:PORT; write --ray=ADDRESS, or put --ray after the positional "
                    "arguments, so that they are not taken for its value)"
                )
        if actors < 0:
            raise UsageError(f"--ray-actors {actors}: must be >= 1 (or 0 for the default)")
        if gpus_per_actor is not None and gpus_per_actor < 0:
            raise UsageError(f"--ray-gpus-per-actor {gpus_per_actor:g}: must be >= 0")
        dev = device.strip()
        if dev not in ("auto", "cpu", "cuda"):
            raise UsageError(
                f"--device {device} with --ray: Ray assigns each actor its GPU; use --device "
                "auto, cpu or cuda, and --ray-gpus-per-actor / --ray-actors to size the pool"
            )
        if dev == "cpu" and gpus_per_actor:
            raise UsageError("--device cpu and --ray-gpus-per-actor > 0 do not go together")
        if dev == "cuda" and gpus_per_actor == 0:
            raise UsageError("--device cuda and --ray-gpus-per-actor 0 do not go together")
        if decode_threads < 0:
            raise UsageError(f"--ray-decode-threads {decode_threads}: must be >= 1 (or 0)")
        require_ray()
        return cls(address, actors, gpus_per_actor, dev, decode_threads)

    def label(self) -> str:
        return self.address or os.environ.get("RAY_ADDRESS") or "local"


def steady_rate(
    t: Sequence[float], actor: Sequence[int], n: Sequence[int]
) -> tuple[float, float, int] | None:
    """Throughput past start-up from the units' completions (time, actor, recordings each, in
    completion order): ``(recordings per s, window s, recordings)`` over the window in which
    every actor is at work, from the last actor's first unit to the first actor's last unit
    (so neither model load and warm-up nor the tail, where actors run out of work, count).
    None when that window is empty (an actor ran one unit, or none came back).

    >>> steady_rate([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], [0, 1, 0, 1, 0, 1], [4] * 6)
    (4.0, 3.0, 12)
    """
    first: dict[int, float] = {}
    last: dict[int, float] = {}
    for ti, a in zip(t, actor):
        first.setdefault(a, ti)
        last[a] = ti
    if not first:
        return None
    lo, hi = max(first.values()), min(last.values())
    if hi <= lo:
        return None
    recs = sum(k for ti, k in zip(t, n) if lo < ti <= hi)
    return recs / (hi - lo), hi - lo, recs


def actor_rates(
    t: Sequence[float], actor: Sequence[int], n: Sequence[int], audio: Sequence[float]
) -> tuple[float, float, int] | None:
    """Steady throughput as the sum of each actor's own: ``(recordings per s, audio seconds
    per s, actors counted)``, each actor's being what it finished after its first unit over the
    time from its first completion to its last. Unlike :func:`steady_rate`'s one window for
    all, no unit is cut at the window's edges (with a few dozen units an edge is worth several
    per cent), and audio seconds weigh units by their work, not their count. Actors with one
    unit are left out; None when none has two.

    >>> actor_rates([1.0, 2.0, 3.0, 5.0], [0, 1, 0, 1], [4, 4, 6, 6], [8.0, 8.0, 12.0, 9.0])
    (5.0, 9.0, 2)
    """
    first: dict[int, float] = {}
    last: dict[int, float] = {}
    recs: dict[int, int] = {}
    secs: dict[int, float] = {}
    for ti, a, k, x in zip(t, actor, n, audio, strict=True):
        if a not in first:
            first[a] = ti
            recs[a], secs[a] = 0, 0.0
            continue
        last[a] = ti
        recs[a] += k
        secs[a] += x
    span = {a: last[a] - first[a] for a in last if last[a] > first[a]}
    if not span:
        return None
    return (sum(recs[a] / w for a, w in span.items()), sum(secs[a] / w for a, w in span.items()),
            len(span))  # fmt: skip


def require_ray() -> None:
    """A UsageError that says how to install Ray when it is not importable."""
    if importlib.util.find_spec("ray") is None:
        raise UsageError(f"--ray needs Ray, which is not installed: {INSTALL_HINT} "
                         f"(or pip install '{RAY_SPEC}')")  # fmt: skip


def load_weights(module: Any, checkpoint: Path, spec: Any) -> None:
    """The checkpoint into ``module`` exactly as :meth:`Extractor.load` does it."""
    from ..models import weights

    load_spec = getattr(weights, "load_spec_checkpoint", None)
    if load_spec is not None:
        load_spec(module, checkpoint, spec)
    else:
        weights.load_checkpoint_into(module, checkpoint, spec.arch)


@dataclass
class _Tally:
    """Per node (or per actor): recordings embedded, found in the store, failed; audio, time."""

    node: str
    pid: int = -1
    recordings: int = 0
    cached: int = 0
    failed: int = 0
    audio_s: float = 0.0
    busy_s: float = 0.0
    cpu_s: float = 0.0

    def add(self, row: dict[str, Any], ok: int, cached: int, failed: int) -> None:
        self.recordings += ok
        self.cached += cached
        self.failed += failed
        self.audio_s += float(row.get("audio_s", 0.0))
        self.busy_s += float(row.get("busy_s", 0.0))
        self.cpu_s += float(row.get("cpu_s", 0.0))

    def to_dict(self) -> dict[str, Any]:
        busy = self.busy_s
        return {"node": self.node, "pid": self.pid, "recordings": self.recordings,
                "from_cache": self.cached, "failed": self.failed,
                "audio_s": round(self.audio_s, 3), "busy_s": round(busy, 3),
                "cpu_s": round(self.cpu_s, 3),
                "cpu_share": round(self.cpu_s / busy, 3) if busy > 0 else None,
                "x_realtime": round(self.audio_s / busy, 1) if busy > 0 else None,
                "recordings_per_s": round(self.recordings / busy, 2) if busy > 0 else None,
                }  # fmt: skip


@dataclass
class RayRun:
    """One ``--ray`` embedding job: what the driver sends, and what it learnt (the report)."""

    opts: RayOptions
    spec: Any  # ModelSpec (frozen dataclass; small, pickled to the actors)
    checkpoint: Path
    cfg: EngineConfig
    cache: Any  # the driver's EmbeddingCache / store (its root and ingredients go to the actors)
    standin: bool = False  # benchmarks: synthetic items, no file work, no network
    in_flight: int = IN_FLIGHT  # units queued on each actor (benchmarks raise it)
    stats: EngineStats = field(default_factory=EngineStats)
    info: dict[str, Any] = field(default_factory=dict)
    actors: dict[str, _Tally] = field(default_factory=dict)
    nodes: dict[str, _Tally] = field(default_factory=dict)
    # Each unit's completion: seconds since the pool started, actor (index into ``actors``),
    # recordings, audio seconds; compact arrays (a few bytes per unit) for :func:`steady_rate`
    # and :func:`actor_rates`.
    timeline: tuple[array, array, array, array] = field(
        default_factory=lambda: (array("d"), array("i"), array("i"), array("d"))
    )
    _ix: dict[str, int] = field(default_factory=dict)

    def report(self) -> dict[str, Any]:
        """The report's ``ray`` block: address, actors, start-up, per-actor and per-node work."""
        return {**self.info, "per_actor": [a.to_dict() for a in self.actors.values()],
                "per_node": [n.to_dict() for n in self.nodes.values()]}  # fmt: skip

    def embed_items(
        self,
        paths: Sequence[str],
        progress: Callable[[int, float], None] | None = None,
        stop_on_error: bool = False,
    ) -> Iterator[tuple[int, bytes | None, str | None, bool]]:
        """Yield ``(index into paths, 32-byte digest | None, reason | None, from the store)``
        once for every path, in completion order (:meth:`embed_units`, one item at a time)."""
        for lo, status, digest, reasons in self.embed_units(paths, progress):
            for j, s in enumerate(status):
                if s == FAILED:
                    yield lo + j, None, reasons.get(j) or "unknown error", False
                    if stop_on_error:
                        return
                else:
                    yield lo + j, digest[32 * j : 32 * j + 32], None, s == CACHED

    def embed_units(
        self,
        paths: Sequence[str],
        progress: Callable[[int, float], None] | None = None,
    ) -> Generator[tuple[int, bytes, bytes, dict[int, str]], None, None]:
        """Yield one ``(lo, status, digests, reasons)`` per work unit: items ``lo ..
        lo+len(status)-1`` have a status byte each (OK, CACHED, FAILED), a 32-byte digest each
        in ``digests`` (the key under which the worker wrote the vector to the store), and a
        reason by offset when they failed. Every path comes back exactly once. A worker that
        cannot serve (store or checkpoint out of its reach) stops the job with a
        SpeakerSimError naming its node and the path.

        ``paths`` is any sequence of str; one that also has ``block(lo, hi) -> bytes`` (the
        paths ``lo .. hi-1`` as :func:`~.ray_worker.pack_paths` packs them) hands out each
        unit's block itself, so a list held compactly costs the driver nothing per item."""
        if self.cache.root is None:
            raise UsageError("--ray needs the embedding cache (the workers hand the embeddings "
                             "back through it): drop --no-cache")  # fmt: skip
        if getattr(self.cache, "write_error", None):
            raise SpeakerSimError(f"cannot write the cache {self.cache.write_error}")
        t0 = time.perf_counter()
        conn = connect(self.opts)
        try:
            yield from self._run(conn, paths, progress, t0)
        finally:
            self.stats.wall_seconds += time.perf_counter() - t0
            if conn.started_here:
                conn.ray.shutdown()

    # -- sizing -------------------------------------------------------------------------------
    def _sizing(self, conn: Connection) -> tuple[float, float, str, int]:
        """(GPUs per actor, CPUs per actor, device, decode threads)."""
        gpa = self.opts.gpus_per_actor
        if gpa is None:
            gpa = 1.0 if conn.gpus >= 1 and self.opts.device != "cpu" else 0.0
        if self.opts.device == "cuda" and gpa == 0:
            raise SpeakerSimError(f"--device cuda: the Ray cluster at {conn.address} has no GPU")
        if gpa > 0 and conn.gpus <= 0:
            raise SpeakerSimError(f"--ray-gpus-per-actor {gpa:g}: the Ray cluster at "
                                  f"{conn.address} has no GPU")  # fmt: skip
        device = "cuda" if gpa > 0 else "cpu"
        threads = self.opts.decode_threads or DECODE_THREADS[device]
        # A CPU actor decodes in line with its model (one CPU); a GPU actor's decode threads
        # are a CPU stage of their own, so it reserves a CPU for each.
        cpus = 1.0 if device == "cpu" else float(threads)
        return gpa, cpus, device, threads

    def _want(self, ray: Any, gpa: float, cpus: float) -> int:
        if self.opts.actors:
            return self.opts.actors
        try:
            res = ray.cluster_resources()
        except Exception:
            return 1
        by_cpu = int(float(res.get("CPU", 0.0)) // cpus + 1e-9)
        if gpa > 0:  # one per GPU share, as far as the CPUs of their decode threads go
            return max(1, min(int(float(res.get("GPU", 0.0)) // gpa + 1e-9), by_cpu))
        return by_cpu

    def _describe_cluster(self, ray: Any, need: dict[str, float]) -> str:
        try:
            alive = [n for n in ray.nodes() if n.get("Alive")]
            res = ray.cluster_resources()
        except Exception as exc:
            return f"cannot describe the cluster ({exc})"
        have = ", ".join(f"{k} {v:g}" for k, v in sorted(res.items()) if k in ("CPU", "GPU"))
        want = ", ".join(f"{k} {v:g}" for k, v in need.items() if v)
        return (f"{len(alive)} nodes alive ({have or 'no CPU or GPU'}); each actor needs "
                f"{want}; add nodes, or lower --ray-actors / --ray-gpus-per-actor")  # fmt: skip

    # -- the job ------------------------------------------------------------------------------
    def _run(
        self,
        conn: Connection,
        paths: Sequence[str],
        progress: Callable[[int, float], None] | None,
        t0: float,
    ) -> Iterator[tuple[int, bytes, bytes, dict[int, str]]]:
        ray = conn.ray
        gpa, cpus, device, threads = self._sizing(conn)
        n_actors = max(1, self._want(ray, gpa, cpus))
        total = len(paths)
        # Units of --batch-size recordings (a default per device), but at least ~4 per actor,
        # so that a small job still spreads over the pool and its progress moves.
        rows = self.cfg.batch_size or UNIT_ROWS[device]
        rows = max(1, min(rows, -(-total // (4 * n_actors))))
        stall = float(os.environ.get("SPEAKER_SIM_RAY_STALL_S") or STALL_S)
        self.info = {
            "address": conn.address, "started_here": conn.started_here, "nodes": conn.nodes,
            "cluster_cpus": conn.cpus, "cluster_gpus": conn.gpus, "actors": n_actors,
            "gpus_per_actor": gpa, "cpus_per_actor": cpus, "decode_threads": threads,
            "actor_device": device, "unit_rows": rows, "units": -(-total // rows),
            "ray": ray.__version__, "api": "ray actors (elastic pool, speaker_sim ray_pool)",
            "stall_s": stall,
        }  # fmt: skip
        actor_cfg = replace(self.cfg, device=device, workers=0, runners=1)
        remote = ray.remote(EmbedActor).options(
            num_cpus=cpus,
            num_gpus=gpa or None,
            max_restarts=0,
            max_task_retries=0,
            enable_task_events=TASK_EVENTS,
        )
        from ..io.storage import ENV as STORAGE_ENV

        kwargs = {
            "spec": self.spec, "checkpoint": str(self.checkpoint), "cfg": actor_cfg,
            "cache_root": self.cache.root if isinstance(self.cache.root, str)  # a bucket
            else str(Path(self.cache.root).resolve()),
            "ingredients": self.cache.ingredients, "threads": 1, "decode_threads": threads,
            "crash_pattern": os.environ.get(CRASH_ENV, ""), "standin": self.standin,
            "cwd": os.getcwd(), "hold": os.environ.get(HOLD_ENV, ""),
            "storage_options": os.environ.get(STORAGE_ENV, ""),
        }  # fmt: skip
        need = {"CPU": cpus, "GPU": gpa}
        pool = ActorPool(ray, lambda: remote.remote(**kwargs),
                         lambda: self._want(ray, gpa, cpus), stall,
                         lambda: self._describe_cluster(ray, need), self.in_flight)  # fmt: skip

        # A compact path list (one buffer, no str per item) hands out its blocks itself.
        block: Callable[[int, int], bytes] | None = getattr(paths, "block", None)

        def units() -> Iterator[Unit]:  # one bytes block each; the actors resolve them
            for lo in range(0, total, rows):
                hi = min(total, lo + rows)
                yield Unit(lo, hi - lo, block(lo, hi) if block else pack_paths(paths[lo:hi]))

        done = failed = 0
        audio = 0.0
        first: float | None = None
        t_exec = next_log = time.perf_counter()
        try:
            for row in pool.run(units()):
                if first is None:
                    first = time.perf_counter() - t_exec
                    self.info["first_result_s"] = round(first, 3)
                    self.info["connect_s"] = round(t_exec - t0, 3)
                lo, n = int(row["lo"]), int(row["n"])
                if "given_up" in row:
                    row.update(status=bytes([FAILED]), digest=bytes(32),
                               reasons={0: row["given_up"]})  # fmt: skip
                status = row["status"]
                n_cached, n_failed = status.count(CACHED), status.count(FAILED)
                n_ok = n - n_cached - n_failed
                yield lo, status, row["digest"], row["reasons"]
                self._count(row, n_ok, n_cached, n_failed)
                now = time.perf_counter()
                if "actor" in row:  # not a recording given up on (it ran on no actor)
                    self._mark(now - t_exec, str(row["actor"]), n, float(row.get("audio_s", 0)))
                done += n
                failed += n_failed
                audio += float(row.get("audio_s", 0.0))
                if progress is not None:
                    progress(n, float(row.get("audio_s", 0.0)))
                if now >= next_log:
                    next_log = now + LOG_EVERY_S
                    log.info("%s", self.progress_line(done, total, failed, audio, now - t_exec))
        finally:
            pool.shutdown()
            self.info.update(lost_actors=pool.lost_actors, worker_crashes=pool.crashes,
                             retried_units=pool.retried_units)  # fmt: skip
        t_end = time.perf_counter()
        self.info["embed_s"] = round(t_end - t_exec, 3)
        each = actor_rates(*self.timeline)
        if each is not None:
            self.info.update(steady_actor_recordings_per_s=round(each[0], 2),
                             steady_actor_x_realtime=round(each[1], 2))  # fmt: skip
        got = steady_rate(*self.timeline[:3])
        if got is not None:  # while every actor was at work, past its first unit
            rate, window, recs = got
            self.info.update(steady_recordings_per_s=round(rate, 2),
                             steady_window_s=round(window, 3), steady_recordings=recs)  # fmt: skip
        elif first is not None and done > 1:  # one actor, or one unit each: after the first
            steady = t_end - t_exec - first
            self.info["steady_recordings_per_s"] = round((done - 1) / steady, 2) if steady > 0 \
                else None  # fmt: skip

    def progress_line(self, done: int, total: int, failed: int, audio: float, wall: float
                      ) -> str:  # fmt: skip
        """``done/total, x-realtime, failed, per node`` for the driver's log."""
        per = "; ".join(f"{k[:8]} {t.recordings + t.cached}" for k, t in self.nodes.items())
        xrt = audio / wall if wall > 0 else 0.0
        return f"ray: {done}/{total} recordings, {xrt:.0f}x realtime, {failed} failed [{per}]"

    def _mark(self, t: float, actor: str, n: int, audio_s: float) -> None:
        times, who, count, audio = self.timeline
        times.append(t)
        who.append(self._ix.setdefault(actor, len(self._ix)))
        count.append(n)
        audio.append(audio_s)

    def _count(self, row: dict[str, Any], ok: int, cached: int, failed: int) -> None:
        st = self.stats
        st.recordings += ok
        st.failed += failed
        st.audio_seconds += float(row.get("audio_s", 0.0))
        st.model_seconds += float(row.get("busy_s", 0.0))
        st.frames += int(row.get("frames", 0))
        st.padded_frames += round(float(row.get("padded", 0.0)))
        st.chunked += int(row.get("chunked", 0))
        st.batches += int(row.get("batches", 0))
        key = str(row.get("actor", "?"))
        if key not in self.actors:
            host, _, pid = key.rpartition(":")
            self.actors[key] = _Tally(host, int(pid) if pid.isdigit() else -1)
        self.actors[key].add(row, ok, cached, failed)
        node = str(row.get("node_id", "?"))
        if node not in self.nodes:
            self.nodes[node] = _Tally(node)
        self.nodes[node].add(row, ok, cached, failed)
