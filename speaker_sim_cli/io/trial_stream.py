"""Trial lists read in chunks (CSV/TSV, Kaldi, VoxCeleb, Parquet) as compact arrays; no torch.

Each chunk holds its two key columns as Arrow string arrays and its labels as int8, never a
Python object per trial. The format rules and messages are :mod:`.trials`' own: a block of
lines the fast Arrow parser cannot take as is (tabs, odd whitespace, quotes, blank lines, a bad
line) is read by that module's line reader, which names the bad line.
"""

from __future__ import annotations

import io
import queue
import threading
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from ..errors import UsageError
from . import trials as T
from .key_index import KeyIndex

# Text parsed at a time (about 250 k Kaldi lines): the parser's working memory scales with it.
# regroup() then joins parsed blocks into chunks of ~0.5 M trials for the key lookup, whose
# cost per call (hashing the key table) does not.
BLOCK_BYTES = 8 << 20
CHUNK_TRIALS = 1 << 19
Item = TypeVar("Item")

# A block the Arrow parser reads exactly as the line reader would: only single spaces (or the
# delimiter) between fields, no other whitespace, no blank line, no leading / trailing space.
# Checked on the raw bytes (memchr-fast): ASCII, none of these control whitespace bytes (what
# str.split and str.splitlines also split on), none of these byte pairs.
_CONTROL = tuple(bytes([c]) for c in b"\t\r\x0b\x0c\x1c\x1d\x1e\x1f")


def _plain(block: bytes, allowed: bytes, quotes: bool) -> bool:
    """Whether the Arrow parser may read ``block`` as the line reader would. What this does
    not rule out (double spaces, blank lines, a leading or trailing space) shows after the
    parse as an empty field or a row count that is not the line count (:func:`_columns`)."""
    if not block.isascii() or (quotes and b'"' in block):
        return False
    return not any(c in block for c in _CONTROL if c != allowed)


def _columns(tab: pa.Table, lines: int, key_cols: list[int]) -> list[pa.Array] | None:
    """The parsed columns, or None when the parse is not the line reader's: a blank line
    (skipped by Arrow), an empty key field (two separators in a row), an overlong field."""
    if tab.num_rows != lines:
        return None
    cols = [c.combine_chunks() for c in tab.columns]
    for i in key_cols:
        if len(cols[i]) and pc.min(pc.binary_length(cols[i])).as_py() == 0:
            return None
    if any(_longest(c) > T.FIELD_LIMIT for c in cols):
        return None
    return cols


def first_line(path: Path) -> tuple[int, str] | None:
    """``(line number, text)`` of the first non-blank line in the first MiB, else None."""
    with open(path, "rb") as f:
        data = f.read(1 << 20)
    cut = data.rfind(b"\n")
    if cut >= 0 and len(data) == 1 << 20:
        data = data[: cut + 1]
    text = T.decode_text(path, data)
    return next(((i + 1, ln) for i, ln in enumerate(text.splitlines()) if ln.strip()), None)


def line_blocks(path: Path, block_bytes: int) -> Iterator[bytes]:
    """Consecutive whole lines of ``path`` read ``block_bytes`` at a time (the last one may
    lack its newline); no BOM."""
    rest = b""
    first = True
    with open(path, "rb") as f:
        while True:
            data = f.read(block_bytes)
            buf = rest + data
            if first and buf.startswith(b"\xef\xbb\xbf"):
                buf = buf[3:]
            first = False
            if not data:
                if buf:
                    yield buf
                return
            cut = buf.rfind(b"\n")
            if cut < 0:
                rest = buf
                continue
            yield buf[: cut + 1]
            rest = buf[cut + 1 :]


@dataclass
class TrialChunk:
    """Consecutive trials: keys as Arrow strings, labels int8 (or None), and where they are."""

    enroll: pa.Array
    test: pa.Array
    labels: np.ndarray | None
    first_line: int  # line (text) or row (Parquet) of the first trial, 1-based
    lines: np.ndarray | None = None  # each trial's line where they are not consecutive
    rows: tuple[np.ndarray, np.ndarray] | None = None  # both sides' key rows, once looked up

    def __len__(self) -> int:
        return len(self.enroll)

    def line_of(self, i: int) -> int:
        return int(self.lines[i]) if self.lines is not None else self.first_line + i


def _strings(values: list[str]) -> pa.Array:
    return pa.array(values, type=pa.string())


