"""How the engine runs, without importing torch.

Everything here is part of a cache key or a default that the CLI shows, and a fully cached run
needs it without paying for ``import torch`` (about 1.5 s): the model, and torch with it, is
loaded on the first recording the cache does not hold.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

from ..errors import UsageError

PRECISION_NAMES = ("fp32", "bf16", "fp16")

# Model backends. ``auto`` picks ONNX Runtime on a CPU at fp32 when it is installed and the
# model's exported graph is cached or the run has at least AUTO_ORT_MIN_AUDIO_S of audio to
# embed (the one-time export then pays for itself), else torch (pipeline.Extractor.load). The
# two give the same scores within 1e-5, so the embedding cache does not record which ran.
# Break-even, CAM++ on the 2-core machine: the export costs ~30 CPU-s idle (~100 s wall at load
# 10); ONNX Runtime saves ~0.016 s per second of audio at load 10 (engine 39.7 s -> 31.9 s on
# 494 s of audio), so it pays after ~1.75 h of audio: 2 h.
BACKENDS = ("auto", "torch", "onnxruntime")
AUTO_ORT_MIN_AUDIO_S = 7200.0

# Submodules that still run in fp32 under low-precision autocast, by (architecture family,
# precision). bf16 keeps 8 mantissa bits, and CAM++ rounds every op's output to it: on
# ../shared/audio, bf16 everywhere gives cosine 0.9944 to fp32 on the worst file, 0.9983 with the
# 2-D head in fp32, 0.9997 with the head, the first TDNN and the first dense block in fp32 (52 %
# of the FLOPs; the other 48 % run in bf16). fp16 (11 bits) needs none: >= 0.99997 everywhere.
# Families not listed have no real weights here to measure; they run wholly in low precision.
FP32_SUBMODULES: dict[tuple[str, str], tuple[str, ...]] = {
    ("campplus", "bf16"): ("head", "xvector.tdnn", "xvector.block1"),
}

# Whole-recording embedding is exact up to this length; longer ones are embedded in windows.
DEFAULT_MAX_FULL_SECONDS = 300.0
DEFAULT_CHUNK_SECONDS = 10.0

# Padded-frame budget of a batch. On a CPU, batches of ~1-2.5k frames run fastest (CAM++ on 2
# cores: 7-7.8k frames/s at 1.2-2.4k, 4.7-5.3k at 9.6k, where activations outgrow the caches).
DEFAULT_BATCH_FRAMES = {"cuda": 200_000, "cpu": 2_400}
# Most rows of a batch when ``--batch-size`` is 0 (the default). A CAM++ forward is ~1,670
# kernel launches whatever the batch, so a GPU needs hundreds of 3-10 s clips per batch to be
# busy; on a CPU 32 rows of ~2.4k frames run fastest.
DEFAULT_BATCH_ROWS = {"cuda": 1024, "cpu": 32}

# Peak GPU memory (GiB) of a fp32 forward per 200k padded frames, measured per architecture
# family (the review). Used to size the default GPU budget from the free memory.
GPU_PEAK_GIB_PER_200K: dict[str, float] = {
    "campplus": 8.0,
    "ecapa": 28.0,
    "eres2net_vox": 25.0,
    "eres2net_base": 25.0,
    "eres2net_large": 42.0,
    "eres2net_huge": 79.0,
    "eres2netv2_w24s4ep4": 77.0,
    "eres2netv2": 46.0,
}
# Share of the free GPU memory a batch may plan to use (the rest: allocator slack, the model,
# the next batch's upload).
GPU_MEMORY_SHARE = 0.6
GPU_MAX_BATCH_FRAMES = 1_000_000


def gpu_peak_gib(arch: str) -> float:
    """Measured fp32 peak (GiB per 200k frames) of ``arch``'s family; the largest if unknown."""
    for prefix, gib in GPU_PEAK_GIB_PER_200K.items():
        if arch.startswith(prefix):
            return gib
    return max(GPU_PEAK_GIB_PER_200K.values())


def gpu_batch_frames(arch: str, free_bytes: int | None) -> int:
    """Padded-frame budget of one GPU batch of ``arch`` with ``free_bytes`` free on the device.

    ``GPU_MEMORY_SHARE`` of the free memory over the measured peak per frame, at most
    ``GPU_MAX_BATCH_FRAMES``, at least 2,000; without a figure, ``DEFAULT_BATCH_FRAMES``.
    On an 80 GB card (~79 GiB free): CAM++ 1.0M, ECAPA 339k, ERes2Net-huge 120k frames.
    """
    if not free_bytes:
        return DEFAULT_BATCH_FRAMES["cuda"]
    per_frame = gpu_peak_gib(arch) * 2**30 / 200_000
    frames = int(GPU_MEMORY_SHARE * free_bytes / per_frame)
    return max(2_000, min(GPU_MAX_BATCH_FRAMES, frames))


def fp32_submodules(arch: str, precision: str) -> tuple[str, ...]:
    """The :data:`FP32_SUBMODULES` names of ``arch`` at ``precision`` (empty for most)."""
    for (family, prec), names in FP32_SUBMODULES.items():
        if arch.startswith(family) and prec == precision:
            return names
    return ()


