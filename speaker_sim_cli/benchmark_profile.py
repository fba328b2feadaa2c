"""What the benchmark measures beside wall time: model FLOPs, the machine, per-side summaries,
the stage that bounds a GPU run, the engine on ONNX Runtime, and embedding parity."""

from __future__ import annotations

import contextlib
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

Log = Callable[[str], None]
# Embeddings count as giving identical scores when every pairwise cosine agrees this closely.
SCORE_TOLERANCE = 1e-5


# -- FLOPs -----------------------------------------------------------------------------------
def flop_model(model: Any, n_mels: int, device: Any) -> tuple[float, float]:
    """``(intercept, per_frame)``: FLOPs of one batch-1 forward of T frames ~ a + b*T.

    Counted by ``torch.utils.flop_counter.FlopCounterMode`` (2 FLOPs per multiply-add, convs
    and matmuls) on two forwards, 200 and 400 frames.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counts = []
    for t in (200, 400):
        feats = torch.zeros(1, t, n_mels, device=device)
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            model(feats)
        counts.append(float(fc.get_total_flops()))
    per_frame = (counts[1] - counts[0]) / 200.0
    return counts[0] - 200.0 * per_frame, per_frame


def device_info(device: Any) -> dict[str, Any]:
    """What ran it: the device's name, CPU model and cores, torch threads, load average."""
    import torch

    info: dict[str, Any] = {"device": str(device), "torch": torch.__version__}
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info["cpu"] = cpu
    info["cpu_cores"] = os.cpu_count()
    info["torch_threads"] = torch.get_num_threads()
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["name"] = props.name
        info["memory_gib"] = round(props.total_memory / 2**30, 1)
        info["capability"] = f"{props.major}.{props.minor}"
    else:
        info["name"] = f"CPU ({cpu}, {os.cpu_count()} cores)"
    info["load_average"] = _load_average()
    return info


