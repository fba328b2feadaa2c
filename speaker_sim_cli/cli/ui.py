"""Console, error mapping and progress shared by the commands."""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from ..errors import SpeakerSimError, UsageError

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_PARTIAL = 0, 1, 2, 3

err_console = Console(stderr=True, highlight=False, soft_wrap=True)
STATE: dict[str, Any] = {"debug": os.environ.get("SPEAKER_SIM_DEBUG") == "1", "quiet": False}


def say(msg: str) -> None:
    if not STATE["quiet"]:
        err_console.print(msg)


def warn(msg: str) -> None:
    err_console.print(f"[yellow]warning:[/yellow] {escape(msg)}")


def fail(msg: str, code: int = EXIT_FAILURE) -> NoReturn:
    err_console.print(f"[red]error:[/red] {escape(msg)}")
    raise typer.Exit(code)


def _sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@contextmanager
def errors_to_exit() -> Iterator[None]:
    """Map library errors to one line and an exit code; ``--debug`` keeps the traceback.

    SIGTERM is handled like Ctrl-C, so temp files are removed and nothing partial is left.
    """
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _sigterm)
    try:
        yield
    except (typer.Exit, typer.Abort, SystemExit):
        raise
    except KeyboardInterrupt:
        err_console.print("[red]interrupted[/red]: nothing partial was written; rerun to resume")
        raise typer.Exit(130) from None
    except UsageError as exc:
        _debug_trace()
        fail(str(exc), EXIT_USAGE)
    except SpeakerSimError as exc:
        _debug_trace()
        fail(str(exc), EXIT_FAILURE)
    except (ValueError, OSError, RuntimeError) as exc:
        _debug_trace()
        fail(f"{type(exc).__name__}: {exc}", EXIT_FAILURE)
    except Exception as exc:  # a bug of ours: one line, the traceback with --debug
        _debug_trace()
        fail(f"internal error {type(exc).__name__}: {exc} (rerun with --debug for the traceback)")


def _debug_trace() -> None:
    if STATE["debug"]:
        traceback.print_exc(file=sys.stderr)


def show_progress() -> bool:
    return not STATE["quiet"] and err_console.is_terminal


class EmbedProgress:
    """Rich progress on stderr: recordings, hours of audio, x-realtime, ETA."""

    def __init__(self, label: str = "embedding") -> None:
        self.label = label
        self.progress: Any = None
        self.task: Any = None
        self.seconds = 0.0
        self.total_seconds = 0.0
        self.t0 = 0.0

    def start(self, n: int, seconds: float) -> None:
        if not show_progress() or n == 0:
            return
        import time

        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.t0 = time.perf_counter()
        self.total_seconds = seconds
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[audio]}"),
            TextColumn("{task.fields[speed]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=err_console,
            transient=True,
        )
        self.progress.start()
        self.task = self.progress.add_task(self.label, total=n, audio="", speed="")

    def update(self, n: int, seconds: float) -> None:
        if self.progress is None:
            return
        import time

        self.seconds += seconds
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        self.progress.update(
            self.task,
            advance=n,
            audio=f"{self.seconds / 3600:.2f}/{self.total_seconds / 3600:.2f} h",
            speed=f"{self.seconds / elapsed:.0f}x realtime",
        )

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    @property
    def callbacks(self) -> tuple[Callable[[int, float], None], Callable[[int, float], None]]:
        return self.update, self.start

    def on_event(self, ev: Any) -> None:
        """Draw a job's :class:`~speaker_sim_cli.job.Progress` event: recordings embedded,
        then trials scored / total (a streamed job)."""
        if ev.stage == "score":
            self._scoring(ev)
            return
        if ev.event == "start":
            self.start(ev.n, ev.seconds)
        elif ev.event == "advance":
            self.update(ev.n, ev.seconds)
        else:
            self.stop()

    def _scoring(self, ev: Any) -> None:
        if ev.event == "start":
            self.stop()
            if not show_progress() or ev.n == 0:
                return
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TaskProgressColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.progress = Progress(
                TextColumn("[bold]scoring"), BarColumn(), MofNCompleteColumn(),
                TextColumn("trials"), TaskProgressColumn(), TimeElapsedColumn(),
                TextColumn("ETA"), TimeRemainingColumn(), console=err_console, transient=True,
            )  # fmt: skip
            self.progress.start()
            self.task = self.progress.add_task("scoring", total=ev.n)
        elif ev.event == "advance":
            if self.progress is not None:
                self.progress.update(self.task, advance=ev.n)
        else:
            self.stop()

    def __enter__(self) -> EmbedProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
