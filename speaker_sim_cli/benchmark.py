"""The engine against a loop equivalent to 3D-Speaker's ``infer_sv.py``, in one run.

(a) baseline: one recording at a time, batch 1, no workers, no cache — what
    ``speakerlab/bin/infer_sv.py`` does per wav: decode (:func:`audio.load`), fbank and mean
    normalisation on the CPU (:func:`features.compute_features`), the features to the device,
    ``model(feats)``, the embedding back to the CPU.
(b) engine: :meth:`pipeline.Extractor.embed_paths` with an empty cache (cold): content hashing,
    header probes, decoding (DataLoader), length-bucketed batches, fbank on the device, and on a
    CPU several single-threaded batches side by side; then the same again on the now full cache
    (warm), which should embed nothing.

Both use the same loaded weights on the same device; model loading is timed apart. Model work is
counted in FLOPs with ``torch.utils.flop_counter`` (linear in frames: two forwards fix the slope
and the intercept), so GFLOP/s is the useful (unpadded) work per second.

>>> corpus = read_corpus(None)  # doctest: +SKIP
>>> result = run_benchmark(corpus, model="campplus-zh-en")  # doctest: +SKIP
>>> result["speedup"]  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import AudioError, UsageError

AUDIO_SUFFIXES = frozenset({".wav", ".flac", ".mp3", ".ogg", ".oga", ".opus"})

# Targets from the issue: (b)/(a) end to end, and x-realtime for CAM++ on a GPU.
TARGETS: dict[str, dict[str, float]] = {
    "cpu": {"speedup": 2.0},
    "cuda": {"speedup": 20.0, "x_realtime_campplus": 10_000.0},
}
# Embeddings count as giving identical scores when every pairwise cosine agrees this closely.
SCORE_TOLERANCE = 1e-5

Log = Callable[[str], None]


# -- corpus ---------------------------------------------------------------------------------
def default_corpus_dir() -> Path:
    """``$SPEAKER_SIM_SHARED/audio``, else ``../shared/audio`` from the working directory or
    from the checkout this package lives in. Raises UsageError when none exists."""
    candidates = []
    env = os.environ.get("SPEAKER_SIM_SHARED")
    if env:
        candidates.append(Path(env).expanduser() / "audio")
    candidates.append(Path.cwd().parent / "shared" / "audio")
    candidates.append(Path(__file__).resolve().parents[2] / "shared" / "audio")
    for c in candidates:
        if c.is_dir():
            return c.resolve()
    raise UsageError(
        "no benchmark corpus: ../shared/audio not found (looked in "
        + ", ".join(str(c) for c in candidates)
        + "); pass --files FOLDER or a list file"
    )


def list_audio(folder: Path) -> list[Path]:
    """Audio files under ``folder`` (recursively, by suffix), sorted."""
    return sorted(
        p for p in folder.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file()
    )


def read_corpus(source: Path | None) -> list[Path]:
    """The benchmark's recordings.

    ``source`` is a folder (every audio file under it), one audio file, or a text file listing one
    recording per line (blank lines and ``#`` comments skipped; relative paths resolve against
    the list's folder). None: :func:`default_corpus_dir`.
    """
    if source is None:
        source = default_corpus_dir()
    if source.is_dir():
        paths = list_audio(source)
    elif source.is_file() and source.suffix.lower() in AUDIO_SUFFIXES:
        paths = [source]
    elif source.is_file():
        paths = []
        for line in source.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            p = Path(line).expanduser()
            paths.append(p if p.is_absolute() else source.parent / p)
    else:
        raise UsageError(f"--files {source}: no such file or folder")
    if not paths:
        raise UsageError(f"--files {source}: no audio files")
    return [p.resolve() for p in paths]


def expand_corpus(paths: Sequence[Path], repeat: int, workdir: Path) -> list[Path]:
    """The corpus ``repeat`` times over, each copy distinct content (so the cache cannot share).

    Copy ``k >= 1`` of a file is its audio plus a DC offset of ``k`` 16-bit steps (``k / 2**15``),
    which the fbank's per-frame DC removal takes out again, so the speech is the same; written
    under ``workdir/rK/`` in the original container and subtype where libsndfile can write them,
    else as float wav.
    """
    import soundfile as sf

    out = list(paths)
    for k in range(1, repeat):
        offset = k / 2**15
        for i, p in enumerate(paths):
            data, rate = sf.read(str(p), dtype="float64", always_2d=True)
            info = sf.info(str(p))
            dest = workdir / f"r{k:03d}" / f"{i:05d}_{p.name}"
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                sf.write(str(dest), data + offset, rate, format=info.format, subtype=info.subtype)
            except Exception:  # libsndfile cannot write every format it reads
                dest = dest.with_suffix(".wav")
                sf.write(str(dest), data + offset, rate, format="WAV", subtype="FLOAT")
            out.append(dest)
    return out


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


# -- (a) the baseline loop ------------------------------------------------------------------
def run_baseline(
    model: Any, frontend: Any, paths: Sequence[str], device: Any
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """3D-Speaker's infer_sv.py loop. Returns embeddings by path and timings.

    Per recording: decode + resample, fbank on the CPU, features to ``device``, ``model`` at
    batch 1 under ``no_grad``, embedding back to the CPU (which waits for the device).
    """
    import torch

    from .audio.decode import load
    from .audio.features import compute_features

    embs: dict[str, np.ndarray] = {}
    failures: dict[str, str] = {}
    decode_s = fbank_s = model_s = audio_s = 0.0
    frames = 0
    t_start = time.perf_counter()
    for p in paths:
        t0 = time.perf_counter()
        try:
            wav = load(p, frontend.sample_rate)
        except AudioError as exc:
            failures[p] = exc.reason
            decode_s += time.perf_counter() - t0
            continue
        t1 = time.perf_counter()
        feats, n = compute_features(torch.from_numpy(wav)[None], None, frontend)
        t2 = time.perf_counter()
        with torch.no_grad():
            emb = model(feats.to(device)).detach().squeeze(0).cpu().numpy()
        t3 = time.perf_counter()
        embs[p] = emb.astype(np.float32, copy=False)
        decode_s, fbank_s, model_s = decode_s + t1 - t0, fbank_s + t2 - t1, model_s + t3 - t2
        audio_s += wav.shape[0] / frontend.sample_rate
        frames += int(n[0])
    wall = time.perf_counter() - t_start
    return embs, {
        "wall_s": wall,
        "decode_s": decode_s,
        "fbank_s": fbank_s,
        "model_s": model_s,
        "compute_s": fbank_s + model_s,
        "recordings": len(embs),
        "failed": len(failures),
        "audio_s": audio_s,
        "frames": frames,
        "rows": len(embs),
        "padded_frames": frames,
    }


# -- (b) the engine ---------------------------------------------------------------------------
def run_engine(
    extractor: Any, paths: Sequence[str], cache_root: Path
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """``extractor.embed_paths`` against the cache at ``cache_root`` (empty: cold; the same root
    again: warm). Returns embeddings by path and timings (``compute_s`` is fbank + model in the
    main process)."""
    from .engine.cache import EmbeddingCache
    from .engine.embedder import EngineStats

    extractor.cache = EmbeddingCache(cache_root, extractor.ingredients(), extractor.spec.dim)
    extractor.embedder.stats = EngineStats()
    t0 = time.perf_counter()
    res = extractor.embed_paths(paths)
    wall = time.perf_counter() - t0
    st = extractor.embedder.stats
    return dict(res.embeddings), {
        "wall_s": wall,
        "compute_s": st.model_seconds,
        "recordings": res.embedded,
        "from_cache": res.cached,
        "failed": len(res.failures),
        "audio_s": st.audio_seconds,
        "frames": st.frames,
        "padded_frames": st.padded_frames,
        "batches": st.batches,
        "chunked": st.chunked,
        "cache_writes": extractor.cache.stats.writes,
        # Wait for the first decoded batch (worker start-up when cold), apart from throughput.
        "first_batch_s": st.extra.get("first_batch_s"),
        "workers_warm": st.extra.get("workers_warm"),
    }


# -- comparison ------------------------------------------------------------------------------
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


# -- the whole benchmark ---------------------------------------------------------------------
def run_benchmark(
    paths: Sequence[Path | str],
    *,
    model: str = "",
    model_dir: Path | str | None = None,
    engine: Any = None,
    rounds: int = 1,
    log: Log | None = None,
    corpus_source: str = "",
    repeat: int = 1,
) -> dict[str, Any]:
    """Time (a) and (b) on ``paths`` ``rounds`` times (interleaved, each (b) cold) and report.

    Returns the JSON-ready result: ``device``, ``model``, ``corpus``, ``baseline``, ``engine``
    (each with ``wall_s``, ``recordings_per_s``, ``x_realtime``, ``gflops_per_s``), ``speedup``
    (b over a, end to end, best round of each), ``engine_warm`` (the same run of (b) again on its
    now full cache: recordings embedded, which should be 0, and the speedup over cold),
    ``parity`` and ``targets``.
    """
    from dataclasses import replace

    import torch

    from .engine.embedder import EngineConfig, cpu_runners, default_workers
    from .models.registry import DEFAULT_MODEL
    from .pipeline import Extractor

    say = log or (lambda _msg: None)
    cfg = engine or EngineConfig()
    files = [str(p) for p in paths]
    load_start = _load_average()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="speaker-sim-bench-") as tmp:
        # (b) is the torch engine whatever --backend auto would pick; (c) the ONNX Runtime one.
        ex = Extractor(model or DEFAULT_MODEL, model_dir, replace(cfg, backend="torch"),
                       cache_dir=Path(tmp) / "warmup")  # fmt: skip
        load_s = time.perf_counter() - t0
        ex_c, c_load = ort_extractor(model or DEFAULT_MODEL, model_dir, cfg, say)
        if ex_c is not None:
            ex_c.embedder.embed_waves([torch.zeros(ex.spec.frontend.sample_rate)] * 2)
        net, device, fe = ex.embedder.model, ex.embedder.device, ex.spec.frontend
        flops = flop_model(net, getattr(fe, "num_mel_bins", 80), device)
        # Warm both paths (page cache, allocator, kernels) so neither pays first-call costs.
        for p in files:
            Path(p).read_bytes()
        run_baseline(net, fe, files[:2], device)
        ex.embedder.embed_waves([torch.zeros(fe.sample_rate).uniform_(-0.1, 0.1)] * 2)
        walls: dict[str, list[float]] = {"baseline": [], "engine": []}
        ort_rounds: list[tuple[dict[str, Any], dict[str, Any]]] = []
        best: dict[str, tuple[dict[str, np.ndarray], dict[str, Any]]] = {}
        warm: list[dict[str, Any]] = []
        for r in range(rounds):
            say(f"round {r + 1}/{rounds}: (a) infer_sv.py loop on {len(files)} recordings")
            ea, ta = run_baseline(net, fe, files, device)
            say(f"  (a) {ta['wall_s']:.2f} s; (b) engine, cold cache")
            eb, tb = run_engine(ex, files, Path(tmp) / f"cold{r}")
            _, tw = run_engine(ex, files, Path(tmp) / f"cold{r}")
            say(f"  (b) {tb['wall_s']:.2f} s; warm rerun {tw['wall_s']:.3f} s")
            warm.append(tw)
            walls["baseline"].append(ta["wall_s"])
            walls["engine"].append(tb["wall_s"])
            sides = [("baseline", (ea, ta)), ("engine", (eb, tb))]
            if ex_c is not None:
                run0 = ex_c.embedder.model.run_seconds
                ec, tc = run_engine(ex_c, files, Path(tmp) / f"ort{r}")
                tc["ort_run_s"] = ex_c.embedder.model.run_seconds - run0
                say(f"  (c) ONNX Runtime engine, cold cache: {tc['wall_s']:.2f} s")
                walls.setdefault("ort", []).append(tc["wall_s"])
                sides.append(("ort", (ec, tc)))
                ort_rounds.append((ta, tc))
            for name, res in sides:
                if name not in best or res[1]["wall_s"] < best[name][1]["wall_s"]:
                    best[name] = res
    base = _side(best["baseline"][1], flops, len(files))
    eng = _side(best["engine"][1], flops, len(files))
    base["round_walls_s"], eng["round_walls_s"] = walls["baseline"], walls["engine"]
    runners = 1
    if device.type == "cpu":
        runners = cfg.runners if cfg.runners > 0 else cpu_runners()
    workers = cfg.workers
    if workers < 0:
        workers = 0 if runners > 1 else default_workers()
    eng.update(
        runners=runners,
        workers=workers,
        batch_size=ex.embedder.batch_size,
        batch_frames=ex.embedder.batch_frames,
        precision=cfg.precision,
    )
    # Decode workers a GPU run would use here (CPU runners decode in-process instead).
    gpu_workers = cfg.workers if cfg.workers >= 0 else default_workers()
    stages = stage_bounds(ex, base, eng, gpu_workers)
    speedup = base["wall_s"] / max(eng["wall_s"], 1e-9)
    paired = [a / max(b, 1e-9) for a, b in zip(walls["baseline"], walls["engine"], strict=True)]
    w = min(warm, key=lambda t: t["wall_s"])
    warm_doc = {
        "wall_s": w["wall_s"],
        "embedded": max(t["recordings"] for t in warm),
        "from_cache": w["from_cache"],
        "speedup_over_cold": eng["wall_s"] / max(w["wall_s"], 1e-9),
        "target_speedup_over_cold": 10.0,
    }
    parity = compare_embeddings(best["baseline"][0], best["engine"][0])
    kind = "cuda" if device.type == "cuda" else "cpu"
    goal = TARGETS[kind]
    targets: dict[str, Any] = {"speedup": goal["speedup"]}
    met = speedup >= goal["speedup"]
    if "x_realtime_campplus" in goal and ex.spec.arch.startswith("campplus"):
        targets["x_realtime"] = goal["x_realtime_campplus"]
        met = met and eng["x_realtime"] >= goal["x_realtime_campplus"]
    targets["met"] = bool(met and parity["identical"])
    audio_s = base["audio_s"]
    dev = device_info(device)
    dev["load_average_start"] = load_start
    ort_doc = _ort_side(best, walls, flops, len(files), c_load, ex_c, ort_rounds)
    return {
        "benchmark": "engine (b) vs 3D-Speaker infer_sv.py loop (a), both cold",
        **ort_doc,
        "device": dev,
        "model": {
            "id": ex.spec.id,
            "arch": ex.spec.arch,
            "checkpoint_sha256": ex.checkpoint_sha256,
            "load_s": load_s,
            "flops_per_frame": flops[1],
            "flops_per_recording": flops[0],
        },
        "corpus": {
            "source": corpus_source,
            "repeat": repeat,
            "recordings": len(files),
            "audio_s": audio_s,
            "audio_h": audio_s / 3600,
            "mean_s": audio_s / max(base["recordings"], 1),
        },
        "rounds": rounds,
        "timing": "best of rounds; (a) and (b) interleaved in one process",
        "baseline": base,
        "engine": eng,
        "speedup": speedup,
        "engine_warm": warm_doc,
        "stages": stages,
        "parity": parity,
        "targets": targets,
        "median_speedup": statistics.median(walls["baseline"]) / statistics.median(walls["engine"]),
        # (a) and (b) of one round ran minutes apart at most, so their ratio is the least
        # exposed to a neighbour's load on a shared machine; the median of those ratios.
        "paired_speedups": paired,
        "median_paired_speedup": statistics.median(paired),
    }
