"""The report of a scoring job: one dataclass whose ``to_dict`` is the JSON that
``score --report`` and ``SpeakerSim.score(report=...)`` both write, plus the per-trial arrays
and notes that callers render (never serialised); :func:`job_report` builds it for both
scoring routes (in memory and streamed)."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..records import EmbedResult, Failure, TrialList

if TYPE_CHECKING:
    from .score import ScoreJob

# Keys of the report that differ between two runs of the same job: how long it took, and how
# the run was invoked (the CLI's resolved options). Everything else is equal on equal inputs.
PER_RUN_KEYS = ("timing", "invocation")


def clean_json(x: Any) -> Any:
    """``x`` with numpy scalars as Python numbers and non-finite floats as None."""
    if isinstance(x, dict):
        return {str(k): clean_json(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [clean_json(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if hasattr(x, "item") and not isinstance(x, str | bytes):
        return clean_json(x.item())
    return x


def json_bytes(doc: dict[str, Any]) -> bytes:
    """The report file's bytes (indented JSON and a newline)."""
    return (json.dumps(clean_json(doc), indent=2) + "\n").encode()


def write_json(path: Path, doc: dict[str, Any]) -> None:
    """Write ``doc`` to ``path`` (a local path or a URL such as ``s3://...``) atomically."""
    from ..io.storage import atomic_write

    atomic_write(path, json_bytes(doc))


@dataclass
class ScoreReport:
    """What a :class:`~speaker_sim_cli.job.score.ScoreJob` did.

    The serialised fields (``to_dict``) are the report; ``timing`` and ``invocation`` are the
    only per-run ones (:data:`PER_RUN_KEYS`). ``trial_list``, ``scores``, ``errors``,
    ``notes``, ``stopped`` and ``extractor`` are for the caller and never written.
    """

    trials: dict[str, Any]
    metrics: Any  # scoring.metrics.Metrics or None
    counts: dict[str, Any]
    model: dict[str, Any]
    engine: dict[str, Any]  # {"engine": "local"} / {"engine": "ray", "ray": ...}; {} without one
    extraction: dict[str, Any]
    failures: list[Failure]
    sim: dict[str, Any] | None
    mvector: Any  # scoring.mvector_eval.MvectorMetrics or None
    scoring: dict[str, Any]
    timing: dict[str, Any]
    scores_to: str
    score_format: str
    invocation: dict[str, Any] | None = None
    # -- not serialised -------------------------------------------------------------------
    trial_list: TrialList | None = field(default=None, repr=False)
    scores: np.ndarray | None = field(default=None, repr=False)
    errors: list[str | None] | None = field(default=None, repr=False)
    notes: list[str] = field(default_factory=list)  # warnings for the user, in order
    stopped: Failure | None = None  # --on-error fail: the failure the run stopped at
    extractor: Any = field(default=None, repr=False)  # the pipeline.Extractor, if any

    @property
    def ok(self) -> np.ndarray:
        assert self.scores is not None
        return ~np.isnan(self.scores)

    def to_dict(self) -> dict[str, Any]:
        from ..scoring.evaluation import metrics_block

        doc: dict[str, Any] = {
            "trials": self.trials,
            "metrics": metrics_block(self.metrics) if self.metrics is not None else None,
            "counts": self.counts,
            "model": self.model,
            **self.engine,
            "extraction": self.extraction,
            "failures": [f.to_dict() for f in self.failures],
            **({"sim": self.sim} if self.sim is not None else {}),
            **({"mvector": self.mvector.to_dict()} if self.mvector is not None else {}),
            "scoring": self.scoring,
            "timing": self.timing,
            "scores": self.scores_to,
            "score_format": self.score_format,
        }
        if self.invocation is not None:
            doc["invocation"] = self.invocation
        return doc

    def comparable(self) -> dict[str, Any]:
        """``to_dict`` without the per-run keys, as JSON would give it back."""
        doc = json.loads(json_bytes(self.to_dict()))
        return {k: v for k, v in doc.items() if k not in PER_RUN_KEYS}


def job_report(
    job: ScoreJob,
    *,
    trials: dict[str, Any],
    trial_counts: dict[str, Any],
    duplicates: int | None,
    recordings: int,
    failures: list[Failure],
    result: EmbedResult,
    model: dict[str, Any],
    vectors_info: dict[str, Any],
    stage_info: dict[str, Any],
    metrics: Any,
    t0: float,
    load_s: float,
    **rest: Any,
) -> ScoreReport:
    """The report of ``job`` (both scoring routes): ``trial_counts`` are the trial list's
    counts (trials .. nontargets), then the recordings', the engine's and the run's blocks;
    ``rest`` are further :class:`ScoreReport` fields (sim, mvector, notes, scores, ...)."""
    from ..engine.config import EngineStats

    ex, out, scale = job.extractor, job.outputs, job.scoring.score_scale
    counts = {
        **trial_counts,
        "recordings": recordings,
        "failed_recordings": len(failures),
        "embedded": result.embedded,
        "from_cache": result.cached,
        "duplicate_trials": duplicates,
    }
    st = ex.stats if ex is not None else EngineStats()
    timing = {
        "total_s": round(time.perf_counter() - t0, 3),
        "model_load_s": round(load_s + (ex.load_seconds if ex is not None else 0.0), 3),
        "embed_s": round(result.seconds, 3),
        "audio_s": round(st.audio_seconds, 3),
        "x_realtime": round(st.audio_seconds / result.seconds, 1)
        if result.seconds > 0 and st.audio_seconds
        else None,
    }
    rest.setdefault("sim", None)
    rest.setdefault("mvector", None)
    return ScoreReport(
        trials=trials,
        metrics=metrics,
        counts=counts,
        model=model,
        engine=ex.engine_report() if ex is not None else {},
        extraction={
            "chunked_recordings": st.chunked,
            "padding_overhead": round(st.padded_frames / st.frames - 1, 4) if st.frames else 0.0,
        },
        failures=failures,
        scoring={
            "method": "cosine",
            **vectors_info,
            **stage_info,
            **({"score_scale": scale} if scale else {}),
        },
        timing=timing,
        scores_to=str(out.out) if out.out else ("stdout" if out.stdout else "none"),
        score_format=out.fmt,
        invocation=out.invocation,
        stopped=failures[0] if job.scoring.on_error == "fail" and failures else None,
        extractor=ex,
        **rest,
    )
