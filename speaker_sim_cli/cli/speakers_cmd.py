"""``speaker-sim speakers DB [list|remove|rename|info]``: the speakers of a voiceprint library."""

from __future__ import annotations

import csv
import io
import json
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from . import common as c
from .ui import STATE, errors_to_exit, say


class Action(str, Enum):
    list = "list"
    remove = "remove"
    rename = "rename"
    info = "info"


def register(app: typer.Typer) -> None:
    app.command()(speakers)


def speakers(
    db: Annotated[Path, typer.Argument(help="The library file.")],
    action: Annotated[
        Action, typer.Argument(help="list, remove NAME, rename OLD NEW, info.")
    ] = Action.list,
    names: Annotated[
        list[str] | None, typer.Argument(help="NAME, or OLD NEW.", show_default=False)
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="list as JSON lines.")] = False,
    quiet: c.QuietOpt = False,
) -> None:
    """List the speakers (name, recordings, enrolled when: CSV on stdout), remove one, rename
    one, or show the library's model, checkpoint hash, counts and size (JSON on stdout).
    Each change is one transaction."""
    STATE["quiet"] = quiet
    with errors_to_exit():
        from ..errors import UsageError
        from ..voiceprints.library import check_name
        from ..voiceprints.store import VoiceprintStore

        names = list(names or [])
        want = {Action.list: 0, Action.info: 0, Action.remove: 1, Action.rename: 2}[action]
        if len(names) != want:
            usage = {Action.remove: "remove NAME", Action.rename: "rename OLD NEW"}
            raise UsageError(
                f"speakers {usage.get(action, action.value)}: expected {want} name(s), "
                f"got {len(names)}"
            )
        with VoiceprintStore(db) as store:  # no model needed: nothing is embedded
            if action is Action.list:
                rows = store.speakers()
                if as_json:
                    for r in rows:
                        typer.echo(
                            json.dumps(
                                {
                                    "speaker": r.name,
                                    "recordings": r.recordings,
                                    "enrolled": r.enrolled,
                                }
                            )
                        )
                else:
                    buf = io.StringIO()
                    w = csv.writer(buf, lineterminator="\n")
                    w.writerow(["speaker", "recordings", "enrolled"])
                    w.writerows([r.name, r.recordings, r.enrolled] for r in rows)
                    typer.echo(buf.getvalue(), nl=False)
                say(f"{len(rows)} speakers, {sum(r.recordings for r in rows)} recordings")
            elif action is Action.info:
                from ..models.registry import MODELS

                doc = store.info()
                doc["threshold"] = next((m.threshold for m in MODELS if m.id == doc["model"]), None)
                typer.echo(json.dumps(c._clean(doc), indent=2))
            elif action is Action.remove:
                n = store.remove(names[0])
                say(f"removed {escape(names[0])} and its {n} recordings")
            else:
                check_name(names[1])
                store.rename(names[0], names[1])
                say(f"renamed {escape(names[0])} -> {escape(names[1])}")
