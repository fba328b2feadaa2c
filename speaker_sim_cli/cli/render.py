"""Rendering shared by ``eval`` and ``calibrate``: the metrics table, short display names
for score files, and the DET / histogram pictures written for ``--plot``."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.table import Table

    from ..scoring.evaluation import FileResult
    from ..scoring.metrics import Metrics


def esc(text: str) -> str:
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
        cells = [esc(name), f"{100 * m.eer:.3f}\n[dim]{_thr(m.eer_threshold)}[/dim]"]
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


def write_plots(
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
