"""Score files read in chunks for their metrics: scores and labels as two compact arrays, no
Python object per row (CSV via Arrow with :mod:`.scorefiles`' row reader as the fallback that
names a bad line; Parquet by batches). numpy / pyarrow only.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from ..errors import UsageError
from . import scorefiles as S
from . import trials as T
from .trial_stream import _label_codes, _longest, _plain, first_line, line_blocks

BLOCK_BYTES = 32 << 20
# Scores the Arrow cast reads exactly as Python's float() (both correctly rounded); others
# (underscores, "inf", spaces, ...) go through the row reader.
_PLAIN_NUMBER = r"^(-?[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?)?$"


def score_arrays(path: Path) -> tuple[np.ndarray, np.ndarray | None, str] | None:
    """``(scores float64 (NaN where empty), labels int8 or None, format)`` of a CSV or
    Parquet score file, read in chunks; None for the whitespace formats (read whole by
    :func:`.scorefiles.read_scores`, whose format check needs every line)."""
    p = Path(path)
    if p.is_file() and T.is_parquet(p):
        return _parquet_arrays(p)
    first = _first_line(p)
    if first is None or "," not in first[1]:
        return None
    cols = S.csv_score_columns(p, *T.csv_rows(p, first[1], ",", first[0])[0])
    scores: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    n = 0
    for s, lab in _csv_chunks(p, cols, first[0]):
        scores.append(s)
        n += len(s)
        if lab is not None:
            labels.append(lab)
    if n == 0:
        raise UsageError(f"{p}: the score file has a header but no rows")
    lab_arr = np.concatenate(labels) if cols.label is not None else None
    return np.concatenate(scores), lab_arr, "csv"


def _first_line(p: Path) -> tuple[int, str] | None:
    if not p.exists():
        raise UsageError(f"{p}: file not found")
    if p.is_dir():
        raise UsageError(f"{p}: is a directory, expected a file")
    return first_line(p)


def _csv_chunks(
    p: Path, c: S.CsvScoreColumns, header_line: int
) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    line = 1
    for block in line_blocks(p, BLOCK_BYTES):
        plain = _plain(block, b",", quotes=True)
        got = None
        if plain:
            n_lines = block.count(b"\n")
            got = _fast(p, block, c, n_lines + (not block.endswith(b"\n")), line == header_line)
        else:
            text = T.decode_text(p, block, line, bom=False)
            n_lines = len(text.splitlines())
        if got is None:
            text = block.decode() if plain else text
            rows = T.csv_rows(p, text, ",", line, allow_empty=True)
            rows = [r for r in rows if r[0] != header_line]
            _, _, sc, labs = S.csv_score_rows(p, rows, c)
            got = (np.asarray(sc, np.float64),
                   np.asarray(labs, np.int8) if c.label is not None else None)  # fmt: skip
        yield got
        line += n_lines


def _fast(
    p: Path, block: bytes, c: S.CsvScoreColumns, rows: int, skip_header: bool
) -> tuple[np.ndarray, np.ndarray | None] | None:
    """The Arrow read of a plain block, or None where the row reader must decide."""
    width = len(c.header)
    names = [f"c{i}" for i in range(width)]
    try:
        tab = pacsv.read_csv(
            io.BytesIO(block),
            read_options=pacsv.ReadOptions(
                column_names=names, skip_rows=int(skip_header), block_size=1 << 24
            ),
            parse_options=pacsv.ParseOptions(delimiter=",", quote_char=False),
            convert_options=pacsv.ConvertOptions(column_types=dict.fromkeys(names, pa.string())),
        )
    except pa.ArrowInvalid:
        return None
    if tab.num_rows != rows - int(skip_header):
        return None  # a blank line
    col = [tab.column(i).combine_chunks() for i in range(width)]
    if any(_longest(x) > T.FIELD_LIMIT for x in col):
        return None
    for i in (c.enroll, c.test):
        if len(col[i]) and pc.min(pc.binary_length(pc.utf8_trim(col[i], " "))).as_py() == 0:
            return None
    raw = pc.utf8_trim(col[c.score], " ")
    if not pc.all(pc.match_substring_regex(raw, _PLAIN_NUMBER)).as_py():
        return None
    empty = pc.equal(pc.binary_length(raw), 0)
    num = pc.if_else(empty, pa.scalar("nan"), raw).cast(pa.float64())
    labels = None
    if c.label is not None:
        try:
            labels = _label_codes(col[c.label], str(p))
        except UsageError:
            return None
    return num.to_numpy(zero_copy_only=False), labels


def _parquet_arrays(p: Path) -> tuple[np.ndarray, np.ndarray | None, str]:
    import pyarrow.parquet as pq

    try:
        f = pq.ParquetFile(p)
        names = f.schema_arrow.names
    except (pa.ArrowException, OSError) as exc:
        raise UsageError(f"{p}: not a readable Parquet file ({exc})") from None
    if "score" not in names:
        raise UsageError(f"{p}: no 'score' column")
    lab = next((n for n in T.LABEL_NAMES if n in names), None)
    scores: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    row = 1
    try:
        for batch in f.iter_batches(1 << 20, columns=["score"] + ([lab] if lab else [])):
            sc = batch.column("score")
            if not (pa.types.is_floating(sc.type) or pa.types.is_integer(sc.type)):
                raise UsageError(f"{p}: column 'score' is {sc.type}, expected numbers")
            scores.append(sc.cast(pa.float64()).fill_null(np.nan).to_numpy(zero_copy_only=False))
            if lab:
                from .trial_parquet import parquet_labels

                labels.append(parquet_labels(batch.column(lab), p, lab, row))
            row += batch.num_rows
    except (pa.ArrowException, OSError) as exc:
        raise UsageError(f"{p}: row {row}: cannot read the Parquet file ({exc})") from None
    if row == 1:
        raise UsageError(f"{p}: the score file has no rows")
    return np.concatenate(scores), (np.concatenate(labels) if lab else None), "parquet"


def read_parquet_scores(p: Path) -> S.ScoreTable:
    """A whole Parquet score file as a :class:`.scorefiles.ScoreTable` (keys included)."""
    import pyarrow.parquet as pq

    from .trial_parquet import parquet_columns

    scores, labels, _ = _parquet_arrays(p)
    e, t, _lab = parquet_columns(p)
    tab = pq.read_table(p, columns=[e, t])
    return S.ScoreTable(tab.column(e).to_pylist(), tab.column(t).to_pylist(), scores, labels,
                        str(p), "parquet")  # fmt: skip
