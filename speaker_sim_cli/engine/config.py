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


def fp32_submodules(arch: str, precision: str) -> tuple[str, ...]:
    """The :data:`FP32_SUBMODULES` names of ``arch`` at ``precision`` (empty for most)."""
    for (family, prec), names in FP32_SUBMODULES.items():
        if arch.startswith(family) and prec == precision:
            return names
    return ()


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


def default_workers() -> int:
    n = os.cpu_count() or 1
    return max(0, min(8, n - 1))


@dataclass(frozen=True)
class EngineConfig:
    """How to run the model. ``mode()`` and ``precision`` are part of the cache key."""

    device: str = "auto"
    precision: str = "fp32"
    batch_size: int = 32
    batch_frames: int = 0  # 0: a default for the device
    workers: int = -1  # -1: default_workers(), or 0 when CPU runners run side by side
    chunk_seconds: float | None = None
    max_full_seconds: float = DEFAULT_MAX_FULL_SECONDS
    min_duration: float = 0.3
    max_duration: float = 0.0  # 0: no limit
    runners: int = 0  # CPU: batches run at once, one thread each; 0: cpu_runners()

    def __post_init__(self) -> None:
        if self.precision not in PRECISION_NAMES:
            raise ValueError(f"precision must be one of {', '.join(PRECISION_NAMES)}")
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
