"""Local engine vs ``--ray`` with 1 and 2 actors on the same files: when does Ray pay?

Usage: ``python benchmarks/bench_ray.py [--files LIST] [--actors 1 2] [--out FILE]``

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
        row["per_actor"] = [
            {k: a[k] for k in ("recordings", "x_realtime", "recordings_per_s")}
            for a in info["per_actor"]
        ]
        row["cpus_per_actor"] = info["cpus_per_actor"]
    return row, res.embeddings


class Synthetic:
    """``n`` synthetic work items, made on demand (the caller's list is not the engine's cost)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, k: slice) -> list[str]:
        return [f"/corpus/{i:09d}.wav" for i in range(*k.indices(self.n))]


def driver_cost(
    sizes: list[int], rows: int, actors: int, mean_seconds: float, api: str
) -> dict[str, Any]:
    """Driver CPU-us, bytes and peak RSS per synthetic item through the real scheduling path."""
    import pickle
    import resource

    import ray

    from speaker_sim_cli.engine.cache import EmbeddingCache
    from speaker_sim_cli.engine.config import EngineConfig
    from speaker_sim_cli.engine.ray_engine import RayOptions, RayRun

    out: dict[str, Any] = {"unit_rows": rows, "actors": actors, "api": api, "sizes": []}
    with tempfile.TemporaryDirectory(prefix="bench-ray-", dir="/tmp") as tmp:
        os.environ.setdefault("RAY_TMPDIR", tmp)
        ray.init(num_cpus=actors, include_dashboard=False, logging_level="WARNING")
        try:
            cache = EmbeddingCache(Path(tmp) / "store", {"bench": "standin"}, 192)
            for n in sizes:
                run = RayRun(RayOptions(actors=actors, device="cpu"), None, Path("/none"),
                             EngineConfig(device="cpu", batch_size=rows), cache,
                             standin=True)  # fmt: skip
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
                c0, t0 = time.process_time(), time.perf_counter()
                if api == "units":  # what a driver at scale consumes: one row per unit
                    for _lo, status, _digests, _reasons in run.embed_units(Synthetic(n)):
                        got += len(status) - status.count(2)
                else:  # one Python tuple per recording (what Extractor.embed_paths uses)
                    for _i, digest, _why, _c in run.embed_items(Synthetic(n)):
                        got += digest is not None
                cpu, wall = time.process_time() - c0, time.perf_counter() - t0
                if got != n:
                    sys.exit(f"driver bench: {got} of {n} items came back")
                rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                row = {"items": n, "cpu_us_per_item": round(cpu / n * 1e6, 2),
                       "wall_s": round(wall, 2), "items_per_s": round(n / wall),
                       "row_bytes_per_item": round(float(np.mean(sampled)), 1),
                       "peak_rss_mb": round(rss, 1)}  # fmt: skip
                out["sizes"].append(row)
                print(f"driver {n}: {json.dumps(row)}", file=sys.stderr)
        finally:
            ray.shutdown()
    xs = np.array([r["items"] for r in out["sizes"]], float)
    cpu_s = np.array([r["cpu_us_per_item"] * r["items"] / 1e6 for r in out["sizes"]])
    rss = np.array([r["peak_rss_mb"] for r in out["sizes"]])
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
    return out


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
    ap.add_argument("--unit-rows", type=int, default=256)
    ap.add_argument("--mean-seconds", type=float, default=8.0)
    ap.add_argument("--api", choices=["units", "items"], default="units")
    args = ap.parse_args()
    if args.driver is not None:
        doc = {"what": "driver cost per work item (synthetic items, stand-in actors)",
               "machine": {"cores": os.cpu_count(), "platform": platform.platform()},
               **driver_cost(args.driver or [10_000, 100_000, 1_000_000], args.unit_rows,
                             2, args.mean_seconds, args.api)}  # fmt: skip
        text = json.dumps(doc, indent=2)
        print(text)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(text + "\n")
        return
    if args.files:
        files = [ln.strip() for ln in args.files.read_text().splitlines() if ln.strip()]
    else:
        files = sorted(str(p) for p in (shared / "audio").rglob("*") if p.suffix in AUDIO)
    os.environ.setdefault("SPEAKER_SIM_PRETRAINED", str(shared / "pretrained"))
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
    text = json.dumps(doc, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