def _label_codes(col: pa.Array, where: str) -> np.ndarray:
    """int8 labels of a string column, each distinct spelling parsed once by parse_label."""
    enc = pc.dictionary_encode(col)
    if isinstance(enc, pa.ChunkedArray):
        enc = enc.combine_chunks()
    words = enc.dictionary.to_pylist()
    table = np.array([T.parse_label(w, where) for w in words], dtype=np.int8)
    return table[enc.indices.to_numpy(zero_copy_only=False)]


def _longest(col: pa.Array) -> int:
    n = pc.max(pc.binary_length(col)).as_py()
    return int(n or 0)


class TrialStream:
    """A trial list read chunk by chunk. Iterating twice reads the file twice.

    ``format`` is the in-memory reader's name for it (kaldi, voxceleb, csv, tsv, parquet);
    ``has_labels`` says whether chunks carry labels.
    """

    def __init__(self, path: str | Path, block_bytes: int | None = None) -> None:
        self.path = Path(path)
        self.source = str(self.path)
        self.block_bytes = block_bytes or BLOCK_BYTES
        p = self.path
        if not p.exists():
            raise UsageError(f"{p}: file not found")
        if p.is_dir():
            raise UsageError(f"{p}: is a directory, expected a file")
        if T.is_parquet(p):
            self.format = "parquet"
            from .trial_parquet import parquet_columns

            self._pq_cols = parquet_columns(p)
            self.has_labels = self._pq_cols[2] is not None
            return
        head = self._first_lines()
        if not head:
            raise UsageError(f"{p}: the trial list is empty")
        first = head[0][1]
        from .pairs import looks_like_pairs

        if looks_like_pairs(first):
            raise UsageError(f"{p}: a seed-tts-eval pair list is read whole, not streamed")
        self.delim: str | None = None
        if "," in first or ("\t" in first and T._header_columns(first.split("\t")) is not None):
            self.delim = "," if "," in first else "\t"
            rows = T.csv_rows(p, first, self.delim, head[0][0])
            header = rows[0][1]
            cols = T._header_columns(header)
            self.width = len(header)
            self.format = "csv" if self.delim == "," else "tsv"
            if cols is None:
                if len(header) not in (2, 3):
                    raise UsageError(
                        f"{p}:{head[0][0]}: no header naming the enrollment and test columns "
                        f"(expected e.g. 'enrollment,test,label'), and {len(header)} fields"
                    )
                cols = (0, 1, 2 if len(header) == 3 else None)
                self.format += " (no header)"
                self.header_line = 0  # the first line is a trial
            else:
                self.header_line = head[0][0]
            self.cols = cols
            self.has_labels = cols[2] is not None
        else:
            f = first.split()
            self.vox = (
                len(f) == 3
                and f[0].lower() in T.TARGET_WORDS
                and f[2].lower() not in T.TARGET_WORDS
            )
            self.format = "voxceleb" if self.vox else "kaldi"
            self.width = 3 if self.vox else len(f)
            self.has_labels = self.vox or len(f) == 3
            self.first_entry = head[0]  # given to the line reader with every later block

    def _first_lines(self) -> list[tuple[int, str]]:
        first = first_line(self.path)
        return [first] if first is not None else []

    # -- text ----------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[TrialChunk]:
        if self.format == "parquet":
            from .trial_parquet import parquet_chunks

            yield from parquet_chunks(self.path, self._pq_cols)
            return
        line = 1
        for block in line_blocks(self.path, self.block_bytes):
            if self.delim is None:
                plain = _plain(block, b"", quotes=False)
            else:
                plain = _plain(block, self.delim.encode(), quotes=True)
            chunk = None
            if plain:
                n_lines = block.count(b"\n")
                rows = n_lines + (not block.endswith(b"\n"))
                if self.delim is None:
                    chunk = self._fast(line, block, rows)
                else:
                    chunk = self._fast_delimited(line, block, rows)
            else:  # as the in-memory reader counts lines: splitlines (\x0c, \u2028, ... too)
                text = T.decode_text(self.path, block, line, bom=False)
                n_lines = len(text.splitlines())
            if chunk is None:
                chunk = self._slow(line, text if not plain else block.decode())
            if chunk is not None and len(chunk):
                yield chunk
            line += n_lines

    def _fast(self, line: int, block: bytes, rows: int) -> TrialChunk | None:
        names = [f"c{i}" for i in range(self.width)]
        try:
            tab = pacsv.read_csv(
                io.BytesIO(block),
                read_options=pacsv.ReadOptions(column_names=names, block_size=1 << 24),
                parse_options=pacsv.ParseOptions(delimiter=" ", quote_char=False),
                convert_options=pacsv.ConvertOptions(
                    column_types=dict.fromkeys(names, pa.string())
                ),
            )
        except pa.ArrowInvalid:
            return None
        cols = _columns(tab, rows, list(range(self.width)))
        if cols is None:
            return None
        e, t, lab = (cols[1], cols[2], cols[0]) if self.vox else (cols[0], cols[1], None)
        if not self.vox and self.width == 3:
            lab = cols[2]
        try:
            labels = _label_codes(lab, self.source) if lab is not None else None
        except UsageError:
            return None  # the line reader names the line
        return TrialChunk(e, t, labels, line)

    def _fast_delimited(self, line: int, block: bytes, rows: int) -> TrialChunk | None:
        assert self.delim is not None
        skip = 1 if line == self.header_line else 0
        names = [f"c{i}" for i in range(self.width)]
        try:
            tab = pacsv.read_csv(
                io.BytesIO(block),
                read_options=pacsv.ReadOptions(
                    column_names=names, skip_rows=skip, block_size=1 << 24
                ),
                parse_options=pacsv.ParseOptions(delimiter=self.delim, quote_char=False),
                convert_options=pacsv.ConvertOptions(
                    column_types=dict.fromkeys(names, pa.string())
                ),
            )
        except pa.ArrowInvalid:
            return None
        e_i, t_i, l_i = self.cols
        cols = _columns(tab, rows - skip, [])
        if cols is None:
            return None
        e = pc.utf8_trim(cols[e_i], characters=" ")
        t = pc.utf8_trim(cols[t_i], characters=" ")
        if len(e) and (pc.min(pc.binary_length(e)).as_py() == 0
                       or pc.min(pc.binary_length(t)).as_py() == 0):  # fmt: skip
            return None
        try:
            labels = _label_codes(cols[l_i], self.source) if l_i is not None else None
        except UsageError:
            return None
        return TrialChunk(e, t, labels, line + skip)

    def _slow(self, line: int, text: str) -> TrialChunk | None:
        """The block read by :mod:`.trials`' line reader (it raises naming the bad line)."""
        p = self.path
        if self.delim is not None:
            rows = T.csv_rows(p, text, self.delim, line, allow_empty=True)
            rows = [r for r in rows if r[0] != self.header_line]
            e_i, t_i, l_i = self.cols
            enroll, test, labels, numbers = T.delimited_body(p, rows, e_i, t_i, l_i, self.width)
            labs = np.asarray(labels, dtype=np.int8) if l_i is not None else None
        else:
            lines = [(line + i, ln) for i, ln in enumerate(text.splitlines()) if ln.strip()]
            prefix = [] if line <= self.first_entry[0] else [self.first_entry]
            tl = T._read_whitespace(p, prefix + lines)
            k = len(prefix)
            enroll, test, numbers = tl.enroll[k:], tl.test[k:], tl.line_numbers[k:]
            labs = tl.labels[k:] if tl.labels is not None else None
        if not enroll:
            return None
        return TrialChunk(_strings(enroll), _strings(test), labs, numbers[0],
                          np.asarray(numbers, dtype=np.int64))  # fmt: skip


