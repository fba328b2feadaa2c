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
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from . import common as c
from .config_opt import config_record
from .ui import EXIT_FAILURE, STATE, err_console, errors_to_exit, say, warn

if TYPE_CHECKING:
    from ..job.evaluate import EvalReport


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
        from ..job.evaluate import EvalJob

        rep = EvalJob(
            scores, labels, p_target, c_miss, c_fa, threshold, report, plot, max_eer,
            max_min_dcf, gate_p, baseline, tolerance, dcf_tolerance, config_record(),
        ).run()  # fmt: skip
        _render(rep, threshold, plot, quiet)
        if report is None:
            typer.echo(json.dumps(c._clean(rep.doc), indent=2))
        gate = rep.gate
        if gate is not None and not gate.passed:
            from rich.markup import escape

            err_console.print(f"[red]gate failed:[/red] {escape('; '.join(gate.failures))}")
            raise typer.Exit(EXIT_FAILURE)
        if gate is not None:
            say(f"gate passed ({len(gate.checks)} checks)")


def _render(rep: EvalReport, threshold: float | None, plot: Path | None, quiet: bool) -> None:
    """The notes, the metrics table, the rates at ``--threshold``, the plots and gate notes."""
    from .render import esc, metrics_table

    for note in rep.notes:
        warn(note)
    pairs = list(zip(rep.names, rep.results, strict=True))
    if not quiet:
        err_console.print(metrics_table([(n, r.metrics) for n, r in pairs]))
        if threshold is not None:
            for n, r in pairs:
                m = r.metrics
                act = ", ".join(
                    f"actual DCF({p:g}) {v:.4f}" for p, v in (m.actual_dcf or {}).items()
                )
                say(f"{esc(n)} at threshold {threshold:g}: FAR {m.far:.4%}, "
                    f"FRR {m.frr:.4%}; {act}")  # fmt: skip
    for r in rep.results:
        if r.failed:
            warn(f"{r.path}: {r.failed} rows without a score (failed) left out")
    if plot is not None:
        say(f"plots written to {esc(str(plot))}")
    for note in rep.gate.notes if rep.gate is not None else []:
        warn(note)


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_scores)
