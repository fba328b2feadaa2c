"""``speaker-sim cache info|clear|verify|migrate|prune|compact``: what the embedding store holds,
checking it, moving legacy per-file caches into it, and trimming or emptying it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from . import common as c
from .ui import STATE, errors_to_exit, say, warn

cache_app = typer.Typer(
    name="cache",
    help="Inspect, verify, migrate, prune or clear the embedding store (shards of vectors "
    "per extraction setting, with a key index).",
    no_args_is_help=True,
)


def register(app: typer.Typer) -> None:
    """Add this module's command(s) to the app."""
    app.add_typer(cache_app, name="cache")


def _root(cache_dir: Path | None) -> Path:
    from ..io.storage import as_url, is_url
    from ..paths import default_cache_dir

    if cache_dir is not None and is_url(cache_dir):
        return as_url(cache_dir)  # type: ignore[return-value]
    return cache_dir.expanduser() if cache_dir is not None else default_cache_dir()


def _exists(root: Path) -> bool:
    from ..io.storage import is_url

    return is_url(root) or root.is_dir()


@cache_app.command("info")
def info(
    cache_dir: c.CacheDirOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON on stdout.")] = False,
) -> None:
    """Entries, size and models in the cache, one row per extraction setting."""
    with errors_to_exit():
        from ..engine.cache import cache_info

        root = _root(cache_dir)
        rows = cache_info(root) if _exists(root) else []
        doc: dict[str, Any] = {
            "cache_dir": str(root),
            "entries": sum(r["entries"] for r in rows),
            "bytes": sum(r["bytes"] for r in rows),
            "shards": sum(r["shards"] for r in rows),
            "legacy_files": sum(r["legacy_files"] for r in rows),
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
            f"{doc['shards']} shards, {len(doc['models'])} model(s)"
        )
        t.add_column("model", overflow="fold")
        t.add_column("precision")
        t.add_column("mode", overflow="fold")
        t.add_column("entries", justify="right")
        t.add_column("size", justify="right")
        t.add_column("shards", justify="right")
        for r in rows:
            t.add_row(_alias(r["model"]), r["precision"], r["mode"], str(r["entries"]),
                      _size(r["bytes"]), str(r["shards"]))  # fmt: skip
        Console(soft_wrap=False).print(t)
        if doc["legacy_files"]:
            say(f"{doc['legacy_files']} embeddings are still one .npy file each: "
                "'speaker-sim cache migrate' moves them into shards")  # fmt: skip


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
                known = {r["model"] for r in cache_info(root)} if _exists(root) else set()
                if model not in known:
                    raise
                model_id = model
        removed = cache_clear(root, model_id) if _exists(root) else 0
        what = f" of {model_id}" if model_id else ""
        say(f"removed {removed} cached embedding(s){what} from {root}")


@cache_app.command("verify")
def verify(
    cache_dir: c.CacheDirOpt = None,
    remove: Annotated[
        bool,
        typer.Option(help="Delete the bad shards (the next run recomputes their entries)."),
    ] = False,
    quiet: c.QuietOpt = False,
) -> None:
    """Check every row of every shard (key and CRC); name each bad shard. Exit 1 when one is
    bad (the store itself never returns its bad rows: they are recomputed)."""
    STATE["quiet"] = quiet
    with errors_to_exit():
        from ..engine.store_admin import remove_shards
        from ..engine.store_admin import verify as check

        root = _root(cache_dir)
        checked, problems = check(root) if _exists(root) else (0, [])
        for p in problems:
            warn(f"bad shard {p['shard']}: {p['problem']}")
        if remove:
            remove_shards(p["shard"] for p in problems if p["shard"].endswith(".arrow"))
        say(f"{checked} shard(s) checked in {root}: {len(problems)} bad"
            + (" (removed)" if remove and problems else ""))  # fmt: skip
        if problems:
            raise typer.Exit(1)


@cache_app.command("migrate")
def migrate(cache_dir: c.CacheDirOpt = None, quiet: c.QuietOpt = False) -> None:
    """Move the per-recording .npy files of older versions into shards (each file is removed
    once its vector is committed in a shard)."""
    STATE["quiet"] = quiet
    with errors_to_exit():
        from ..engine.store_admin import migrate as move

        root = _root(cache_dir)
        got = move(root) if _exists(root) else {"moved": 0, "bad": 0}
        bad = f"; {got['bad']} unreadable file(s) left in place" if got["bad"] else ""
        say(f"moved {got['moved']} embedding(s) into shards in {root}{bad}")


@cache_app.command("compact")
def compact(cache_dir: c.CacheDirOpt = None, quiet: c.QuietOpt = False) -> None:
    """Merge small shards (runs commit one every 10 s) into full ones. Run it while nothing
    else uses the cache."""
    STATE["quiet"] = quiet
    with errors_to_exit():
        from ..engine.store_admin import compact as merge

        root = _root(cache_dir)
        got = merge(root) if _exists(root) else {"merged": 0, "written": 0, "entries": 0}
        say(f"merged {got['merged']} small shard(s) into {got['written']} "
            f"({got['entries']} entries) in {root}")  # fmt: skip


@cache_app.command("prune")
def prune(
    keep_list: Annotated[
        list[Path],
        typer.Option(
            "--keep-list",
            help="Trial list (any format score reads) or list of recordings whose embeddings "
            "are kept; repeatable. Everything else is removed.",
        ),
    ],
    root_dir: Annotated[
        Path | None,
        typer.Option("--root", help="Folder relative paths resolve against (as in score)."),
    ] = None,
    wav_scp: Annotated[Path | None, typer.Option(help="Kaldi wav.scp of the lists' ids.")] = None,
    cache_dir: c.CacheDirOpt = None,
    quiet: c.QuietOpt = False,
) -> None:
    """Keep only the embeddings the given lists need (by content hash, every model)."""
    STATE["quiet"] = quiet
    with errors_to_exit():
        from ..engine.cache import EmbeddingCache
        from ..engine.store_admin import prune as trim
        from ..errors import UsageError
        from ..io.trials import (
            read_inputs,
            read_trials,
            read_wav_scp,
            resolve_trial_items,
            source_folder,
        )

        root = _root(cache_dir)
        paths: list[str] = []
        for lst in keep_list:
            try:
                tl = read_trials(lst)
            except UsageError:
                paths += [str(r.path) for r in read_inputs([str(lst)])]
                continue
            scp = read_wav_scp(wav_scp) if wav_scp else None
            scp_dir = source_folder(str(wav_scp)) if wav_scp else None
            recs, _ = resolve_trial_items(tl, root_dir, scp, scp_dir)  # type: ignore[arg-type]
            paths += [str(r.path) for r in recs.values()]
        paths = list(dict.fromkeys(paths))
        hasher = EmbeddingCache.hasher(root)
        hashes = hasher.file_hashes(paths)
        keep = {h for h in hashes if isinstance(h, str)}
        unread = len(paths) - len(keep)
        if unread:
            warn(f"{unread} recording(s) of the lists could not be read; their embeddings, "
                 "if any, are removed")  # fmt: skip
        got = trim(root, keep) if _exists(root) else {"kept": 0, "removed": 0}
        say(f"kept {got['kept']} embedding(s), removed {got['removed']} from {root}")


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
