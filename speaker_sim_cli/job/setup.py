"""What a scoring job is built from: the trial source, the model / engine (or precomputed
embeddings), the scoring options and the output targets, as plain dataclasses, and how they
resolve to the records the stages take (trial list, recordings, cohort, enroll map)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..engine.config import EngineConfig
from ..errors import UsageError
from ..models.registry import DEFAULT_MODEL
from ..records import Recording, TrialList
from .items import ScoringOptions

if TYPE_CHECKING:
    from ..engine.ray_engine import RayOptions
    from ..pipeline import EmbeddingSource


@dataclass
class TrialSource:
    """A trial list: parsed already (``trials``; rows in memory: :func:`trials_from_memory`),
    or a file (``path``; a seed-tts-eval meta.lst with ``gen_dir``; mvector's two lists with
    ``mvector_lists``). Items are paths relative to ``root`` (default: the list's folder), or
    utterance ids of ``wav_scp``."""

    path: Path | None = None
    trials: TrialList | None = None
    gen_dir: Path | None = None
    mvector_lists: tuple[Path, Path] | None = None
    wav_scp: Path | None = None
    root: Path | None = None
    allow_commands: bool = False

    def load(self) -> TrialList:
        if self.trials is not None:
            return self.trials
        if self.mvector_lists is not None:
            from ..io.mvector_lists import read_mvector_lists

            return read_mvector_lists(*self.mvector_lists)
        if self.path is None:
            raise UsageError("give a trial list")
        from ..io.trials import read_trials

        return read_trials(self.path, self.gen_dir)

    @property
    def scp_dir(self) -> Path | None:
        from ..io.trials import source_folder  # a URL's folder for a wav.scp in a bucket

        return source_folder(str(self.wav_scp)) if self.wav_scp is not None else None  # type: ignore[return-value]


@dataclass
class ModelSource:
    """Where the vectors come from: a model run by an engine (local, device shards or Ray),
    embeddings computed earlier (``embeddings``: an ``embed`` folder or an xvector.scp), or an
    already built source (``source``: an Extractor, or the API's memory-cached one)."""

    model: str = DEFAULT_MODEL
    model_dir: Path | None = None
    model_config: Path | None = None
    # An EngineConfig, or a function that makes one: then its option errors come after the
    # inputs are checked, and not at all with precomputed embeddings (as ``score`` always did).
    engine: EngineConfig | Callable[[], EngineConfig] = field(default_factory=EngineConfig)
    cache_dir: Path | None = None
    use_cache: bool = True
    ray: RayOptions | None = None
    embeddings: Path | None = None
    source: EmbeddingSource | None = None

    def engine_config(self) -> EngineConfig:
        return self.engine if isinstance(self.engine, EngineConfig) else self.engine()


@dataclass
class ScoringSetup:
    """How trials are scored and evaluated (the ``score`` options of the same names)."""

    p_targets: list[float] = field(default_factory=lambda: [0.01, 0.05])
    on_error: str = "keep"  # keep | skip | fail
    enroll_map: Path | None = None
    norm: str | None = None
    cohort: Path | None = None
    cohort_utt2spk: Path | None = None
    top_n: int = 300
    mean_from: Path | None = None
    score_scale: str | None = None


@dataclass
class Outputs:
    """Where results go. ``out=None`` with ``stdout=True`` writes the scores to stdout (the
    CLI); with ``stdout=False`` nowhere (the API, which returns them)."""

    out: Path | None = None
    fmt: str = "csv"
    report: Path | None = None
    stdout: bool = False
    invocation: dict[str, Any] | None = None  # the CLI's resolved options, for the report
    # True: a trial file is scored in chunks (job/stream_stage.py; what ``score`` does), and
    # the report has no per-trial arrays (trial_list, scores, errors). False (the library's
    # default) scores it whole and keeps them.
    stream: bool = False


def scoring_options(
    x: ScoringSetup, root: Path, scp: dict[str, str] | None, scp_dir: Path | None
) -> ScoringOptions:
    """Read the enrolment map, cohort and mean lists the setup names."""
    from ..io.trials import read_inputs, read_spk2utt, read_utt2spk, resolve_path

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


def keys_as_paths(opt: ScoringOptions) -> None:
    """With precomputed embeddings, every recording of the options is looked up by its key."""

    def keyed(rs: list[Recording]) -> list[Recording]:
        return [Recording(r.key, Path(r.key)) for r in rs]

    if opt.enroll_map is not None:
        opt.enroll_map = {spk: keyed(rs) for spk, rs in opt.enroll_map.items()}
    if opt.cohort is not None:
        opt.cohort = keyed(opt.cohort)
    if opt.mean_from is not None:
        opt.mean_from = keyed(opt.mean_from)


def trials_from_memory(trials: Any) -> TrialList:
    """A TrialList from a DataFrame or an iterable of (enrollment, test[, label])."""
    import numpy as np

    from ..io.trials import _header_columns, parse_label

    enroll: list[str] = []
    test: list[str] = []
    labels: list[int] = []
    if hasattr(trials, "columns") and hasattr(trials, "itertuples"):
        cols_found = _header_columns([str(c) for c in trials.columns])
        if cols_found is None:
            if len(trials.columns) < 2:
                raise UsageError("trials DataFrame needs enrollment and test columns")
            cols_found = (0, 1, None)
        e, t, lab = cols_found
        cols = [trials.columns[e], trials.columns[t]]
        if lab is not None:
            cols.append(trials.columns[lab])
        rows: Iterable[Sequence[Any]] = trials[cols].itertuples(index=False, name=None)
    else:
        rows = trials
    has_label: bool | None = None
    for n, row in enumerate(rows, 1):
        r = tuple(row)
        if len(r) not in (2, 3):
            raise UsageError(f"trial {n}: expected (enrollment, test[, label]), got {len(r)} items")
        if has_label is None:
            has_label = len(r) == 3
        elif has_label != (len(r) == 3):
            raise UsageError(f"trial {n}: some trials have a label and some do not")
        enroll.append(os.fspath(r[0]) if isinstance(r[0], os.PathLike) else str(r[0]))
        test.append(os.fspath(r[1]) if isinstance(r[1], os.PathLike) else str(r[1]))
        if len(r) == 3:
            labels.append(parse_label(str(r[2]), f"trial {n}"))
    if not enroll:
        raise UsageError("no trials")
    return TrialList(
        enroll,
        test,
        np.asarray(labels, dtype=np.int8) if has_label else None,
        source="<memory>",
        format="memory",
        line_numbers=list(range(1, len(enroll) + 1)),
    )
