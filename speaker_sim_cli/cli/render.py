"""Rendering shared by ``eval`` and ``calibrate``: the metrics table (display names and the
``--plot`` pictures are the library's: job/evaluate.py, re-exported here)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from ..job.evaluate import base_name, display_names, write_plots

__all__ = ["base_name", "display_names", "esc", "metrics_table", "write_plots"]

if TYPE_CHECKING:
    from rich.table import Table

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
