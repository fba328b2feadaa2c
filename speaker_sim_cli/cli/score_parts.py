"""The parts of ``speaker-sim score`` below its option list: the trial source and the
rendering of a :class:`~speaker_sim_cli.job.ScoreReport` (summary, tables, warnings)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.markup import escape

from . import common as c
from .ui import STATE, err_console, fail, say, warn

if TYPE_CHECKING:
    from ..job import ScoreReport


def render(rep: ScoreReport, embeddings: Path | None) -> None:
    """Everything ``score`` tells the user about a finished job, on stderr."""
    for note in rep.notes:
        warn(note)
    summary(rep, embeddings)
    mv = rep.mvector
    if mv is not None and not STATE["quiet"]:
        say(f"mvector eval.py: threshold:{mv.threshold:.5f}, EER:{mv.eer:.5f}, "
            f"MinDCF:{mv.min_dcf:.5f}")  # fmt: skip
    if rep.sim is not None:
        say_sim(rep.sim)
    ex = rep.extractor
    if ex is not None and ex.cache.write_error:
        warn(f"the cache could not be written ({ex.cache.write_error}); ran without it")
    if rep.counts["duplicate_trials"]:
        warn(f"{rep.counts['duplicate_trials']} duplicate trials (each scored and written)")
    if rep.stopped is not None:
        f = rep.stopped
        fail(f"stopped at the first bad recording (--on-error fail): {f.path}: {f.reason}")


def summary(rep: ScoreReport, embeddings: Path | None) -> None:
    if STATE["quiet"]:
        return
    counts, timing, metrics, ex = rep.counts, rep.timing, rep.metrics, rep.extractor
    if ex is None:
        say(
            f"{counts['scored']}/{counts['trials']} trials scored from the embeddings in "
            f"{escape(str(embeddings))}; {counts['recordings']} items, "
            f"{counts['failed_recordings']} without a vector; {timing['total_s']:.1f} s"
        )
    else:
        say(
            f"{counts['scored']}/{counts['trials']} trials scored with {ex.spec.alias} "
            f"({ex.device_label}, {ex.engine_cfg.precision}); {counts['recordings']} recordings: "
            f"{counts['embedded']} embedded, {counts['from_cache']} from cache; "
            f"{timing['total_s']:.1f} s"
        )
    if metrics is not None:
        err_console.print(c.metrics_table([("scores", metrics)], "Metrics (NIST SRE16 scorer)"))
    if rep.failures:
        from rich.table import Table

        t = Table(title=f"{len(rep.failures)} recordings failed "
                  f"({counts['failed']} trials not scored)", title_style="red")  # fmt: skip
        t.add_column("recording")
        t.add_column("reason")
        for f in rep.failures:
            t.add_row(escape(f.path), escape(f.reason))
        err_console.print(t)
    if ex is not None and ex.stats.chunked:
        say(f"{ex.stats.chunked} long recordings were embedded as averages of windows")


def trial_source(
    trials: Path | None, pairs: Path | None, mvector_lists: tuple[Path, Path] | None = None
) -> Path:
    """TRIALS, --pairs or --mvector-lists (exactly one); the trial file's path."""
    from ..errors import UsageError

    if mvector_lists is not None:
        if trials is not None or pairs is not None:
            raise UsageError("--mvector-lists replaces the trial list: give one or the other")
        return mvector_lists[1]
    if trials is not None and pairs is not None:
        raise UsageError("give a trial list or --pairs, not both")
    src = trials if trials is not None else pairs
    if src is None:
        raise UsageError("give a trial list (or --pairs meta.lst for TTS speaker similarity)")
    return src


def say_sim(sim: dict[str, Any]) -> None:
    """The TTS SIM line: mean over the scored pairs, always with how many of how many."""
    if STATE["quiet"]:
        return
    if sim["count_scored"]:
        say(f"SIM {sim['mean']:.4f} (std {sim['std']:.4f}) over {sim['count_scored']} of "
            f"{sim['count_total']} pairs")  # fmt: skip
    if sim["count_failed"]:
        reasons = ", ".join(f"{n} x {why}" for why, n in list(sim["failed_by_reason"].items())[:3])
        warn(f"{sim['count_failed']} of {sim['count_total']} pairs not scored (not in the "
             f"mean): {escape(reasons)}")  # fmt: skip
