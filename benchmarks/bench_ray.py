"""Local engine vs ``--ray`` with 1 and 2 actors on the same files: when does Ray pay?

Usage: ``python benchmarks/bench_ray.py [--files LIST] [--actors 1 2] [--out FILE]``,
``--scaling [--nodes 1 2 1] [--copies 4]``, ``--driver [N ...]``.

Default files: every recording under ../shared/audio (dev_hard, VCTK, the 3D-Speaker and
SpeechBrain samples). Each engine embeds them from an empty cache folder (the same files, the
same model, CPU):

- ``local``: the in-process engine (:class:`Extractor` without Ray);
- ``ray xN``: a local Ray cluster started in this process (``ray.init(num_cpus=cores)``, timed
  on its own as ``cluster_start_s``), then one job per pool size.

For each run: ``total_s`` (embed_paths, wall clock), ``startup_s`` (until the first recordings
come back: model load, and for Ray the actors' start), ``steady_rec_per_s`` (recordings per
second after the first result) and ``x_realtime``. Every Ray run must give the local engine's
vectors (relative L2 <= 1e-5) or the benchmark fails. On one machine Ray only adds start-up;
it pays when a cluster has more cores or GPUs than one host.

``--driver 10000 100000 1000000``: the driver's own cost per work item instead. Synthetic items
(``/corpus/000000001.wav`` ...) go through the real scheduling path (:class:`RayRun`, the actor
pool, one result row per unit) to actors in ``standin`` mode, which replace the file work and
the network by a hash of the key. Per size: the driver's CPU-us per item (its process time,
Ray's core-worker threads included), the bytes per item of the rows it receives, its peak RSS,
and the slope of CPU and RSS against items; from the slope, a cost model: how many GPU nodes
(CAM++ at 10,000x realtime per GPU, recordings of ``--mean-seconds``) one driver core feeds.

``--scaling``: throughput against the number of worker nodes. A ``ray.cluster_utils.Cluster``
on this host (a head with 0 CPUs, so it holds no actor; N worker nodes of 1 CPU each, each its
own raylet) embeds a corpus of real speech with real CAM++: every shared recording in
``--copies`` versions of distinct content (copy 0 the file itself, copy k the same speech
rewritten with its first sample moved by k LSBs, so that each has its own content key and is
embedded, never found in the store). ``--nodes 1 2 1`` runs N=1, adds a node for N=2, removes
one for N=1 again (bracketing drift in the machine's load); each run starts from an empty
store, with the default pool (one actor per CPU) and units. Steady throughput is the engine's
own figure, two ways: recordings per second in the one window in which every actor is at work,
past its first unit (:func:`steady_rate` over the units' completion times: ``scaling``), and
the sum of each actor's own rate past its first unit (:func:`actor_rates`: no unit is cut at
the window's edges, which with ~18 units moves the figure by several per cent), in recordings
(``scaling_actor_recordings``) and in audio seconds (``scaling_actor_x_realtime``: units
weighed by the speech they hold, which differs from unit to unit). Each is mean(N=2) /
(2 x mean(N=1)); the target is >= 0.9. The local engine (one process, its defaults) on the same
corpus is the baseline. Because the host is shared, every run also reports the CPU the actors
got (``cpu_share``: their CPU time over their busy wall time), the machine's busy cores and
load average (/proc), and ``cpu_scaling``: the same ratio per actor CPU-second, which is what
the nodes would give with the cores to themselves.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
AUDIO = {".wav", ".flac", ".mp3", ".ogg"}
ACTOR_KEYS = ("recordings", "x_realtime", "recordings_per_s", "busy_s", "cpu_s", "cpu_share")
ENGINE_KEYS = ("actors", "unit_rows", "units", "first_result_s", "steady_recordings_per_s",
               "steady_window_s", "steady_recordings", "steady_actor_recordings_per_s",
               "steady_actor_x_realtime")  # fmt: skip


def find_shared() -> Path:
    return Path(os.environ.get("SPEAKER_SIM_SHARED", REPO.parent / "shared")).resolve()


class Clock:
    """Progress callback: when the first and the last recordings came back."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.first: float | None = None
        self.first_n = 0
        self.last = self.t0
        self.n = 0

    def __call__(self, n: int, _seconds: float) -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first, self.first_n = now, n
        self.last, self.n = now, self.n + n

    def summary(self) -> dict[str, Any]:
        first = self.first if self.first is not None else self.last
        steady = self.last - first
        return {
            "startup_s": round(first - self.t0, 3),
            "steady_rec_per_s": round((self.n - self.first_n) / steady, 2) if steady > 0 else None,
        }


