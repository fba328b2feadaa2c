"""Export a registry model to ONNX or TorchScript, with a sidecar JSON a deployer can read.

The exported graph is the model's ``forward`` alone; the front end stays outside:

* inputs ``feats`` (batch, frames, *feature dims) float32: what the model's front end
  (``spec.frontend``, written into the sidecar) computes from the waveform, zero-padded past each
  row's valid frames (for the 3D-Speaker models: 80-bin Kaldi fbank of 16 kHz audio, 25 ms
  windows every 10 ms, Povey window, no dither, minus the per-utterance mean over valid frames),
  and ``n_frames`` (batch,) int64, each row's valid frames;
* output ``embedding`` (batch, dim) float32, unnormalised; each row is the embedding the row
  gets alone (the models mask padding), so batches of unequal lengths are exact.

Batch and time are dynamic axes. Both formats come from one ``torch.jit.trace`` of the eager
model on a real feature batch of two unequal rows: TorchScript saves the trace, ONNX goes
through ``torch.onnx.export(dynamo=False)`` (the trace-based exporter: on this 2-core machine it
exports CAM++ about 8x faster than the ``torch.export`` one and gives the same graph numerics).
Every export is checked before it is kept: the file is loaded back and run on a batch of three
rows whose lengths differ from the trace's, and must give the eager embeddings within relative
L2 1e-4 per row; a model whose shapes do not trace (a Python branch on a size, a host read)
fails there with the error, not later in a deployment.

>>> from speaker_sim_cli.models.registry import get_model  # doctest: +SKIP
>>> export_model(get_model("campplus-zh-en"), "onnx", "cam.onnx")  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import io
import json
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import UsageError
from ..models.registry import ModelSpec

__all__ = [
    "EXPORTER",
    "FORMATS",
    "INPUT_NAMES",
    "OPSET",
    "OUTPUT_NAMES",
    "ExportError",
    "ExportResult",
    "cached_export",
    "check_export",
    "example_batch",
    "export_model",
    "export_path",
    "load_exported",
]

FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}
OPSET = 17
EXPORTER = "torch.jit.trace"  # + torch.onnx.export(dynamo=False) for ONNX
INPUT_NAMES = ("feats", "n_frames")
OUTPUT_NAMES = ("embedding",)
CHECK_TOL = 1e-4  # relative L2 per row, exported vs eager, at export time
# Seconds of audio in the trace batch and in the (differently shaped) check batch.
TRACE_SECONDS = (2.13, 1.37)
CHECK_SECONDS = (3.01, 0.83, 1.9)


class ExportError(RuntimeError):
    """The model could not be exported, or its export does not reproduce the eager model."""


@dataclass(frozen=True)
class ExportResult:
    path: Path
    sidecar: Path
    meta: dict[str, Any]
    seconds: float


def example_batch(
    spec: ModelSpec, seconds: tuple[float, ...] = TRACE_SECONDS, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """A real feature batch for ``spec``: noise of the given durations through its front end.

    Returns ``feats`` (B, T, ...) float32 zero-padded and ``n_frames`` (B,) int64: exactly what
    the engine feeds the model, whatever the family's front end.
    """
    from ..audio.features import compute_features

    sr = spec.frontend.sample_rate
    n = [int(s * sr) for s in seconds]
    gen = torch.Generator().manual_seed(seed)
    waves = torch.zeros(len(n), max(n))
    for i, k in enumerate(n):
        waves[i, :k] = 0.1 * torch.randn(k, generator=gen)
    feats, frames = compute_features(waves, torch.tensor(n), spec.frontend)
    return feats.float().contiguous(), frames.to(torch.int64)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _dynamic_axes(feats: torch.Tensor) -> dict[str, dict[int, str]]:
    return {"feats": {0: "batch", 1: "frames"}, "n_frames": {0: "batch"}, "embedding": {0: "batch"}}


def _io_doc(spec: ModelSpec, feats: torch.Tensor) -> dict[str, Any]:
    feature_dims = list(feats.shape[2:])
    return {
        "inputs": [
            {"name": "feats", "dtype": "float32", "shape": ["batch", "frames", *feature_dims],
             "doc": "front-end features (see 'frontend'), zero past each row's n_frames"},
            {"name": "n_frames", "dtype": "int64", "shape": ["batch"],
             "doc": "valid frames of each row (1 <= n_frames <= frames)"},
        ],
        "outputs": [
            {"name": "embedding", "dtype": "float32", "shape": ["batch", spec.dim],
             "doc": "unnormalised speaker embedding; score pairs by cosine"},
        ],
    }  # fmt: skip


def frontend_doc(spec: ModelSpec) -> dict[str, Any]:
    """The front end the graph expects its ``feats`` from: the registry's settings and, in
    words, what they compute."""
    fe = spec.frontend
    out: dict[str, Any] = {"kind": fe.kind, **fe.to_dict()}
    if fe.kind == "fbank":
        out["description"] = (
            f"Kaldi fbank (torchaudio.compliance.kaldi.fbank semantics): "
            f"{getattr(fe, 'num_mel_bins', '?')} mel bins of {fe.sample_rate} Hz mono audio "
            f"(float in [-1, 1] x input_scale), {getattr(fe, 'frame_length_ms', '?')} ms "
            f"{getattr(fe, 'window', '?')} windows every {getattr(fe, 'frame_shift_ms', '?')} ms, "
            "snip edges, preemphasis and DC removal per frame, log of the power mel energies, no "
            "dither"
            + (", then minus each row's mean over its valid frames" if getattr(fe, "mean_norm",
                                                                               False) else "")
        )  # fmt: skip
    else:
        # The config class says what it computes; its settings are the fields above.
        summary = " ".join((inspect.getdoc(type(fe)) or "").split("\n\n")[0].split())
        out["description"] = summary.replace("``", "") or f"speaker_sim_cli front end '{fe.kind}'"
        if fe.kind == "waveform":
            norm = getattr(fe, "normalize", False)
            out["description"] += f" {fe.sample_rate} Hz mono samples" + (
                ", each row normalised to zero mean and unit variance over its valid samples"
                if norm else ""
            ) + "; n_frames counts samples"  # fmt: skip
    return out


@contextlib.contextmanager
def _quiet_tracing() -> Iterator[None]:
    """Tracer / exporter warnings (constant folding notes, deprecation) and the exporter's
    prints stay off the user's terminal; real failures still raise."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _trace(model: torch.nn.Module, feats: torch.Tensor, n: torch.Tensor) -> Any:
    with _quiet_tracing(), torch.no_grad():
        return torch.jit.trace(model, (feats, n), check_trace=False)


