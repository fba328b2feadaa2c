"""``--config FILE.yaml`` on every command that takes options.

The file's keys are the command's option names (``batch_size`` or ``batch-size``; positional
arguments by their name, e.g. ``trials``), plus ``storage_options`` (a mapping, as the app's
``--storage-options``); its values become the command's defaults, so a flag
given on the command line always wins. An unknown key or a value of the wrong type is a usage
error (exit 2) naming the file, the key and what is allowed. A shipped preset can be named
instead of a path (``--config voxceleb1-o``; ``speaker-sim models --presets`` lists them).

The option is added to every command of the app by :class:`ConfigGroup`, so a new command gets
it without code of its own. The report a command writes records the file and the resolved
options (:func:`config_record`).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, cast

import typer
from typer.core import TyperGroup

from .ui import STATE

CONFIG_HELP = (
    "YAML file (or shipped preset name) of option values for this command; flags given on the "
    "command line override it."
)


def _key_names(p: Any) -> list[str]:
    """The keys a config may use for parameter ``p``: its long option names (``batch-size``,
    ``batch_size``), its Python name, and an argument's name."""
    names = {p.name}
    for opt in getattr(p, "opts", []):
        if opt.startswith("--"):
            names.add(opt[2:])
            names.add(opt[2:].replace("-", "_"))
    return sorted(names)


def _allowed(cmd: Any) -> dict[str, Any]:
    """Parameter by every key that may name it."""
    out: dict[str, Any] = {}
    for p in cmd.params:
        if p.name and p.name not in ("config", "help") and p.expose_value:
            for k in _key_names(p):
                out[k] = p
    return out


def _shown(cmd: Any) -> str:
    """The allowed keys as a user writes them (long option names, arguments by name)."""
    keys = []
    for p in cmd.params:
        if p.name and p.name not in ("config", "help") and p.expose_value:
            longs = [o[2:] for o in getattr(p, "opts", []) if o.startswith("--")]
            keys.append(longs[0] if longs else p.name)
    return ", ".join(sorted(keys))


def _check_value(ctx: Any, p: Any, key: str, value: Any, where: str) -> Any:
    """``value`` checked as the command line would convert it; BadParameter when it cannot."""
    desc = getattr(p, "type_descriptor", None)
    annotation = getattr(desc, "annotation", None)
    many = p.multiple or p.nargs == -1
    if isinstance(value, dict) or (isinstance(value, list) and not many):
        kind = "a mapping" if isinstance(value, dict) else "a list"
        raise typer.BadParameter(f"{where}: key {key!r} takes one value, not {kind}", ctx=ctx)
    items = value if isinstance(value, list) else [value]
    for item in items:
        if isinstance(item, dict | list):
            raise typer.BadParameter(
                f"{where}: key {key!r}: nested values are not allowed", ctx=ctx
            )
        if annotation is bool:
            if not isinstance(item, bool):
                raise typer.BadParameter(
                    f"{where}: key {key!r} takes true or false, not {item!r}", ctx=ctx
                )
            continue
        if isinstance(item, bool) or item is None:
            raise typer.BadParameter(f"{where}: key {key!r} takes a value, not {item!r}", ctx=ctx)
        try:
            p.get_runtime_param().coerce(item if not many else [item], param=p, ctx=ctx)
        except typer.BadParameter as exc:
            choices = getattr(desc, "choices", None)
            allowed = f" (one of: {', '.join(map(str, choices))})" if choices else ""
            raise typer.BadParameter(
                f"{where}: key {key!r}: {exc.message}{allowed}", ctx=ctx
            ) from None
    return items if many else value


def _load(ctx: typer.Context, param: typer.CallbackParam, value: str | None) -> str | None:
    # Eager, so this runs first for every invocation, with or without --config.
    STATE["ctx"] = ctx
    STATE.pop("config", None)
    if value is None or ctx.resilient_parsing:
        return value
    from ..errors import UsageError
    from ..io.config import read_config, resolve_config

    try:
        path = resolve_config(value)
        data = read_config(path)
    except UsageError as exc:
        raise typer.BadParameter(str(exc), ctx=ctx, param=cast(Any, param)) from None
    allowed = _allowed(ctx.command)
    defaults: dict[str, Any] = {}
    for key, val in data.items():
        if key.replace("-", "_") == "storage_options":  # the app-level --storage-options
            if not isinstance(val, dict):
                raise typer.BadParameter(
                    f"{path}: key {key!r} takes a mapping of filesystem options",
                    ctx=ctx,
                    param=cast(Any, param),
                )
            if not STATE.get("storage_options_flag"):  # the command line wins
                from ..io.storage import set_options

                set_options(val)
            continue
        p = allowed.get(key)
        if p is None:
            raise typer.BadParameter(
                f"{path}: unknown key {key!r} for `{ctx.command_path}`; allowed keys: "
                f"{_shown(ctx.command)}",
                ctx=ctx,
                param=cast(Any, param),
            )
        if p.name in defaults:
            raise typer.BadParameter(
                f"{path}: key {key!r} given twice", ctx=ctx, param=cast(Any, param)
            )
        defaults[p.name] = _check_value(ctx, p, key, val, str(path))
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    STATE["config"] = {"file": str(path.resolve()), "values": defaults}
    return value


@lru_cache(maxsize=1)
def _template() -> Any:
    """The ``--config`` parameter as Typer builds it (from a one-option command)."""
    tiny = typer.Typer()

    @tiny.command()
    def _cmd(
        config: Annotated[
            str | None,
            typer.Option(
                "--config",
                metavar="FILE.yaml",
                help=CONFIG_HELP,
                is_eager=True,
                expose_value=False,
                callback=_load,
            ),
        ] = None,
    ) -> None:  # never run
        return None

    cmd = typer.main.get_command(tiny)
    return next(p for p in cmd.params if p.name == "config")


def add_config_option(cmd: Any) -> None:
    """Give ``cmd`` (and, for a group, each of its commands) a ``--config`` option."""
    subs = getattr(cmd, "commands", None)
    if isinstance(subs, dict):
        for sub in subs.values():
            add_config_option(sub)
        return
    if not _allowed(cmd) or any(p.name == "config" for p in cmd.params):
        return
    cmd.params.append(_template())


class ConfigGroup(TyperGroup):
    """The app's group: every command it holds gets ``--config``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for cmd in self.commands.values():
            add_config_option(cmd)
        STATE.pop("config", None)
        STATE.pop("ctx", None)


def _plain(v: Any) -> Any:
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, list | tuple):
        return [_plain(x) for x in v]
    if hasattr(v, "value") and not isinstance(v, int | float | str | bool):
        return v.value  # Enum
    if isinstance(v, int | float | str | bool) or v is None:
        return v
    return str(v)


def config_record() -> dict[str, Any] | None:
    """For a report: the config file used (or None) and the command's resolved options (after
    the file and the command line). None outside a command."""
    ctx = STATE.get("ctx")
    if ctx is None:
        return None
    cfg = STATE.get("config")
    return {
        "file": cfg["file"] if cfg else None,
        "from_file": sorted(cfg["values"]) if cfg else [],
        "options": {k: _plain(v) for k, v in sorted(ctx.params.items())},
    }
