"""``speaker-sim export``: a model as an ONNX or TorchScript file, with a sidecar JSON."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from . import common as c
from .ui import STATE, errors_to_exit, say


class ExportFormat(str, Enum):
    onnx = "onnx"
    torchscript = "torchscript"


def register(app: typer.Typer) -> None:
    """Add this module's command(s) to the app."""
    app.command("export")(export)


def export(
    out: Annotated[
        Path, typer.Option("--out", "-o", help="The exported file (FILE.json is written beside).")
    ],
    fmt: Annotated[ExportFormat, typer.Option("--format", help="onnx or torchscript.")] = (
        ExportFormat.onnx
    ),
    model: c.ModelOpt = c.DEFAULT,
    model_dir: c.ModelDirOpt = None,
    model_config: c.ModelConfigOpt = None,
    quiet: c.QuietOpt = False,
) -> None:
    """Export the model's network (front end left out) with dynamic batch and time axes.

    Inputs: [bold]feats[/bold] (batch, frames, ...) float32, the model's front-end features
    zero-padded past each row's valid frames (3D-Speaker models: 80-bin Kaldi fbank of 16 kHz
    audio, 25/10 ms, minus the per-utterance mean), and [bold]n_frames[/bold] (batch,) int64.
    Output: [bold]embedding[/bold] (batch, dim) float32; score by cosine. Each row's embedding is
    the one it gets alone, so batches of unequal lengths are exact. The sidecar FILE.json holds
    the model id, checkpoint sha256, front end, input/output names and shapes, opset and the
    export check (the file run on another batch shape against the eager model).
    """
    STATE["quiet"] = quiet
    with errors_to_exit():
        from ..engine.export import export_model
        from ..models.registry import resolve_model
        from ..models.weights import checkpoint_hash, resolve_checkpoint

        spec = resolve_model(model, model_dir, model_config)
        found = resolve_checkpoint(spec, model_dir)
        say(f"exporting {spec.id} ({spec.arch}) from {found.path} as {fmt.value}")
        res = export_model(
            spec, fmt.value, out, checkpoint=found.path,
            checkpoint_sha256=checkpoint_hash(found.path),
        )  # fmt: skip
        chk = res.meta["check"]
        say(
            f"wrote {res.path} and {res.sidecar.name} in {res.seconds:.1f} s; check on "
            f"{chk['rows']} rows of {chk['n_frames']} frames: relative L2 "
            f"{chk['max_rel_l2']:.1e} (<= {chk['tolerance']:g})"
        )
