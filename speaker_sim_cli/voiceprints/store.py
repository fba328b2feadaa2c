"""The voiceprint library file: one SQLite database in WAL mode (stdlib ``sqlite3``, no torch).

Tables: ``meta`` (format, the model the library was built with, the voiceprint rule, a
generation counter bumped by every change), ``speakers`` (name, when enrolled, recording count,
voiceprint: float32 unit vector, last seen, net speech seconds), ``recordings`` (speaker,
content sha256, path as given, raw float32 embedding; one content once per speaker), ``audio``
(uploads kept by the login service's ``--retain-audio``; deleted with the speaker) and ``ann``
(a serialised ANN index and the generation it was built from).

Every change is one ``BEGIN IMMEDIATE ... COMMIT`` transaction: a process killed in the middle
leaves the file as it was before (SQLite rolls the journal back), and readers in other processes
read a snapshot (WAL), so they see the state before or after a change, never between.

A speaker's voiceprint is defined in :mod:`.entries` only (:func:`voiceprint`).
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SpeakerSimError, UsageError
from .entries import (
    RULES,
    AddReport,
    Enrolment,
    ModelInfo,
    SpeakerRow,
    _blob,
    _chunks,
    voiceprint,
    voiceprints,
)
from .retention import AUDIO_TABLE, Retention, _now

# The value types live in .entries; importing them from here keeps working.
__all__ = ["AddReport", "Enrolment", "LibraryError", "ModelInfo", "ModelMismatchError",
           "SpeakerRow", "VoiceprintStore", "voiceprint", "voiceprints"]  # fmt: skip

FORMAT = "speaker-sim-voiceprints"
VERSION = 1
SQLITE_MAGIC = b"SQLite format 3\x00"
#: Test hook: seconds to sleep after each recording is inserted (a kill lands mid-transaction).
_DELAY_ENV = "SPEAKER_SIM_VOICEPRINTS_TEST_INSERT_DELAY"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS speakers (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    created TEXT NOT NULL,
    n INTEGER NOT NULL,
    voiceprint BLOB NOT NULL,
    last_seen TEXT,
    speech_seconds REAL
);
CREATE TABLE IF NOT EXISTS recordings (
    id INTEGER PRIMARY KEY,
    speaker_id INTEGER NOT NULL REFERENCES speakers(id) ON DELETE CASCADE,
    sha256 TEXT NOT NULL,
    path TEXT NOT NULL,
    embedding BLOB NOT NULL,
    added TEXT NOT NULL,
    UNIQUE (speaker_id, sha256)
);
CREATE TABLE IF NOT EXISTS ann (kind TEXT PRIMARY KEY, generation INTEGER NOT NULL,
                                params TEXT NOT NULL, blob BLOB NOT NULL);
"""
_SCHEMA += AUDIO_TABLE + ";\n"


class LibraryError(SpeakerSimError):
    """The file is not a usable voiceprint library (not SQLite, damaged, another format)."""


class ModelMismatchError(UsageError):
    """The library was built with another model than the one asked for."""


