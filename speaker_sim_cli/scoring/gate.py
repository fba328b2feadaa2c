"""The regression gate behind ``speaker-sim eval --max-eer / --max-min-dcf / --baseline``,
callable from Python.

* :func:`limit_check`: a metric against a ceiling (EER and minDCF are fractions).
* :func:`load_baseline` reads an earlier ``eval`` or ``score`` JSON report (single-file or
  ``{"files": ...}``) into :class:`BaselineMetrics`; :func:`match_baseline` picks a file's entry.
* :func:`baseline_checks`: EER and minDCF at every p_target both runs report; fails when
  ``new > old + tolerance``.
* :func:`run_gate`: all of the above for a set of evaluated files, as the CLI runs it.

No torch; numpy only through the metrics it is given.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .metrics import Metrics


@dataclass(frozen=True)
class BaselineMetrics:
    """The comparable part of a report: EER, minDCF per p_target, the costs it used."""

    eer: float
    min_dcf: dict[float, float]
    c_miss: float | None = None
    c_fa: float | None = None


def _num(x: Any, where: str) -> float:
    from ..errors import UsageError

    if isinstance(x, bool) or not isinstance(x, int | float):
        raise UsageError(f"{where}: expected a number, found {x!r}")
    return float(x)


def baseline_block(d: Any, where: str) -> BaselineMetrics:
    from ..errors import UsageError

    if not isinstance(d, Mapping):
        raise UsageError(f"{where}: not a JSON object")
    if "metrics" in d:
        d = d["metrics"]
        if d is None:
            raise UsageError(f"{where}: the report has no metrics (were the trials labelled?)")
        if not isinstance(d, Mapping):
            raise UsageError(f"{where}: 'metrics' is not a JSON object")
    if "eer" not in d:
        raise UsageError(f"{where}: no 'eer' in the report; is it an eval or score report?")
    mdcf: dict[float, float] = {}
    if isinstance(d.get("min_dcf"), Mapping):  # common.metrics_block: {"0.01": v}
        items = [(k, v) for k, v in d["min_dcf"].items()]
    else:  # flat Metrics.to_dict / reference files: "min_dcf_p0.01": v
        items = [(k[len("min_dcf_p") :], v) for k, v in d.items() if k.startswith("min_dcf_p")]
    for k, v in items:
        if v is None:
            continue
        try:
            p = float(k)
        except ValueError:
            raise UsageError(f"{where}: bad p_target key {k!r} in min_dcf") from None
        mdcf[p] = _num(v, f"{where}: min_dcf[{k}]")
    cm = d.get("c_miss")
    cf = d.get("c_fa")
    return BaselineMetrics(
        eer=_num(d["eer"], f"{where}: eer"),
        min_dcf=mdcf,
        c_miss=None if cm is None else _num(cm, f"{where}: c_miss"),
        c_fa=None if cf is None else _num(cf, f"{where}: c_fa"),
    )


def load_baseline(path: Path) -> dict[str, BaselineMetrics]:
    """Baseline metrics by score-file path ('' for a single-file report)."""
    from ..errors import UsageError
    from ..io.trials import read_text

    text = read_text(path)
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--baseline {path}: not JSON ({exc})") from None
    if isinstance(doc, Mapping) and isinstance(doc.get("files"), Mapping):
        if not doc["files"]:
            raise UsageError(f"--baseline {path}: 'files' is empty")
        return {
            str(k): baseline_block(v, f"--baseline {path}: files[{k}]")
            for k, v in doc["files"].items()
        }
    return {"": baseline_block(doc, f"--baseline {path}")}


def match_baseline(
    refs: dict[str, BaselineMetrics], path: Path, baseline: Path | None
) -> BaselineMetrics:
    from ..errors import UsageError

    if len(refs) == 1:
        return next(iter(refs.values()))
    if str(path) in refs:
        return refs[str(path)]
    res = path.resolve()
    for k, v in refs.items():
        if Path(k).resolve() == res:
            return v
    same = [k for k in refs if Path(k).name == path.name]
    if len(same) == 1:
        return refs[same[0]]
    raise UsageError(
        f"--baseline {baseline}: no entry for {path} (it has {', '.join(sorted(refs))})"
    )


def _metric_name(key: str) -> str:
    if key == "eer":
        return "EER"
    return "minDCF(" + key[len("min_dcf[") : -1] + ")"


def limit_check(name: str, prefix: str, key: str, value: float, limit: float) -> dict[str, Any]:
    ok = value <= limit
    reason = f"{prefix}{_metric_name(key)} {value:.6f} > max {limit:g}"
    return {
        "file": name,
        "metric": key,
        "value": value,
        "max": limit,
        "passed": ok,
        "reason": None if ok else reason,
    }


def baseline_checks(
    name: str,
    prefix: str,
    m: Metrics,
    ref: BaselineMetrics,
    tolerance: float,
    dcf_tolerance: float,
    baseline: Path | None,
    notes: list[str] | None = None,
) -> list[dict[str, Any]]:
    """EER and every common minDCF against the baseline: a check dict each (``passed``,
    ``reason``). ``new > old + tolerance`` fails; improvements never do. Raises UsageError when
    the costs differ (minDCF values would not be comparable)."""
    from ..errors import UsageError

    for cost, new, old in (("c_miss", m.c_miss, ref.c_miss), ("c_fa", m.c_fa, ref.c_fa)):
        if old is not None and not math.isclose(new, old):
            raise UsageError(
                f"--baseline {baseline} used {cost}={old:g}, this run {cost}={new:g}: "
                "minDCF values are not comparable"
            )
    pairs: list[tuple[str, float, float]] = [("eer", m.eer, ref.eer)]
    common_ps = [p for p in m.min_dcf if any(math.isclose(p, q) for q in ref.min_dcf)]
    for p in common_ps:
        q = next(q for q in ref.min_dcf if math.isclose(p, q))
        pairs.append((f"min_dcf[{p:g}]", m.min_dcf[p], ref.min_dcf[q]))
    if ref.min_dcf and not common_ps and notes is not None:
        notes.append(f"--baseline {baseline}: no p_target in common; only EER is compared")
    out = []
    for key, new, old in pairs:
        tol = tolerance if key == "eer" else dcf_tolerance
        ok = new <= old + tol
        reason = (
            f"{prefix}{_metric_name(key)} {new:.6f} is worse than baseline {old:.6f} "
            f"by {new - old:.6f} (tolerance {tol:g})"
        )
        out.append(
            {
                "file": name,
                "metric": key,
                "value": new,
                "baseline": old,
                "passed": ok,
                "reason": None if ok else reason,
            }
        )
    return out


@dataclass
class GateResult:
    """Every check made (``passed``, ``reason`` each), the failure reasons, and notes."""

    checks: list[dict[str, Any]]
    tolerance: dict[str, float]
    notes: list[str] = field(default_factory=list)

    @property
    def failures(self) -> list[str]:
        return [ck["reason"] for ck in self.checks if not ck["passed"]]

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "tolerance": self.tolerance, "checks": self.checks}


def run_gate(
    files: Sequence[tuple[str, Path, Metrics]],
    *,
    max_eer: float | None = None,
    max_min_dcf: float | None = None,
    gate_p: float = 0.01,
    baseline: Path | None = None,
    tolerance: float = 0.0,
    dcf_tolerance: float | None = None,
    refs: Mapping[str, BaselineMetrics] | None = None,
) -> GateResult:
    """Gate ``files`` (display name, score-file path, metrics): ceilings, then the baseline.

    >>> from speaker_sim_cli.scoring.metrics import evaluate
    >>> m = evaluate([0.9, 0.8, 0.3, 0.1], [1, 1, 0, 0], p_targets=[0.01])
    >>> run_gate([("dev", Path("dev.csv"), m)], max_eer=0.02).passed
    True
    """
    if refs is None and baseline is not None:
        refs = load_baseline(baseline)
    dcf_tol = tolerance if dcf_tolerance is None else dcf_tolerance
    result = GateResult([], {"eer": tolerance, "min_dcf": dcf_tol})
    for name, path, m in files:
        prefix = f"{name}: " if len(files) > 1 else ""
        if max_eer is not None:
            result.checks.append(limit_check(name, prefix, "eer", m.eer, max_eer))
        if max_min_dcf is not None:
            key = f"min_dcf[{gate_p:g}]"
            result.checks.append(limit_check(name, prefix, key, m.min_dcf[gate_p], max_min_dcf))
        if refs is not None:
            ref = match_baseline(dict(refs), path, baseline)
            result.checks.extend(
                baseline_checks(name, prefix, m, ref, tolerance, dcf_tol, baseline, result.notes)
            )
    return result
