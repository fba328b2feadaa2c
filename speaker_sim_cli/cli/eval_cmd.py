"""``speaker-sim eval``: metrics, DET / histogram pictures and a CI gate from score files.

Reads our CSV, Kaldi / 3D-Speaker (``enroll test label score``) and WeSpeaker
(``enroll test score target|nontarget``) score files, detected from the content. The JSON
report has the keys ``score --report`` writes (``metrics`` from :func:`common.metrics_block`,
``counts``, ``scores``, ``score_format``), so either report can be the ``--baseline`` of a
later run.

Gate semantics (exit 1 with one line naming the metric, the old / limit and the new value):

* ``--max-eer X``: EER > X fails (fractions: 0.02 is 2 %).
* ``--max-min-dcf Y``: minDCF at ``--gate-p`` (default 0.01) > Y fails.
* ``--baseline OLD.json --tolerance T``: EER, and minDCF at every p_target both runs report,
  fail when ``new > old + T`` (T absolute, in the metric's own unit; default 0: any
  worsening fails; ``--dcf-tolerance`` sets another T for minDCF). Improvements never fail.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from . import common as c
from .ui import EXIT_FAILURE, STATE, err_console, errors_to_exit, say, warn

if TYPE_CHECKING:
    import numpy as np
    from rich.table import Table

    from ..scoring.metrics import Metrics

DEFAULT_P_TARGETS = (0.01, 0.05)


def eval_scores(
    scores: Annotated[
        list[Path],
        typer.Argument(
            help="Score files: our CSV, kaldi or wespeaker (detected).",
            show_default=False,
            metavar="SCORES...",
        ),
    ],
    labels: Annotated[
        Path | None,
        typer.Option(
            help="Labelled trial list; labels are looked up by (enroll, test) and "
            "used instead of any in the score files. Works with every format."
        ),
    ] = None,
    p_target: Annotated[
        list[float] | None,
        typer.Option(
            min=0.0, max=1.0, help="Target prior of a minDCF; repeatable (default: 0.01 and 0.05)."
        ),
    ] = None,
    c_miss: Annotated[float, typer.Option(min=0.0, help="Cost of a miss.")] = 1.0,
    c_fa: Annotated[float, typer.Option(min=0.0, help="Cost of a false alarm.")] = 1.0,
    threshold: Annotated[
        float | None,
        typer.Option(
            help="Also report FAR, FRR and the actual DCF at this threshold "
            "(accept when score > threshold)."
        ),
    ] = None,
    report: Annotated[
        Path | None, typer.Option(help="Write the JSON report here (default: stdout).")
    ] = None,
    plot: Annotated[
        Path | None,
        typer.Option(
            help="Write det.png (all files overlaid) and hist_<name>.png per file "
            "into this folder.",
            file_okay=False,
        ),
    ] = None,
    max_eer: Annotated[
        float | None,
        typer.Option(
            min=0.0, max=1.0, help="Gate: exit 1 when EER (a fraction: 0.02 = 2 %) is above this."
        ),
    ] = None,
    max_min_dcf: Annotated[
        float | None,
        typer.Option(min=0.0, help="Gate: exit 1 when minDCF at --gate-p is above this."),
    ] = None,
    gate_p: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=1.0,
            help="The p_target whose minDCF --max-min-dcf limits (added to the "
            "reported ones when missing).",
        ),
    ] = 0.01,
    baseline: Annotated[
        Path | None,
        typer.Option(
            help="Gate: a JSON report of an earlier `eval --report` or "
            "`score --report`; exit 1 when EER or a minDCF got worse.",
            dir_okay=False,
        ),
    ] = None,
    tolerance: Annotated[
        float,
        typer.Option(
            min=0.0,
            help="Absolute worsening --baseline allows (0.002 = 0.2 EER points or 0.002 minDCF).",
        ),
    ] = 0.0,
    dcf_tolerance: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            help="Absolute worsening --baseline allows for minDCF (default: --tolerance). "
            "On small sets one non-target trial moves minDCF(0.01) by about 99/n_nontargets.",
            show_default=False,
        ),
    ] = None,
    quiet: c.QuietOpt = False,
) -> None:
    """EER and minDCF as the NIST SRE16 scorer that 3D-Speaker and WeSpeaker share.

    Scores sorted ascending; FNR = cumsum(targets)/n_targets, FPR = 1 -
    cumsum(nontargets)/n_nontargets; EER linearly interpolated at the FNR/FPR crossing;
    minDCF = min(c_miss*FNR*p + c_fa*FPR*(1-p)) / min(c_miss*p, c_fa*(1-p)). A trial is
    accepted when score > threshold. Rates are fractions. Rows without a score (failed) are
    left out and counted. With --max-eer, --max-min-dcf or --baseline it is a CI gate: the
    report is written first, then a worse metric exits 1 with one line saying which.
    Exit codes: 0 done (gate passed), 1 a gate failed, 2 usage error (bad file or option).
    """
    STATE["quiet"] = quiet
    with errors_to_exit():
        ps = _p_targets(p_target, gate_p if max_min_dcf is not None else None)
        refs = _load_baseline(baseline) if baseline is not None else None

        results = [_evaluate_file(p, labels, ps, c_miss, c_fa, threshold) for p in scores]
        names = display_names(scores)
        if not quiet:
            err_console.print(
                metrics_table([(n, r.metrics) for n, r in zip(names, results, strict=True)])
            )
            if threshold is not None:
                for n, r in zip(names, results, strict=True):
                    m = r.metrics
                    act = ", ".join(
                        f"actual DCF({p:g}) {v:.4f}" for p, v in (m.actual_dcf or {}).items()
                    )
                    say(
                        f"{_esc(n)} at threshold {threshold:g}: FAR {m.far:.4%}, "
                        f"FRR {m.frr:.4%}; {act}"
                    )
        for r in results:
            if r.failed:
                warn(f"{_esc(str(r.path))}: {r.failed} rows without a score (failed) left out")

        docs = {str(r.path): r.doc() for r in results}
        out: dict[str, Any] = docs[str(scores[0])] if len(scores) == 1 else {"files": docs}

        if plot is not None:
            out["plots"] = _plots(plot, names, results, ps[0])
            say(f"plots written to {_esc(str(plot))}")

        dcf_tol = tolerance if dcf_tolerance is None else dcf_tolerance
        gate = max_eer is not None or max_min_dcf is not None or refs is not None
        failures: list[str] = []
        if gate:
            checks: list[dict[str, Any]] = []
            for n, r in zip(names, results, strict=True):
                prefix = f"{n}: " if len(results) > 1 else ""
                m = r.metrics
                if max_eer is not None:
                    checks.append(_limit_check(n, prefix, "eer", m.eer, max_eer))
                if max_min_dcf is not None:
                    key = f"min_dcf[{gate_p:g}]"
                    checks.append(_limit_check(n, prefix, key, m.min_dcf[gate_p], max_min_dcf))
                if refs is not None:
                    ref = _match_baseline(refs, r.path, baseline)
                    checks.extend(_baseline_checks(n, prefix, m, ref, tolerance, dcf_tol, baseline))
            failures = [ck["reason"] for ck in checks if not ck["passed"]]
            out["gate"] = {
                "passed": not failures,
                "tolerance": {"eer": tolerance, "min_dcf": dcf_tol},
                "checks": checks,
            }

        if report is not None:
            c.write_json(report, out)
        else:
            typer.echo(json.dumps(c._clean(out), indent=2))

        if failures:
            from rich.markup import escape

            err_console.print(f"[red]gate failed:[/red] {escape('; '.join(failures))}")
            raise typer.Exit(EXIT_FAILURE)
        if gate:
            say(f"gate passed ({len(out['gate']['checks'])} checks)")


# ---------------------------------------------------------------------------------------------
# reading and evaluating one score file
# ---------------------------------------------------------------------------------------------


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
            "metrics": c.metrics_block(self.metrics),
            "counts": {
                "trials": self.trials,
                "scored": self.trials - self.failed,
                "failed": self.failed,
                "targets": self.metrics.n_targets,
                "nontargets": self.metrics.n_nontargets,
            },
        }


def _p_targets(given: Sequence[float] | None, gate_p: float | None) -> list[float]:
    from ..errors import UsageError

    ps = list(dict.fromkeys(float(p) for p in (given or DEFAULT_P_TARGETS)))
    if gate_p is not None and gate_p not in ps:
        ps.append(float(gate_p))
    bad = [p for p in ps if not 0.0 < p < 1.0]
    if bad:
        raise UsageError(f"--p-target / --gate-p must be in (0, 1), got {bad[0]:g}")
    return ps


def read_labelled(path: Path, labels: Path | None) -> tuple[Any, np.ndarray, str]:
    """``(table, labels (n,) int8, where the labels came from)``; UsageError when unlabelled."""
    import numpy as np

    from ..errors import UsageError
    from ..io.scorefiles import attach_labels, read_scores

    table = read_scores(path)
    if labels is not None:
        labs = attach_labels(table, labels)
        if table.labels is not None:
            differ = int(np.count_nonzero(table.labels != labs))
            if differ:
                warn(
                    f"{_esc(str(path))}: {differ} labels in the score file differ from "
                    f"{_esc(str(labels))}; using {_esc(str(labels))}"
                )
        return table, labs, str(labels)
    if table.labels is None:
        raise UsageError(f"{path}: no labels in the score file; pass --labels TRIALS")
    return table, table.labels, "score file"


def _evaluate_file(
    path: Path,
    labels: Path | None,
    ps: list[float],
    c_miss: float,
    c_fa: float,
    threshold: float | None,
) -> FileResult:
    import numpy as np

    from ..errors import UsageError
    from ..scoring.metrics import evaluate

    table, labs, source = read_labelled(path, labels)
    ok = ~np.isnan(table.scores)
    s = table.scores[ok]
    y = labs[ok]
    try:
        m = evaluate(s, y, p_targets=ps, c_miss=c_miss, c_fa=c_fa, threshold=threshold)
    except ValueError as exc:
        raise UsageError(f"{path}: {exc}") from None
    n = len(table.scores)
    return FileResult(path, table.format, source, s, y, m, n, int(n - ok.sum()))


# ---------------------------------------------------------------------------------------------
# human output and pictures
# ---------------------------------------------------------------------------------------------


def _esc(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def _thr(x: float | None) -> str:
    if x is None:
        return ""
    return f"{x:.4f}" if math.isfinite(x) else ("-inf" if x < 0 else "inf")


def metrics_table(rows: list[tuple[str, Metrics]]) -> Table:
    """EER and minDCF per file, each over the threshold that reaches it (dim)."""
    from rich import box
    from rich.table import Table

    t = Table(
        title="Metrics (NIST SRE16 scorer)",
        caption="each value over the threshold that reaches it (dim)",
        header_style="bold",
        box=box.SIMPLE_HEAD,
    )
    width = max((len(name) for name, _ in rows), default=6)
    t.add_column("scores", overflow="fold", min_width=min(width, 12))
    t.add_column("EER\n%", justify="right", no_wrap=True)
    ps = list(dict.fromkeys(p for _, m in rows for p in m.min_dcf))
    for p in ps:
        t.add_column(f"minDCF\np={p:g}", justify="right", no_wrap=True)
    t.add_column("\ntargets", justify="right", no_wrap=True)
    t.add_column("non-\ntargets", justify="right", no_wrap=True)
    for name, m in rows:
        cells = [_esc(name), f"{100 * m.eer:.3f}\n[dim]{_thr(m.eer_threshold)}[/dim]"]
        for p in ps:
            if p in m.min_dcf:
                cells.append(f"{m.min_dcf[p]:.4f}\n[dim]{_thr(m.min_dcf_threshold[p])}[/dim]")
            else:
                cells.append("")
        cells += [str(m.n_targets), str(m.n_nontargets)]
        t.add_row(*cells)
    return t


_SUFFIXES = (".csv", ".tsv", ".txt", ".score", ".scores", ".trials")


def base_name(p: Path) -> str:
    name = p.name
    changed = True
    while changed:
        changed = False
        for s in _SUFFIXES:
            if name.lower().endswith(s) and len(name) > len(s):
                name = name[: -len(s)]
                changed = True
    return name


def display_names(paths: Sequence[Path]) -> list[str]:
    """Short, distinct labels for score files (legend entries, table rows, file names)."""
    base = [base_name(p) for p in paths]
    names = [
        f"{p.parent.name}/{n}" if base.count(n) > 1 and p.parent.name else n
        for p, n in zip(paths, base, strict=True)
    ]
    seen: dict[str, int] = {}
    out = []
    for n in names:
        if names.count(n) > 1:
            seen[n] = seen.get(n, 0) + 1
            n = f"{n} ({seen[n]})"
        out.append(n)
    return out


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "scores"


def _plots(
    folder: Path, names: list[str], results: list[FileResult], p_target: float
) -> dict[str, Any]:
    from ..errors import UsageError
    from ..scoring.plots import plot_det, plot_histograms

    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--plot {folder}: exists and is not a folder")
    title = "DET curve" if len(results) > 1 else f"DET curve: {names[0]}"
    # a system with EER 0 has FAR = 0 or FRR = 0 at every operating point: its curve runs along
    # the (infinitely far) axes of a normal-deviate plot, and only its legend entry shows
    curves = [(n, r.scores, r.labels) for n, r in zip(names, results, strict=True)]
    det = plot_det(
        curves,
        folder / "det.png",
        p_target=p_target,
        title=title,
    )
    hists: dict[str, str] = {}
    used: set[str] = set()
    for n, r in zip(names, results, strict=True):
        stem = _safe(n)
        k = 1
        while stem in used:
            k += 1
            stem = f"{_safe(n)}_{k}"
        used.add(stem)
        try:
            h = plot_histograms(
                r.scores, r.labels, folder / f"hist_{stem}.png", title=f"Scores: {n}"
            )
        except ValueError as exc:
            raise UsageError(f"{r.path}: {exc}") from None
        hists[str(r.path)] = str(h)
    return {"det": str(det), "histograms": hists}


# ---------------------------------------------------------------------------------------------
# the gate
# ---------------------------------------------------------------------------------------------


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


def _baseline_block(d: Any, where: str) -> BaselineMetrics:
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


def _load_baseline(path: Path) -> dict[str, BaselineMetrics]:
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
            str(k): _baseline_block(v, f"--baseline {path}: files[{k}]")
            for k, v in doc["files"].items()
        }
    return {"": _baseline_block(doc, f"--baseline {path}")}


def _match_baseline(
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


def _limit_check(name: str, prefix: str, key: str, value: float, limit: float) -> dict[str, Any]:
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


def _baseline_checks(
    name: str,
    prefix: str,
    m: Metrics,
    ref: BaselineMetrics,
    tolerance: float,
    dcf_tolerance: float,
    baseline: Path | None,
) -> list[dict[str, Any]]:
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
    if ref.min_dcf and not common_ps:
        warn(f"--baseline {_esc(str(baseline))}: no p_target in common; only EER is compared")
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


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_scores)
