"""``speaker-sim serve``: keep a model loaded and answer pair requests from stdin."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Annotated, Any, TextIO

import typer

from . import common as c
from .ui import STATE, errors_to_exit, say


def register(app: typer.Typer) -> None:
    """Add this module's command(s) to the app."""
    app.command()(serve)


def serve(
    model: c.ModelOpt = c.DEFAULT,
    model_dir: c.ModelDirOpt = None,
    model_config: c.ModelConfigOpt = None,
    device: c.DeviceOpt = "auto",
    precision: c.PrecisionOpt = c.Precision.fp32,
    jsonl: Annotated[
        bool,
        typer.Option(
            "--jsonl",
            help='JSON lines: {"id": ..., "a": ..., "b": ...} in, '
            '{"id": ..., "score": ...} or {"id": ..., "error": ...} out.',
        ),
    ] = False,
    window_ms: Annotated[
        float,
        typer.Option(
            "--window-ms", min=0.0, help="Wait this long for more requests before embedding."
        ),
    ] = 5.0,
    max_batch: Annotated[int, typer.Option(min=1, help="Most requests in one batch.")] = 256,
    memory_cache: Annotated[
        int, typer.Option(min=0, help="Most embeddings kept in memory (LRU); 0: none.")
    ] = 50_000,
    cache_dir: c.CacheDirOpt = None,
    no_cache: c.NoCacheOpt = False,
    batch_size: c.BatchSizeOpt = 0,
    batch_frames: c.BatchFramesOpt = 0,
    workers: Annotated[
        int,
        typer.Option(min=-1, help="Decoding worker processes (0: decode in the server)."),
    ] = 0,
    chunk_seconds: c.ChunkOpt = None,
    min_duration: c.MinDurOpt = 0.3,
    stats_file: Annotated[
        Path | None, typer.Option(help="At exit, write the serving counters here (JSON).")
    ] = None,
    quiet: c.QuietOpt = False,
) -> None:
    """Keep a model loaded and score pairs sent on stdin, one request a line.

    [bold]<id>->/path/a.wav,/path/b.wav[/bold] is answered [bold]<id>-><cosine>[/bold]
    (raw cosine in [-1, 1], 6 decimals) on stdout, flushed; a bad request (wrong number of
    paths, unreadable audio) is answered [bold]Error: <id> <reason>[/bold] and serving goes
    on; [bold]<id>->close[/bold] lines are ignored. Many requests may be in flight; answers
    can come out of order. Embeddings are cached in memory and on disk (the cache
    [bold]score[/bold] uses), so each recording is embedded once. Only answers go to stdout;
    logs go to stderr. End of input or SIGTERM: the requests already read are answered,
    then the server exits 0.
    """
    STATE["quiet"] = quiet
    with errors_to_exit():
        out = protect_stdout()
        _run(
            out, model, model_dir, device, precision.value, jsonl, window_ms, max_batch,
            memory_cache, cache_dir, no_cache, batch_size, batch_frames, workers, chunk_seconds,
            min_duration, stats_file, model_config,
        )  # fmt: skip


def protect_stdout() -> TextIO:
    """A stream on the real stdout for answers; everything else that writes there goes to stderr.

    File descriptor 1 is pointed at stderr (so even a native library's stray print cannot
    corrupt the answer stream) and ``sys.stdout`` with it. When stdout is not the process's
    own (an in-process test runner), answers simply go to ``sys.stdout``.
    """
    try:
        real = sys.stdout is sys.__stdout__ and sys.__stdout__.fileno() == 1
    except (AttributeError, OSError, ValueError):
        real = False
    if not real:
        return sys.stdout
    sys.stdout.flush()
    fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return open(fd, "w", encoding="utf-8", errors="surrogateescape", newline="\n")


def _run(
    out: TextIO, model: str, model_dir: Path | None, device: str, precision: str, jsonl: bool,
    window_ms: float, max_batch: int, memory_cache: int, cache_dir: Path | None,
    no_cache: bool, batch_size: int, batch_frames: int, workers: int,
    chunk_seconds: float | None, min_duration: float, stats_file: Path | None,
    model_config: Path | None = None,
) -> None:  # fmt: skip
    import time

    from ..api import SpeakerSim
    from ..serve import Server, read_lines_fd

    t0 = time.perf_counter()
    sim = SpeakerSim(
        model, model_dir, device, precision=precision, cache_dir=cache_dir,
        use_cache=not no_cache, memory_cache=memory_cache, workers=workers,
        batch_size=batch_size, batch_frames=batch_frames, chunk_seconds=chunk_seconds,
        min_duration=min_duration, model_config=model_config,
    )  # fmt: skip
    load_s = time.perf_counter() - t0
    server = Server(sim, out, jsonl=jsonl, window=window_ms / 1000, max_batch=max_batch, log=say)

    def on_signal(signum: int, _frame: Any) -> None:
        server.stop()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    say(
        f"serving {sim.model_id} on {sim.device} ({precision}), loaded in {load_s:.1f} s; "
        + ("JSON lines" if jsonl else "'<id>->a.wav,b.wav' lines")
        + " on stdin; EOF or SIGTERM ends"
    )
    try:
        lines = read_lines_fd(sys.stdin.fileno()) if _has_fd(sys.stdin) else iter(sys.stdin)
        stats = server.serve(lines)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    doc: dict[str, Any] = {
        "serve": stats.to_dict(),
        "model": sim.describe(),
        "embeddings": sim.stats(),
        "model_load_s": round(load_s, 3),
    }
    if stats_file is not None:
        c.write_json(stats_file, doc)
    e = doc["embeddings"]
    say(
        f"served {stats.requests} requests: {stats.scored} scored, {stats.errors} errors, "
        f"{stats.ignored} ignored; {e['embedded']} recordings embedded, {e['disk_hits']} from "
        f"the disk cache, {e['memory_hits']} memory hits; {stats.batches} batches; "
        f"{stats.seconds:.1f} s"
        + (" (stopped by signal)" if server.stopping and not stats.stdout_closed else "")
    )
    if stats.stdout_closed:
        raise typer.Exit(1)


def _has_fd(stream: Any) -> bool:
    try:
        stream.fileno()
    except (AttributeError, OSError, ValueError):
        return False
    return True