def export_model(
    spec: ModelSpec,
    fmt: str,
    out: str | Path,
    *,
    model: torch.nn.Module | None = None,
    checkpoint: Path | None = None,
    checkpoint_sha256: str | None = None,
    opset: int = OPSET,
    check: bool = True,
) -> ExportResult:
    """Export ``spec``'s model (``model`` with its weights loaded, or built and loaded from
    ``checkpoint``) as ``fmt`` ("onnx" or "torchscript") to ``out``, with ``out`` + ``.json``.

    Writes atomically (a temp file renamed into place). Raises :class:`ExportError` when the
    trace, the export or the check fails.
    """
    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt}: use one of {', '.join(FORMATS)}")
    out = Path(out)
    t0 = time.perf_counter()
    if model is None:
        if checkpoint is None:
            raise ValueError("export_model needs a model or a checkpoint")
        from ..models.weights import load_spec_checkpoint

        model = spec.build()
        load_spec_checkpoint(model, checkpoint, spec)
    model = model.float().eval()
    feats, n = example_batch(spec)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        try:
            traced = _trace(model, feats, n)
            if fmt == "torchscript":
                torch.jit.save(traced, str(tmp))
            else:
                _onnx_export(traced, feats, n, tmp, opset)
        except Exception as exc:
            raise ExportError(
                f"{spec.id}: {fmt} export failed: {type(exc).__name__}: {exc}"
            ) from exc
        check_doc = check_export(spec, model, tmp, fmt) if check else None
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    meta = {
        "model": spec.id,
        "arch": spec.arch,
        "embedding_dim": spec.dim,
        "checkpoint_sha256": checkpoint_sha256
        or (_sha256(checkpoint) if checkpoint is not None else None),
        "format": fmt,
        "file": out.name,
        "file_sha256": _sha256(out),
        "frontend": frontend_doc(spec),
        **_io_doc(spec, feats),
        "dynamic_axes": {"batch": "any", "frames": "any >= the model's shortest input"},
        "opset": opset if fmt == "onnx" else None,
        "exporter": EXPORTER + (" + torch.onnx.export(dynamo=False)" if fmt == "onnx" else ""),
        "torch": torch.__version__,
        "onnx": _version("onnx") if fmt == "onnx" else None,
        "speaker_sim": _version("speaker-sim"),
        "models_code_sha256": models_code_sha256(),
        "check": check_doc,
        "export_seconds": round(time.perf_counter() - t0, 2),
    }
    sidecar = out.with_name(out.name + ".json")
    from ..paths import atomic_write_bytes

    atomic_write_bytes(sidecar, (json.dumps(meta, indent=2) + "\n").encode())
    return ExportResult(out, sidecar, meta, time.perf_counter() - t0)


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _onnx_export(traced: Any, feats: torch.Tensor, n: torch.Tensor, dest: Path, opset: int) -> None:
    try:
        import onnx  # noqa: F401  (the exporter needs it)
    except ImportError:
        raise UsageError(
            "ONNX export needs the onnx package: pip install 'speaker-sim[onnx]'"
        ) from None
    with _quiet_tracing():
        torch.onnx.export(
            traced,
            (feats, n),
            str(dest),
            dynamo=False,
            input_names=list(INPUT_NAMES),
            output_names=list(OUTPUT_NAMES),
            dynamic_axes=_dynamic_axes(feats),
            opset_version=opset,
            do_constant_folding=True,
        )


