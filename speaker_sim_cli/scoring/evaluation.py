"""Evaluate score files: read one (our CSV, Kaldi / 3D-Speaker, WeSpeaker), attach labels,
compute the metrics, and the report block ``eval`` and ``score`` share. numpy only, no torch."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

    from .metrics import Metrics


DEFAULT_P_TARGETS = (0.01, 0.05)


def metrics_block(m: Any) -> dict[str, Any]:
    """The report's ``metrics``: fractions, thresholds, one entry per p_target."""
    out: dict[str, Any] = {
        "eer": m.eer,
        "eer_threshold": m.eer_threshold,
        "min_dcf": {f"{p:g}": v for p, v in m.min_dcf.items()},
        "min_dcf_threshold": {f"{p:g}": v for p, v in m.min_dcf_threshold.items()},
        "c_miss": m.c_miss,
        "c_fa": m.c_fa,
    }
    if m.threshold is not None:
        out["threshold"] = m.threshold
        out["far"] = m.far
        out["frr"] = m.frr
        out["actual_dcf"] = {f"{p:g}": v for p, v in (m.actual_dcf or {}).items()}
    out["definition"] = m.definition
    return out


@dataclass
class FileResult:
    path: Path
    fmt: str
    labels_from: str
    scores: np.ndarray  # (n_scored,) float64, failed rows removed
    labels: np.ndarray  # (n_scored,) int8
    metrics: Metrics
    trials: int
    failed: int

    def doc(self) -> dict[str, Any]:
        """The per-file report, keyed as ``score --report`` keys its own."""
        return {
            "scores": str(self.path),
            "score_format": self.fmt,
            "labels": self.labels_from,
            "metrics": metrics_block(self.metrics),
            "counts": {
                "trials": self.trials,
                "scored": self.trials - self.failed,
                "failed": self.failed,
                "targets": self.metrics.n_targets,
                "nontargets": self.metrics.n_nontargets,
            },
        }


def p_targets(given: Sequence[float] | None, gate_p: float | None) -> list[float]:
    from ..errors import UsageError

    ps = list(dict.fromkeys(float(p) for p in (given or DEFAULT_P_TARGETS)))
    if gate_p is not None and gate_p not in ps:
        ps.append(float(gate_p))
    bad = [p for p in ps if not 0.0 < p < 1.0]
    if bad:
        raise UsageError(f"--p-target / --gate-p must be in (0, 1), got {bad[0]:g}")
    return ps


def read_labelled(
    path: Path, labels: Path | None, notes: list[str] | None = None
) -> tuple[Any, np.ndarray, str]:
    """``(table, labels (n,) int8, where the labels came from)``; UsageError when unlabelled.
    Disagreements between the score file's labels and ``labels`` go to ``notes``."""
    if notes is None:
        notes = []
    import numpy as np

    from ..errors import UsageError
    from ..io.scorefiles import attach_labels, read_scores

    table = read_scores(path)
    if labels is not None:
        labs = attach_labels(table, labels)
        if table.labels is not None:
            differ = int(np.count_nonzero(table.labels != labs))
            if differ:
                notes.append(
                    f"{path}: {differ} labels in the score file differ from {labels}; "
                    f"using {labels}"
                )
        return table, labs, str(labels)
    if table.labels is None:
        raise UsageError(f"{path}: no labels in the score file; pass --labels TRIALS")
    return table, table.labels, "score file"


def evaluate_file(
    path: Path,
    labels: Path | None,
    ps: list[float],
    c_miss: float,
    c_fa: float,
    threshold: float | None,
    notes: list[str] | None = None,
) -> FileResult:
    """Read a score file (labels from it or from ``labels``) and compute its metrics; rows
    without a score (failed trials) are left out and counted. A CSV or Parquet file with its
    own labels is read in chunks as two arrays (io/score_stream.py)."""
    import numpy as np

    from ..errors import UsageError
    from ..io.score_stream import score_arrays
    from .sorted_metrics import ScoreCollector

    arrays = score_arrays(path) if labels is None else None
    if arrays is not None:
        scores, labs, fmt = arrays
        if labs is None:
            raise UsageError(f"{path}: no labels in the score file; pass --labels TRIALS")
        source = "score file"
    else:
        table, labs, source = read_labelled(path, labels, notes)
        scores, fmt = table.scores, table.format
    ok = ~np.isnan(scores)
    s = scores[ok]
    y = labs[ok]
    n = len(scores)
    del scores, labs
    col = ScoreCollector(s.dtype.type)
    col.add(s, y)
    try:  # evaluate() itself, or the same numbers in less memory past a size
        m = col.evaluate(ps, c_miss=c_miss, c_fa=c_fa, threshold=threshold)
    except ValueError as exc:
        raise UsageError(f"{path}: {exc}") from None
    return FileResult(path, fmt, source, s, y, m, n, int(n - ok.sum()))
