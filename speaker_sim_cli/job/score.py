"""``ScoreJob``: one scoring run, the same for ``speaker-sim score``, ``SpeakerSim.score``
and Ray: trial list -> recordings -> embedding stage (cache, then the engine) -> scoring stage
(cosine, normalisation, scores written) -> metrics -> one :class:`ScoreReport`.

The job never prints and never exits: usage problems raise
:class:`~speaker_sim_cli.errors.UsageError` before any model work, a failed recording costs
only its trials (the report lists it), and progress goes to an optional callback.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import IO, Any

import numpy as np

from ..errors import UsageError
from ..io.storage import is_url
from ..io.trials import source_folder
from ..pipeline import EmbeddingSource, Extractor
from ..records import Recording, TrialList
from .events import Progress, ProgressFn, embed_callbacks
from .items import Embedded, ScoringOptions, embed_items
from .report import ScoreReport, job_report, write_json
from .setup import ModelSource, Outputs, ScoringSetup, TrialSource, keys_as_paths, scoring_options
from .stage import ScoreWriter, ScoringStage, StageResult, score_stage


class ScoreJob:
    """A trial list scored by one model, written to its outputs; :meth:`run` does it."""

    def __init__(
        self,
        trials: TrialSource | TrialList | str | Path,
        model: ModelSource | None = None,
        scoring: ScoringSetup | None = None,
        outputs: Outputs | None = None,
        stage: ScoringStage = score_stage,
    ) -> None:
        if isinstance(trials, TrialList):
            trials = TrialSource(trials=trials)
        elif not isinstance(trials, TrialSource):
            trials = TrialSource(path=Path(trials))
        self.source = trials
        self.model = model or ModelSource()
        self.scoring = scoring or ScoringSetup()
        self.outputs = outputs or Outputs()
        self.stage = stage  # the scoring stage (job/stage.py's contract): in memory by default
        self.extractor: Extractor | None = None  # set by run() when a model is used

    # -- the run ------------------------------------------------------------------------
    def run(self, progress: ProgressFn | None = None) -> ScoreReport:
        """Score every trial; write the scores and the report; return the report."""
        from .stream_stage import run_streamed, streamable

        if streamable(self):
            report = run_streamed(self, progress)
            if self.outputs.report is not None:
                write_json(self.outputs.report, report.to_dict())
            return report
        t0 = time.perf_counter()
        tl, scp, options = self._prepare()
        t_load = time.perf_counter()
        source, recs, missing = self._embedding_source(tl, scp, options)
        load_s = time.perf_counter() - t_load
        advance, start = embed_callbacks(progress)
        stop = self.scoring.on_error == "fail"
        emb = embed_items(tl, recs, missing, source, advance, start, stop, options)
        if progress is not None:
            progress(Progress("embed", "done"))
            progress(Progress("score", "start", len(tl)))
        stage = self.stage(tl.enroll, tl.test, emb.vectors, self._writer(tl),
                           options.norm, options.top_n)  # fmt: skip
        if progress is not None:
            progress(Progress("score", "done", len(tl)))
        report = self._report(tl, source, emb, stage, t0, load_s)
        if self.outputs.report is not None:
            write_json(self.outputs.report, report.to_dict())
        return report

    # -- stages -------------------------------------------------------------------------
    def _prepare(self) -> tuple[TrialList, dict[str, str] | None, ScoringOptions]:
        """Read and check every input before any model work (usage errors first)."""
        from ..io.scorefiles import check_whitespace_safe
        from ..io.trials import read_wav_scp

        src, m, out = self.source, self.model, self.outputs
        tl = src.load()
        if m.embeddings is not None and src.wav_scp is not None:
            raise UsageError("--embeddings and --wav-scp do not go together: trial items are keys")
        if m.embeddings is not None and m.ray is not None:
            raise UsageError("--embeddings and --ray do not go together: nothing is embedded")
        scp = read_wav_scp(src.wav_scp, src.allow_commands) if src.wav_scp else None
        if src.root is not None and not is_url(src.root) and not src.root.is_dir():
            raise UsageError(f"--root {src.root}: not a folder")
        check_whitespace_safe(tl.items(), out.fmt)
        if self.scoring.score_scale and out.fmt != "csv":
            raise UsageError(f"--score-scale adds a column, which the {out.fmt} format has no "
                             "place for: use --format csv")  # fmt: skip
        root = src.root or source_folder(tl.source)
        return tl, scp, scoring_options(self.scoring, root, scp, src.scp_dir)  # type: ignore[arg-type]

    def _embedding_source(
        self, tl: TrialList, scp: dict[str, str] | None, options: ScoringOptions
    ) -> tuple[EmbeddingSource, dict[str, Recording], dict[str, str]]:
        """The vectors' source (precomputed, given, or a new Extractor) and the recordings."""
        from ..io.trials import resolve_trial_items

        m = self.model
        if m.embeddings is not None:
            from ..io.precomputed import PrecomputedEmbeddings

            keys_as_paths(options)  # items are the source's keys: no path resolution anywhere
            recs = {k: Recording(k, Path(k)) for k in tl.items()}
            return PrecomputedEmbeddings.load(m.embeddings), recs, {}
        recs, missing = resolve_trial_items(tl, self.source.root, scp, self.source.scp_dir)
        source = m.source
        if source is None:
            source = Extractor(m.model, m.model_dir, m.engine_config(), m.cache_dir,
                               use_cache=m.use_cache, ray=m.ray,
                               model_config=m.model_config)  # fmt: skip
        ex = source if isinstance(source, Extractor) else getattr(source, "extractor", None)
        self.extractor = ex if isinstance(ex, Extractor) else None
        return source, recs, missing

    def _writer(self, tl: TrialList) -> ScoreWriter | None:
        """The scoring stage's ``write``: the score file (atomic) or stdout, in input order."""
        out = self.outputs
        if out.out is None and not out.stdout:
            return None

        def write(scores: np.ndarray, errors: list[str | None]) -> int:
            from ..io.scorefiles import atomic_text_output, write_scores
            from ..scoring.scales import rescaled_columns

            def to(stream: IO[str]) -> int:
                return write_scores(
                    stream, tl.enroll, tl.test, scores, tl.labels, errors, out.fmt,
                    skip_failed=self.scoring.on_error == "skip",
                    extra=rescaled_columns(self.scoring.score_scale, scores),
                )  # fmt: skip

            return atomic_text_output(out.out, to)

        return write

    def _metrics(self, tl: TrialList, stage: StageResult, notes: list[str]) -> tuple[Any, Any]:
        """EER / minDCF from the scored trials' scores and labels, and mvector's block."""
        labels = tl.labels
        if labels is None:
            return None, None
        from ..scoring.metrics import evaluate

        ok = stage.ok
        try:
            metrics = evaluate(stage.scores[ok], labels[ok], p_targets=self.scoring.p_targets)
        except ValueError as exc:
            notes.append(f"no metrics: {exc}")
            return None, None
        if tl.format != "mvector-lists":
            return metrics, None
        from ..scoring.mvector_eval import mvector_metrics

        return metrics, mvector_metrics(stage.scores[ok], labels[ok])

    def _report(
        self,
        tl: TrialList,
        source: EmbeddingSource,
        emb: Embedded,
        stage: StageResult,
        t0: float,
        load_s: float,
    ) -> ScoreReport:
        labels = tl.labels
        notes: list[str] = []
        metrics, mv = self._metrics(tl, stage, notes)
        sim = None
        if tl.format.startswith("seed-tts-eval"):
            from ..io.pairs import sim_summary

            sim = sim_summary(tl, stage.scores, {f.key: f.reason for f in emb.failures})
        return job_report(
            self,
            trials=tl.describe(),
            trial_counts={
                "trials": len(tl),
                "scored": int(stage.ok.sum()),
                "failed": int((~stage.ok).sum()),
                "written": stage.written,
                "targets": int(labels.sum()) if labels is not None else None,
                "nontargets": int(len(labels) - labels.sum()) if labels is not None else None,
            },
            duplicates=len(tl) - len(set(zip(tl.enroll, tl.test))),
            recordings=emb.recordings,
            failures=emb.failures,
            result=emb.result,
            model=source.describe(),
            vectors_info=emb.vectors.info,
            stage_info=stage.info,
            metrics=metrics,
            t0=t0,
            load_s=load_s,
            sim=sim,
            mvector=mv,
            trial_list=tl,
            scores=stage.scores,
            errors=stage.errors,
            notes=notes,
        )
