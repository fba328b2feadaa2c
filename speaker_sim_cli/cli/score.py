"""``speaker-sim score``: trials in, one cosine score per trial out."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from . import common as c
from .config_opt import config_record
from .ray_opt import RayActorsOpt, RayAddressOpt, RayDecodeOpt, RayGpusOpt, RayOpt, ray_options
from .score_parts import render, trial_source
from .ui import EXIT_PARTIAL, STATE, EmbedProgress, errors_to_exit


def score(
    trials: Annotated[
        Path | None,
        typer.Argument(
            help="Trial list: CSV with a header (enrollment,test[,label]), Kaldi trials "
            "(enroll test [target|nontarget]), a VoxCeleb list (1 path1 path2) or a "
            "seed-tts-eval pair list (generated|prompt|text).",
            show_default=False,
        ),
    ] = None,
    pairs: Annotated[
        Path | None,
        typer.Option(
            help="TTS speaker similarity: a seed-tts-eval pair list (generated|prompt|text, "
            "or a test set's meta.lst with --gen-dir) instead of TRIALS. The report's 'sim' "
            "block gives the mean, std and counts over all pairs and the failed pairs by reason.",
        ),
    ] = None,
    mvector_lists: Annotated[
        tuple[Path, Path] | None,
        typer.Option(
            metavar="ENROLL TRIALS",
            help="mvector's evaluation lists (path<TAB>speaker-id each) instead of TRIALS: "
            "every trial recording against every enrolment recording, target when the ids "
            "match. The summary and the report's 'mvector' block add mvector's own threshold, "
            "EER and MinDCF for the same scores.",
            show_default=False,
        ),
    ] = None,
    gen_dir: Annotated[
        Path | None,
        typer.Option(
            help="With a seed-tts-eval meta.lst: the folder of the generated <utt>.wav files "
            "(cal_sim.sh's output_dir)."
        ),
    ] = None,
    wav_scp: Annotated[
        Path | None, typer.Option(help="Kaldi wav.scp: trial items are utterance ids.")
    ] = None,
    root: Annotated[
        Path | None,
        typer.Option(help="Folder relative paths resolve against (default: the trial file's)."),
    ] = None,
    model: c.ModelOpt = c.DEFAULT,
    model_dir: c.ModelDirOpt = None,
    model_config: c.ModelConfigOpt = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Score file (default: stdout).")
    ] = None,
    fmt: Annotated[
        c.OutScoreFormat | None,
        typer.Option(
            "--format",
            help="Score file format [default: csv; parquet when --out ends in .parquet].",
            show_default=False,
        ),
    ] = None,
    report: Annotated[Path | None, typer.Option(help="Write a JSON report here.")] = None,
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
    max_duration: c.MaxDurOpt = 4 * 3600.0,
    p_target: Annotated[
        list[float] | None,
        typer.Option(help="Target prior of a minDCF; repeatable (default: 0.01 and 0.05)."),
    ] = None,
    on_error: Annotated[
        c.OnError,
        typer.Option(
            help="keep: failed trials get an error column; skip: leave them out; "
            "fail: stop at the first bad recording."
        ),
    ] = c.OnError.keep,
    enroll_map: Annotated[
        Path | None,
        typer.Option(
            help="spk2utt-style file 'speaker rec1 rec2 ...': trials whose enrolment is "
            "a speaker score against the normalised mean of its recordings."
        ),
    ] = None,
    norm: Annotated[
        c.Norm | None, typer.Option(help="Score normalisation against --cohort (WeSpeaker's).")
    ] = None,
    cohort: Annotated[
        Path | None, typer.Option(help="Cohort recordings: a list file or wav.scp.")
    ] = None,
    cohort_utt2spk: Annotated[
        Path | None, typer.Option(help="utt2spk of the cohort: average the cohort per speaker.")
    ] = None,
    top_n: Annotated[int, typer.Option(min=1, help="AS-norm: top cohort scores kept.")] = 300,
    mean_from: Annotated[
        Path | None,
        typer.Option(help="Recordings (list or wav.scp) whose mean embedding is subtracted."),
    ] = None,
    allow_commands: Annotated[
        bool, typer.Option(help="Allow wav.scp entries that are shell commands ('... |').")
    ] = False,
    embeddings: Annotated[
        Path | None,
        typer.Option(
            help="Score embeddings computed earlier instead of audio: a folder written by "
            "'speaker-sim embed' (npy or kaldi) or a Kaldi/WeSpeaker xvector.scp. Trial, "
            "enrolment-map, cohort and mean items are its keys; model options are unused.",
        ),
    ] = None,
    score_scale: c.ScoreScaleOpt = None,
    ray: RayOpt = False,
    ray_address: RayAddressOpt = None,
    ray_actors: RayActorsOpt = 0,
    ray_gpus_per_actor: RayGpusOpt = None,
    ray_decode_threads: RayDecodeOpt = 0,
    quiet: c.QuietOpt = False,
) -> None:
    """Score every trial by cosine; EER / minDCF when the trials have labels.

    Each unique recording is embedded once (and cached). Scores are raw cosine in [-1, 1].
    Metrics follow the NIST SRE16 scorer of 3D-Speaker and WeSpeaker: EER interpolated at the
    FNR/FPR crossing; minDCF normalised, c_miss = c_fa = 1.
    Exit codes: 0 done, 1 failure, 2 usage error, 3 done but some recordings failed.
    """
    STATE["quiet"] = quiet
    with errors_to_exit():
        from functools import partial

        from ..engine.config import EngineConfig
        from ..job import ModelSource, Outputs, ScoreJob, ScoringSetup, TrialSource

        path = trial_source(trials, pairs, mvector_lists)
        engine = partial(
            EngineConfig,
            device=device, precision=precision.value, batch_size=batch_size,
            batch_frames=batch_frames, workers=workers, chunk_seconds=chunk_seconds,
            min_duration=min_duration, max_duration=max_duration, backend=backend.value,
        )  # fmt: skip
        job = ScoreJob(
            TrialSource(path, gen_dir=gen_dir, mvector_lists=mvector_lists, wav_scp=wav_scp,
                        root=root, allow_commands=allow_commands),
            ModelSource(model, model_dir, model_config, engine, cache_dir, not no_cache,
                        ray_options(ray, ray_address, ray_actors, ray_gpus_per_actor, device,
                                    ray_decode_threads),
                        embeddings),
            ScoringSetup(p_target or [0.01, 0.05], on_error.value, enroll_map,
                         norm.value if norm else None, cohort, cohort_utt2spk, top_n, mean_from,
                         score_scale.value if score_scale else None),
            Outputs(out, c.out_format(fmt, out), report, stdout=True, invocation=config_record(),
                    stream=True),
        )  # fmt: skip
        with EmbedProgress() as bar:
            rep = job.run(bar.on_event)
        render(rep, embeddings)
    if rep.failures:
        raise typer.Exit(EXIT_PARTIAL)
