"""``speaker-sim score``: trials in, one cosine score per trial out."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from . import common as c

if TYPE_CHECKING:
    from ..engine.ray_engine import RayOptions
    from ..pipeline import Extractor
from .ray_opt import (
    RayActorsOpt,
    RayAddressOpt,
    RayDecodeOpt,
    RayGpusOpt,
    RayOpt,
    ray_options,
)
from .score_parts import (
    Extras,
    keys_as_paths,
    say_sim,
    scoring_options,
    summary,
    trial_source,
)
from .ui import EXIT_PARTIAL, STATE, EmbedProgress, errors_to_exit, fail, say, warn


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
    fmt: Annotated[c.ScoreFormat, typer.Option("--format", help="Score file format.")] = (
        c.ScoreFormat.csv
    ),
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
        _run(
            trial_source(trials, pairs, mvector_lists), wav_scp, root, model, model_dir, out,
            fmt.value, report, cache_dir, no_cache,
            device, precision.value, batch_size, batch_frames, workers, chunk_seconds,
            min_duration, max_duration, p_target or [0.01, 0.05], on_error.value, allow_commands,
            Extras(enroll_map, norm.value if norm else None, cohort, cohort_utt2spk, top_n,
                    mean_from, embeddings, score_scale.value if score_scale else None,
                    gen_dir=gen_dir, model_config=model_config,
                    mvector_lists=mvector_lists, backend=backend.value),
            ray_opts=ray_options(ray, ray_address, ray_actors, ray_gpus_per_actor, device,
                                 ray_decode_threads),
        )  # fmt: skip


def _run(
    trials_path: Path, wav_scp: Path | None, root: Path | None, model: str,
    model_dir: Path | None, out: Path | None, fmt: str, report: Path | None,
    cache_dir: Path | None, no_cache: bool, device: str, precision: str, batch_size: int,
    batch_frames: int, workers: int, chunk_seconds: float | None, min_duration: float,
    max_duration: float, p_targets: list[float], on_error: str, allow_commands: bool,
    extras: Extras, ray_opts: RayOptions | None = None,
) -> None:  # fmt: skip
    from ..engine.config import EngineConfig, EngineStats
    from ..errors import UsageError
    from ..io.scorefiles import atomic_text_output, check_whitespace_safe, write_scores
    from ..io.trials import read_trials, read_wav_scp, resolve_trial_items
    from ..pipeline import EmbeddingSource, Extractor, score_trials
    from ..records import Recording

    t0 = time.perf_counter()
    if extras.mvector_lists is not None:
        from ..io.mvector_lists import read_mvector_lists

        tl = read_mvector_lists(*extras.mvector_lists)
    else:
        tl = read_trials(trials_path, extras.gen_dir)
    if extras.embeddings is not None and wav_scp is not None:
        raise UsageError("--embeddings and --wav-scp do not go together: trial items are keys")
    if extras.embeddings is not None and ray_opts is not None:
        raise UsageError("--embeddings and --ray do not go together: nothing is embedded")
    scp = read_wav_scp(wav_scp, allow_commands) if wav_scp else None
    if root is not None and not root.is_dir():
        raise UsageError(f"--root {root}: not a folder")
    check_whitespace_safe(tl.items(), fmt)
    if extras.score_scale and fmt != "csv":
        raise UsageError(f"--score-scale adds a column, which the {fmt} format has no place "
                         "for: use --format csv")  # fmt: skip
    options = scoring_options(extras, root or Path(tl.source).resolve().parent, scp,
                               wav_scp.resolve().parent if wav_scp else None)  # fmt: skip
    t_load = time.perf_counter()
    source: EmbeddingSource
    ex: Extractor | None = None
    if extras.embeddings is not None:
        from ..io.precomputed import PrecomputedEmbeddings

        source = PrecomputedEmbeddings.load(extras.embeddings)
        # Items are the source's keys: no path resolution anywhere.
        recs = {k: Recording(k, Path(k)) for k in tl.items()}
        missing: dict[str, str] = {}
        keys_as_paths(options)
    else:
        recs, missing = resolve_trial_items(
            tl, root, scp, wav_scp.resolve().parent if wav_scp else None
        )
        engine = EngineConfig(
            device=device, precision=precision, batch_size=batch_size,
            batch_frames=batch_frames, workers=workers, chunk_seconds=chunk_seconds,
            min_duration=min_duration, max_duration=max_duration, backend=extras.backend,
        )  # fmt: skip
        source = ex = Extractor(model, model_dir, engine, cache_dir, use_cache=not no_cache,
                                ray=ray_opts, model_config=extras.model_config)  # fmt: skip
    load_s = time.perf_counter() - t_load
    bar = EmbedProgress()
    try:
        res = score_trials(tl, recs, missing, source, *bar.callbacks,
                           stop_on_error=on_error == "fail", options=options)  # fmt: skip
    finally:
        bar.stop()
    n_fail_trials = int((~res.ok).sum())
    sim = None
    if tl.format.startswith("seed-tts-eval"):
        from ..io.pairs import sim_summary

        sim = sim_summary(tl, res.scores, {f.key: f.reason for f in res.failures})

    metrics = None
    labels = tl.labels
    if labels is not None:
        from ..scoring.metrics import evaluate

        ok = res.ok
        try:
            metrics = evaluate(res.scores[ok], labels[ok], p_targets=p_targets)
        except ValueError as exc:
            warn(f"no metrics: {exc}")
    mv = None
    if metrics is not None and tl.format == "mvector-lists":
        from ..scoring.mvector_eval import mvector_metrics

        mv = mvector_metrics(res.scores[res.ok], labels[res.ok])  # type: ignore[index]

    def write(stream: object) -> int:
        from ..scoring.scales import rescaled_columns

        return write_scores(
            stream,  # type: ignore[arg-type]
            tl.enroll, tl.test, res.scores, labels, res.errors, fmt,
            skip_failed=on_error == "skip",
            extra=rescaled_columns(extras.score_scale, res.scores),
        )  # fmt: skip

    written = atomic_text_output(out, write)
    counts = {
        "trials": len(tl),
        "scored": int(res.ok.sum()),
        "failed": n_fail_trials,
        "written": written,
        "targets": int(labels.sum()) if labels is not None else None,
        "nontargets": int(len(labels) - labels.sum()) if labels is not None else None,
        "recordings": res.recordings,
        "failed_recordings": len(res.failures),
        "embedded": res.embed.embedded,
        "from_cache": res.embed.cached,
        "duplicate_trials": len(tl) - len(set(zip(tl.enroll, tl.test))),
    }
    st = ex.stats if ex is not None else EngineStats()
    timing = {
        "total_s": round(time.perf_counter() - t0, 3),
        "model_load_s": round(load_s + (ex.load_seconds if ex is not None else 0.0), 3),
        "embed_s": round(res.embed.seconds, 3),
        "audio_s": round(st.audio_seconds, 3),
        "x_realtime": round(st.audio_seconds / res.embed.seconds, 1)
        if res.embed.seconds > 0 and st.audio_seconds
        else None,
    }
    if report is not None:
        doc = {
            "trials": tl.describe(),
            "metrics": c.metrics_block(metrics) if metrics is not None else None,
            "counts": counts,
            "model": source.describe(),
            **(ex.engine_report() if ex is not None else {}),
            "extraction": {
                "chunked_recordings": st.chunked,
                "padding_overhead": round(st.padded_frames / st.frames - 1, 4)
                if st.frames
                else 0.0,
            },
            "failures": [f.to_dict() for f in res.failures],
            **({"sim": sim} if sim is not None else {}),
            **({"mvector": mv.to_dict()} if mv is not None else {}),
            "scoring": {
                "method": "cosine",
                **res.extra,
                **({"score_scale": extras.score_scale} if extras.score_scale else {}),
            },
            "timing": timing,
            "scores": str(out) if out else "stdout",
            "score_format": fmt,
        }
        c.write_json(report, c.with_invocation(doc))
    summary(res, counts, timing, metrics, ex, extras.embeddings)
    if mv is not None and not STATE["quiet"]:
        say(f"mvector eval.py: threshold:{mv.threshold:.5f}, EER:{mv.eer:.5f}, "
            f"MinDCF:{mv.min_dcf:.5f}")  # fmt: skip
    if sim is not None:
        say_sim(sim)
    if ex is not None and ex.cache.write_error:
        warn(f"the cache could not be written ({ex.cache.write_error}); ran without it")
    if counts["duplicate_trials"]:
        warn(f"{counts['duplicate_trials']} duplicate trials (each scored and written)")
    if on_error == "fail" and res.failures:
        f = res.failures[0]
        fail(f"stopped at the first bad recording (--on-error fail): {f.path}: {f.reason}")
    if res.failures:
        raise typer.Exit(EXIT_PARTIAL)
