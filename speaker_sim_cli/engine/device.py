"""Where and how much the engine runs: device resolution, CPU runner count, out-of-memory
detection and freeing, shared-memory sizing of decode workers, engine error text."""

from __future__ import annotations

import gc
import os

import torch

from ..errors import UsageError


def resolve_device(device: str) -> torch.device:
    """``auto`` -> first CUDA device when there is one, else CPU. A CUDA device that is not
    there is a usage error that says why (a CPU-only torch build, or no such GPU)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UsageError(
            f"--device {device}: not a device (use auto, cpu, cuda or cuda:N)"
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = (
                "this torch is a CPU-only build"
                if torch.version.cuda is None
                else "no GPU is visible (check CUDA_VISIBLE_DEVICES and the driver)"
            )
            raise UsageError(f"--device {device}: CUDA is not available: {why} "
                             f"(torch {torch.__version__}); use --device cpu or auto")  # fmt: skip
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise UsageError(f"--device {device}: this machine has {n} GPU(s), cuda:0 to "
                             f"cuda:{n - 1}")  # fmt: skip
    return dev


def cpu_runners() -> int:
    """Batches a CPU embeds at once: one per intra-op thread, at most 4.

    Several single-threaded forwards side by side beat one forward on every core for these
    small convolutions (CAM++ on 2 cores: 7.7k frames/s as 2 x 1 thread, 5.1k as 1 x 2).
    """
    return max(1, min(4, torch.get_num_threads()))


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocator's out-of-memory error (CUDA, MPS or the CPU's)."""
    oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    if isinstance(exc, oom):
        return True
    msg = str(exc)
    return isinstance(exc, RuntimeError) and (
        "out of memory" in msg or "can't allocate memory" in msg  # MPS, DefaultCPUAllocator
    )


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()


def engine_error(device: torch.device, exc: BaseException) -> str:
    return f"engine error on {device}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"


def free_bytes(device: torch.device) -> int | None:
    try:
        return int(torch.cuda.mem_get_info(device)[0])
    except Exception:
        return None


def shm_plan(
    workers: int, prefetch: int, batch_bytes: int, shm: str = "/dev/shm"
) -> tuple[int, int, str]:
    """Workers and prefetch depth whose batches fit in half of ``/dev/shm`` (where worker
    processes hand tensors over; Docker's 64 MB default would end in a bus error).

    Returns ``(workers, prefetch, note)``: fewer batches in flight when they do not fit, and
    decoding in the main process (note says why and how to fix it) when not even one batch
    per worker fits.
    """
    if workers <= 0:
        return workers, prefetch, ""
    try:
        st = os.statvfs(shm)
    except (OSError, AttributeError):  # no /dev/shm (macOS, Windows): nothing to size
        return workers, prefetch, ""
    free = st.f_bavail * st.f_frsize
    room = free // 2
    if workers * prefetch * batch_bytes <= room:
        return workers, prefetch, ""
    fit = room // max(1, workers * batch_bytes)
    if fit >= 1:
        return workers, int(min(prefetch, fit)), ""
    return (
        0,
        prefetch,
        (
            f"{shm} has {free / 2**20:.0f} MB free, too little for {workers} decode worker(s) "
            f"handing over batches of {batch_bytes / 2**20:.0f} MB: decoding in the main process "
            "instead (slower). Give the container more shared memory (docker run --shm-size=8g or "
            "--ipc=host) or lower --batch-frames."
        ),
    )


def worker_init(_: int) -> None:
    torch.set_num_threads(1)
