"""ONNX Runtime as an engine backend: a callable with the models' signature.

``OnnxModel(path)(feats, n_frames) -> (B, D)`` float32 tensor, so the :class:`Embedder` runs it
exactly as it runs a torch module (the front end stays in torch, outside the graph). One
session serves every CPU runner: each ``run`` is single-threaded (``intra_op_num_threads=1``)
and releases the GIL, so the runners' batches execute side by side, the shape that also suits
torch on a CPU (engine/embedder.py ``cpu_runners``).

ONNX Runtime has its own batch budget, :data:`ORT_BATCH_FRAMES` (measured, not borrowed from
torch's).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import UsageError

__all__ = ["ORT_BATCH_FRAMES", "OnnxModel", "available"]

# Padded-frame budget of one ONNX Runtime batch on a CPU. CAM++, one thread, frames per CPU
# second (torch eager in brackets), measured interleaved on the shared 2-core machine (load
# 14-27): 300 frames 2.8k (1.4k), 1.2k 2.9k (1.8k), 2.4k 3.3-3.5k (2.2-2.6k), 4.8k 3.0k (1.7k).
# ONNX Runtime is 1.3-1.9x torch at every size and, like torch, peaks near 2.4k frames.
ORT_BATCH_FRAMES = 2_400


def available() -> bool:
    """Whether onnxruntime can be imported."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def _ort() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise UsageError(
            "--backend onnxruntime needs onnxruntime: pip install 'speaker-sim[onnx]'"
        ) from None
    return onnxruntime


class OnnxModel:
    """An exported model (:mod:`engine.export`) in an ONNX Runtime CPU session.

    ``threads``: intra-op threads of each run (1: the engine runs several side by side);
    ``min_frames``: the source module's shortest row.
    """

    #: The engine's default padded-frame budget for this backend.
    batch_frames = ORT_BATCH_FRAMES

    def __init__(self, path: str | Path, threads: int = 1, min_frames: int = 0) -> None:
        #: Shortest row (feature frames) the exported network takes, as the torch module it
        #: came from states it; the engine fails shorter rows one by one.
        self.min_frames = min_frames
        ort = _ort()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        names = [i.name for i in self.session.get_inputs()]
        if names[:2] != ["feats", "n_frames"]:
            raise ValueError(f"{path}: inputs {names}, expected feats and n_frames")
        self.output = self.session.get_outputs()[0].name
        #: Seconds spent in ``session.run``, summed over the threads that called it.
        self.run_seconds = 0.0
        self._lock = threading.Lock()

    def __call__(self, feats: torch.Tensor, n_frames: torch.Tensor) -> torch.Tensor:
        """(B, T, ...) float features, (B,) frame counts -> (B, D) float32 embeddings."""
        x = np.ascontiguousarray(feats.detach().to("cpu", torch.float32).numpy())
        n = np.ascontiguousarray(n_frames.detach().to("cpu", torch.int64).numpy())
        t0 = time.perf_counter()
        (emb,) = self.session.run([self.output], {"feats": x, "n_frames": n})
        with self._lock:
            self.run_seconds += time.perf_counter() - t0
        return torch.from_numpy(emb)

    def __repr__(self) -> str:
        return f"OnnxModel({str(self.path)!r})"
