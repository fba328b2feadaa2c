"""``EvalJob``: score files in, metrics, ``--plot`` pictures, a CI gate and the JSON report
out (``speaker-sim eval``). Reads our CSV, Kaldi and WeSpeaker score files; never prints."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..scoring.evaluation import FileResult
from .report import write_json


@dataclass
class EvalReport:
    """The results per file (``names``: short display names), the readers' notes for the
    user, the gate's result (None without a gate; its own ``notes``) and the report document."""

    results: list[FileResult]
    names: list[str]
    notes: list[str]
    gate: Any  # scoring.gate.GateResult or None
    doc: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalJob:
    """Evaluate ``scores`` (labels from the files, or looked up in ``labels``); the options
    are ``speaker-sim eval``'s of the same names (see its help for the gate semantics)."""

    scores: list[Path]
    labels: Path | None = None
    p_target: list[float] | None = None
    c_miss: float = 1.0
    c_fa: float = 1.0
    threshold: float | None = None
    report: Path | None = None
    plot: Path | None = None
    max_eer: float | None = None
    max_min_dcf: float | None = None
    gate_p: float = 0.01
    baseline: Path | None = None
    tolerance: float = 0.0
    dcf_tolerance: float | None = None
    invocation: dict[str, Any] | None = None

    def run(self) -> EvalReport:
        from ..scoring.evaluation import evaluate_file, p_targets
        from ..scoring.gate import load_baseline, run_gate

        ps = p_targets(self.p_target, self.gate_p if self.max_min_dcf is not None else None)
        refs = load_baseline(self.baseline) if self.baseline is not None else None  # fail fast
        notes: list[str] = []
        results = [
            evaluate_file(p, self.labels, ps, self.c_miss, self.c_fa, self.threshold, notes)
            for p in self.scores
        ]
        names = display_names(self.scores)
        docs = {str(r.path): r.doc() for r in results}
        out: dict[str, Any] = docs[str(self.scores[0])] if len(results) == 1 else {"files": docs}
        if self.plot is not None:
            out["plots"] = write_plots(self.plot, names, results, ps[0])
        gate = None
        if self.max_eer is not None or self.max_min_dcf is not None or refs is not None:
            files = [(n, r.path, r.metrics) for n, r in zip(names, results, strict=True)]
            gate = run_gate(
                files, max_eer=self.max_eer, max_min_dcf=self.max_min_dcf, gate_p=self.gate_p,
                baseline=self.baseline, tolerance=self.tolerance,
                dcf_tolerance=self.dcf_tolerance, refs=refs,
            )  # fmt: skip
            out["gate"] = gate.to_dict()
        if self.invocation is not None:
            out["invocation"] = self.invocation
        if self.report is not None:
            write_json(self.report, out)
        return EvalReport(results, names, notes, gate, out)


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


def write_plots(
    folder: Path, names: list[str], results: list[FileResult], p_target: float
) -> dict[str, Any]:
    """det.png (all files overlaid) and hist_<name>.png per file in ``folder``."""
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
