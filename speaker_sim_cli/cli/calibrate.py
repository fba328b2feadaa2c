"""``speaker-sim calibrate``: scores -> log-likelihood ratios, Cllr and minCllr.

Fits ``llr = slope * score + offset`` (natural-log LLR) by prior-weighted logistic regression
on a labelled score file, writes it as JSON, and applies it (or a saved one) to other score
files. Cllr (bits, prior 0.5) measures the calibrated LLRs; minCllr is the Cllr of the best
monotone (PAV) calibration of the same scores, so ``Cllr - minCllr`` is the calibration loss.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from . import common as c
from .ui import STATE, err_console, errors_to_exit, say, warn

if TYPE_CHECKING:
    import numpy as np

    from ..scoring.calibration import Calibration

LLR_DEFINITION = (
    "llr = slope * score + offset, natural-log likelihood ratio of target vs non-target; "
    "fitted by logistic regression minimising the prior-weighted cross-entropy at 'prior'; "
    "cllr and min_cllr in bits at prior 0.5 (min_cllr: after the optimal monotone PAV map)"
)


def calibrate(
    train: Annotated[
        Path | None,
        typer.Argument(
            help="Labelled score file to fit on (csv, kaldi or wespeaker).",
            show_default=False,
            metavar="TRAIN_SCORES",
        ),
    ] = None,
    labels: Annotated[
        Path | None,
        typer.Option(help="Labelled trial list for TRAIN (instead of labels in the file)."),
    ] = None,
    prior: Annotated[
        float,
        typer.Option(min=0.0, max=1.0, help="Effective target prior of the fit, in (0, 1)."),
    ] = 0.5,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Write the calibration JSON here (default: stdout)."),
    ] = None,
    calibration: Annotated[
        Path | None,
        typer.Option(
            help="Apply this saved calibration JSON instead of fitting one on TRAIN.",
            dir_okay=False,
        ),
    ] = None,
    apply: Annotated[
        list[Path] | None,
        typer.Option(help="Score file to calibrate; repeatable.", dir_okay=False),
    ] = None,
    apply_labels: Annotated[
        Path | None,
        typer.Option(help="Labelled trial list for the --apply files (for their Cllr)."),
    ] = None,
    out_dir: Annotated[
        Path | None,
        typer.Option(help="Folder for the calibrated --apply files.", file_okay=False),
    ] = None,
    fmt: Annotated[
        c.ScoreFormat,
        typer.Option(
            "--format",
            help="csv: the input rows plus an 'llr' column (<name>.llr.csv); kaldi / "
            "wespeaker: the LLR in place of the score (<name>.llr.txt).",
        ),
    ] = c.ScoreFormat.csv,
    quiet: c.QuietOpt = False,
) -> None:
    """Fit a logistic-regression calibration (score -> LLR) and apply it to score files.

    The fit minimises the prior-weighted cross-entropy of llr = slope*score + offset on
    TRAIN. Reports Cllr (bits; 0 perfect, 1 uninformative) and minCllr (the Cllr of the best
    monotone map, PAV) of TRAIN and of every labelled --apply file. Rows without a score are
    kept in the csv output (empty llr) and left out of the metrics.
    """
    STATE["quiet"] = quiet
    with errors_to_exit():
        from ..errors import UsageError

        if (train is None) == (calibration is None):
            raise UsageError(
                "give TRAIN_SCORES to fit a calibration, or --calibration CAL.json to apply a "
                "saved one (not both)"
            )
        if calibration is not None and out is not None:
            raise UsageError("--out writes a fitted calibration; with --calibration none is fit")
        if calibration is not None and not apply:
            raise UsageError("--calibration needs --apply SCORES (what to calibrate)")
        if apply and out_dir is None:
            raise UsageError("--apply needs --out-dir DIR for the calibrated score files")
        if not 0.0 < prior < 1.0:
            raise UsageError(f"--prior must be in (0, 1), got {prior:g}")

        from .render import display_names

        names = display_names(([train] if train is not None else []) + list(apply or []))
        rows: list[tuple[str, int, float | None, float | None]] = []
        if train is not None:
            cal, doc = _fit(train, labels, prior)
            train_name = names.pop(0)
            rows.append(
                (f"{train_name} (train)", doc["train"]["scored"], doc["cllr"], doc["min_cllr"])
            )
            if out is not None:
                c.write_json(out, doc)
            else:
                typer.echo(json.dumps(c._clean(doc), indent=2))
            if cal.slope <= 0:
                warn(
                    f"the fitted slope is {cal.slope:.4g}: higher scores mean *less* likely "
                    "the same speaker in this training set"
                )
        else:
            assert calibration is not None
            cal = _load(calibration)

        assert out_dir is not None or not apply
        outputs = _output_paths(apply or [], out_dir, fmt.value)
        for name, src, dest in zip(names, apply or [], outputs, strict=True):
            rows.append((name, *_apply(cal, src, dest, apply_labels, fmt.value)))

        if not quiet:
            say(
                f"calibration: llr = {cal.slope:.6g} * score {'+' if cal.offset >= 0 else '-'} "
                f"{abs(cal.offset):.6g} (prior {cal.prior:g})"
            )
            err_console.print(_table(rows))
            if apply:
                say(f"calibrated scores written to {_esc(str(out_dir))}")


def _esc(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def _labelled(path: Path, labels: Path | None, need: bool) -> tuple[Any, np.ndarray | None]:
    from ..errors import UsageError
    from ..io.scorefiles import attach_labels, read_scores

    table = read_scores(path)
    if labels is not None:
        return table, attach_labels(table, labels)
    if table.labels is None and need:
        raise UsageError(f"{path}: no labels in the score file; pass --labels TRIALS")
    return table, table.labels


def _fit(train: Path, labels: Path | None, prior: float) -> tuple[Calibration, dict[str, Any]]:
    import numpy as np

    from ..errors import UsageError
    from ..scoring.calibration import fit_calibration, min_cllr

    table, labs = _labelled(train, labels, need=True)
    assert labs is not None
    ok = ~np.isnan(table.scores)
    s, y = table.scores[ok], labs[ok]
    try:
        cal = fit_calibration(s, y, prior=prior)
        mc = min_cllr(s, y)
    except ValueError as exc:
        raise UsageError(f"{train}: {exc}") from None
    n_t = int(np.count_nonzero(y))
    doc = {
        **cal.to_dict(),
        "min_cllr": mc,
        "definition": LLR_DEFINITION,
        "train": {
            "scores": str(train),
            "score_format": table.format,
            "labels": str(labels) if labels is not None else "score file",
            "trials": len(table.scores),
            "scored": int(ok.sum()),
            "failed": int((~ok).sum()),
            "targets": n_t,
            "nontargets": int(len(y) - n_t),
        },
    }
    return cal, doc


def _load(path: Path) -> Calibration:
    from ..errors import UsageError
    from ..io.trials import read_text
    from ..scoring.calibration import Calibration

    try:
        doc = json.loads(read_text(path))
        return Calibration.from_dict(doc)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise UsageError(f"--calibration {path}: not a calibration JSON ({exc!r})") from None


def _output_paths(srcs: list[Path], out_dir: Path | None, fmt: str) -> list[Path]:
    from ..errors import UsageError
    from .render import base_name

    if not srcs:
        return []
    assert out_dir is not None
    ext = ".llr.csv" if fmt == "csv" else ".llr.txt"
    dests = [out_dir / (base_name(p) + ext) for p in srcs]
    seen: dict[Path, Path] = {}
    for src, d in zip(srcs, dests, strict=True):
        if d in seen:
            raise UsageError(f"--apply {seen[d]} and {src} would both be written to {d}")
        if d.resolve() == src.resolve():
            raise UsageError(f"--apply {src}: the output {d} would overwrite it")
        seen[d] = src
    return dests


def _apply(
    cal: Calibration, src: Path, dest: Path, labels: Path | None, fmt: str
) -> tuple[int, float | None, float | None]:
    """Write ``dest``; return ``(scored rows, Cllr, minCllr)`` (None when unlabelled)."""
    import numpy as np

    from ..errors import UsageError
    from ..io.scorefiles import atomic_text_output, check_whitespace_safe, write_scores
    from ..scoring.calibration import cllr, min_cllr

    table, labs = _labelled(src, labels, need=False)
    llr = cal.apply(table.scores)  # NaN (failed rows) stays NaN
    ok = ~np.isnan(table.scores)
    if fmt == "csv":
        atomic_text_output(dest, lambda f: _write_llr_csv(f, table, labs, llr))
    else:
        check_whitespace_safe(table.enroll + table.test, fmt)
        atomic_text_output(
            dest, lambda f: write_scores(f, table.enroll, table.test, llr, labs, None, fmt)
        )
    c_llr = m_cllr = None
    if labs is not None:
        try:
            c_llr = cllr(llr[ok], labs[ok])
            m_cllr = min_cllr(table.scores[ok], labs[ok])
        except ValueError as exc:
            raise UsageError(f"{src}: {exc}") from None
    return int(ok.sum()), c_llr, m_cllr


def _write_llr_csv(f: Any, table: Any, labs: np.ndarray | None, llr: np.ndarray) -> int:
    import csv
    import math

    def num(x: float) -> str:
        return "" if math.isnan(x) else f"{x:.6f}"

    w = csv.writer(f, lineterminator="\n")
    w.writerow(["enrollment", "test"] + (["label"] if labs is not None else []) + ["score", "llr"])
    for i in range(len(table.enroll)):
        row = [table.enroll[i], table.test[i]]
        if labs is not None:
            row.append(str(int(labs[i])))
        row += [num(float(table.scores[i])), num(float(llr[i]))]
        w.writerow(row)
    return len(table.enroll)


def _table(rows: list[tuple[str, int, float | None, float | None]]) -> Any:
    from rich import box
    from rich.table import Table

    t = Table(
        title="Calibration (Cllr, bits)",
        caption="minCllr: after the best monotone map; Cllr - minCllr: calibration loss",
        header_style="bold",
        box=box.SIMPLE_HEAD,
    )
    t.add_column("scores", overflow="fold")
    t.add_column("trials", justify="right", no_wrap=True)
    t.add_column("Cllr", justify="right", no_wrap=True)
    t.add_column("minCllr", justify="right", no_wrap=True)
    t.add_column("loss", justify="right", no_wrap=True)
    for name, n, cl, mc in rows:
        if cl is None or mc is None:
            t.add_row(_esc(name), str(n), "[dim]unlabelled[/dim]", "", "")
        else:
            t.add_row(_esc(name), str(n), f"{cl:.4f}", f"{mc:.4f}", f"{cl - mc:.4f}")
    return t


def register(app: typer.Typer) -> None:
    """Add ``calibrate`` to the app."""
    app.command("calibrate")(calibrate)
