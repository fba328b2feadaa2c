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
    storage_options: Annotated[
        str | None,
        typer.Option(
            "--storage-options",
            metavar="JSON",
            help="fsspec options for s3:// gs:// http(s):// paths, e.g. "
            '\'{"endpoint_url": "http://127.0.0.1:9000"}\' (or per scheme: {"s3": {...}}; '
            "default: $SPEAKER_SIM_STORAGE_OPTIONS). Credentials come from the usual "
            "environment and config files.",
        ),
    ] = None,
) -> None:
    STATE["debug"] = debug or os.environ.get("SPEAKER_SIM_DEBUG") == "1"
    STATE["storage_options_flag"] = storage_options is not None
    if storage_options is not None:
        from ..errors import UsageError
        from ..io.storage import set_options

        try:
            set_options(storage_options)
        except UsageError as exc:
            raise typer.BadParameter(str(exc), param_hint="--storage-options") from None


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
