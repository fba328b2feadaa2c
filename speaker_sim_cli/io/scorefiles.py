"""Score files other tools read and write; no torch.

- ``csv``: ``enrollment,test[,label],score[,error]`` (ours; header; rows in input order);
- ``kaldi``: ``enroll test label score`` as Kaldi / 3D-Speaker write them (label 1/0), or
  ``enroll test score`` without labels;
- ``wespeaker``: ``enroll test score target|nontarget`` (or ``enroll test score``);
- ``parquet``: columns enrollment, test[, label], score[, error] (score null where it failed).
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np

from ..errors import UsageError
from .trials import ENROLL_NAMES, LABEL_NAMES, TARGET_WORDS, TEST_NAMES, parse_label, read_text

FORMATS = ("csv", "kaldi", "wespeaker")
STREAM_FORMATS = (*FORMATS, "parquet")


@dataclass
class ScoreTable:
    """Scores read back: NaN where the writer recorded a failure."""

    enroll: list[str]
    test: list[str]
    scores: np.ndarray
    labels: np.ndarray | None
    source: str
    format: str


def _fmt(x: float) -> str:
    return "" if math.isnan(x) else f"{x:.6f}"


def write_scores(
    out: IO[str],
    enroll: list[str],
    test: list[str],
    scores: np.ndarray,
    labels: np.ndarray | None,
    errors: list[str | None] | None,
    fmt: str = "csv",
    skip_failed: bool = False,
    extra: dict[str, np.ndarray] | None = None,
    header: bool = True,
    error_column: bool | None = None,
) -> int:
    """Write rows in input order; returns how many rows were written.

    ``extra``: more score columns (name -> values per trial, e.g. ``score_funasr``) written after
    ``score``; csv only. A streamed file is written a part at a time: ``header`` for the first
    part only, and ``error_column`` (whether the whole file has one) decided up front.
    """
    has_err = errors is not None and any(e is not None for e in errors)
    if error_column is not None:
        has_err = error_column
    text = [_fmt(x) for x in scores.tolist()]  # floats once, not numpy scalars per row
    extra = extra or {}
    if extra and fmt != "csv":
        raise UsageError(f"the {fmt} score format has no place for {', '.join(extra)}: "
                         "use --format csv")  # fmt: skip
    extra_text = [[_fmt(x) for x in v.tolist()] for v in extra.values()]
    labs = labels.tolist() if labels is not None else None
    rows = 0
    write_header = header
    if fmt == "csv":
        w = csv.writer(out, lineterminator="\n")
        names = ["enrollment", "test"] + (["label"] if labels is not None else []) + ["score"]
        names += list(extra)
        if has_err and not skip_failed:
            names.append("error")
        if write_header:
            w.writerow(names)
        for i in range(len(enroll)):
            err = errors[i] if errors is not None else None
            if err is not None and skip_failed:
                continue
            row = [enroll[i], test[i]]
            if labs is not None:
                row.append(str(int(labs[i])))
            row.append(text[i])
            row.extend(col[i] for col in extra_text)
            if has_err and not skip_failed:
                row.append(err or "")
            w.writerow(row)
            rows += 1
        return rows
    if fmt not in FORMATS:
        raise UsageError(f"unknown score format {fmt!r}: use one of {', '.join(FORMATS)}")
    # Whitespace formats have no place for a failure (NaN, written as ""): the report counts it.
    keep = [i for i, t in enumerate(text) if t]
    for s in range(0, len(keep), 65536):
        part = keep[s : s + 65536]
        if labs is None:
            lines = [f"{enroll[i]} {test[i]} {text[i]}\n" for i in part]
        elif fmt == "kaldi":
            lines = [f"{enroll[i]} {test[i]} {int(labs[i])} {text[i]}\n" for i in part]
        else:
            word = ("nontarget", "target")
            lines = [f"{enroll[i]} {test[i]} {text[i]} {word[int(labs[i])]}\n" for i in part]
        out.write("".join(lines))
        rows += len(part)
    return rows


def check_whitespace_safe(items: list[str], fmt: str) -> None:
    if fmt == "csv":
        return
    bad = next((x for x in items if any(c.isspace() for c in x)), None)
    if bad is not None:
        raise UsageError(
            f"item {bad!r} contains whitespace, which the {fmt} score format cannot hold: "
            "use --format csv"
        )


def atomic_text_output(path: Path | None, write: WriteFn) -> int:
    """Run ``write(stream)`` into ``path`` atomically (temp + rename), or to stdout."""
    if path is None:
        return write(sys.stdout)
    from . import storage

    if storage.is_url(path):  # written locally, then uploaded in one PUT
        with storage.atomic_output(path) as out, open(out, "w", encoding="utf-8", newline="") as f:
            return write(f)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            n = write(f)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return n


from collections.abc import Callable  # noqa: E402

WriteFn = Callable[[IO[str]], int]


def read_scores(path: str | Path) -> ScoreTable:
    """Read a score file in any of the three formats, or Parquet (detected)."""
    p = Path(path)
    from .trials import is_parquet

    if p.is_file() and is_parquet(p):
        from .score_stream import read_parquet_scores

        return read_parquet_scores(p)
    text = read_text(p)
    lines = [(i + 1, ln) for i, ln in enumerate(text.splitlines()) if ln.strip()]
    if not lines:
        raise UsageError(f"{p}: the score file is empty")
    if "," in lines[0][1]:
        return _read_csv(p, text)
    rows = [(f"{p}:{lineno}", line.split(), line.strip()) for lineno, line in lines]
    fmt = _whitespace_format(rows)
    enroll, test, scores, labels = [], [], [], []
    for where, f, _ in rows:
        if fmt == "plain":
            e, t, s, lab = f[0], f[1], f[2], None
        elif fmt == "wespeaker":
            e, t, s, lab = f[0], f[1], f[2], f[3]
        else:
            e, t, s, lab = f[0], f[1], f[3], f[2]
        if not _is_float(s):
            raise UsageError(f"{where}: score {s!r} is not a number")
        enroll.append(e)
        test.append(t)
        scores.append(float(s))
        if lab is not None:
            labels.append(parse_label(lab, where))
    arr = np.asarray(labels, dtype=np.int8) if labels else None
    return ScoreTable(enroll, test, np.asarray(scores, dtype=np.float64), arr, str(p), fmt)


def _line_formats(f: list[str]) -> set[str]:
    """The whitespace formats a split line can be: plain (a b score), WeSpeaker (a b score
    label), Kaldi (a b label score). "a b 0 1" is both of the last two."""
    if len(f) == 3:
        return {"plain"}
    if len(f) != 4:
        return set()
    out = set()
    if f[3].lower() in TARGET_WORDS and _is_float(f[2]):
        out.add("wespeaker")
    if f[2].lower() in TARGET_WORDS and _is_float(f[3]):
        out.add("kaldi")
    return out


def _whitespace_format(rows: list[tuple[str, list[str], str]]) -> str:
    """One format for the whole file: the one every line can be read as.

    A line that reads both ways (labels and scores all 0/1) takes its reading from the others;
    a file in which every line does is refused rather than guessed.
    """
    common: set[str] | None = None
    for where, f, line in rows:
        can = _line_formats(f)
        if not can:
            if len(f) not in (3, 4):
                raise UsageError(f"{where}: expected 3 or 4 fields, found {len(f)}")
            raise UsageError(f"{where}: cannot tell score from label in {line!r}")
        if common is None:
            common = can
        elif not common & can:
            raise UsageError(f"{where}: line format {'/'.join(sorted(can))} differs from earlier "
                             f"lines ({'/'.join(sorted(common))})")  # fmt: skip
        else:
            common &= can
    assert common
    if len(common) > 1:
        raise UsageError(
            f"{rows[0][0].rsplit(':', 1)[0]}: every line reads both as 'a b score label' "
            "(WeSpeaker) and 'a b label score' (Kaldi); cannot tell which column is the score "
            "(write it as CSV with a header)"
        )
    return common.pop()


def _is_float(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def _read_csv(p: Path, text: str) -> ScoreTable:
    from .trials import csv_rows

    rows = csv_rows(p, text)
    cols = csv_score_columns(p, *rows[0])
    enroll, test, scores, labels = csv_score_rows(p, rows[1:], cols)
    arr = np.asarray(labels, dtype=np.int8) if cols.label is not None else None
    return ScoreTable(enroll, test, np.asarray(scores, dtype=np.float64), arr, str(p), "csv")


@dataclass(frozen=True)
class CsvScoreColumns:
    """Where a CSV score file keeps its columns (from its header)."""

    header: list[str]
    enroll: int
    test: int
    score: int
    label: int | None
    need: int  # fields a row must have at least


def csv_score_columns(p: Path, head_line: int, head: list[str]) -> CsvScoreColumns:
    header = [h.strip().lower() for h in head]
    if "score" not in header:
        raise UsageError(f"{p}:{head_line}: no 'score' column in the header")
    e = next((header.index(n) for n in ENROLL_NAMES if n in header), None)
    t = next((header.index(n) for n in TEST_NAMES if n in header and header.index(n) != e), None)
    if e is None or t is None:
        raise UsageError(f"{p}:{head_line}: no enrollment / test columns in the header")
    s_col = header.index("score")
    lab = next((header.index(n) for n in LABEL_NAMES if n in header), None)
    need = max(e, t, s_col, lab if lab is not None else 0) + 1
    return CsvScoreColumns(header, e, t, s_col, lab, need)


def csv_score_rows(
    p: Path, rows: list[tuple[int, list[str]]], c: CsvScoreColumns
) -> tuple[list[str], list[str], list[float], list[int]]:
    """enroll, test, scores (NaN where empty) and labels of CSV score rows (after the header)."""
    header = c.header
    enroll: list[str] = []
    test: list[str] = []
    scores: list[float] = []
    labels: list[int] = []
    for lineno, r in rows:
        if len(r) < len(header) - (1 if header[-1] == "error" else 0) or len(r) < c.need:
            raise UsageError(f"{p}:{lineno}: expected {len(header)} fields, found {len(r)}")
        if len(r) > len(header):
            raise UsageError(f"{p}:{lineno}: expected {len(header)} fields, found {len(r)}")
        val = r[c.score].strip()
        if val and not _is_float(val):
            raise UsageError(f"{p}:{lineno}: score {val!r} is not a number")
        if not r[c.enroll].strip() or not r[c.test].strip():
            raise UsageError(f"{p}:{lineno}: empty enrollment or test field")
        enroll.append(r[c.enroll])
        test.append(r[c.test])
        scores.append(float(val) if val else math.nan)
        if c.label is not None:
            labels.append(parse_label(r[c.label], f"{p}:{lineno}"))
    return enroll, test, scores, labels


def attach_labels(table: ScoreTable, trials_path: str | Path) -> np.ndarray:
    """Labels for each scored pair, looked up by (enroll, test) in a labelled trial list."""
    from .trials import read_trials

    tl = read_trials(trials_path)
    if tl.labels is None:
        raise UsageError(f"{trials_path}: the trial list has no labels")
    lut = {(a, b): int(lab) for a, b, lab in zip(tl.enroll, tl.test, tl.labels)}
    out = np.empty(len(table.enroll), dtype=np.int8)
    for i, (a, b) in enumerate(zip(table.enroll, table.test)):
        lab = lut.get((a, b))
        if lab is None:
            lab = lut.get((b, a))
        if lab is None:
            raise UsageError(
                f"{table.source}: trial ({a}, {b}) is not in the labelled list {trials_path}"
            )
        out[i] = lab
    return out
