"""The ``speaker-sim`` command."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from . import (
    bench,
    cache_cmd,
    calibrate,
    eval_cmd,
    export_cmd,
    identify_cmd,
    serve,
    speakers_cmd,
    voiceprints_cmd,
    voiceprints_serve,
)
from .compare import compare
from .config_opt import ConfigGroup
from .embed import embed
from .models_cmd import models
from .ray_opt import RayCommand
from .score import score
from .ui import STATE

app = typer.Typer(
    name="speaker-sim",
    cls=ConfigGroup,
    help="Same speaker or not? Batch speaker-verification scoring with the 3D-Speaker zoo.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode="rich",
)


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks of errors.")] = False,
) -> None:
    STATE["debug"] = debug or os.environ.get("SPEAKER_SIM_DEBUG") == "1"


app.command(cls=RayCommand)(score)  # --ray [ADDRESS]
app.command(cls=RayCommand)(embed)
app.command()(compare)
app.command()(models)


for _module in (
    eval_cmd,
    calibrate,
    serve,
    bench,
    cache_cmd,
    export_cmd,
    voiceprints_cmd,
    identify_cmd,
    speakers_cmd,
    voiceprints_serve,
):
    _module.register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
