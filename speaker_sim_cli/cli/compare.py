"""``speaker-sim compare``: every pair of a few recordings, as a table."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import common as c
from .ui import EXIT_PARTIAL, STATE, errors_to_exit, say


def compare(
    files: Annotated[
        list[Path], typer.Argument(help="Audio files, or folders of them.", show_default=False)
    ],
    model: c.ModelOpt = c.DEFAULT,
    model_dir: c.ModelDirOpt = None,
    model_config: c.ModelConfigOpt = None,
    cache_dir: c.CacheDirOpt = None,
    no_cache: c.NoCacheOpt = False,
    device: c.DeviceOpt = "auto",
    score_scale: c.ScoreScaleOpt = None,
    threshold: Annotated[
        float | None,
        typer.Option(
            help="Decision threshold on the cosine for the verdict column (default: the "
            "model's published one, when its card gives one).",
        ),
    ] = None,
    quiet: c.QuietOpt = False,
) -> None:
    """Score every pair of the given recordings (raw cosine) and print the table.

    With a threshold (``--threshold``, or the model's published one) a verdict column says
    ``same`` when the cosine is at or above it, else ``different``.
    """
    STATE["quiet"] = quiet
    bad: dict[str, str] = {}
    with errors_to_exit():
        from ..audio.formats import is_audio_path
        from ..engine.config import EngineConfig
        from ..errors import UsageError
        from ..pipeline import Extractor, cosine_pairs

        paths: list[Path] = []
        for f in files:
            if f.is_dir():
                paths.extend(sorted(p for p in f.iterdir() if is_audio_path(p)))
            else:
                paths.append(f)
        if len(paths) < 2:
            raise UsageError("compare needs at least two recordings")
        ex = Extractor(model, model_dir, EngineConfig(device=device, workers=0), cache_dir,
                       use_cache=not no_cache, model_config=model_config)  # fmt: skip
        res = ex.embed_paths([str(p.resolve()) for p in paths])
        bad = {str(p): res.failures[str(p.resolve())] for p in paths
               if str(p.resolve()) in res.failures}  # fmt: skip
        good = [p for p in paths if str(p.resolve()) in res.embeddings]
        import numpy as np

        mat = np.stack([res.embeddings[str(p.resolve())] for p in good]) if good else None
        thr = threshold if threshold is not None else ex.spec.threshold
        title = f"Cosine similarity ({ex.spec.alias}, {ex.spec.id})"
        if thr is not None:
            origin = "--threshold" if threshold is not None else "published"
            title += f"; threshold {thr:g} ({origin})"
        t = Table(title=title)
        t.add_column("enrollment")
        t.add_column("test")
        t.add_column("cosine", justify="right")
        if score_scale is not None:
            from ..scoring.scales import SCALES

            column, rescale = SCALES[score_scale.value]
            t.add_column(column, justify="right")
        if thr is not None:
            t.add_column("verdict")
        for i, j in itertools.combinations(range(len(good)), 2):
            s = float(cosine_pairs(mat, np.array([i]), np.array([j]))[0])  # type: ignore[arg-type]
            cells = [good[i].name, good[j].name, f"{s:.4f}"]
            if score_scale is not None:
                cells.append(f"{float(rescale(s)):.2f}")
            if thr is not None:
                cells.append("[green]same[/green]" if s >= thr else "different")
            t.add_row(*cells)
        Console(soft_wrap=False).print(t)
        for p, reason in bad.items():
            say(f"[red]failed[/red] {escape(p)}: {escape(reason)}")
    if bad:
        raise typer.Exit(EXIT_PARTIAL)