def choose_backend(
    cfg: EngineConfig,
    device_type: str,
    ort_installed: bool,
    graph_cached: bool,
    audio_seconds: float,
) -> tuple[str, str]:
    """``(backend, why)`` for ``cfg.backend`` on ``device_type`` (see :data:`BACKENDS`).

    ``auto``: ONNX Runtime where it is the faster one, i.e. on a CPU at fp32 (CAM++ on 2 cores,
    single-thread runners: measured in benchmark.py's (c) against (b)), once its graph is
    cached or when the run is long enough to pay for exporting it; torch everywhere else (GPUs,
    bf16/fp16, short runs, no onnxruntime).
    """
    if cfg.backend == "torch":
        return "torch", "--backend torch"
    if cfg.backend == "onnxruntime":
        if device_type != "cpu":
            raise UsageError(f"--backend onnxruntime runs on the CPU, not on {device_type} "
                             "(use --device cpu, or --backend torch)")  # fmt: skip
        if not ort_installed:
            raise UsageError("--backend onnxruntime needs onnxruntime: "
                             "pip install 'speaker-sim[onnx]'")  # fmt: skip
        return "onnxruntime", "--backend onnxruntime"
    if device_type != "cpu":
        return "torch", f"auto: {device_type} runs torch"
    if cfg.precision != "fp32":
        return "torch", f"auto: {cfg.precision} runs in torch"
    if not ort_installed:
        return "torch", "auto: onnxruntime is not installed"
    if graph_cached:
        return "onnxruntime", "auto: CPU fp32 and the ONNX graph is cached"
    if audio_seconds >= AUTO_ORT_MIN_AUDIO_S:
        return "onnxruntime", (f"auto: CPU fp32, {audio_seconds / 60:.0f} min of audio pays for "
                               "the one-time ONNX export")  # fmt: skip
    return "torch", (f"auto: {audio_seconds / 60:.1f} min of audio is too little to pay for the "
                     f"one-time ONNX export (>= {AUTO_ORT_MIN_AUDIO_S / 60:.0f} min)")  # fmt: skip


_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def check_device_syntax(device: str) -> None:
    """``auto``, ``cpu``, ``cuda``, ``cuda:N`` or a comma-separated list of them; checked before
    any work (and without torch), so a typo fails at once, even on a fully cached run."""
    items = [d.strip() for d in device.split(",")]
    bad = next((d for d in items if not _DEVICE.fullmatch(d)), None)
    if bad is not None:
        raise UsageError(f"--device {device}: {bad!r} is not a device (use auto, cpu, cuda or "
                         "cuda:N, or a list such as cuda:0,cuda:1)")  # fmt: skip
    if len(items) > 1 and "auto" in items:
        raise UsageError(f"--device {device}: auto cannot be part of a list")
    # Two shards on one GPU would share its memory and its launches for no gain ("cuda" is
    # cuda:0 here: shards are separate processes, whose current device starts at 0).
    gpus = ["cuda:0" if d == "cuda" else d for d in items if d.startswith("cuda")]
    dup = next((d for i, d in enumerate(gpus) if d in gpus[:i]), None)
    if dup is not None:
        raise UsageError(f"--device {device}: {dup} is named twice; list each GPU once "
                         "(cuda:0,cuda:1)")  # fmt: skip


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, else ``os.cpu_count()``)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def default_workers(shards: int = 1) -> int:
    """Decode worker processes per device: the cores but one (which feeds the device), split
    across ``shards`` devices. Decoding 44.1/48 kHz sources runs ~900-1,200x realtime per
    core, so the workers, not the GPU, bound a run unless they follow the cores."""
    return max(0, (usable_cores() - 1) // max(1, shards))


@dataclass(frozen=True)
class EngineConfig:
    """How to run the model. ``mode()`` and ``precision`` are part of the cache key."""

    device: str = "auto"
    precision: str = "fp32"
    batch_size: int = 0  # 0: DEFAULT_BATCH_ROWS for the device
    batch_frames: int = 0  # 0: a default for the device
    workers: int = -1  # -1: default_workers(), or 0 when CPU runners run side by side
    chunk_seconds: float | None = None
    max_full_seconds: float = DEFAULT_MAX_FULL_SECONDS
    min_duration: float = 0.3
    max_duration: float = 0.0  # 0: no limit
    runners: int = 0  # CPU: batches run at once, one thread each; 0: cpu_runners()
    # What runs the model: torch, onnxruntime (an exported graph, cached), or auto (BACKENDS).
    backend: str = "auto"

    def __post_init__(self) -> None:
        if self.precision not in PRECISION_NAMES:
            raise ValueError(f"precision must be one of {', '.join(PRECISION_NAMES)}")
        if self.backend not in BACKENDS:
            raise UsageError(f"--backend {self.backend}: use one of {', '.join(BACKENDS)}")
        if self.backend == "onnxruntime" and self.precision != "fp32":
            raise UsageError("--backend onnxruntime runs fp32 only: drop --precision "
                             f"{self.precision} or use --backend torch")  # fmt: skip
        check_device_syntax(self.device)

    def mode(self) -> str:
        if self.chunk_seconds:
            return f"chunk{self.chunk_seconds:g}s"
        return f"full<= {self.max_full_seconds:g}s else chunk{DEFAULT_CHUNK_SECONDS:g}s"


@dataclass
class EngineStats:
    recordings: int = 0
    failed: int = 0
    chunked: int = 0
    audio_seconds: float = 0.0
    frames: int = 0
    padded_frames: int = 0
    batches: int = 0
    model_seconds: float = 0.0
    wall_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
