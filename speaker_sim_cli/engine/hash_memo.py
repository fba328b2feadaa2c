"""Remembered content hashes: one SQLite file (WAL) instead of a memo file per recording.

``files.sqlite`` maps a file's absolute path (or a URL) to the stamp it had when it was hashed
(``size mtime_ns inode``; a URL's ``url size etag``) and its content sha256. A stamp that
differs is a miss, so an edited or replaced file is hashed again. Any number of processes may
read and write it (WAL, a busy timeout); writes are batched in one transaction per
``file_hashes`` call. The memo only saves time: any SQLite error turns it off for the process
and the files are hashed instead. The memo files older versions wrote (``files/*.txt``) are
still read.
"""

from __future__ import annotations

import contextlib
import hashlib
import sqlite3
import threading
from pathlib import Path

_SCHEMA = "CREATE TABLE IF NOT EXISTS memo (key TEXT PRIMARY KEY, stamp TEXT, sha256 TEXT)"


class HashMemo:
    """Path/URL -> (stamp, sha256). ``write=False`` only reads."""

    def __init__(self, db: Path, legacy_dir: Path | None = None, write: bool = True) -> None:
        self.db = db
        self.legacy_dir = legacy_dir
        self.write = write
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._broken = False
        self._pending: list[tuple[str, str, str]] = []

    def _connect(self) -> sqlite3.Connection | None:
        if self._conn is not None or self._broken:
            return self._conn
        try:
            if not self.db.exists() and not self.write:
                return None
            self.db.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(str(self.db), timeout=30, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute(_SCHEMA)
            conn.commit()
            self._conn = conn
        except (sqlite3.Error, OSError):
            self._broken = True
        return self._conn

    def get(self, key: str, stamp: str) -> str | None:
        with self._lock:
            conn = self._connect()
            if conn is not None:
                try:
                    row = conn.execute(
                        "SELECT stamp, sha256 FROM memo WHERE key = ?", (key,)
                    ).fetchone()
                except sqlite3.Error:
                    self._broken, self._conn = True, None
                    row = None
                if row is not None and row[0] == stamp and len(row[1] or "") == 64:
                    return str(row[1])
        return self._legacy(key, stamp)

    def known(self, key: str) -> bool:
        """Whether anything is remembered for ``key`` (whatever its stamp): a URL that is not
        need not be asked for its ETag before it is fetched and hashed."""
        with self._lock:
            conn = self._connect()
            if conn is not None:
                try:
                    row = conn.execute("SELECT 1 FROM memo WHERE key = ?", (key,)).fetchone()
                except sqlite3.Error:
                    self._broken, self._conn = True, None
                    row = None
                if row is not None:
                    return True
        if self.legacy_dir is None:
            return False
        return (self.legacy_dir / (hashlib.sha1(key.encode()).hexdigest() + ".txt")).exists()

    def _legacy(self, key: str, stamp: str) -> str | None:
        """The ``files/<sha1(key)>.txt`` memo of older versions."""
        if self.legacy_dir is None:
            return None
        memo = self.legacy_dir / (hashlib.sha1(key.encode()).hexdigest() + ".txt")
        with contextlib.suppress(OSError, UnicodeDecodeError):
            text = memo.read_text()
            if text.startswith(stamp + " "):
                digest = text[len(stamp) + 1 :].strip()
                if len(digest) == 64:
                    return digest
        return None

    def put(self, key: str, stamp: str, digest: str) -> None:
        """Remember (committed by :meth:`commit`, or at once when ``auto``)."""
        if self.write and not self._broken:
            with self._lock:
                self._pending.append((key, stamp, digest))

    def commit(self) -> None:
        with self._lock:
            rows, self._pending = self._pending, []
            if not rows or not self.write:
                return
            conn = self._connect()
            if conn is None:
                return
            try:
                with conn:
                    conn.executemany("INSERT OR REPLACE INTO memo VALUES (?, ?, ?)", rows)
            except sqlite3.Error:
                self._broken, self._conn = True, None

    def close(self) -> None:
        self.commit()
        with self._lock:
            if self._conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    self._conn.close()
                self._conn = None
