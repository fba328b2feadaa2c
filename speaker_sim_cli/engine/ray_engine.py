"""Past one machine: embed recordings on a Ray cluster with Ray Data (``--ray``).

The distributed sibling of :mod:`.shard`. Every Ray API call of the project is in this module,
so a rename between Ray releases is fixed here alone (the tested range is :data:`RAY_SPEC`).

The driver (the ``speaker-sim`` process) has already hashed every recording and looked it up in
the content-keyed cache; only the misses come here. They are grouped into *units* of similar
length (like the local batch planner), and Ray Data streams them through two stages::

    units --map_batches(tasks, CPU)--> decoded waveforms --map_batches(actor pool)--> small rows

1. a CPU stage (Ray tasks) decodes a unit's recordings with the local engine's own
   :class:`~.data.AudioDataset` (same channel pick, resampler, duration checks and failure
   reasons), and ships the waveforms as bytes;
2. a fixed pool of actors (``ActorPoolStrategy(size=N)``), each of which builds the model from
   the checkpoint *path* on its own node (the model is never pickled from the driver), checks
   that its checkpoint has the driver's sha256, embeds the unit with :class:`~.embedder.Embedder`
   and writes every embedding to the cache with the same atomic writes as the local engine. A
   retried task rewrites the same bytes under the same key, so retries are harmless.

The driver receives one small row per recording (index, failure reason, seconds, which actor),
never an embedding: its memory does not grow with the corpus beyond the lists it already holds.
It then reads each vector back from the cache, which is why ``--cache-dir`` must be a path every
node and the driver see. Ray Data gives the backpressure between the stages, and restarts a
killed actor and retries its task (``max_restarts`` / ``max_task_retries``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SpeakerSimError, UsageError
from .config import EngineConfig, EngineStats

#: The Ray this adapter is tested with (the ``speaker-sim[ray]`` extra pins the same range).
RAY_SPEC = "ray[data]>=2.60,<2.61"
INSTALL_HINT = "pip install 'speaker-sim[ray]'"

# An actor that dies is restarted this many times, and a task it was running is retried this
# many times, before the job fails (a crash-looping node must not loop forever).
MAX_RESTARTS = 4
MAX_TASK_RETRIES = 4
# CPUs the decode stage asks for per task: it is a small share of the work next to the model.
DECODE_CPUS = 0.5
# A unit (one Ray task) holds at most this many seconds of audio (one longer recording is a
# unit of its own), and at most --batch-size recordings (default below).
UNIT_SECONDS = {"cpu": 30.0, "cuda": 2_000.0}
UNIT_ROWS = {"cpu": 32, "cuda": 256}
NON_FINITE = "the model produced a non-finite embedding"
CACHE_HINT = (
    "with --ray, --cache-dir must be a path that every node and this machine can read and "
    "write (NFS, a mounted bucket): the workers write the embeddings there and this process "
    "reads them back"
)
_HOSTPORT = re.compile(r"(?P<host>\[[0-9a-fA-F:]+\]|[A-Za-z0-9_.-]+):(?P<port>\d{1,5})")


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
    """

    address: str | None = None
    actors: int = 0
    gpus_per_actor: float | None = None
    device: str = "auto"

    @classmethod
    def from_cli(
        cls, address: str | None, actors: int, gpus_per_actor: float | None, device: str
    ) -> RayOptions:
        """Check the options before any work; raises UsageError with what to do."""
        if address is not None:
            address = address.strip()
            if address == "":
                address = None
            elif address not in ("auto", "local") and not _HOSTPORT.fullmatch(
                address.removeprefix("ray://")
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
        require_ray()
        return cls(address, actors, gpus_per_actor, dev)

    def label(self) -> str:
        return self.address or os.environ.get("RAY_ADDRESS") or "local"


def require_ray() -> None:
    """A UsageError that says how to install Ray when it is not importable."""
    if importlib.util.find_spec("ray") is None or importlib.util.find_spec("ray.data") is None:
        raise UsageError(f"--ray needs Ray Data, which is not installed: {INSTALL_HINT} "
                         f"(or pip install '{RAY_SPEC}')")  # fmt: skip


def _import_ray() -> Any:
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise UsageError(
            f"--ray needs Ray Data, which cannot be imported ({exc}): {INSTALL_HINT}"
        ) from None
    return ray


# -- connecting ---------------------------------------------------------------------------------
@dataclass
class _Connection:
    ray: Any
    address: str
    started_here: bool
    cpus: float
    gpus: float
    nodes: int


def _connect(opts: RayOptions) -> _Connection:
    """Join the cluster (or start a local one). Raises SpeakerSimError saying what to set."""
    import signal
    import threading

    ray = _import_ray()
    target = opts.address or os.environ.get("RAY_ADDRESS") or None
    if ray.is_initialized():  # e.g. a library caller or a test that owns the connection
        conn = _describe(ray, started_here=False)
        wanted = opts.address or "auto"
        if wanted not in ("auto", "local") and wanted.removeprefix("ray://") != conn.address:
            raise SpeakerSimError(f"--ray {opts.address}: this process is already connected "
                                  f"to the Ray cluster at {conn.address}")  # fmt: skip
        return conn
    if target is not None and target not in ("auto", "local"):
        _check_reachable(target)
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None
    try:
        if target in (None, "local"):
            # One command's private cluster: Ray's notice that it turned token auth on is noise.
            import logging

            logging.getLogger("ray._private.authentication").setLevel(logging.ERROR)
            ray.init(address=target, include_dashboard=False, logging_level="WARNING")
        else:
            ray.init(address=target, logging_level="WARNING")
    except ConnectionError as exc:
        raise SpeakerSimError(_refused(target, exc)) from None
    except Exception as exc:
        if type(exc).__name__ == "AuthenticationError":
            raise SpeakerSimError(_refused(target, exc)) from None
        raise
    finally:
        # Ray's driver turns SIGTERM into an exit; the CLI's handler (exit 130, nothing
        # partial) must stay in charge.
        if main and previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return _describe(ray, started_here=True)


def _describe(ray: Any, started_here: bool) -> _Connection:
    res = ray.cluster_resources()
    try:
        address = ray.get_runtime_context().gcs_address
    except Exception:
        address = "?"
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    return _Connection(ray, str(address), started_here, float(res.get("CPU", 0.0)),
                       float(res.get("GPU", 0.0)), nodes)  # fmt: skip


def _check_reachable(target: str) -> None:
    """Fail in seconds when nothing listens at HOST:PORT (Ray itself retries for minutes)."""
    m = _HOSTPORT.fullmatch(target.removeprefix("ray://"))
    if m is None:
        return
    host, port = m["host"].strip("[]"), int(m["port"])
    try:
        with socket.create_connection((host, port), timeout=5):
            pass
    except OSError as exc:
        raise SpeakerSimError(
            f"--ray {target}: nothing answers at {host}:{port} ({exc.strerror or exc}); start "
            "a cluster with `ray start --head` and pass the address it prints, or --ray auto "
            "on one of its nodes"
        ) from None


def _refused(target: str | None, exc: BaseException) -> str:
    where = target or "the local Ray"
    if target == "auto" and "find any running Ray" in str(exc):
        return ("--ray auto: no Ray cluster runs on this machine; start one with "
                "`ray start --head`, or give its address (--ray HOST:PORT)")  # fmt: skip
    token_mode = os.environ.get("RAY_AUTH_MODE", "").lower() == "token"
    if token_mode:
        hint = (
            "RAY_AUTH_MODE=token is set, so the token was most likely refused: set the "
            "cluster's token in RAY_AUTH_TOKEN (or its file in RAY_AUTH_TOKEN_PATH; "
            "`ray get-auth-token` on the head node prints it)"
        )
    else:
        hint = (
            "the cluster is up but refused the connection; clusters started with `ray start` "
            "use token authentication: set RAY_AUTH_MODE=token and the cluster's token in "
            "RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH; `ray get-auth-token` on the head node "
            "prints it)"
        )
    first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
    return f"--ray: cannot connect to {where}: {first}. {hint}"


# -- planning -----------------------------------------------------------------------------------
def plan_units(seconds: Sequence[float], rows: int, max_seconds: float) -> list[list[int]]:
    """Indices grouped longest first into units of <= ``rows`` recordings and <= ``max_seconds``
    of padded audio (rows x longest); a longer recording is a unit of its own.

    >>> plan_units([5.0, 1.0, 4.0, 2.0], rows=8, max_seconds=8.0)
    [[0], [2, 3], [1]]
    """
    order = sorted(range(len(seconds)), key=lambda i: (-seconds[i], i))
    units: list[list[int]] = []
    cur: list[int] = []
    longest = 0.0
    for i in order:
        s = max(float(seconds[i]), 1e-3)
        if cur and (len(cur) + 1 > rows or max(longest, s) * (len(cur) + 1) > max_seconds):
            units.append(cur)
            cur, longest = [], 0.0
        cur.append(i)
        longest = max(longest, s)
    if cur:
        units.append(cur)
    return units


@dataclass
class _Actor:
    node: str
    pid: int
    recordings: int = 0
    failed: int = 0
    audio_s: float = 0.0
    busy_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "pid": self.pid,
            "recordings": self.recordings,
            "failed": self.failed,
            "audio_s": round(self.audio_s, 3),
            "busy_s": round(self.busy_s, 3),
            "x_realtime": round(self.audio_s / self.busy_s, 1) if self.busy_s > 0 else None,
            "recordings_per_s": round(self.recordings / self.busy_s, 2)
            if self.busy_s > 0
            else None,
        }


