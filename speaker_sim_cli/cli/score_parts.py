"""The parts of ``speaker-sim score`` below its option list: the extra scoring inputs, the
trial source, the enrolment / cohort options and the human summary."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from rich.markup import escape

from . import common as c
from .ui import STATE, err_console, say, warn

if TYPE_CHECKING:
    from ..pipeline import Extractor, ScoreResult, ScoringOptions


class Extras(NamedTuple):
    enroll_map: Path | None
    norm: str | None
    cohort: Path | None
    cohort_utt2spk: Path | None
    top_n: int
    mean_from: Path | None
    embeddings: Path | None = None
    score_scale: str | None = None  # --score-scale: an extra rescaled column (scoring/scales.py)
    gen_dir: Path | None = None  # --gen-dir: generated wavs of a seed-tts-eval meta.lst
    model_config: Path | None = None  # --model-config: mvector's training config.yml
    mvector_lists: tuple[Path, Path] | None = None  # --mvector-lists ENROLL TRIALS
    backend: str = "auto"  # --backend: torch, onnxruntime or auto (engine/config.py)


def keys_as_paths(opt: ScoringOptions) -> None:
    """With --embeddings, every recording of the options is looked up by its key as written."""
    from ..records import Recording

    def keyed(rs: list[Recording]) -> list[Recording]:
        return [Recording(r.key, Path(r.key)) for r in rs]

    if opt.enroll_map is not None:
        opt.enroll_map = {spk: keyed(rs) for spk, rs in opt.enroll_map.items()}
    if opt.cohort is not None:
        opt.cohort = keyed(opt.cohort)
    if opt.mean_from is not None:
        opt.mean_from = keyed(opt.mean_from)


def scoring_options(
    x: Extras, root: Path, scp: dict[str, str] | None, scp_dir: Path | None
) -> ScoringOptions:
    from ..errors import UsageError
    from ..io.trials import read_inputs, read_spk2utt, read_utt2spk, resolve_path
    from ..pipeline import ScoringOptions
    from ..records import Recording

    def rec(item: str) -> Recording:
        if scp is not None:
            if item not in scp:
                raise UsageError(f"{x.enroll_map}: utterance id {item!r} is not in wav.scp")
            return Recording(item, resolve_path(scp[item], scp_dir or Path.cwd()))
        return Recording(item, resolve_path(item, root))

    if x.norm and x.cohort is None:
        raise UsageError(f"--norm {x.norm} needs --cohort (a list of cohort recordings)")
    if x.cohort_utt2spk is not None and x.cohort is None:
        raise UsageError("--cohort-utt2spk needs --cohort")
    opt = ScoringOptions(norm=x.norm, top_n=x.top_n)
    if x.enroll_map is not None:
        opt.enroll_map = {
            spk: [rec(u) for u in utts] for spk, utts in read_spk2utt(x.enroll_map).items()
        }
    if x.cohort is not None:
        opt.cohort = read_inputs([str(x.cohort)])
        if x.cohort_utt2spk is not None:
            u2s = read_utt2spk(x.cohort_utt2spk)
            lost = [r.key for r in opt.cohort if r.key not in u2s]
            if lost:
                raise UsageError(f"{x.cohort_utt2spk}: no speaker for cohort item {lost[0]!r}")
            opt.cohort_speakers = [u2s[r.key] for r in opt.cohort]
    if x.mean_from is not None:
        opt.mean_from = read_inputs([str(x.mean_from)])
    return opt


def summary(
    res: ScoreResult,
    counts: dict[str, Any],
    timing: dict[str, Any],
    metrics: Any,
    ex: Extractor | None,
    embeddings: Path | None,
) -> None:
    if STATE["quiet"]:
        return
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
    if res.failures:
        from rich.table import Table

        t = Table(title=f"{len(res.failures)} recordings failed "
                  f"({counts['failed']} trials not scored)", title_style="red")  # fmt: skip
        t.add_column("recording")
        t.add_column("reason")
        for f in res.failures:
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