def _load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages (None where the OS has none)."""
    with contextlib.suppress(OSError, AttributeError):
        return [round(x, 2) for x in os.getloadavg()]
    return None


def _side(t: dict[str, Any], flops: tuple[float, float], n_files: int) -> dict[str, Any]:
    """Rates of one side from its timings: recordings/s, x-realtime, GFLOP/s."""
    a, b = flops
    useful = a * t["recordings"] + b * t["frames"]
    wall = max(t["wall_s"], 1e-9)
    out = dict(t)
    out["recordings_per_s"] = t["recordings"] / wall
    out["x_realtime"] = t["audio_s"] / wall
    out["gflop"] = useful / 1e9
    out["gflops_per_s"] = useful / 1e9 / wall
    # Per thread-second of fbank + model (the engine's CPU runners overlap, so their compute_s
    # is summed over threads and can exceed the wall time).
    out["compute_gflops_per_s"] = useful / 1e9 / max(t["compute_s"], 1e-9)
    out["padding_overhead"] = t["padded_frames"] / t["frames"] - 1 if t["frames"] else 0.0
    out["all_recordings"] = t["recordings"] + t.get("from_cache", 0) == n_files
    return out


# -- per stage: what bounds a GPU run ----------------------------------------------------------
def host_forward_seconds(model: Any, frontend: Any) -> tuple[float, int]:
    """Host time and op count of one batch's features + forward, with almost no device work.

    A GPU batch costs the feeding thread one dispatch and launch per op whatever its size; a
    forward of one 2 s row on this CPU runs the same ops with kernels of a few microseconds,
    so its time is the host's share of a GPU batch (a GPU adds its driver's launch cost). The
    meta device would skip the kernels but its Python shape functions are slower than the
    kernels. Returns (seconds, best of 3; ops dispatched ~ kernel launches).
    """
    import copy

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from .audio.features import compute_features

    class Ops(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Ops.n += 1
            return func(*args, **(kwargs or {}))

    net = copy.deepcopy(model).to("cpu").float()
    sr = frontend.sample_rate
    waves = torch.zeros(1, 2 * sr).uniform_(-0.1, 0.1)
    lengths = torch.full((1,), 2 * sr, dtype=torch.long)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    best = float("inf")
    try:
        with torch.inference_mode():
            for k in range(4):
                t0 = time.perf_counter()
                with Ops() if k == 0 else contextlib.nullcontext():
                    net(*compute_features(waves, lengths, frontend))
                if k:
                    best = min(best, time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    return best, Ops.n


def stage_bounds(
    extractor: Any, baseline: dict[str, Any], engine: dict[str, Any], workers: int
) -> dict[str, Any]:
    """Per stage, the x-realtime it would allow a GPU run on this machine's measurements.

    decode: the infer_sv loop's decode + resample rate (one core) x the decode workers;
    host: audio of one GPU-sized batch (rows of the corpus' mean length within the GPU budget)
    over the host time of one batch (:func:`host_forward_seconds`);
    model: what this device's model achieved in the engine run (fbank + model, summed over
    runners). ``bound_by``: the smallest; on a GPU box the same figures are measured there.
    """
    from .engine.config import DEFAULT_BATCH_ROWS, gpu_batch_frames

    spec, emb = extractor.spec, extractor.embedder
    recs = max(baseline["recordings"], 1)
    mean_s = baseline["audio_s"] / recs
    mean_frames = max(1, int(baseline["frames"] / recs))
    decode_core = baseline["audio_s"] / max(baseline["decode_s"], 1e-9)
    cores = max(1, workers)
    if emb.device.type == "cuda":
        budget = emb.batch_frames
    else:
        budget = gpu_batch_frames(spec.arch, 79 * 2**30)  # as on an 80 GB card
    rows = max(1, min(DEFAULT_BATCH_ROWS["cuda"], budget // mean_frames))
    host_s, ops = host_forward_seconds(emb.model, spec.frontend)
    host = rows * mean_s / max(host_s, 1e-9)
    model = engine["audio_s"] / max(engine["compute_s"], 1e-9) * max(engine.get("runners", 1), 1)
    stages = {
        "decode": {
            "x_realtime_per_core": decode_core,
            "workers": workers,
            "x_realtime": decode_core * cores,
        },
        "host": {
            "rows_per_batch": rows,
            "frames_per_row": mean_frames,
            "seconds_per_batch": host_s,
            "ops_per_batch": ops,
            "x_realtime": host,
        },
        "model": {"device": str(emb.device), "x_realtime": model},
    }
    bound = min(stages, key=lambda k: stages[k]["x_realtime"])
    return {**stages, "bound_by": bound, "x_realtime_bound": stages[bound]["x_realtime"]}


# -- (c) the engine on ONNX Runtime -----------------------------------------------------------
def ort_extractor(
    model: str, model_dir: Path | str | None, cfg: Any, log: Log
) -> tuple[Any, float] | tuple[None, str]:
    """An :class:`Extractor` whose engine runs the exported graph in ONNX Runtime, and the
    seconds its load took (export included when the graph was not cached yet: it is built
    once, under the user's cache folder, and never timed as part of (c)); or ``(None, why)``
    when (c) cannot run here."""
    from dataclasses import replace

    from .engine.onnx_backend import available
    from .pipeline import Extractor

    if cfg.precision != "fp32":
        return None, f"(c) runs fp32 only, not {cfg.precision}"
    if not available():
        return None, "onnxruntime is not installed (pip install 'speaker-sim[onnx]')"
    t0 = time.perf_counter()
    try:
        ex = Extractor(model, model_dir, replace(cfg, backend="onnxruntime", device="cpu"),
                       use_cache=False)  # fmt: skip
        log("(c): loading the ONNX graph (exported once, then cached)")
        ex.load()
    except Exception as exc:  # reported in the result, (a) and (b) still run
        return None, f"{type(exc).__name__}: {exc}"
    return ex, time.perf_counter() - t0


def _ort_side(
    best: dict[str, Any],
    walls: dict[str, list[float]],
    flops: tuple[float, float],
    n_files: int,
    c_load: Any,
    ex_c: Any,
    rounds: list[tuple[dict[str, Any], dict[str, Any]]],
) -> dict[str, Any]:
    """The result's (c) entries: ``ort`` (its side, with batch budget and profile),
    ``ort_speedup`` (c)/(a), ``ort_over_engine`` (c)/(b), per-round ratios and parity."""
    if ex_c is None:
        return {"ort": {"skipped": str(c_load)}}
    side = _side(best["ort"][1], flops, n_files)
    side["round_walls_s"] = walls["ort"]
    side["load_s"] = c_load
    side["batch_frames"] = ex_c.embedder.batch_frames
    side["backend_reason"] = ex_c.backend_reason
    ta, tc = min(rounds, key=lambda r: r[1]["wall_s"])
    side["profile"] = ort_profile(tc, ta, tc["ort_run_s"])
    paired_a = [a / max(c, 1e-9) for a, c in zip(walls["baseline"], walls["ort"], strict=True)]
    paired_b = [b / max(c, 1e-9) for b, c in zip(walls["engine"], walls["ort"], strict=True)]
    return {
        "ort": side,
        "ort_speedup": best["baseline"][1]["wall_s"] / max(side["wall_s"], 1e-9),
        "ort_over_engine": best["engine"][1]["wall_s"] / max(side["wall_s"], 1e-9),
        "ort_paired_speedups": paired_a,
        "ort_paired_over_engine": paired_b,
        "ort_parity": compare_embeddings(best["baseline"][0], best["ort"][0]),
        "ort_vs_engine_parity": compare_embeddings(best["engine"][0], best["ort"][0]),
        "ort_targets": {"x_realtime_campplus": 110.0, "speedup": 3.5},
    }


def ort_profile(tc: dict[str, Any], ta: dict[str, Any], run_s: float) -> dict[str, Any]:
    """Where (c)'s time goes, as CPU seconds per hour of audio and x-realtime per core:
    decode (from (a)'s per-recording figure: the same files), fbank + Python glue (the
    runners' compute time less ONNX Runtime's), the model (``session.run``), and the wall."""
    hours = max(tc["audio_s"], 1e-9) / 3600.0

    def stage(seconds: float) -> dict[str, float]:
        return {"cpu_s_per_audio_h": seconds / hours,
                "x_realtime_per_core": tc["audio_s"] / max(seconds, 1e-9)}  # fmt: skip

    decode = ta["decode_s"] * tc["audio_s"] / max(ta["audio_s"], 1e-9)
    return {
        "decode": stage(decode),
        "fbank_and_python": stage(max(tc["compute_s"] - run_s, 0.0)),
        "model": stage(run_s),
        "wall": stage(tc["wall_s"]),
        "note": "model = ONNX Runtime session.run summed over the runner threads; "
        "fbank_and_python = the runners' compute time less that; decode scaled from (a)",
    }


# -- parity -------------------------------------------------------------------------------
def compare_embeddings(
    a: dict[str, np.ndarray], b: dict[str, np.ndarray], chunk: int = 2048
) -> dict[str, Any]:
    """How far (b)'s embeddings are from (a)'s, and the cosine scores of every pair from them.

    ``max_abs_diff``: largest element difference; ``max_rel_l2``: largest ``|a-b|/|a|``;
    ``min_cosine``: lowest cosine between a recording's two embeddings; ``max_score_diff``:
    largest difference of any pairwise cosine score (all pairs of the corpus).
    """
    keys = [k for k in a if k in b]
    out: dict[str, Any] = {
        "compared": len(keys),
        "only_baseline": len(set(a) - set(b)),
        "only_engine": len(set(b) - set(a)),
    }
    if not keys:
        out.update(max_abs_diff=None, max_rel_l2=None, min_cosine=None, max_score_diff=None)
        out["identical"] = False
        return out
    ea = np.stack([a[k] for k in keys]).astype(np.float64)
    eb = np.stack([b[k] for k in keys]).astype(np.float64)
    na, nb = np.linalg.norm(ea, axis=1), np.linalg.norm(eb, axis=1)
    ua, ub = ea / np.maximum(na, 1e-12)[:, None], eb / np.maximum(nb, 1e-12)[:, None]
    worst = 0.0
    for s in range(0, len(keys), chunk):
        sa, sb = ua[s : s + chunk] @ ua.T, ub[s : s + chunk] @ ub.T
        worst = max(worst, float(np.abs(sa - sb).max()))
    out["max_abs_diff"] = float(np.abs(ea - eb).max())
    out["max_rel_l2"] = float((np.linalg.norm(ea - eb, axis=1) / np.maximum(na, 1e-12)).max())
    out["min_cosine"] = float(np.einsum("ij,ij->i", ua, ub).min())
    out["max_score_diff"] = worst
    out["score_tolerance"] = SCORE_TOLERANCE
    out["identical"] = bool(
        worst <= SCORE_TOLERANCE and not out["only_baseline"] and not out["only_engine"]
    )
    return out