def run(files: list[str], cache: Path, ray: Any = None) -> tuple[dict[str, Any], Any]:
    from speaker_sim_cli.engine.config import EngineConfig
    from speaker_sim_cli.models.registry import DEFAULT_MODEL
    from speaker_sim_cli.pipeline import Extractor

    ex = Extractor(DEFAULT_MODEL, None, EngineConfig(device="cpu"), cache, ray=ray)
    clock = Clock()
    t0 = time.perf_counter()
    res = ex.embed_paths(files, progress=clock)
    total = time.perf_counter() - t0
    if res.failures:
        sys.exit(f"failures: {res.failures}")
    st = ex.stats
    row = {
        "total_s": round(total, 3),
        **clock.summary(),
        "recordings": res.embedded,
        "audio_s": round(st.audio_seconds, 1),
        "x_realtime": round(st.audio_seconds / total, 1) if total > 0 else None,
    }
    if ray is not None:
        info = ex.engine_report()["ray"]
        row["per_actor"] = [{k: a[k] for k in ACTOR_KEYS} for a in info["per_actor"]]
        row["cpus_per_actor"] = info["cpus_per_actor"]
        row["engine"] = {k: info.get(k) for k in ENGINE_KEYS}
    return row, res.embeddings


def machine_cpu() -> tuple[int, int]:
    """(busy, total) jiffies over all cores since boot (/proc/stat; idle and iowait are idle)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return sum(v) - v[3] - v[4], sum(v)


def make_corpus(files: list[str], copies: int, out: Path) -> list[str]:
    """Each file, then ``copies - 1`` versions of distinct content: the same speech written as a
    WAV (the source's sample rate, channels and, for a WAV, sample format) with its first
    sample moved by k LSBs. Every version has its own content key, so each is embedded."""
    import hashlib

    import soundfile as sf

    out.mkdir(parents=True, exist_ok=True)
    corpus: list[str] = []
    for i, f in enumerate(files):
        corpus.append(f)
        if copies <= 1:
            continue
        info = sf.info(f)
        data, sr = sf.read(f, dtype="float32", always_2d=True)
        subtype = info.subtype if info.format == "WAV" else "PCM_16"
        for k in range(1, copies):
            x = data.copy()
            x[0, 0] = np.clip(x[0, 0] + k / 32768, -1.0, 1.0)
            dst = out / f"{i:04d}-{k}.wav"
            sf.write(dst, x, sr, subtype=subtype, format="WAV")
            corpus.append(str(dst))
    digests = {hashlib.sha256(Path(p).read_bytes()).digest() for p in corpus}
    if len(digests) != len(corpus):
        sys.exit(f"corpus: {len(corpus) - len(digests)} versions have the same content")
    return corpus


def scaling(files: list[str], nodes: list[int], copies: int) -> dict[str, Any]:
    """Steady throughput of a head (0 CPUs) + N 1-CPU worker nodes, against N = 1."""
    import secrets

    import ray
    from ray.cluster_utils import Cluster

    from speaker_sim_cli.engine.ray_engine import RayOptions

    store_mb = 100 * 2**20
    out: dict[str, Any] = {"runs": []}
    with tempfile.TemporaryDirectory(prefix="bs", dir="/tmp") as tmp:
        corpus = make_corpus(files, copies, Path(tmp) / "corpus")
        out["recordings"] = len(corpus)
        os.environ["RAY_TMPDIR"] = tmp  # Ray's socket paths must stay short
        os.environ.pop("RAY_AUTH_MODE", None)
        os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
        ncpu = os.cpu_count() or 1

        def measured(what: str, fn: Any) -> tuple[dict[str, Any], Any]:
            load0, (b0, t0), c0 = os.getloadavg()[0], machine_cpu(), time.process_time()
            row, emb = fn()
            load1, (b1, t1), c1 = os.getloadavg()[0], machine_cpu(), time.process_time()
            busy_cores = (b1 - b0) / max(1, t1 - t0) * ncpu
            actors_cpu = sum(a["cpu_s"] for a in row.get("per_actor", []))
            driver_cpu = c1 - c0  # this process (the driver; the local engine itself)
            mine = (actors_cpu + driver_cpu) / row["total_s"]
            row["machine"] = {"load_before": round(load0, 2), "load_after": round(load1, 2),
                              "busy_cores": round(busy_cores, 2),
                              "this_run_cores": round(mine, 2),
                              "others_cores": round(max(0.0, busy_cores - mine), 2)}  # fmt: skip
            print(f"{what}: {json.dumps(row)}", file=sys.stderr)
            return row, emb

        local, ref = measured("local", lambda: run(corpus, Path(tmp) / "local"))
        out["local"] = local
        t0 = time.perf_counter()
        c = Cluster(initialize_head=True,
                    head_node_args={"num_cpus": 0, "object_store_memory": store_mb})  # fmt: skip
        held: list[Any] = []
        try:
            ray.init(address=c.address, logging_level="WARNING")
            out["cluster_start_s"] = round(time.perf_counter() - t0, 2)
            for k, n in enumerate(nodes):
                while len(held) < n:
                    held.append(c.add_node(num_cpus=1, object_store_memory=store_mb))
                while len(held) > n:
                    c.remove_node(held.pop())
                c.wait_for_nodes()
                deadline = time.monotonic() + 60
                while ray.cluster_resources().get("CPU", 0) != n:
                    if time.monotonic() > deadline:
                        sys.exit(f"the cluster did not settle at {n} CPUs")
                    time.sleep(0.5)
                opts = RayOptions(address="auto", device="cpu")
                where = Path(tmp) / f"ray{k}"
                row, got = measured(f"ray {n} node(s)",
                                    lambda w=where, o=opts: run(corpus, w, o))  # fmt: skip
                worst = max(
                    float(np.linalg.norm(got[f] - ref[f]) / np.linalg.norm(ref[f])) for f in ref
                )
                if worst > 1e-5:
                    sys.exit(f"ray {n} nodes: vectors differ from the local engine's ({worst})")
                row["max_rel_l2_vs_local"] = worst
                row["nodes"] = n
                out["runs"].append(row)
        finally:
            ray.shutdown()
            c.shutdown()

    def rate(r: dict[str, Any], key: str = "steady_recordings_per_s") -> float:
        return float(r["engine"].get(key) or 0.0)

    def per_cpu(r: dict[str, Any]) -> float:  # recordings per actor CPU-second
        return sum(a["recordings"] for a in r["per_actor"]) / max(
            1e-9, sum(a["cpu_s"] for a in r["per_actor"])
        )

    ones = [r for r in out["runs"] if r["nodes"] == 1]
    twos = [r for r in out["runs"] if r["nodes"] == 2]
    if ones and twos:
        one = float(np.mean([rate(r) for r in ones]))
        two = float(np.mean([rate(r) for r in twos]))
        out["steady_rec_per_s"] = {"n1": round(one, 2), "n2": round(two, 2),
                                   "local": local["steady_rec_per_s"]}  # fmt: skip
        out["scaling"] = round(two / (2 * one), 3) if one > 0 else None
        # The same from each actor's own steady rate, summed (no unit cut at a shared window's
        # edges), in recordings and in audio seconds (units weighed by their work).
        for key, name in (("steady_actor_recordings_per_s", "scaling_actor_recordings"),
                          ("steady_actor_x_realtime", "scaling_actor_x_realtime")):  # fmt: skip
            a1 = float(np.mean([rate(r, key) for r in ones]))
            a2 = float(np.mean([rate(r, key) for r in twos]))
            out[name] = round(a2 / (2 * a1), 3) if a1 > 0 else None
        out["cpu_scaling"] = round(float(np.mean([per_cpu(r) for r in twos]))
                                   / float(np.mean([per_cpu(r) for r in ones])), 3)  # fmt: skip
        out["cpu_share"] = {f"n{r['nodes']}": [a["cpu_share"] for a in r["per_actor"]]
                            for r in out["runs"]}  # fmt: skip
    return out


class Synthetic:
    """``n`` synthetic work items ``/corpus/000000001.wav`` ... As a plain sequence it makes
    a str per item on demand (~0.2 us each, counted in the driver's CPU; a list of 10 M str
    would be the caller's memory, not the engine's). With ``blocks`` it holds the items as a
    compact list does, one buffer of packed paths (22 bytes an item, built before the clock
    starts and counted in the peak RSS), and hands out each unit's block as a slice of it."""

    PREFIX, SUFFIX = b"/corpus/", b".wav"

    def __init__(self, n: int, blocks: bool = False) -> None:
        self.n = n
        if blocks:
            self.width = len(self.PREFIX) + 9 + len(self.SUFFIX) + 1  # + the NUL
            self.buf = np.empty(n * self.width, np.uint8)
            for lo in range(0, n, 1_000_000):
                hi = min(n, lo + 1_000_000)
                self.buf[lo * self.width : hi * self.width] = self._packed(lo, hi).ravel()
            self.block = self._block

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, k: slice) -> list[str]:
        return [f"/corpus/{i:09d}.wav" for i in range(*k.indices(self.n))]

    def _packed(self, lo: int, hi: int) -> np.ndarray:
        """Items ``lo .. hi-1``, each followed by a NUL, one a row (vectorised)."""
        row = np.frombuffer(self.PREFIX + b"0" * 9 + self.SUFFIX + b"\0", np.uint8)
        i = np.arange(lo, hi, dtype=np.int64)
        out = np.tile(row, (hi - lo, 1))
        p = len(self.PREFIX)
        for k in range(9):
            out[:, p + 8 - k] = i // 10**k % 10 + ord("0")
        return out

    def _block(self, lo: int, hi: int) -> bytes:
        """Items ``lo .. hi-1`` as ``pack_paths(self[lo:hi])`` packs them."""
        return self.buf[lo * self.width : hi * self.width - 1].tobytes()


