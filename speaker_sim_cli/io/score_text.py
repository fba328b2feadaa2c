"""Score lines built by Arrow a chunk at a time, byte for byte what :func:`.scorefiles.
write_scores` writes with Python strings per row. numpy / pyarrow only.

A score is written as ``f"{x:.6f}"`` (correctly rounded, half to even, ``-0.000000`` for a
negative value that rounds to zero) and NaN as an empty field. :func:`fixed6` gets the digits
from ``rint(x * 1e6)`` as an integer, which is the correctly rounded result except within the
product's rounding error of a half: those values (and non-finite or huge ones) are formatted by
Python, so every value is exactly Python's.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_BIG = float(2**52)  # past this, x * 1e6 is not an exact integer grid: Python formats it
_CSV_SPECIAL = '[,"\r\n]'  # what makes Python's csv writer quote a field
WORDS = pa.array(["nontarget", "target"])


def fixed6(x: np.ndarray) -> pa.Array:
    """``f"{v:.6f}"`` of each value as an Arrow string array; ``""`` for NaN.

    >>> fixed6(np.array([0.5, -1e-9, 0.0078125, np.nan, -0.25])).to_pylist()
    ['0.500000', '-0.000000', '0.007812', '', '-0.250000']
    """
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        p = x * 1e6
        q = np.rint(p)
        ap = np.abs(p)
        # |p - x * 10**6| <= |p| * 2**-53: a half closer than that may round either way
        slow = ~(ap < _BIG) | (np.abs(np.abs(p - q) - 0.5) <= ap * 2.0**-51)
    mag = np.where(slow, 0.0, np.abs(q)).astype(np.int64)
    whole = pa.array(mag // 1_000_000).cast(pa.string())
    frac = pc.utf8_slice_codeunits(pa.array(mag % 1_000_000 + 1_000_000).cast(pa.string()), 1)
    sign = pc.if_else(pa.array(np.signbit(x)), pa.scalar("-"), pa.scalar(""))
    text = pc.binary_join_element_wise(pc.binary_join_element_wise(sign, whole, ""), frac, ".")
    if slow.any():
        idx = np.flatnonzero(slow)
        fixed = ["" if math.isnan(v) else f"{v:.6f}" for v in x[idx].tolist()]
        mask = np.zeros(len(x), bool)
        mask[idx] = True
        text = pc.replace_with_mask(text, pa.array(mask), pa.array(fixed, pa.string()))
    return text


def _flat(col: object) -> pa.Array:
    if isinstance(col, pa.ChunkedArray):
        return col.combine_chunks().cast(pa.string())
    if isinstance(col, pa.Array):
        return col.cast(pa.string())
    return pa.array(col, pa.string())


def _joined_bytes(fields: list[pa.Array], sep: str) -> memoryview:
    """Each row's fields joined by ``sep`` and ended by a newline, all rows as one bytes."""
    line = pc.binary_join_element_wise(*fields, sep)
    line = pc.binary_join_element_wise(line, pa.scalar(""), "\n")
    if isinstance(line, pa.ChunkedArray):
        line = line.combine_chunks()
    if len(line) == 0:
        return memoryview(b"")
    off = np.frombuffer(line.buffers()[1], np.int32, len(line) + 1, line.offset * 4)
    return memoryview(line.buffers()[2])[int(off[0]) : int(off[-1])]


def text_rows(
    fmt: str, enroll: object, test: object, scores: np.ndarray, labels: np.ndarray | None,
    errors: list[str | None] | None, extra: dict[str, np.ndarray] | None,
    skip_failed: bool, error_column: bool,
) -> tuple[memoryview, int] | None:  # fmt: skip
    """The rows of ``write_scores(..., header=False, error_column=error_column)`` as bytes and
    their count; None where a CSV field would need quoting (the caller writes those rows
    with Python's csv writer)."""
    e, t = _flat(enroll), _flat(test)
    score = fixed6(scores)
    if fmt == "csv":
        err = None
        if error_column and not skip_failed:
            err = pa.array(errors if errors is not None else [None] * len(scores), pa.string())
            err = err.fill_null("")
        for col in (e, t) + ((err,) if err is not None else ()):
            if len(col) and pc.any(pc.match_substring_regex(col, _CSV_SPECIAL)).as_py():
                return None
        fields = [e, t]
        if labels is not None:
            fields.append(pa.array(labels.astype(np.int64)).cast(pa.string()))
        fields.append(score)
        fields += [fixed6(v) for v in (extra or {}).values()]
        if err is not None:
            fields.append(err)
        keep = None
        if skip_failed and errors is not None:
            keep = pa.array([x is None for x in errors])
    else:
        if extra:
            return None  # write_scores names the problem
        fields = [e, t]
        if fmt == "kaldi" and labels is not None:
            fields.append(pa.array(labels.astype(np.int64)).cast(pa.string()))
        fields.append(score)
        if fmt == "wespeaker" and labels is not None:
            fields.append(WORDS.take(pa.array(labels.astype(np.int64))))
        keep = pa.array(~np.isnan(scores))  # no place for a failure: the report counts it
    if keep is not None:
        fields = [pc.filter(f, keep) for f in fields]
    n = len(fields[0])
    return _joined_bytes(fields, "," if fmt == "csv" else " "), n


__all__ = ["fixed6", "text_rows"]
