"""``speaker-sim cache info|clear``: what the embedding cache holds, and emptying it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from . import common as c
from .ui import STATE, errors_to_exit, say

cache_app = typer.Typer(
    name="cache",
    help="Inspect or clear the embedding cache (one .npy per recording and setting).",
    no_args_is_help=True,
)


def register(app: typer.Typer) -> None:
    """Add this module's command(s) to the app."""
    app.add_typer(cache_app, name="cache")


def _root(cache_dir: Path | None) -> Path:
    from ..paths import default_cache_dir

    return cache_dir.expanduser() if cache_dir is not None else default_cache_dir()


@cache_app.command("info")
def info(
    cache_dir: c.CacheDirOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON on stdout.")] = False,
) -> None:
    """Entries, size and models in the cache, one row per extraction setting."""
    with errors_to_exit():
        from ..engine.cache import cache_info

        root = _root(cache_dir)
        rows = cache_info(root) if root.is_dir() else []
        doc: dict[str, Any] = {
            "cache_dir": str(root),
            "entries": sum(r["entries"] for r in rows),
            "bytes": sum(r["bytes"] for r in rows),
            "models": sorted({r["model"] for r in rows}),
            "settings": rows,
        }
        if as_json:
            typer.echo(json.dumps(doc, indent=2))
            return
        from rich.console import Console
        from rich.table import Table

        t = Table(
            title=f"{root}: {doc['entries']} entries, {_size(doc['bytes'])}, "
            f"{len(doc['models'])} model(s)"
        )
        t.add_column("model", overflow="fold")
        t.add_column("precision")
        t.add_column("mode", overflow="fold")
        t.add_column("entries", justify="right")
        t.add_column("size", justify="right")
        for r in rows:
            t.add_row(_alias(r["model"]), r["precision"], r["mode"], str(r["entries"]),
                      _size(r["bytes"]))  # fmt: skip
        Console(soft_wrap=False).print(t)


@cache_app.command("clear")
def clear(
    model: Annotated[
        str | None,
        typer.Option(
            "--model", "-m", help="Only this model's embeddings (ModelScope id or alias)."
        ),
    ] = None,
    cache_dir: c.CacheDirOpt = None,
    quiet: c.QuietOpt = False,
) -> None:
    """Remove cached embeddings: all of them, or only those of ``--model``."""
    STATE["quiet"] = quiet
    with errors_to_exit():
        from ..engine.cache import cache_clear, cache_info
        from ..errors import UsageError
        from ..models.registry import get_model

        root = _root(cache_dir)
        model_id = None
        if model is not None:
            try:
                model_id = get_model(model).id
            except UsageError:
                # A setting left by a model this version no longer lists can still be named.
                known = {r["model"] for r in cache_info(root)} if root.is_dir() else set()
                if model not in known:
                    raise
                model_id = model
        removed = cache_clear(root, model_id) if root.is_dir() else 0
        what = f" of {model_id}" if model_id else ""
        say(f"removed {removed} cached embedding(s){what} from {root}")


def _size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _alias(model_id: str) -> str:
    """The short alias of a registry id (ids from elsewhere are shown as they are)."""
    from ..errors import UsageError
    from ..models.registry import get_model

    try:
        return get_model(model_id).alias
    except UsageError:
        return model_id
