"""``speaker-sim eval``: metrics from score files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from . import common as c
from .ui import STATE, err_console, errors_to_exit


def eval_scores(
    scores: Annotated[list[Path], typer.Argument(help="Score files (csv, kaldi, wespeaker).",
                                                 show_default=False)],
    labels: Annotated[
        Path | None, typer.Option(help="Labelled trial list, when the score file has no labels.")
    ] = None,
    p_target: Annotated[
        list[float] | None,
        typer.Option(help="Target prior of a minDCF; repeatable [default: 0.01 and 0.05]."),
    ] = None,
    c_miss: Annotated[float, typer.Option(help="Cost of a miss.")] = 1.0,
    c_fa: Annotated[float, typer.Option(help="Cost of a false alarm.")] = 1.0,
    threshold: Annotated[
        float | None, typer.Option(help="Also report FAR / FRR / actual DCF at this threshold.")
    ] = None,
    report: Annotated[Path | None, typer.Option(help="Write a JSON report here.")] = None,
    quiet: c.QuietOpt = False,
) -> None:
    """EER and minDCF as the NIST SRE16 scorer of 3D-Speaker and WeSpeaker defines them.

    EER is interpolated at the FNR/FPR crossing; minDCF = min(c_miss*FNR*p + c_fa*FPR*(1-p))
    / min(c_miss*p, c_fa*(1-p)). Rates are fractions. Rows without a score (failed) are left
    out and counted.
    """
    STATE["quiet"] = quiet
    with errors_to_exit():
        import numpy as np

        from ..errors import UsageError
        from ..scorefiles import attach_labels, read_scores
        from ..scoring.metrics import evaluate

        rows = []
        docs = {}
        for path in scores:
            table = read_scores(path)
            labs = attach_labels(table, labels) if labels is not None else table.labels
            if labs is None:
                raise UsageError(f"{path}: no labels in the score file; pass --labels TRIALS")
            ok = ~np.isnan(table.scores)
            try:
                m = evaluate(table.scores[ok], labs[ok], p_targets=p_target or [0.01, 0.05],
                             c_miss=c_miss, c_fa=c_fa, threshold=threshold)  # fmt: skip
            except ValueError as exc:
                raise UsageError(f"{path}: {exc}") from None
            rows.append((path.name, m))
            docs[str(path)] = {
                "metrics": c.metrics_block(m),
                "counts": {"trials": len(ok), "scored": int(ok.sum()), "failed": int((~ok).sum()),
                           "targets": m.n_targets, "nontargets": m.n_nontargets},
                "format": table.format,
            }  # fmt: skip
        if not quiet:
            err_console.print(c.metrics_table(rows, "Metrics (NIST SRE16 scorer)"))
        import json

        out = docs[str(scores[0])] if len(scores) == 1 else {"files": docs}
        if report is not None:
            c.write_json(report, out)
        else:
            typer.echo(json.dumps(c._clean(out), indent=2))


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_scores)