def _fill_store(cache: Any, paths: list[str]) -> None:
    """Vectors under the keys the stand-in actors send for ``paths`` (sha256 of the path)."""
    import hashlib

    rng = np.random.default_rng(0)
    for lo in range(0, len(paths), 65_536):
        part = paths[lo : lo + 65_536]
        keys = [hashlib.sha256(p.encode()).hexdigest() for p in part]
        cache.put_many(keys, rng.standard_normal((len(part), 192)).astype(np.float32))
        cache.flush()


def driver_cost(
    sizes: list[int],
    rows: int,
    actors: int,
    mean_seconds: float,
    api: str,
    blocks: bool = False,
    in_flight: int = 2,
    warm_mb: int = 0,
) -> dict[str, Any]:
    """Driver CPU-us, bytes and peak RSS per synthetic item through the real scheduling path.

    ``warm_mb``: touch and free that much memory first (unclocked). On this VM, memory the
    guest has never used costs ~2.7 ms/MB at its first touch (~0.26 ms/MB once it has been
    used and freed): the read-back's result matrix (768 bytes a recording) pays it in a fresh
    process, a driver host that has run for a while does not. Both are reported."""
    import pickle
    import resource

    import ray

    from speaker_sim_cli.engine.cache import EmbeddingCache
    from speaker_sim_cli.engine.config import EngineConfig
    from speaker_sim_cli.engine.ray_engine import RayOptions, RayRun
    from speaker_sim_cli.engine.ray_readback import embed_unique

    out: dict[str, Any] = {"unit_rows": rows, "actors": actors, "api": api,
                           "items": "blocks" if blocks else "str", "in_flight": in_flight,
                           "warm_mb": warm_mb, "sizes": []}  # fmt: skip
    if warm_mb:
        t = time.perf_counter()
        np.ones(warm_mb * 2**18, np.float32)  # touched, then freed at once
        out["warm_s"] = round(time.perf_counter() - t, 2)
    with tempfile.TemporaryDirectory(prefix="bench-ray-", dir="/tmp") as tmp:
        os.environ.setdefault("RAY_TMPDIR", tmp)
        ray.init(num_cpus=actors, include_dashboard=False, logging_level="WARNING")
        try:
            cache = EmbeddingCache(Path(tmp) / "store", {"bench": "standin"}, 192)
            filled = 0
            for n in sorted(sizes):
                run = RayRun(RayOptions(actors=actors, device="cpu"), None, Path("/none"),
                             EngineConfig(device="cpu", batch_size=rows), cache,
                             standin=True, in_flight=in_flight)  # fmt: skip
                sampled: list[int] = []
                orig = run._count

                def count(
                    row: dict[str, Any], *a: int, orig: Any = orig, sampled: list[int] = sampled
                ) -> None:
                    if len(sampled) < 50:
                        sampled.append(len(pickle.dumps(row)) // max(1, int(row["n"])))
                    orig(row, *a)

                run._count = count  # type: ignore[method-assign]
                got = 0
                items = Synthetic(n, blocks)  # before the clock: the caller's list
                if api.startswith("paths"):  # the store holds every stand-in key (unclocked)
                    paths = items[0:n]
                    _fill_store(cache, paths[filled:])  # the sizes grow: each key once
                    filled = n
                c0, t0 = time.process_time(), time.perf_counter()
                if api == "units":  # what a driver at scale consumes: one row per unit
                    for _lo, status, _digests, _reasons in run.embed_units(items):
                        got += len(status) - status.count(2)
                elif api == "items":  # one Python tuple per recording
                    for _i, digest, _why, _c in run.embed_items(Synthetic(n)):
                        got += digest is not None
                elif api == "paths":  # what Extractor.embed_paths runs: vectors read back
                    got = len(embed_unique(run, paths)[0])
                else:  # the previous read-back, for comparison: one store lookup per item
                    for _i, digest, _why, _c in run.embed_items(paths):
                        got += cache.get(digest.hex()) is not None
                cpu, wall = time.process_time() - c0, time.perf_counter() - t0
                if got != n:
                    sys.exit(f"driver bench: {got} of {n} items came back")
                rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                row = {"items": n, "cpu_us_per_item": round(cpu / n * 1e6, 2),
                       "wall_s": round(wall, 2), "items_per_s": round(n / wall),
                       "row_bytes_per_item": round(float(np.mean(sampled)), 1),
                       "peak_rss_mb": round(rss, 1)}  # fmt: skip
                if "readback_cpu_s" in run.info:  # the read-back thread's share of ``cpu``
                    back = float(run.info["readback_cpu_s"])
                    row["readback_cpu_us_per_item"] = round(back / n * 1e6, 2)
                    row["scheduling_cpu_us_per_item"] = round((cpu - back) / n * 1e6, 2)
                out["sizes"].append(row)
                print(f"driver {n}: {json.dumps(row)}", file=sys.stderr)
        finally:
            ray.shutdown()
    xs = np.array([r["items"] for r in out["sizes"]], float)
    cpu_s = np.array([r["cpu_us_per_item"] * r["items"] / 1e6 for r in out["sizes"]])
    rss = np.array([r["peak_rss_mb"] for r in out["sizes"]])
    if len(xs) >= 2 and "scheduling_cpu_us_per_item" in out["sizes"][0]:
        # the thread that hands out work (and Ray's own threads), without the read-back's
        sched = np.array([r["scheduling_cpu_us_per_item"] * r["items"] / 1e6
                          for r in out["sizes"]])  # fmt: skip
        back = np.array([r["readback_cpu_us_per_item"] * r["items"] / 1e6 for r in out["sizes"]])
        out["slope_scheduling_cpu_us_per_item"] = round(float(np.polyfit(xs, sched, 1)[0]) * 1e6, 2)
        out["slope_readback_cpu_us_per_item"] = round(float(np.polyfit(xs, back, 1)[0]) * 1e6, 2)
    if len(xs) >= 2:
        slope_cpu = float(np.polyfit(xs, cpu_s, 1)[0]) * 1e6  # us per item
        slope_rss = float(np.polyfit(xs, rss, 1)[0]) * 1e6  # MB per million items
        out["slope_cpu_us_per_item"] = round(slope_cpu, 2)
        out["slope_rss_mb_per_million_items"] = round(slope_rss, 2)
        how = "measured" if xs[-1] >= 1e7 else "extrapolated"
        out[f"rss_10M_items_mb_{how}"] = round(
            float(rss[-1]) + slope_rss * max(0.0, 10 - xs[-1] / 1e6), 1
        )
        per_gpu = 10_000 / mean_seconds  # recordings per second one GPU embeds
        out["cost_model"] = {
            "assumes": f"CAM++ at 10,000x realtime per GPU, {mean_seconds:g} s recordings",
            "recordings_per_s_per_gpu": round(per_gpu, 1),
            "driver_items_per_s_one_core": round(1e6 / slope_cpu),
            "gpu_nodes_one_driver_core_feeds": round(1e6 / slope_cpu / per_gpu),
        }
        if "slope_scheduling_cpu_us_per_item" in out:  # the read-back on a core of its own
            sched_slope = max(1e-3, out["slope_scheduling_cpu_us_per_item"])
            back_slope = max(1e-3, out["slope_readback_cpu_us_per_item"])
            out["cost_model"]["gpu_nodes_the_scheduling_core_feeds"] = round(
                1e6 / sched_slope / per_gpu
            )
            out["cost_model"]["gpu_nodes_the_readback_core_keeps_up_with"] = round(
                1e6 / back_slope / per_gpu
            )
    return out


def _emit(doc: dict[str, Any], out: Path | None) -> None:
    """Print a result document and write it to ``out`` when given."""
    text = json.dumps(doc, indent=2)
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")


def main() -> None:
    shared = find_shared()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=Path, default=None, help="a list file, one path a line")
    ap.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument(
        "--driver",
        type=int,
        nargs="*",
        default=None,
        metavar="N",
        help="measure the driver's cost per item at these sizes instead",
    )
    ap.add_argument("--unit-rows", type=int, default=1024)
    ap.add_argument("--mean-seconds", type=float, default=8.0)
    ap.add_argument("--api", choices=["units", "items", "paths", "paths-per-item"],
                    default="units")  # fmt: skip
    ap.add_argument(
        "--blocks",
        action="store_true",
        help="--driver: the items hand out packed blocks (a compact list)",
    )
    ap.add_argument(
        "--in-flight",
        type=int,
        default=2,
        help="--driver: units queued on each actor (2 x actors in flight)",
    )
    ap.add_argument(
        "--warm-memory",
        dest="warm_mb",
        type=int,
        default=0,
        metavar="MB",
        help="--driver: touch and free this much memory first (a fresh VM's first-touch cost)",
    )
    ap.add_argument(
        "--scaling",
        action="store_true",
        help="throughput against worker nodes (ray.cluster_utils.Cluster)",
    )
    ap.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 1])
    ap.add_argument("--copies", type=int, default=4)
    args = ap.parse_args()
    if args.driver is not None:
        doc = {"what": "driver cost per work item (synthetic items, stand-in actors)",
               "machine": {"cores": os.cpu_count(), "platform": platform.platform()},
               **driver_cost(args.driver or [10_000, 100_000, 1_000_000], args.unit_rows,
                             2, args.mean_seconds, args.api, args.blocks,
                             args.in_flight, args.warm_mb)}  # fmt: skip
        _emit(doc, args.out)
        return
    if args.files:
        files = [ln.strip() for ln in args.files.read_text().splitlines() if ln.strip()]
    else:
        files = sorted(str(p) for p in (shared / "audio").rglob("*") if p.suffix in AUDIO)
    os.environ.setdefault("SPEAKER_SIM_PRETRAINED", str(shared / "pretrained"))
    if args.scaling:
        doc = {"what": "steady throughput, head (0 CPUs) + N 1-CPU worker nodes, real CAM++",
               "machine": {"cores": os.cpu_count(), "platform": platform.platform()},
               "copies": args.copies, "nodes": args.nodes,
               **scaling(files, args.nodes, args.copies)}  # fmt: skip
        _emit(doc, args.out)
        return
    import ray

    from speaker_sim_cli.engine.ray_engine import RayOptions

    cores = os.cpu_count() or 1
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-ray-", dir="/tmp") as tmp:
        local, ref = run(files, Path(tmp) / "local")
        results["local"] = local
        print(f"local: {json.dumps(local)}", file=sys.stderr)
        os.environ.setdefault("RAY_TMPDIR", tmp)
        t0 = time.perf_counter()
        ray.init(num_cpus=cores, include_dashboard=False, logging_level="WARNING")
        results["cluster_start_s"] = round(time.perf_counter() - t0, 2)
        try:
            for n in args.actors:
                row, got = run(files, Path(tmp) / f"ray{n}", RayOptions(actors=n, device="cpu"))
                worst = max(
                    float(np.linalg.norm(got[f] - ref[f]) / np.linalg.norm(ref[f])) for f in ref
                )
                if worst > 1e-5:
                    sys.exit(f"ray x{n}: vectors differ from the local engine's (rel L2 {worst})")
                row["max_rel_l2_vs_local"] = worst
                results[f"ray_x{n}"] = row
                print(f"ray x{n}: {json.dumps(row)}", file=sys.stderr)
        finally:
            ray.shutdown()
    doc = {
        "what": "embed the same files from an empty cache: local engine vs --ray (CPU)",
        "files": len(files),
        "machine": {"cores": cores, "platform": platform.platform()},
        "ray": ray.__version__,
        **results,
    }
    _emit(doc, args.out)


if __name__ == "__main__":
    main()
