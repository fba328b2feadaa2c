"""``speaker-sim embed``: an embedding matrix and its index."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from . import common as c
from .ray_opt import (
    RayActorsOpt,
    RayAddressOpt,
    RayDecodeOpt,
    RayGpusOpt,
    RayOpt,
    ray_options,
)
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
    ray_decode_threads: RayDecodeOpt = 0,
    quiet: c.QuietOpt = False,
) -> None:
    """Write OUT/embeddings.npy (N x D float32, not normalised) and OUT/index.csv (key,path),
    or with --format kaldi OUT/xvector.ark + OUT/xvector.scp.

    Row i of the matrix is row i of the index; recordings that fail are listed in
    OUT/failures.csv instead (exit 3). OUT/model.json names the model, checkpoint and settings.
    """
    STATE["quiet"] = quiet
    with errors_to_exit():
        import numpy as np

        from ..engine.cache import atomic_write_bytes, npy_bytes
        from ..engine.config import EngineConfig
        from ..io.kaldi_vectors import check_key, kaldi_vectors
        from ..io.trials import read_inputs
        from ..pipeline import Extractor

        ray_opts = ray_options(
            ray, ray_address, ray_actors, ray_gpus_per_actor, device, ray_decode_threads
        )
        recs = read_inputs([str(p) for p in inputs])
        if fmt is c.EmbedFormat.kaldi:
            for r in recs:
                check_key(r.key)  # before any embedding work
        engine = EngineConfig(
            device=device, precision=precision.value, batch_size=batch_size,
            batch_frames=batch_frames, workers=workers, chunk_seconds=chunk_seconds,
            min_duration=min_duration, backend=backend.value,
        )  # fmt: skip
        ex = Extractor(model, model_dir, engine, cache_dir, use_cache=not no_cache,
                       model_config=model_config, ray=ray_opts)  # fmt: skip
        bar = EmbedProgress()
        try:
            res = ex.embed_paths([str(r.path) for r in recs], *bar.callbacks)
        finally:
            bar.stop()
        good = [r for r in recs if str(r.path) in res.embeddings]
        bad = [r for r in recs if str(r.path) in res.failures]
        mat = (
            np.stack([res.embeddings[str(r.path)] for r in good]).astype(np.float32)
            if good
            else np.zeros((0, ex.spec.dim), np.float32)
        )
        out.mkdir(parents=True, exist_ok=True)
        index = [[r.key, str(r.path)] for r in good]
        if fmt is c.EmbedFormat.kaldi:
            ark = (out / "xvector.ark").resolve()
            ark_bytes, scp_bytes = kaldi_vectors([r.key for r in good], mat, str(ark))
            atomic_write_bytes(ark, ark_bytes)
            atomic_write_bytes(out / "xvector.scp", scp_bytes)
            written = out / "xvector.scp"
        else:
            atomic_write_bytes(out / "embeddings.npy", npy_bytes(mat))
            written = out / "embeddings.npy"
        atomic_write_bytes(out / "index.csv", _csv(["key", "path"], index))
        failures = out / "failures.csv"
        if bad:
            rows = [[r.key, str(r.path), res.failures[str(r.path)]] for r in bad]
            atomic_write_bytes(failures, _csv(["key", "path", "error"], rows))
        else:  # an earlier run's list must not outlive it
            failures.unlink(missing_ok=True)
        c.write_json(out / "model.json", c.with_invocation({**ex.describe(), **ex.engine_report()}))
        say(
            f"{len(good)} embeddings ({ex.spec.dim}-dim, {ex.spec.alias}) -> {written}; "
            f"{res.embedded} embedded, {res.cached} from cache"
        )
        if ex.stats.chunked:
            say(
                f"{ex.stats.chunked} recordings longer than "
                f"{ex.engine_cfg.max_full_seconds:g} s were embedded as the average of "
                "10 s windows"
            )
        for r in bad:
            say(f"[red]failed[/red] {escape(str(r.path))}: {escape(res.failures[str(r.path)])}")
    if bad:
        raise typer.Exit(EXIT_PARTIAL)


def _csv(header: list[str], rows: list[list[str]]) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue().encode()