def prefetch(items: Iterable[Item], depth: int = 1) -> Generator[Item, None, None]:
    """``items`` produced by a background thread up to ``depth`` ahead of the consumer (the
    Arrow parser and numpy release the GIL, so reading the next chunk overlaps scoring this
    one). The producer's exception is raised where its item would have come; a consumer that
    stops early (an exception, ``close``) stops the producer."""
    q: queue.Queue[tuple[int, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(kind: int, x: Any) -> bool:
        while not stop.is_set():
            try:
                q.put((kind, x), timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for x in items:
                if not put(0, x):
                    return
        except BaseException as exc:  # handed to the consumer, raised there
            put(1, exc)
            return
        put(2, None)

    th = threading.Thread(target=produce, name="speaker-sim-prefetch", daemon=True)
    th.start()
    try:
        while True:
            kind, x = q.get()
            if kind == 1:
                raise x
            if kind == 2:
                return
            yield x
    finally:
        stop.set()
        th.join()


def regroup(chunks: Iterable[TrialChunk], trials: int | None = None) -> Iterator[TrialChunk]:
    """Consecutive chunks joined into chunks of at least ``trials`` (default CHUNK_TRIALS; the
    last one less): the key columns become Arrow ChunkedArrays, nothing is copied."""
    trials = trials or CHUNK_TRIALS
    group: list[TrialChunk] = []
    size = 0
    for ch in chunks:
        group.append(ch)
        size += len(ch)
        if size >= trials:
            yield _join(group)
            group, size = [], 0
    if group:
        yield _join(group)


def _join(group: list[TrialChunk]) -> TrialChunk:
    if len(group) == 1:
        return group[0]

    def col(name: str) -> pa.ChunkedArray:
        parts = [getattr(c, name) for c in group]
        flat = [x for p in parts for x in (p.chunks if isinstance(p, pa.ChunkedArray) else [p])]
        return pa.chunked_array([x.cast(pa.string()) for x in flat], type=pa.string())

    labels = None
    if group[0].labels is not None:
        labels = np.concatenate([c.labels for c in group if c.labels is not None])
    lines = None
    if any(c.lines is not None for c in group):
        lines = np.concatenate([c.lines if c.lines is not None
                                else c.first_line + np.arange(len(c)) for c in group])  # fmt: skip
    return TrialChunk(col("enroll"), col("test"), labels, group[0].first_line, lines)


# -- keys --------------------------------------------------------------------------------------


class KeyTable:
    """Unique keys as one Arrow string array; a key's id is its row (int64, -1 if absent),
    found by a :class:`.key_index.KeyIndex` built on the first lookup."""

    def __init__(self, keys: pa.Array) -> None:
        self.keys = keys.cast(pa.string())
        self._index: KeyIndex | None = None

    def __len__(self) -> int:
        return len(self.keys)

    def ids(self, *cols: pa.Array | pa.ChunkedArray) -> list[np.ndarray]:
        """The id of every key of each column."""
        if self._index is None:
            self._index = KeyIndex(self.keys)
        return [self._index.rows(c) for c in cols]

    def to_list(self) -> list[str]:
        return self.keys.to_pylist()


@dataclass
class ListSummary:
    """What a first pass over a list found: its unique keys in first-seen order (enrolment
    and test interleaved, as TrialList.items gives them), the enrolment side's, and counts."""

    keys: KeyTable
    enroll_keys: KeyTable
    trials: int
    targets: int | None
    format: str
    source: str

    def describe(self) -> dict[str, object]:
        """TrialList.describe of the same list."""
        out: dict[str, object] = {"source": self.source, "format": self.format,
                                  "trials": self.trials}  # fmt: skip
        if self.targets is not None:
            out["targets"] = self.targets
            out["nontargets"] = self.trials - self.targets
        return out


def _unique(parts: list[pa.Array]) -> pa.Array:
    """Distinct strings of the parts, in first-seen order."""
    u = pc.unique(pa.chunked_array(parts, type=pa.string()))
    return u.combine_chunks() if isinstance(u, pa.ChunkedArray) else u


def scan(stream: TrialStream) -> ListSummary:
    """Read the whole list once: every line checked (a bad one raises naming it, before any
    model work), its unique keys collected as Arrow strings, its trials counted."""
    keys: list[pa.Array] = []
    enroll: list[pa.Array] = []
    pending = [0, 0]  # keys collected since the last fold, of each list
    folded = [0, 0]
    n = targets = 0
    for ch in stream:
        m = len(ch)
        n += m
        if ch.labels is not None:
            targets += int(ch.labels.sum(dtype=np.int64))
        both = pa.concat_arrays([ch.enroll.cast(pa.string()), ch.test.cast(pa.string())])
        order = np.empty(2 * m, dtype=np.int64)  # e0 t0 e1 t1 ...: first-seen as in items()
        order[0::2] = np.arange(m)
        order[1::2] = np.arange(m, 2 * m)
        for k, (parts, new) in enumerate(
            (
                (keys, pc.unique(both.take(pa.array(order)))),
                (enroll, pc.unique(ch.enroll.cast(pa.string()))),
            )
        ):
            parts.append(new)
            pending[k] += len(new)
            if pending[k] > max(folded[k], 1 << 20):  # fold: amortised, first-seen order kept
                parts[:] = [_unique(parts)]
                folded[k], pending[k] = len(parts[0]), 0
    keys, enroll = [_unique(keys)], [_unique(enroll)]
    if n == 0:
        raise UsageError(f"{stream.path}: the trial list has no trials")
    return ListSummary(KeyTable(keys[0]), KeyTable(enroll[0]), n,
                       targets if stream.has_labels else None, stream.format,
                       stream.source)  # fmt: skip
