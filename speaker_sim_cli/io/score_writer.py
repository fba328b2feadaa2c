"""A score file written a chunk at a time (streamed ``score``), atomically: the text formats
exactly as :func:`.scorefiles.write_scores` writes them whole, or Parquet. numpy / pyarrow."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from pathlib import Path
from typing import IO

import numpy as np

from ..errors import UsageError
from .scorefiles import STREAM_FORMATS, write_scores

TEXT_ROWS = 65536


def _pylist(col: object, lo: int, hi: int) -> list[str]:
    if isinstance(col, list):
        return col[lo:hi]
    return col.slice(lo, hi - lo).to_pylist()  # type: ignore[attr-defined]


def _arrow(col: object) -> object:
    import pyarrow as pa

    if isinstance(col, pa.ChunkedArray):
        return col.cast(pa.string())  # stays chunked: no copy
    return pa.array(col, pa.string())


class StreamedScores:
    """A score file written a chunk at a time, atomically: into a temp file beside ``path``,
    renamed over it by :meth:`commit`; :meth:`abort` (or leaving the ``with`` block by an
    exception) removes the temp file, so a run that fails late leaves nothing half written.
    ``path`` None writes text to stdout as it comes."""

    def __init__(
        self, path: Path | None, fmt: str, labelled: bool, error_column: bool,
        skip_failed: bool = False, extra_names: tuple[str, ...] = (),
    ) -> None:  # fmt: skip
        if fmt not in STREAM_FORMATS:
            raise UsageError(f"unknown score format {fmt!r}: use one of "
                             f"{', '.join(STREAM_FORMATS)}")  # fmt: skip
        if fmt == "parquet" and path is None:
            raise UsageError("--format parquet needs --out FILE (Parquet is not written to stdout)")
        if extra_names and fmt not in ("csv", "parquet"):
            raise UsageError(f"the {fmt} score format has no place for {', '.join(extra_names)}: "
                             "use --format csv")  # fmt: skip
        self.path, self.fmt, self.labelled = path, fmt, labelled
        self.error_column = error_column and not skip_failed
        self.skip_failed = skip_failed
        self.extra_names = extra_names
        self._first = True
        self._tmp: str | None = None
        self._text: IO[str] | None = None
        self._pq: object = None
        if path is None:
            self._text = sys.stdout
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, self._tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        if fmt == "parquet":
            os.close(fd)
            import pyarrow.parquet as pq

            self._pq = pq.ParquetWriter(self._tmp, self._schema())
        else:
            self._text = os.fdopen(fd, "w", encoding="utf-8", newline="")

    def _schema(self) -> object:
        import pyarrow as pa

        cols = [("enrollment", pa.string()), ("test", pa.string())]
        cols += [("label", pa.int8())] if self.labelled else []
        cols += [("score", pa.float64())] + [(n, pa.float64()) for n in self.extra_names]
        cols += [("error", pa.string())] if self.error_column else []
        return pa.schema(cols)

    def write(
        self, enroll: object, test: object, scores: np.ndarray, labels: np.ndarray | None,
        errors: list[str | None] | None, extra: dict[str, np.ndarray] | None = None,
    ) -> int:  # fmt: skip
        """One chunk, in input order; the number of rows written."""
        if self._pq is not None:
            return self._write_parquet(enroll, test, scores, labels, errors, extra)
        assert self._text is not None
        if self._first and self.fmt == "csv":  # the header, as write_scores words it
            write_scores(self._text, [], [], np.empty(0),
                         np.empty(0, np.int8) if labels is not None else None, None, self.fmt,
                         self.skip_failed, {k: v[:0] for k, v in (extra or {}).items()} or None,
                         header=True, error_column=self.error_column)  # fmt: skip
            self._first = False
        from .score_text import text_rows

        fast = text_rows(self.fmt, enroll, test, scores, labels, errors, extra,
                         self.skip_failed, self.error_column)  # fmt: skip
        if fast is not None:  # Arrow built the lines: the same bytes as the loop below
            raw = getattr(self._text, "buffer", None)
            if raw is None:
                self._text.write(bytes(fast[0]).decode())
            else:
                self._text.flush()
                raw.write(fast[0])
            return fast[1]
        n = 0
        for lo in range(0, len(scores), TEXT_ROWS):  # Python strings for a slice at a time
            hi = min(len(scores), lo + TEXT_ROWS)
            n += write_scores(
                self._text, _pylist(enroll, lo, hi), _pylist(test, lo, hi), scores[lo:hi],
                labels[lo:hi] if labels is not None else None,
                errors[lo:hi] if errors is not None else None, self.fmt, self.skip_failed,
                {k: v[lo:hi] for k, v in extra.items()} if extra else None,
                header=self._first, error_column=self.error_column,
            )  # fmt: skip
            self._first = False
        return n

    def _write_parquet(
        self, enroll: object, test: object, scores: np.ndarray, labels: np.ndarray | None,
        errors: list[str | None] | None, extra: dict[str, np.ndarray] | None,
    ) -> int:  # fmt: skip
        import pyarrow as pa

        ok = ~np.isnan(scores)
        cols: list[object] = [_arrow(enroll), _arrow(test)]
        if self.labelled:
            cols.append(pa.array(labels, pa.int8()))
        cols.append(pa.array(scores, pa.float64(), mask=~ok))
        cols += [pa.array(v, pa.float64(), mask=np.isnan(v)) for v in (extra or {}).values()]
        if self.error_column:
            cols.append(pa.array(errors if errors is not None else [None] * len(scores),
                                 pa.string()))  # fmt: skip
        table = pa.Table.from_arrays(cols, schema=self._schema())
        if self.skip_failed and not ok.all():
            table = table.filter(pa.array(ok))
        self._pq.write_table(table)  # type: ignore[attr-defined]
        return table.num_rows

    def commit(self) -> None:
        """Finish the file and move it into place (an empty score file has its header)."""
        if self._first and self._text is not None and self.fmt == "csv":
            self.write([], [], np.empty(0), np.empty(0, np.int8) if self.labelled else None,
                       None)  # fmt: skip
        if self._pq is not None:
            self._pq.close()  # type: ignore[attr-defined]
        elif self._text is not None and self._text is not sys.stdout:
            self._text.close()
        else:
            sys.stdout.flush()
        if self._tmp is not None:
            assert self.path is not None
            os.replace(self._tmp, self.path)
            self._tmp = None

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            if self._pq is not None:
                self._pq.close()  # type: ignore[attr-defined]
            elif self._text is not None and self._text is not sys.stdout:
                self._text.close()
        if self._tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._tmp)
            self._tmp = None

    def __enter__(self) -> StreamedScores:
        return self

    def __exit__(self, kind: object, *_: object) -> None:
        if kind is None:
            self.commit()
        else:
            self.abort()
