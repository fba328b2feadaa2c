"""``speaker-sim models``: the zoo and where each checkpoint was found."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from . import common as c


def models(
    model_dir: c.ModelDirOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON on stdout.")] = False,
) -> None:
    """List the models: id, alias, architecture, dimension, where the weights are."""
    from ..models.registry import DEFAULT_MODEL, MODELS
    from ..models.weights import find_checkpoint

    rows: list[dict[str, Any]] = []
    for m in MODELS:
        found = find_checkpoint(m, model_dir)
        rows.append({
            "id": m.id, "alias": m.alias, "arch": m.arch, "dim": m.dim, "revision": m.revision,
            "checkpoint": m.checkpoint, "trained_on": m.trained_on, "threshold": m.threshold,
            "weights": str(found.path) if found else "missing",
            "default": m.id == DEFAULT_MODEL,
        })  # fmt: skip
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    t = Table(title="speaker-sim model zoo (16 kHz, 80-bin fbank, cosine)")
    for col in ("id", "alias", "arch", "dim", "weights"):
        t.add_column(col, overflow="fold")
    for r in rows:
        w = r["weights"]
        shown = "[red]missing[/red]" if w == "missing" else _short(w)
        t.add_row(r["id"] + (" *" if r["default"] else ""), r["alias"], r["arch"], str(r["dim"]),
                  shown)  # fmt: skip
    Console(soft_wrap=False).print(t)
    Console(soft_wrap=False).print(_families())


def _families() -> Table:
    """Families whose model is your own checkpoint (no zoo row): how to point at one."""
    from importlib import import_module

    from ..models.registry import FAMILIES

    t = Table(title="model families from your own checkpoints (--model KEY --model-dir DIR)")
    for col in ("model", "what", "usage"):
        t.add_column(col, overflow="fold")
    for key, builder in FAMILIES.items():
        module = import_module(builder.partition(":")[0])
        t.add_row(key, getattr(module, "FAMILY_WHAT", ""), getattr(module, "FAMILY_USAGE", ""))
    return t


def _short(path: str) -> str:
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return path