def load_exported(path: str | Path, fmt: str, threads: int = 1) -> Callable[..., torch.Tensor]:
    """A callable ``(feats, n_frames) -> (B, D)`` tensor over an exported file."""
    if fmt == "torchscript":
        mod = torch.jit.load(str(path), map_location="cpu").eval()

        def run(feats: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
            # The profiling executor's first calls re-profile and re-optimise per shape (2x
            # eager on CAM++); the plain interpreter runs the traced graph at eager speed.
            with torch.no_grad(), torch.jit.optimized_execution(False):
                return mod(feats, n)

        return run
    from .onnx_backend import OnnxModel

    return OnnxModel(path, threads=threads)


def rel_l2_rows(got: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Per-row ``|got - ref| / |ref|`` in float64."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return np.linalg.norm(got - ref, axis=-1) / np.maximum(np.linalg.norm(ref, axis=-1), 1e-30)


def check_export(spec: ModelSpec, model: torch.nn.Module, path: Path, fmt: str) -> dict[str, Any]:
    """Run the exported file on a batch shaped unlike the trace (3 rows, other lengths) and
    compare with ``model``; raises :class:`ExportError` past :data:`CHECK_TOL`."""
    feats, n = example_batch(spec, CHECK_SECONDS, seed=1)
    with torch.no_grad():
        ref = model(feats, n).float().numpy()
    try:
        got = load_exported(path, fmt)(feats, n)
    except Exception as exc:
        raise ExportError(f"{spec.id}: the exported {fmt} file does not run: {exc}") from None
    err = rel_l2_rows(np.asarray(got), ref)
    doc = {
        "rows": len(n),
        "n_frames": [int(x) for x in n],
        "max_rel_l2": float(err.max()),
        "tolerance": CHECK_TOL,
    }
    if not np.isfinite(np.asarray(got)).all():
        raise ExportError(
            f"{spec.id}: the exported {fmt} graph gives non-finite embeddings on a batch of "
            f"{len(n)} rows of {doc['n_frames']} frames where the model gives finite ones (an op "
            "the exporter or runtime treats differently, e.g. a softmax over -inf)"
        )
    if float(err.max()) > CHECK_TOL:
        raise ExportError(
            f"{spec.id}: the exported {fmt} graph does not reproduce the model on a batch of "
            f"{len(n)} rows of {doc['n_frames']} frames (relative L2 up to {err.max():.3g} > "
            f"{CHECK_TOL:g}); a shape was probably fixed at trace time"
        )
    return doc


@functools.lru_cache(maxsize=1)
def models_code_sha256() -> str:
    """sha256 over the source of ``speaker_sim_cli/models`` (every network we export): a graph
    exported by an older version of a model's code is never reused."""
    root = Path(__file__).resolve().parents[1] / "models"
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def export_key(spec: ModelSpec, checkpoint_sha256: str, fmt: str, opset: int = OPSET) -> str:
    """Cache key of an exported graph: model, weights, front end, format, exporter, opset,
    torch version (a new torch may trace differently) and the models' source code."""
    doc = {
        "model": spec.id,
        "arch": spec.arch,
        "checkpoint_sha256": checkpoint_sha256,
        "frontend": spec.frontend.to_dict(),
        "format": fmt,
        "exporter": EXPORTER,
        "opset": opset if fmt == "onnx" else None,
        "torch": torch.__version__,
        "models_code": models_code_sha256(),
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:32]


def export_path(spec: ModelSpec, checkpoint_sha256: str, fmt: str, cache_root: Path) -> Path:
    """Where :func:`cached_export` keeps the graph under ``cache_root``."""
    key = export_key(spec, checkpoint_sha256, fmt)
    return Path(cache_root) / "exported" / f"{spec.arch}-{key}{FORMATS[fmt]}"


def cached_export(
    spec: ModelSpec,
    fmt: str,
    cache_root: Path,
    checkpoint_sha256: str,
    model: torch.nn.Module,
    log: Callable[[str], None] | None = None,
) -> Path:
    """The exported file for this model and weights under ``cache_root/exported/``, exported
    (and checked) once; later runs find it by :func:`export_key`."""
    path = export_path(spec, checkpoint_sha256, fmt, cache_root)
    if path.is_file() and path.with_name(path.name + ".json").is_file():
        return path
    if log is not None:
        log(f"exporting {spec.id} to {fmt} once (cached at {path})")
    export_model(spec, fmt, path, model=model, checkpoint_sha256=checkpoint_sha256)
    return path