@dataclass
class RayRun:
    """One ``--ray`` embedding job: what the driver sends, and what it learnt (the report)."""

    opts: RayOptions
    spec: Any  # ModelSpec (frozen dataclass; small, pickled to the actors)
    checkpoint: Path
    cfg: EngineConfig
    cache: Any  # EmbeddingCache of the driver
    stats: EngineStats = field(default_factory=EngineStats)
    info: dict[str, Any] = field(default_factory=dict)
    actors: dict[str, _Actor] = field(default_factory=dict)

    def report(self) -> dict[str, Any]:
        """The report's ``ray`` block: address, actors, start-up, per-actor throughput."""
        per = [a.to_dict() for a in self.actors.values()]
        return {**self.info, "per_actor": per}

    def embed(
        self,
        files: Sequence[str],
        digests: Sequence[str],
        est_samples: Sequence[int],
        progress: Callable[[int, float], None] | None = None,
    ) -> Iterator[tuple[int, np.ndarray | None, str | None]]:
        """Yield ``(index into files, embedding | None, reason | None)`` for every file.

        Embeddings come back through the cache (the actors wrote them); a vector the driver
        cannot read there, a worker that cannot write it, or a worker whose checkpoint differs
        is a SpeakerSimError that stops the job.
        """
        if self.cache.root is None:
            raise UsageError("--ray needs the embedding cache (the workers hand the embeddings "
                             "back through it): drop --no-cache")  # fmt: skip
        if self.cache.write_error:
            raise SpeakerSimError(f"cannot write the cache {self.cache.write_error}; {CACHE_HINT}")
        t0 = time.perf_counter()
        conn = _connect(self.opts)
        try:
            yield from self._run(conn, files, digests, est_samples, progress, t0)
        finally:
            self.stats.wall_seconds += time.perf_counter() - t0
            if conn.started_here:
                conn.ray.shutdown()

    def _sizing(self, conn: _Connection) -> tuple[int, float, float, str]:
        gpa = self.opts.gpus_per_actor
        if gpa is None:
            gpa = 1.0 if conn.gpus >= 1 and self.opts.device != "cpu" else 0.0
        if self.opts.device == "cuda" and gpa == 0:
            raise SpeakerSimError(f"--device cuda: the Ray cluster at {conn.address} has no GPU")
        if gpa > 0 and conn.gpus <= 0:
            raise SpeakerSimError(f"--ray-gpus-per-actor {gpa:g}: the Ray cluster at "
                                  f"{conn.address} has no GPU")  # fmt: skip
        if self.opts.actors:
            n = self.opts.actors
        elif gpa > 0:
            n = max(1, int(conn.gpus // gpa))
        else:
            n = max(1, int(conn.cpus) - 1)
        # Leave room for one decode task: actors that took every CPU would starve the stage
        # that feeds them. Logical CPUs only; each actor runs the model on one thread.
        spare = max(conn.cpus - DECODE_CPUS, 0.1 * n)
        cpus = min(1.0, spare / n)
        return n, gpa, cpus, "cuda" if gpa > 0 else "cpu"

    def _run(
        self,
        conn: _Connection,
        files: Sequence[str],
        digests: Sequence[str],
        est_samples: Sequence[int],
        progress: Callable[[int, float], None] | None,
        t0: float,
    ) -> Iterator[tuple[int, np.ndarray | None, str | None]]:
        ray = conn.ray
        n_actors, gpa, cpus, device = self._sizing(conn)
        sr = self.spec.sample_rate
        # Units of --batch-size recordings (a default per device), but at least ~4 per actor,
        # so that a small job still spreads over the pool and its progress moves.
        rows = self.cfg.batch_size or UNIT_ROWS[device]
        rows = max(1, min(rows, -(-len(files) // (4 * n_actors))))
        units = plan_units([e / sr for e in est_samples], rows, UNIT_SECONDS[device])
        paths = [p if p.rstrip().endswith("|") else os.path.abspath(p) for p in files]
        items = [
            {"idx": u, "path": [paths[i] for i in u], "digest": [digests[i] for i in u]}
            for u in units
        ]
        self.info = {
            "address": conn.address,
            "started_here": conn.started_here,
            "nodes": conn.nodes,
            "cluster_cpus": conn.cpus,
            "cluster_gpus": conn.gpus,
            "actors": n_actors,
            "gpus_per_actor": gpa,
            "cpus_per_actor": round(cpus, 3),
            "actor_device": device,
            "units": len(units),
            "ray": ray.__version__,
            "api": "ray.data map_batches + ActorPoolStrategy",
        }
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        import logging
        import warnings

        # Our own progress bar reports; Ray Data's would draw over it (and says it is off), and
        # its INFO lines (execution finished in ...) would land in the middle of it.
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
        actor_cfg = replace(self.cfg, device=device, workers=0, runners=1)
        ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
        ds = ds.map_batches(
            decode_units,
            batch_size=1,
            batch_format="pyarrow",
            num_cpus=DECODE_CPUS,
            fn_kwargs={
                "sample_rate": sr,
                "min_samples": int(self.cfg.min_duration * sr),
                "max_samples": int(self.cfg.max_duration * sr),
                "channel": self.spec.frontend.channel,
            },
        )
        with warnings.catch_warnings():
            # Ray 2.60 has no named parameter for actor restarts and task retries; the
            # remote-args form is deprecated for 2.64, beyond the pinned range (RAY_SPEC).
            warnings.filterwarnings("ignore", message=".*ray_remote_args. is deprecated")
            ds = ds.map_batches(
                EmbedActor,
                batch_size=1,
                batch_format="pyarrow",
                compute=ray.data.ActorPoolStrategy(size=n_actors),
                num_cpus=cpus,
                num_gpus=gpa or None,
                max_restarts=MAX_RESTARTS,
                max_task_retries=MAX_TASK_RETRIES,
                fn_constructor_kwargs={
                    "spec": self.spec,
                    "checkpoint": str(self.checkpoint),
                    "cfg": actor_cfg,
                    "cache_root": str(Path(self.cache.root).resolve()),
                    "ingredients": self.cache.ingredients,
                    "threads": max(1, round(cpus)),
                },
            )
        seen: set[int] = set()
        it = ds.iter_batches(batch_size=None, batch_format="pyarrow")
        first: float | None = None
        t_exec = time.perf_counter()
        try:
            for table in _guard(it):
                if first is None:
                    first = time.perf_counter() - t_exec
                    self.info["first_result_s"] = round(first, 3)
                    self.info["connect_s"] = round(t_exec - t0, 3)
                cols = {k: table.column(k).to_pylist() for k in table.column_names}
                n_done, audio = 0, 0.0
                for r in range(table.num_rows):
                    fatal = cols["fatal"][r]
                    if fatal:
                        raise SpeakerSimError(fatal)
                    i = int(cols["i"][r])
                    if i in seen:  # a retried unit whose first result did arrive
                        continue
                    seen.add(i)
                    n_done += 1
                    reason = cols["reason"][r] or None
                    actor = self._actor(cols["actor"][r])
                    self._count(actor, cols, r, reason)
                    if reason is not None:
                        yield i, None, reason
                        continue
                    audio += float(cols["audio_s"][r])
                    emb = self.cache.get(digests[i])
                    if emb is None:
                        raise SpeakerSimError(
                            f"{files[i]}: embedded by the Ray worker {actor.node} (pid "
                            f"{actor.pid}) under {self.cache.dir}, but this process cannot "
                            f"read it there; {CACHE_HINT}"
                        )
                    yield i, emb, None
                if progress is not None and n_done:
                    progress(n_done, audio)
        finally:
            _close(it)
        t_end = time.perf_counter()
        for i in range(len(files)):
            if i not in seen:  # never expected: Ray Data returns every row or raises
                yield i, None, "no result came back from the Ray job"
        self.info["embed_s"] = round(t_end - t_exec, 3)
        if first is not None and len(seen) > 0:
            steady = t_end - t_exec - first
            self.info["steady_recordings_per_s"] = (
                round((len(seen) - 1) / steady, 2) if steady > 0 and len(seen) > 1 else None
            )

    def _actor(self, key: str) -> _Actor:
        a = self.actors.get(key)
        if a is None:
            node, _, pid = key.rpartition(":")
            a = self.actors[key] = _Actor(node, int(pid) if pid.isdigit() else -1)
        return a

    def _count(self, a: _Actor, cols: dict[str, list[Any]], r: int, reason: str | None) -> None:
        st = self.stats
        busy = float(cols["busy_s"][r])
        a.busy_s += busy
        st.model_seconds += busy
        if reason is not None:
            a.failed += 1
            st.failed += 1
            return
        audio = float(cols["audio_s"][r])
        a.recordings += 1
        a.audio_s += audio
        st.recordings += 1
        st.audio_seconds += audio
        st.frames += int(cols["frames"][r])
        st.padded_frames += round(float(cols["padded"][r]))
        st.chunked += int(cols["chunked"][r])
        st.batches += int(cols["batches"][r])


def _guard(it: Iterator[Any]) -> Iterator[Any]:
    """Ray Data's exceptions as one line that says what to do."""
    try:
        yield from it
    except SpeakerSimError:
        raise
    except Exception as exc:
        text = str(exc)
        if "No module named 'speaker_sim_cli'" in text or "No module named speaker_sim_cli" in text:
            raise SpeakerSimError(
                "a Ray worker node has no speaker-sim: install the same version on every node "
                f"({INSTALL_HINT})"
            ) from None
        first = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(exc).__name__)
        raise SpeakerSimError(f"the Ray job failed: {type(exc).__name__}: {first[:300]}") from None


def _close(it: Any) -> None:
    close = getattr(it, "close", None)
    if close is not None:
        with contextlib.suppress(Exception):
            close()


# -- worker side (runs in Ray tasks and actors; must stay importable from the package) ---------
def decode_units(
    batch: Any, sample_rate: int, min_samples: int, max_samples: int, channel: int | str
) -> Any:
    """Ray task: decode each unit's recordings (pyarrow batch in, pyarrow table out).

    Uses the local engine's :class:`~.data.AudioDataset`, so a bad file fails with the same
    reason. Waveforms travel as float32 bytes.
    """
    import pyarrow as pa

    from .data import AudioDataset

    idx_out: list[list[int]] = []
    dig_out: list[list[str]] = []
    wave_out: list[list[bytes]] = []
    why_out: list[list[str]] = []
    for idx, paths, digests in zip(
        batch.column("idx").to_pylist(),
        batch.column("path").to_pylist(),
        batch.column("digest").to_pylist(),
    ):
        data = AudioDataset(paths, sample_rate, min_samples, max_samples, channel)
        waves: list[bytes] = []
        whys: list[str] = []
        for j in range(len(paths)):
            got = data[j]
            if got.wave is None:
                waves.append(b"")
                whys.append(got.error or "unknown error")
            else:
                waves.append(got.wave.numpy().astype(np.float32, copy=False).tobytes())
                whys.append("")
        idx_out.append(idx)
        dig_out.append(digests)
        wave_out.append(waves)
        why_out.append(whys)
    return pa.table({
        "idx": pa.array(idx_out, pa.list_(pa.int64())),
        "digest": pa.array(dig_out, pa.list_(pa.string())),
        "wave": pa.array(wave_out, pa.list_(pa.large_binary())),
        "reason": pa.array(why_out, pa.list_(pa.string())),
    })  # fmt: skip


def _load_weights(module: Any, checkpoint: Path, spec: Any) -> None:
    """The checkpoint into ``module`` exactly as :meth:`Extractor.load` does it."""
    from ..models import weights

    load_spec = getattr(weights, "load_spec_checkpoint", None)
    if load_spec is not None:
        load_spec(module, checkpoint, spec)
    else:
        weights.load_checkpoint_into(module, checkpoint, spec.arch)


class EmbedActor:
    """Ray actor: the model on this actor's device; embeds units and writes the cache.

    The constructor never raises: a node that cannot serve (checkpoint missing or different,
    cache not writable, model does not load) answers every unit with a ``fatal`` row, which
    stops the job with that message instead of a restart loop.
    """

    def __init__(
        self,
        spec: Any,
        checkpoint: str,
        cfg: EngineConfig,
        cache_root: str,
        ingredients: dict[str, Any],
        threads: int = 1,
    ) -> None:
        self.node = socket.gethostname()
        self.key = f"{self.node}:{os.getpid()}"
        self.fatal = ""
        self.embedder: Any = None
        self.cache: Any = None
        try:
            self._setup(spec, Path(checkpoint), cfg, Path(cache_root), ingredients, threads)
        except Exception as exc:
            self.fatal = self.fatal or (
                f"Ray worker {self.key}: cannot load the model: {type(exc).__name__}: {exc}"
            )

    def _setup(
        self,
        spec: Any,
        checkpoint: Path,
        cfg: EngineConfig,
        root: Path,
        ingredients: dict[str, Any],
        threads: int,
    ) -> None:
        import torch

        from ..models.weights import checkpoint_hash
        from ..paths import atomic_write_bytes
        from .cache import EmbeddingCache
        from .embedder import Embedder

        torch.set_num_threads(max(1, threads))
        where = f"Ray worker {self.key}"
        if not checkpoint.is_file():
            self.fatal = (f"{where}: checkpoint {checkpoint} not found on that node: every node "
                          "needs the checkpoint at the same path (or pass --model-dir with a "
                          "shared folder)")  # fmt: skip
            return
        want = ingredients.get("checkpoint_sha256")
        if want and checkpoint_hash(checkpoint) != want:
            self.fatal = (f"{where}: checkpoint {checkpoint} differs from the driver's "
                          f"(sha256 {want[:12]}...): use the same file on every node")  # fmt: skip
            return
        cache = EmbeddingCache(root, ingredients, spec.dim)
        probe = cache.dir / f".probe-{self.node}-{os.getpid()}"
        try:
            if cache.write_error:
                raise OSError(cache.write_error)
            atomic_write_bytes(probe, b"")
            probe.unlink()
        except OSError as exc:
            self.fatal = (f"{where}: cannot write the cache {root} "
                          f"({exc.strerror or exc}); {CACHE_HINT}")  # fmt: skip
            return
        module = spec.build()
        _load_weights(module, checkpoint, spec)
        embedder = Embedder(spec, module, cfg)
        if list(embedder.fp32_modules) != list(ingredients.get("fp32_modules", [])):
            self.fatal = (
                f"{where}: fp32 submodules {embedder.fp32_modules} differ from the driver's"
            )
            return
        self.cache = cache
        self.embedder = embedder

    def __call__(self, batch: Any) -> Any:
        import pyarrow as pa

        out: dict[str, list[Any]] = {k: [] for k in (
            "i", "reason", "audio_s", "busy_s", "frames", "padded", "chunked", "batches",
            "actor", "fatal")}  # fmt: skip
        for idx, digests, waves, whys in zip(
            batch.column("idx").to_pylist(),
            batch.column("digest").to_pylist(),
            batch.column("wave").to_pylist(),
            batch.column("reason").to_pylist(),
        ):
            for row in self._unit(idx, digests, waves, whys):
                for k, v in row.items():
                    out[k].append(v)
        return pa.table({
            "i": pa.array(out["i"], pa.int64()),
            "reason": pa.array(out["reason"], pa.string()),
            "audio_s": pa.array(out["audio_s"], pa.float64()),
            "busy_s": pa.array(out["busy_s"], pa.float64()),
            "frames": pa.array(out["frames"], pa.int64()),
            "padded": pa.array(out["padded"], pa.float64()),
            "chunked": pa.array(out["chunked"], pa.int64()),
            "batches": pa.array(out["batches"], pa.int64()),
            "actor": pa.array(out["actor"], pa.string()),
            "fatal": pa.array(out["fatal"], pa.string()),
        })  # fmt: skip

    def _unit(
        self, idx: list[int], digests: list[str], waves: list[bytes], whys: list[str]
    ) -> Iterator[dict[str, Any]]:
        import torch

        base = {"audio_s": 0.0, "busy_s": 0.0, "frames": 0, "padded": 0.0, "chunked": 0,
                "batches": 0, "actor": self.key, "fatal": ""}  # fmt: skip
        if self.fatal:
            for i in idx:
                yield {**base, "i": i, "reason": "", "fatal": self.fatal}
            return
        sr = self.embedder.frontend.sample_rate
        good = [j for j, w in enumerate(whys) if not w]
        tensors = [torch.from_numpy(np.frombuffer(waves[j], dtype=np.float32).copy()) for j in good]
        st = self.embedder.stats
        before = (st.frames, st.padded_frames, st.chunked, st.batches)
        t = time.perf_counter()
        embs = self.embedder.embed_waves(tensors) if tensors else np.zeros((0, 0), np.float32)
        busy = time.perf_counter() - t
        frames, padded, chunked, batches = (
            st.frames - before[0], st.padded_frames - before[1], st.chunked - before[2],
            st.batches - before[3])  # fmt: skip
        share = busy / max(1, len(idx))
        for j, why in enumerate(whys):
            if why:
                yield {**base, "i": idx[j], "reason": why, "busy_s": share}
        total = sum(int(t.shape[0]) for t in tensors) or 1
        for k, j in enumerate(good):
            emb = embs[k]
            n = int(tensors[k].shape[0])
            row = {**base, "i": idx[j], "busy_s": share, "audio_s": n / sr,
                   "frames": round(frames * n / total), "padded": padded * n / total,
                   "chunked": 0, "batches": batches if k == 0 else 0}  # fmt: skip
            if k == 0:
                row["chunked"] = chunked
            if not np.isfinite(emb).all():
                yield {**row, "reason": NON_FINITE, "audio_s": 0.0}
                continue
            self.cache.put(digests[j], emb)
            if self.cache.write_error:
                yield {**row, "reason": "", "fatal": (
                    f"Ray worker {self.key}: cannot write the cache "
                    f"({self.cache.write_error}); {CACHE_HINT}")}  # fmt: skip
                continue
            yield {**row, "reason": ""}