class VoiceprintStore(Retention):
    """One library file. ``create`` (the model) makes it when the file is absent or empty;
    an existing file is opened only when it is a library (never overwritten otherwise)."""

    def __init__(
        self, path: str | Path, create: ModelInfo | None = None, rule: str = "unit-mean"
    ) -> None:
        self.path = Path(path)
        if rule not in RULES:
            raise UsageError(f"unknown voiceprint rule {rule!r}: use one of {', '.join(RULES)}")
        if self.path.is_dir():
            raise LibraryError(f"{self.path}: is a folder, not a voiceprint library file")
        new = not self.path.exists() or self.path.stat().st_size == 0
        if new and create is None:
            raise LibraryError(f"{self.path}: no voiceprint library there (enrol to create one)")
        if not new:
            with open(self.path, "rb") as f:
                head = f.read(len(SQLITE_MAGIC))
            if head != SQLITE_MAGIC:
                raise LibraryError(
                    f"{self.path}: not a voiceprint library (not an SQLite database); "
                    "nothing was changed"
                )
        # One connection, used from the login service's threads too: every use is under a lock.
        self._lock = threading.RLock()
        try:
            self.con = sqlite3.connect(
                str(self.path), timeout=60.0, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise LibraryError(f"{self.path}: cannot open ({exc})") from None
        with self._errors():
            if not new:
                self._meta = self._read_meta()  # before anything that could write
            self.con.execute("PRAGMA busy_timeout = 60000")
            self.con.execute("PRAGMA journal_mode = WAL")
            self.con.execute("PRAGMA synchronous = NORMAL")
            self.con.execute("PRAGMA foreign_keys = ON")
            if new:
                assert create is not None
                self._create(create, rule)
                self._meta = self._read_meta()
            else:
                self._upgrade()

    # -- plumbing --
    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.DatabaseError as exc:
            msg = str(exc)
            if isinstance(exc, sqlite3.OperationalError) and "locked" in msg:
                raise LibraryError(f"{self.path}: {msg} (another process holds it)") from None
            raise LibraryError(
                f"{self.path}: the library file is damaged or not a library ({msg}); "
                "nothing was changed"
            ) from None

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: all of it or none of it."""
        with self._lock, self._errors():
            self.con.execute("BEGIN IMMEDIATE")
            try:
                yield self.con
            except BaseException:
                self.con.execute("ROLLBACK")
                raise
            self.con.execute("COMMIT")

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """One read snapshot (WAL): every SELECT inside sees the same committed state."""
        with self._lock, self._errors():
            self.con.execute("BEGIN")
            try:
                yield self.con
            finally:
                self.con.execute("COMMIT")

    def _read_meta(self) -> dict[str, str]:
        try:
            rows = self.con.execute("SELECT key, value FROM meta").fetchall()
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                raise LibraryError(
                    f"{self.path}: an SQLite database, but not a speaker-sim voiceprint "
                    "library; nothing was changed"
                ) from None
            raise
        meta = dict(rows)
        if meta.get("format") != FORMAT:
            raise LibraryError(
                f"{self.path}: an SQLite database, but not a speaker-sim voiceprint library "
                f"(format {meta.get('format')!r}); nothing was changed"
            )
        if int(meta.get("version", "0")) > VERSION:
            raise LibraryError(
                f"{self.path}: library format version {meta['version']} is newer than this "
                f"speaker-sim reads ({VERSION}); upgrade speaker-sim"
            )
        return meta

    def _create(self, info: ModelInfo, rule: str) -> None:
        with self._write() as con:
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    con.execute(stmt)
            meta = {
                "format": FORMAT,
                "version": str(VERSION),
                "model": info.model,
                "checkpoint_sha256": info.checkpoint_sha256,
                "frontend": json.dumps(info.frontend, sort_keys=True),
                "dim": str(info.dim),
                "rule": rule,
                "generation": "0",
                "created": _now(),
            }
            # Another process may have created it meanwhile: keep what is there.
            con.executemany("INSERT OR IGNORE INTO meta VALUES (?, ?)", meta.items())

    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> VoiceprintStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- what the library is --
    @property
    def model(self) -> ModelInfo:
        m = self._meta
        return ModelInfo(
            m["model"], m["checkpoint_sha256"], json.loads(m["frontend"]), int(m["dim"])
        )

    @property
    def rule(self) -> str:
        return self._meta["rule"]

    @property
    def dim(self) -> int:
        return int(self._meta["dim"])

    def check_model(self, info: ModelInfo) -> None:
        """Raise :class:`ModelMismatchError` naming both models unless ``info`` is the library's."""
        mine = self.model
        diff = mine.differences(info)
        if diff:
            raise ModelMismatchError(
                f"{self.path}: the library was built with {mine.describe()}, but this run uses "
                f"{info.describe()} (different {', '.join(diff)}); their scores are not "
                f"comparable: pass --model {mine.model} (and its checkpoint), or use another "
                "library"
            )

    def generation(self) -> int:
        with self._lock, self._errors():
            row = self.con.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()
        return int(row[0])

    # -- changes (one transaction each) -----------------------------------------------------------
    def add(self, items: Sequence[Enrolment]) -> AddReport:
        """Add recordings to speakers (created on first use); content already enrolled for that
        speaker is reported as a duplicate and left alone. One transaction."""
        rep = AddReport()
        if not items:
            return rep
        dim = self.dim
        for it in items:
            if it.embedding.shape != (dim,):
                raise UsageError(
                    f"{it.path}: embedding of shape {it.embedding.shape}, the library holds "
                    f"{dim}-dim vectors"
                )
        delay = float(os.environ.get(_DELAY_ENV, "0") or 0)
        now = _now()
        with self._write() as con:
            names = list(dict.fromkeys(it.speaker for it in items))
            ids = self._ids(con, names)
            old = [ids[n] for n in names if n in ids]
            new = [n for n in names if n not in ids]
            con.executemany(
                "INSERT INTO speakers (name, created, n, voiceprint) VALUES (?, ?, 0, x'')",
                [(n, now) for n in new],
            )
            ids.update(self._ids(con, new))
            rep.new_speakers = new
            seen: dict[tuple[int, str], str] = {}
            for chunk in _chunks(old, 900):
                marks = ",".join("?" * len(chunk))
                q = f"SELECT speaker_id, sha256, path FROM recordings WHERE speaker_id IN ({marks})"
                for sid, sha, path in con.execute(q, chunk):
                    seen[(int(sid), str(sha))] = str(path)
            rows = []
            for it in items:
                key = (ids[it.speaker], it.sha256)
                if key in seen:
                    rep.duplicates.append((it, seen[key]))
                    continue
                seen[key] = it.path
                rep.added.append(it)
                rows.append((key[0], it.sha256, it.path, _blob(it.embedding), now))
            step = 1 if delay else 10_000
            for k in range(0, len(rows), step):
                con.executemany(
                    "INSERT INTO recordings (speaker_id, sha256, path, embedding, added) "
                    "VALUES (?, ?, ?, ?, ?)",
                    rows[k : k + step],
                )
                if delay:  # the test hook: a kill lands inside the transaction
                    print(f"voiceprints-test: inserted {k + step}", file=sys.stderr, flush=True)
                    time.sleep(delay)
            self._add_extras(con, rep.added, ids, now)
            self._update_voiceprints(con, rep.added, set(new), ids)
            if rep.added:
                self._bump(con)
        return rep

    def _ids(self, con: sqlite3.Connection, names: Sequence[str]) -> dict[str, int]:
        out: dict[str, int] = {}
        for chunk in _chunks(list(names), 900):
            marks = ",".join("?" * len(chunk))
            q = f"SELECT name, id FROM speakers WHERE name IN ({marks})"
            out.update((str(a), int(b)) for a, b in con.execute(q, chunk))
        return out

    def _update_voiceprints(
        self, con: sqlite3.Connection, added: list[Enrolment], new: set[str], ids: dict[str, int]
    ) -> None:
        """Recompute the voiceprint of every speaker that got recordings: new speakers from
        the vectors in hand (all at once), the others from all their stored recordings."""
        dim = self.dim
        fresh = [it for it in added if it.speaker in new]
        names = list(dict.fromkeys(it.speaker for it in fresh))
        updates: list[tuple[int, bytes, int]] = []
        if fresh:
            pos = {n: i for i, n in enumerate(names)}
            group = np.fromiter((pos[it.speaker] for it in fresh), np.int64, len(fresh))
            vps = voiceprints(
                np.stack([it.embedding for it in fresh]), group, len(names), self.rule
            )
            counts = np.bincount(group, minlength=len(names))
            updates += [(int(c), _blob(v), ids[n]) for n, c, v in zip(names, counts, vps)]
        for name in dict.fromkeys(it.speaker for it in added if it.speaker not in new):
            sid = ids[name]
            got = con.execute(
                "SELECT embedding FROM recordings WHERE speaker_id = ? ORDER BY id", (sid,)
            ).fetchall()
            embs = np.frombuffer(b"".join(r[0] for r in got), "<f4").reshape(-1, dim)
            updates.append((len(embs), _blob(voiceprint(embs, self.rule)), sid))
        con.executemany("UPDATE speakers SET n = ?, voiceprint = ? WHERE id = ?", updates)

    def remove(self, name: str) -> int:
        """Delete a speaker and its recordings; returns how many recordings went."""
        with self._write() as con:
            row = con.execute("SELECT id, n FROM speakers WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise UsageError(f"{self.path}: no speaker {name!r} in the library")
            con.execute("DELETE FROM speakers WHERE id = ?", (row[0],))
            self._bump(con)
        return int(row[1])

    def rename(self, old: str, new: str) -> None:
        if not new.strip():
            raise UsageError("the new speaker name is empty")
        with self._write() as con:
            if con.execute("SELECT 1 FROM speakers WHERE name = ?", (new,)).fetchone():
                raise UsageError(f"{self.path}: speaker {new!r} exists already")
            cur = con.execute("UPDATE speakers SET name = ? WHERE name = ?", (new, old))
            if cur.rowcount == 0:
                raise UsageError(f"{self.path}: no speaker {old!r} in the library")
            self._bump(con)

    def _bump(self, con: sqlite3.Connection) -> None:
        con.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'generation'")

    # -- reading --
    def recordings(self, name: str) -> list[tuple[str, str, np.ndarray]]:
        """(path, sha256, raw embedding) of a speaker's recordings, in enrolment order."""
        with self._read() as con:
            rows = con.execute(
                "SELECT r.path, r.sha256, r.embedding FROM recordings r "
                "JOIN speakers s ON s.id = r.speaker_id WHERE s.name = ? ORDER BY r.id",
                (name,),
            ).fetchall()
        return [(str(p), str(h), np.frombuffer(e, "<f4").copy()) for p, h, e in rows]

    def load(self, chunk: int = 65536) -> tuple[int, list[str], np.ndarray]:
        """(generation, names, voiceprints ``(S, D)`` float32 unit rows), one snapshot."""
        dim = self.dim
        with self._read() as con:
            gen = int(con.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()[0])
            n = int(con.execute("SELECT count(*) FROM speakers").fetchone()[0])
            mat = np.empty((n, dim), dtype=np.float32)
            names: list[str] = []
            cur = con.execute("SELECT name, voiceprint FROM speakers ORDER BY id")
            i = 0
            while True:
                rows = cur.fetchmany(chunk)
                if not rows:
                    break
                names.extend(r[0] for r in rows)
                buf = np.frombuffer(b"".join(r[1] for r in rows), "<f4")
                mat[i : i + len(rows)] = buf.reshape(len(rows), dim)
                i += len(rows)
        return gen, names, mat

    def info(self) -> dict[str, Any]:
        with self._read() as con:
            n_spk = int(con.execute("SELECT count(*) FROM speakers").fetchone()[0])
            n_rec = int(con.execute("SELECT count(*) FROM recordings").fetchone()[0])
            gen = int(con.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()[0])
            ann = con.execute("SELECT kind, generation, params FROM ann").fetchall()
        size = sum(p.stat().st_size for p in (self.path, Path(f"{self.path}-wal")) if p.exists())
        m = self.model
        return {
            "path": str(self.path),
            "model": m.model,
            "checkpoint_sha256": m.checkpoint_sha256,
            "frontend": m.frontend,
            "dim": m.dim,
            "voiceprint": self.rule,
            "speakers": n_spk,
            "recordings": n_rec,
            "generation": gen,
            "created": self._meta.get("created"),
            "bytes": size,
            "ann": [
                {"kind": k, "generation": g, "current": g == gen, **json.loads(p)}
                for k, g, p in ann
            ],
        }

    # -- ANN index (optional) ---------------------------------------------------------------------
    def get_ann(self, kind: str) -> tuple[int, dict[str, Any], bytes] | None:
        with self._read() as con:
            row = con.execute(
                "SELECT generation, params, blob FROM ann WHERE kind = ?", (kind,)
            ).fetchone()
        return None if row is None else (int(row[0]), json.loads(row[1]), bytes(row[2]))

    def put_ann(self, kind: str, generation: int, params: dict[str, Any], blob: bytes) -> bool:
        """Store an index built from ``generation``; False (nothing stored) if the library
        changed since."""
        with self._write() as con:
            now = con.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()
            if int(now[0]) != generation:
                return False
            con.execute(
                "INSERT OR REPLACE INTO ann VALUES (?, ?, ?, ?)",
                (kind, generation, json.dumps(params), blob),
            )
        return True
