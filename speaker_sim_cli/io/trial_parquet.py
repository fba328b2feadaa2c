"""Parquet trial lists: the key and label columns found by a CSV header's names, read in
batches as Arrow arrays; a bad value is named by its row. numpy / pyarrow only."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import UsageError
from ..records import TrialList
from . import trials as T
from .trial_stream import TrialChunk, _label_codes, _longest

PARQUET_ROWS = 1 << 20


def parquet_columns(p: Path) -> tuple[str, str, str | None]:
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(p).names
    except (pa.ArrowException, OSError) as exc:
        raise UsageError(f"{p}: not a readable Parquet file ({exc})") from None
    cols = T._header_columns(names)
    if cols is None:
        raise UsageError(f"{p}: no columns naming the enrollment and test items (found "
                         f"{', '.join(names[:8]) or 'none'}; expected e.g. enrollment, test, "
                         "label)")  # fmt: skip
    e, t, lab = cols
    return names[e], names[t], None if lab is None else names[lab]


def _parquet_keys(col: pa.Array, p: Path, name: str, row0: int) -> pa.Array:
    if pa.types.is_dictionary(col.type):
        col = col.dictionary_decode()
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        raise UsageError(f"{p}: column {name!r} is {col.type}, expected text")
    col = pc.utf8_trim_whitespace(col.cast(pa.string()))
    bad = pc.fill_null(pc.equal(pc.binary_length(col), 0), True)  # null or empty
    if pc.any(bad).as_py():
        i = int(np.flatnonzero(bad.to_numpy(zero_copy_only=False))[0])
        raise UsageError(f"{p}: row {row0 + i}: empty enrollment or test field")
    if _longest(col) > T.FIELD_LIMIT:
        lens = pc.binary_length(col).to_numpy(zero_copy_only=False)
        i = int(np.flatnonzero(lens > T.FIELD_LIMIT)[0])
        raise UsageError(f"{p}: row {row0 + i}: a field is longer than {T.FIELD_LIMIT:,} bytes")
    return col


def parquet_labels(col: pa.Array, p: Path, name: str, row0: int) -> np.ndarray:
    if pa.types.is_dictionary(col.type):
        col = col.dictionary_decode()
    if col.null_count:
        i = int(np.flatnonzero(pc.is_null(col).to_numpy(zero_copy_only=False))[0])
        raise UsageError(f"{p}: row {row0 + i}: no label")
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        words = col.cast(pa.string())
        try:
            return _label_codes(words, f"{p}: column {name!r}")
        except UsageError:
            for i, w in enumerate(words.to_pylist()):
                T.parse_label(w, f"{p}: row {row0 + i}")
            raise
    if not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type)
            or pa.types.is_boolean(col.type)):  # fmt: skip
        raise UsageError(f"{p}: column {name!r} is {col.type}, expected 0/1 labels")
    v = col.to_numpy(zero_copy_only=False)
    ok = (v == 0) | (v == 1)
    if not ok.all():
        i = int(np.flatnonzero(~ok)[0])
        raise UsageError(f"{p}: row {row0 + i}: unknown label {v[i]!r} (use 1/0)")
    return v.astype(np.int8)


def parquet_chunks(p: Path, cols: tuple[str, str, str | None]) -> Iterator[TrialChunk]:
    import pyarrow.parquet as pq

    e, t, lab = cols
    row = 1
    try:
        f = pq.ParquetFile(p)
        want = [e, t] + ([lab] if lab else [])
        for batch in f.iter_batches(batch_size=PARQUET_ROWS, columns=want):
            n = batch.num_rows
            a = _parquet_keys(batch.column(e), p, e, row)
            b = _parquet_keys(batch.column(t), p, t, row)
            labels = parquet_labels(batch.column(lab), p, lab, row) if lab else None
            yield TrialChunk(a, b, labels, row)
            row += n
    except (pa.ArrowException, OSError) as exc:
        raise UsageError(f"{p}: row {row}: cannot read the Parquet file ({exc})") from None


def read_parquet_trials(p: Path) -> TrialList:
    """A whole Parquet trial list as a :class:`TrialList` (the in-memory path)."""
    from .trial_stream import TrialStream

    s = TrialStream(p)
    enroll: list[str] = []
    test: list[str] = []
    labels: list[np.ndarray] = []
    for ch in s:
        enroll += ch.enroll.to_pylist()
        test += ch.test.to_pylist()
        if ch.labels is not None:
            labels.append(ch.labels)
    if not enroll:
        raise UsageError(f"{p}: the trial list is empty")
    arr = np.concatenate(labels) if s.has_labels else None
    return TrialList(enroll, test, arr, str(p), "parquet", list(range(1, len(enroll) + 1)))
