"""``speaker-sim embed``: an embedding matrix and its index."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from . import common as c
from .config_opt import config_record
from .ray_opt import RayActorsOpt, RayAddressOpt, RayGpusOpt, RayOpt, ray_options
from .ui import EXIT_PARTIAL, STATE, EmbedProgress, errors_to_exit, say


def embed(
    inputs: Annotated[
        list[Path],
        typer.Argument(
            help="wav.scp files (utt path), list files (a path a line) or audio files.",
            show_default=False,
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")],
    model: c.ModelOpt = c.DEFAULT,
    model_dir: c.ModelDirOpt = None,
    model_config: c.ModelConfigOpt = None,
    cache_dir: c.CacheDirOpt = None,
    no_cache: c.NoCacheOpt = False,
    device: c.DeviceOpt = "auto",
    precision: c.PrecisionOpt = c.Precision.fp32,
    backend: c.BackendOpt = c.Backend.auto,
    batch_size: c.BatchSizeOpt = 0,
    batch_frames: c.BatchFramesOpt = 0,
    workers: c.WorkersOpt = -1,
    chunk_seconds: c.ChunkOpt = None,
    min_duration: c.MinDurOpt = 0.3,
    fmt: Annotated[
        c.EmbedFormat,
        typer.Option(
            "--format",
            help="npy: embeddings.npy + index.csv; kaldi: xvector.ark + xvector.scp (as "
            "WeSpeaker and Kaldi write them; keys must have no spaces).",
        ),
    ] = c.EmbedFormat.npy,
    ray: RayOpt = False,
    ray_address: RayAddressOpt = None,
    ray_actors: RayActorsOpt = 0,
    ray_gpus_per_actor: RayGpusOpt = None,
    quiet: c.QuietOpt = False,
) -> None:
    """Write OUT/embeddings.npy (N x D float32, not normalised) and OUT/index.csv (key,path),
    or with --format kaldi OUT/xvector.ark + OUT/xvector.scp.

    Row i of the matrix is row i of the index; recordings that fail are listed in
    OUT/failures.csv instead (exit 3). OUT/model.json names the model, checkpoint and settings.
    """
    STATE["quiet"] = quiet
    with errors_to_exit():
        from functools import partial

        from ..engine.config import EngineConfig
        from ..job import ModelSource
        from ..job.embed import EmbedJob

        ray_opts = ray_options(ray, ray_address, ray_actors, ray_gpus_per_actor, device)
        engine = partial(
            EngineConfig,
            device=device, precision=precision.value, batch_size=batch_size,
            batch_frames=batch_frames, workers=workers, chunk_seconds=chunk_seconds,
            min_duration=min_duration, backend=backend.value,
        )  # fmt: skip
        job = EmbedJob(
            inputs, out,
            ModelSource(model, model_dir, model_config, engine, cache_dir, not no_cache, ray_opts),
            fmt.value, config_record(),
        )  # fmt: skip
        with EmbedProgress() as bar:
            rep = job.run(bar.on_event)
        ex, res = rep.extractor, rep.result
        say(
            f"{len(rep.good)} embeddings ({ex.spec.dim}-dim, {ex.spec.alias}) -> {rep.written}; "
            f"{res.embedded} embedded, {res.cached} from cache"
        )
        if ex.stats.chunked:
            say(
                f"{ex.stats.chunked} recordings longer than "
                f"{ex.engine_cfg.max_full_seconds:g} s were embedded as the average of "
                "10 s windows"
            )
        for r in rep.bad:
            say(f"[red]failed[/red] {escape(str(r.path))}: {escape(rep.reason(r))}")
    if rep.bad:
        raise typer.Exit(EXIT_PARTIAL)
