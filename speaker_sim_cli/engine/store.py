"""The sharded embedding store of one extraction setting: many vectors per file, one index.

Layout under a setting's folder (``<cache>/emb/<setting>/``, a local path or an fsspec URL)::

    shards/<time_ns>-<host>-<pid>-<rand>.arrow   Arrow IPC files, one record batch each:
                                                 key fixed_size_binary(32) (content sha256),
                                                 check uint32 (:func:`row_checks` of the row),
                                                 vec fixed_size_list<float32>[dim]
    index/<time_ns>-<rand>.idx                   compacted index (:mod:`.store_index`): sorted
                                                 16-byte key prefixes -> (shard, row)

Why Arrow IPC (not Parquet or Lance), measured on this machine (``benchmarks/bench_store.py``
and the report of issue #23): an uncompressed IPC file is memory-mapped and its vector column
*is* a numpy array (zero copy), so fetching rows is ``vec[rows]``; random vectors do not
compress, so Parquet's encoding buys nothing and costs a decode of whole pages per lookup;
Lance gives random access too but brings its own manifest/versioning and a 100 MB dependency,
and its commit protocol does not match "each writer its own files, nothing shared to lock".

Writers buffer rows and commit a whole shard at once: written to a temp name in the same
folder, fsynced, renamed (locally) or uploaded as one PUT (object stores), so a shard exists
whole or not at all; a killed writer loses only its uncommitted rows and leaves at most a
``.tmp`` file that readers never list. Every writer names its shards uniquely, so any number
of processes write side by side with no lock. The index is derived data: readers take the
newest compacted index and read the keys of the shards it does not cover (the listing is one
directory read; no shard it covers is opened), so a lost or corrupted index costs time, never
a wrong vector. Every returned row is checked against its key and check word; a row or shard that
fails is a miss (the caller recomputes it) and is counted as corrupt.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from ..io import storage
from . import store_index as si
from .store_shard import (
    SHARD_FORMAT,
    SHARD_SUFFIX,
    Shard,
    ShardError,
    digest_bytes,
    digests_to_keys,
    new_shard_name,
    parse_shard,
    read_vectors,
    row_checks,
    shard_bytes,
)

__all__ = [
    "SHARD_FORMAT",
    "SHARD_ROWS",
    "Shard",
    "ShardError",
    "ShardStore",
    "digest_bytes",
    "digests_to_keys",
    "parse_shard",
    "row_checks",
    "shard_bytes",
]

#: Rows buffered before a shard is committed by :meth:`ShardStore.put_many` itself.
SHARD_ROWS = 16384
#: ... or seconds since the oldest buffered row (``$SPEAKER_SIM_STORE_COMMIT_SECONDS``), so a
#: killed run loses at most this much work.
COMMIT_SECONDS = 10.0
#: Shards not covered by the compacted index before a flush rebuilds it.
COMPACT_AT = 16
_OPEN_SHARDS = 64  # open (memory-mapped or fetched) shards kept per store
#: A lookup that wants at least 1/DENSE_READ of a local shard's rows reads its vectors whole.
DENSE_READ = 8


class _Target:
    """Where a lookup's rows go: ``out[dest[i]]`` (``out[i]`` without ``dest``), and
    ``found[i]`` set."""

    def __init__(self, out: np.ndarray, dest: np.ndarray | None, found: np.ndarray) -> None:
        self.out, self.dest, self.found = out, dest, found

    def put(self, qi: np.ndarray, vec: np.ndarray, good: np.ndarray) -> None:
        if not good.all():
            qi, vec = qi[good], vec[good]
        self.out[qi if self.dest is None else self.dest[qi]] = vec
        self.found[qi] = True


class ShardStore:
    """Vectors of one setting in shards under ``root`` (a folder path or URL)."""

    def __init__(
        self, root: str, dim: int, shard_rows: int = SHARD_ROWS, commit_seconds: float | None = None
    ) -> None:
        self.root = root.rstrip("/")
        self.dim = dim
        self.shard_rows = shard_rows
        if commit_seconds is None:
            env = os.environ.get("SPEAKER_SIM_STORE_COMMIT_SECONDS", "")
            try:
                commit_seconds = float(env) if env else COMMIT_SECONDS
            except ValueError:
                commit_seconds = COMMIT_SECONDS
        self.commit_seconds = commit_seconds
        self._oldest = 0.0
        self.remote = storage.is_url(self.root)
        self.corrupt = 0
        self.bad_shards: dict[str, str] = {}
        self._lock = threading.RLock()
        self._pending_keys: list[bytes] = []
        self._pending_vecs: list[np.ndarray] = []
        self._pending_at: dict[bytes, int] = {}
        self._names: list[str] = []  # shard id -> name
        self._ids: dict[str, int] = {}
        self._live = np.zeros(0, dtype=bool)
        self._main = si.Index.empty()  # from the compacted index file
        self._main_file: str | None = None
        self._main_covers: set[str] = set()
        self._delta = si.Index.empty()  # shards the index file does not cover
        self._delta_shards: list[str] = []
        self._listing: frozenset[str] | None = None
        self._listed_at = 0.0
        self._mtime = -1
        self._open: OrderedDict[str, Shard] = OrderedDict()

    # -- paths ------------------------------------------------------------------------------
    def _join(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def shard_names(self) -> list[str]:
        """Committed shards, oldest first (one directory listing; no shard is opened)."""
        return sorted(
            n
            for n in storage.list_names(self._join("shards"))
            if n.endswith(SHARD_SUFFIX) and not n.startswith(".")
        )

    def shard_sizes(self) -> dict[str, int]:
        return {
            n: s
            for n, s in storage.list_sizes(self._join("shards")).items()
            if n.endswith(SHARD_SUFFIX) and not n.startswith(".")
        }

    # -- index ------------------------------------------------------------------------------
    def _id(self, name: str) -> int:
        if name not in self._ids:
            self._ids[name] = len(self._names)
            self._names.append(name)
            self._live = np.append(self._live, True)
        return self._ids[name]

    def _unchanged(self) -> bool:
        """True when the shard folder surely has not changed since the last listing: its mtime
        is the same and older than 2 s (timestamps are coarse), or, for an object store, the
        last listing is under 1 s old."""
        if self._listing is None:
            return False
        if self.remote:
            return time.monotonic() - self._listed_at < 1.0
        try:
            mtime = os.stat(self._join("shards")).st_mtime_ns
        except OSError:
            mtime = 0
        if mtime != self._mtime or time.time_ns() - mtime < 2_000_000_000:
            self._mtime = mtime
            return False
        return True

    def refresh(self, force: bool = False, cheap: bool = False) -> None:
        """Pick up shards committed (or removed) since the last look, by any process.
        ``cheap``: skip the listing when the folder has not changed (:meth:`_unchanged`)."""
        with self._lock:
            if cheap and not force and self._unchanged():
                return
            names = frozenset(self.shard_names())
            self._listed_at = time.monotonic()
            if names == self._listing and not force:
                return
            self._listing = names
            idx_files = sorted(
                n for n in storage.list_names(self._join("index")) if n.endswith(".idx")
            )
            newest = idx_files[-1] if idx_files else None
            if newest != self._main_file:
                self._load_main(newest)
            for name, i in self._ids.items():
                self._live[i] = name in names
            todo = sorted(names - self._main_covers - set(self._delta_shards))
            parts = [self._delta]
            for name in todo:
                try:
                    sh = self._shard(name)
                except ShardError as exc:
                    self._bad(name, str(exc))
                    continue
                parts.append(si.Index.from_keys(sh.keys, self._id(name)))
                self._delta_shards.append(name)
            if len(parts) > 1:
                self._delta = si.Index.merge(parts)

    def _load_main(self, fname: str | None) -> None:
        self._main, self._main_file, self._main_covers = si.Index.empty(), None, set()
        self._delta, self._delta_shards = si.Index.empty(), []
        if fname is None:
            return
        try:
            data = storage.read_bytes(self._join("index", fname))
            shards, idx = si.decode(data)
        except (OSError, si.IndexFileError) as exc:
            self.bad_shards.setdefault(f"index/{fname}", str(exc))
            return  # the index is derived data: the shards' own keys are read instead
        ids = np.array([self._id(s) for s in shards], dtype=np.uint32)
        self._main = si.Index(idx.hi, idx.lo, ids[idx.shard] if len(ids) else idx.shard, idx.row)
        self._main_file, self._main_covers = fname, set(shards)

    def _bad(self, name: str, why: str) -> None:
        self.bad_shards[name] = why
        if name in self._ids:
            self._live[self._ids[name]] = False

    def entries(self) -> int:
        """Keys held by committed shards (from the index; a key stored twice counts once)."""
        self.refresh()
        with self._lock:
            main, delta = self._main, self._delta
            live_main = self._live[main.shard] if len(main) else np.zeros(0, bool)
            live_delta = self._live[delta.shard] if len(delta) else np.zeros(0, bool)
            pos = main.find(delta.hi[live_delta], delta.lo[live_delta])
            both = int(live_main[pos[pos >= 0]].sum())  # live keys in both: count once
            return int(live_main.sum()) + int(live_delta.sum()) - both

    # -- shards -----------------------------------------------------------------------------
    def _shard(self, name: str) -> Shard:
        sh = self._open.get(name)
        if sh is not None:
            self._open.move_to_end(name)
            return sh
        sh = self.open_shard(name)
        self._open[name] = sh
        # A remote shard is held in memory (~13 MB at 16,384 rows): keep fewer of them.
        while len(self._open) > (_OPEN_SHARDS // 8 if self.remote else _OPEN_SHARDS):
            self._open.popitem(last=False)
        return sh

    def open_shard(self, name: str) -> Shard:
        import pyarrow as pa

        path = self._join("shards", name)
        try:
            if self.remote:
                source: Any = pa.BufferReader(storage.read_bytes(path))
            else:
                source = pa.memory_map(path, "r")
        except OSError as exc:
            raise ShardError(f"cannot open ({exc})") from None
        return parse_shard(name, source, self.dim)

    # -- reads ------------------------------------------------------------------------------
    def get_many(
        self, digests: Sequence[str], cheap: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(matrix (n, dim) float32, found (n,) bool)``; rows not found are zero.
        ``cheap``: see :meth:`refresh` (for one-key lookups in a loop)."""
        if not len(digests):
            return np.zeros((0, self.dim), dtype=np.float32), np.zeros(0, dtype=bool)
        return self.get_keys(digests_to_keys(digests), cheap)

    def get_keys(
        self,
        qkeys: np.ndarray,
        cheap: bool = False,
        out: np.ndarray | None = None,
        dest: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`get_many` of raw keys, (n, 32) uint8 (no hex on the way). With ``out`` and
        ``dest``, key ``i``'s vector is written to ``out[dest[i]]`` (a caller's matrix: no
        copy of the rows in between) and ``out`` is returned; rows not found are left as
        they were."""
        n = len(qkeys)
        if out is None:
            out, dest = np.zeros((n, self.dim), dtype=np.float32), None
        found = np.zeros(n, dtype=bool)
        if n == 0:
            return out, found
        with self._lock:
            if self._pending_at:  # rows this process has not committed yet
                for i, k in enumerate(qkeys):
                    j = self._pending_at.get(k.tobytes())
                    if j is not None:
                        out[i if dest is None else dest[i]] = self._pending_vecs[j]
                        found[i] = True
            self.refresh(cheap=cheap)
            todo = np.flatnonzero(~found)
            if len(todo):
                self._fetch(qkeys, todo, _Target(out, dest, found))
        return out, found

    def _fetch(self, qkeys: np.ndarray, todo: np.ndarray, to: _Target) -> None:
        hi, lo = si.split_keys(qkeys[todo])
        for index in (self._delta, self._main):
            if not len(todo):
                return
            pos = index.find(hi, lo)
            hit = pos >= 0
            if not hit.any():
                continue
            q = todo[hit]
            sid = index.shard[pos[hit]]
            row = index.row[pos[hit]]
            by = np.argsort(sid, kind="stable")  # one group a shard, without a pass per shard
            sid, row, q = sid[by], row[by], q[by]
            cut = np.flatnonzero(sid[1:] != sid[:-1]) + 1
            for a, b in zip([0, *cut.tolist()], [*cut.tolist(), len(sid)], strict=True):
                self._read_rows(int(sid[a]), row[a:b], q[a:b], qkeys, to)
            keep = ~to.found[todo]
            todo, hi, lo = todo[keep], hi[keep], lo[keep]

    def _read_rows(
        self, sid: int, rows: np.ndarray, qi: np.ndarray, qkeys: np.ndarray, to: _Target
    ) -> None:
        name = self._names[sid]
        if not self._live[sid]:
            return
        try:
            sh = self._shard(name)
        except ShardError as exc:
            self._bad(name, str(exc))
            self.corrupt += len(rows)
            return
        if rows.max(initial=0) >= len(sh.vec):
            self._bad(name, "the index points past its last row")
            self.corrupt += len(rows)
            return
        order = np.argsort(rows, kind="stable")  # in file order: pages are touched once
        rows, qi = rows[order], qi[order]
        whole = len(rows) == len(sh.vec) and bool((np.diff(rows) == 1).all())
        at: slice | np.ndarray = slice(None) if whole else rows  # every row: views, no gather
        vec = None
        if sh.vec_offset is not None and len(rows) * DENSE_READ >= len(sh.vec):
            # Many of its rows: one read of the file instead of faulting in the memory map's
            # pages one by one (each fault is dear on a VM, and a shard just written by a
            # worker is not mapped in this process yet).
            with contextlib.suppress(OSError, ShardError):
                vec = read_vectors(self._join("shards", name), sh)[at]
        if vec is None:
            vec = sh.vec[at]
        keys = sh.keys[at]
        good = (keys == qkeys[qi]).all(axis=1)
        ok = (row_checks(keys, vec) == sh.crc[at]) & np.isfinite(vec).all(axis=1)
        bad = good & ~ok
        if bad.any():
            self.corrupt += int(bad.sum())
            first = int(rows[np.flatnonzero(bad)[0]])
            self.bad_shards.setdefault(name, f"row {first} fails its checksum")
        good &= ok
        to.put(qi, vec, good)

    # -- writes -----------------------------------------------------------------------------
    def put_many(self, digests: Sequence[str], vecs: np.ndarray) -> None:
        vecs = np.asarray(vecs, dtype=np.float32).reshape(len(digests), self.dim)
        import pyarrow  # noqa: F401  (now, not in the flush at interpreter exit)

        with self._lock:
            if not self._pending_keys:
                self._oldest = time.monotonic()
            for k, v in zip(digests_to_keys(digests), vecs):
                key = k.tobytes()
                self._pending_at[key] = len(self._pending_keys)
                self._pending_keys.append(key)
                self._pending_vecs.append(np.array(v, dtype=np.float32))
            if (
                len(self._pending_keys) >= self.shard_rows
                or time.monotonic() - self._oldest >= self.commit_seconds
            ):
                self.flush()

    def pending(self) -> int:
        return len(self._pending_keys)

    def flush(self) -> str | None:
        """Commit the buffered rows as one shard; returns its name (None when nothing was
        buffered). Raises OSError when the shard cannot be written (the rows stay buffered)."""
        with self._lock:
            if not self._pending_keys:
                return None
            keys = np.frombuffer(b"".join(self._pending_keys), np.uint8).reshape(-1, 32)
            vecs = np.stack(self._pending_vecs)
            name = new_shard_name()
            storage.atomic_write(self._join("shards", name), shard_bytes(keys, vecs))
            self._pending_keys, self._pending_vecs, self._pending_at = [], [], {}
            self.refresh()
            if len(self._delta_shards) >= COMPACT_AT:
                with contextlib.suppress(OSError):
                    self.compact()
            return name

    def compact(self) -> str:
        """Write a new index file covering every live shard; older index files are removed."""
        with self._lock:
            self.refresh(force=True)
            live = [self._names[i] for i in np.flatnonzero(self._live).tolist()]
            both = si.Index.merge([self._main, self._delta])
            keep = self._live[both.shard] if len(both) else np.zeros(0, bool)
            both = both.select(keep)
            remap = np.full(len(self._names), 0, dtype=np.uint32)
            for j, nm in enumerate(live):
                remap[self._ids[nm]] = j
            body = si.encode(live, si.Index(both.hi, both.lo, remap[both.shard], both.row))
            fname = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.idx"
            storage.atomic_write(self._join("index", fname), body)
            for old in storage.list_names(self._join("index")):
                if old.endswith(".idx") and old < fname:
                    with contextlib.suppress(OSError):
                        storage.remove(self._join("index", old))
            self._main = si.Index(both.hi, both.lo, both.shard, both.row)
            self._main_file, self._main_covers = fname, set(live)
            self._delta, self._delta_shards = si.Index.empty(), []
            return fname

    # -- maintenance --------------------------------------------------------------------------
    def iter_shards(self) -> Iterator[tuple[str, Shard | ShardError]]:
        for name in self.shard_names():
            try:
                yield name, self.open_shard(name)
            except ShardError as exc:
                yield name, exc

    def verify_shard(self, name: str) -> str | None:
        """None when every row of ``name`` passes its CRC, else what is wrong."""
        try:
            sh = self.open_shard(name)
        except ShardError as exc:
            return str(exc)
        bad = np.flatnonzero(row_checks(sh.keys, sh.vec) != sh.crc)
        if len(bad):
            return f"row {int(bad[0])} fails its checksum" + (
                f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
            )
        return None

    def remove_shards(self, names: Sequence[str]) -> None:
        for n in names:
            self._open.pop(n, None)
            with contextlib.suppress(FileNotFoundError):
                storage.remove(self._join("shards", n))
        self.refresh(force=True)
