"""The report of a scoring job: one dataclass whose ``to_dict`` is the JSON that
``score --report`` and ``SpeakerSim.score(report=...)`` both write, plus the per-trial arrays
and notes that callers render (never serialised)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..records import Failure, TrialList

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
    """Write ``doc`` to ``path`` atomically (temp + rename)."""
    from ..paths import atomic_write_bytes

    atomic_write_bytes(path, json_bytes(doc))


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
