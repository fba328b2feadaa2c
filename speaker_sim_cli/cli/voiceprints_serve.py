"""``speaker-sim voiceprints serve|prune|enroll|identify``: the login service, pruning, and the
library commands again under one group (``enroll``/``identify`` are the top-level ones)."""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from . import common as c
from .identify_cmd import identify
from .ui import STATE, errors_to_exit, say
from .voiceprints_cmd import LibModelOpt, enroll

group = typer.Typer(
    name="voiceprints",
    help="The voiceprint login service (serve), pruning, and enrol/identify (also --record).",
    no_args_is_help=True,
    rich_markup_mode="rich",
)


def register(app: typer.Typer) -> None:
    group.command("enroll")(enroll)
    group.command("identify")(identify)
    app.add_typer(group)


@group.command()
def serve(
    library: Annotated[
        Path, typer.Option("--library", "-l", help="The library file (created on first enrolment).")
    ],
    model: LibModelOpt = None,
    host: Annotated[
        str, typer.Option(help="Address to listen on; beyond loopback, API keys are required.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8000,
    admin_key_file: Annotated[
        Path | None,
        typer.Option(help="Admin key(s), one a line (default: $SPEAKER_SIM_ADMIN_KEY)."),
    ] = None,
    client_key_file: Annotated[
        Path | None,
        typer.Option(
            help="Client key(s), one a line (default: $SPEAKER_SIM_CLIENT_KEY, comma-separated)."
        ),
    ] = None,
    threshold: Annotated[
        float | None,
        typer.Option(
            help="Accept/identify at or above this cosine (default: the model's "
            "published threshold, else 0.6)."
        ),
    ] = None,
    top_k: Annotated[int, typer.Option(min=1, max=100, help="identify: candidates.")] = 5,
    enrol_seconds: Annotated[
        float, typer.Option(min=0.5, help="Net speech a complete voiceprint needs.")
    ] = 10.0,
    min_seconds: Annotated[
        float, typer.Option(min=0.1, help="Net speech one request needs.")
    ] = 1.0,
    max_seconds: Annotated[
        float, typer.Option(min=1.0, help="Most audio (duration) one request may carry.")
    ] = 30.0,
    max_body: Annotated[
        int, typer.Option(min=1024, help="Most bytes in one request body (413 beyond).")
    ] = 5 * 1024 * 1024,
    rate_limit: Annotated[
        str, typer.Option(help="identify/verify per key: N/s, N/min or N/h.")
    ] = "60/min",
    max_inflight: Annotated[
        int, typer.Option(min=1, help="Requests worked on at once (503 beyond).")
    ] = 32,
    max_batch: Annotated[int, typer.Option(min=1, help="Most requests in one forward pass.")] = 16,
    batch_wait_ms: Annotated[
        float,
        typer.Option(
            min=0.0,
            help="A batch waits this long for one more request "
            "(each arrival extends it; at most 4x after the first).",
        ),
    ] = 10.0,
    cors_origin: Annotated[
        list[str] | None,
        typer.Option(help="Let pages from this origin call the API (repeatable; none by default)."),
    ] = None,
    retain_audio: Annotated[
        bool, typer.Option(help="Keep enrolment uploads in the library (off: embeddings only).")
    ] = False,
    device: c.DeviceOpt = "cpu",
    quiet: c.QuietOpt = False,
) -> None:
    """Serve the voiceprint login API and its page at http://HOST:PORT/ (OpenAPI at /docs).

    Admin key: enrol, list, get, delete. Client key: verify, identify. Without keys the
    service refuses to listen beyond this machine. Ctrl-C or SIGTERM: requests in flight are
    finished, then it exits 0.
    """
    STATE["quiet"] = quiet
    with errors_to_exit():
        from ..voiceprints.service.auth import ADMIN_ENV, CLIENT_ENV, load_keys
        from ..voiceprints.service.config import ServiceConfig, parse_rate
        from ..voiceprints.service.run import serve as run

        rate, period = parse_rate(rate_limit)
        cfg = ServiceConfig(
            library=library, model=model, host=host, port=port, threshold=threshold,
            top_k=top_k, enrol_seconds=enrol_seconds, min_seconds=min_seconds,
            max_seconds=max_seconds, max_body_bytes=max_body, rate=rate, rate_period=period,
            max_inflight=max_inflight, max_batch=max_batch, batch_wait_ms=batch_wait_ms,
            cors_origins=list(cors_origin or []), retain_audio=retain_audio,
            admin_keys=load_keys(ADMIN_ENV, admin_key_file),
            client_keys=load_keys(CLIENT_ENV, client_key_file), device=device,
        )  # fmt: skip
        run(cfg)


@group.command()
def prune(
    library: Annotated[Path, typer.Option("--library", "-l", help="The library file.")],
    not_seen_for: Annotated[
        str, typer.Option(help="Delete speakers not seen for this long: e.g. 365d, 12w, 48h.")
    ],
    dry_run: Annotated[bool, typer.Option(help="Only list who would be deleted.")] = False,
    quiet: c.QuietOpt = False,
) -> None:
    """Delete speakers (embeddings and any stored audio) not enrolled, verified or identified
    for a while; speakers never seen count from their enrolment. One transaction."""
    STATE["quiet"] = quiet
    with errors_to_exit():
        from ..errors import UsageError
        from ..voiceprints.store import VoiceprintStore

        m = re.fullmatch(r"(\d+)([dwh])", not_seen_for.strip())
        if not m or int(m.group(1)) < 1:
            raise UsageError(f"--not-seen-for {not_seen_for!r}: expected e.g. 365d, 12w or 48h")
        n, unit = int(m.group(1)), m.group(2)
        age = {"d": timedelta(days=n), "w": timedelta(weeks=n), "h": timedelta(hours=n)}[unit]
        cutoff = (datetime.now(timezone.utc) - age).isoformat(timespec="seconds")
        with VoiceprintStore(library) as store:
            gone = store.prune(cutoff, dry_run)
        for name in gone:
            typer.echo(name)
        verb = "would delete" if dry_run else "deleted"
        say(f"{escape(str(library))}: {verb} {len(gone)} speakers not seen since {cutoff}")
