"""Privacy and lifecycle of a library's speakers, added for the login service: the columns and
table older library files lack, speech seconds and retained audio of an enrolment, ``last_seen``
and pruning of speakers not seen for a while (mixed into :class:`.store.VoiceprintStore`).
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Sequence
from contextlib import AbstractContextManager
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import SpeakerSimError
from .entries import SpeakerRow

if TYPE_CHECKING:
    from .entries import Enrolment

AUDIO_TABLE = """CREATE TABLE IF NOT EXISTS audio (
    recording_id INTEGER PRIMARY KEY REFERENCES recordings(id) ON DELETE CASCADE,
    bytes BLOB NOT NULL
)"""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Retention:
    """What :class:`.store.VoiceprintStore` gets from here; it provides the transactions."""

    path: Path
    con: sqlite3.Connection
    #: False for a read-only library made before the login service (no last_seen, no audio).
    upgraded = True

    if TYPE_CHECKING:

        def _write(self) -> AbstractContextManager[sqlite3.Connection]: ...
        def _read(self) -> AbstractContextManager[sqlite3.Connection]: ...
        def _bump(self, con: sqlite3.Connection) -> None: ...

    def _upgrade(self) -> None:
        """Add what libraries made before the login service lack (columns, a table)."""
        cols = {r[1] for r in self.con.execute("PRAGMA table_info(speakers)")}
        missing = [c for c in ("last_seen TEXT", "speech_seconds REAL") if c.split()[0] not in cols]
        has_audio = self.con.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'audio'"
        ).fetchone()
        if missing or not has_audio:
            try:
                with self._write() as con:
                    for col in missing:
                        con.execute(f"ALTER TABLE speakers ADD COLUMN {col}")
                    con.execute(AUDIO_TABLE)  # CREATE TABLE IF NOT EXISTS audio
            except SpeakerSimError:
                if os.access(self.path, os.W_OK):
                    raise
                self.upgraded = False  # a read-only file: read it as it is

    def _add_extras(
        self, con: sqlite3.Connection, added: list[Enrolment], ids: dict[str, int], now: str
    ) -> None:
        """Speech seconds, last seen and retained audio of recordings added by the service."""
        for it in added:
            if it.seconds is None and it.audio is None:
                continue
            sid = ids[it.speaker]
            con.execute(
                "UPDATE speakers SET speech_seconds = coalesce(speech_seconds, 0) + ?, "
                "last_seen = ? WHERE id = ?",
                (float(it.seconds or 0.0), now, sid),
            )
            if it.audio is not None:
                con.execute(
                    "INSERT INTO audio SELECT id, ? FROM recordings "
                    "WHERE speaker_id = ? AND sha256 = ?",
                    (it.audio, sid, it.sha256),
                )

    def touch(self, names: Sequence[str]) -> None:
        """Set ``last_seen`` of these speakers to now (verified or identified)."""
        if names:
            with self._write() as con:
                con.executemany(
                    "UPDATE speakers SET last_seen = ? WHERE name = ?",
                    [(_now(), n) for n in dict.fromkeys(names)],
                )

    def prune(self, cutoff: str, dry_run: bool = False) -> list[str]:
        """Delete (one transaction) every speaker last seen (or enrolled, if never seen)
        before ``cutoff`` (ISO 8601 UTC), with its recordings and audio; returns their names."""
        with self._write() as con:
            names = [
                str(r[0])
                for r in con.execute(
                    "SELECT name FROM speakers WHERE coalesce(last_seen, created) < ? "
                    "ORDER BY name",
                    (cutoff,),
                )
            ]
            if names and not dry_run:
                con.executemany("DELETE FROM speakers WHERE name = ?", [(n,) for n in names])
                self._bump(con)
        return names

    def audio_count(self, name: str) -> int:
        """How many uploads of ``name`` are kept (``--retain-audio``)."""
        with self._read() as con:
            row = con.execute(
                "SELECT count(*) FROM audio a JOIN recordings r ON r.id = a.recording_id "
                "JOIN speakers s ON s.id = r.speaker_id WHERE s.name = ?",
                (name,),
            ).fetchone()
        return int(row[0])

    def speakers(self, name: str | None = None) -> list[SpeakerRow]:
        """Every speaker by name, or the one called ``name`` (an empty list when none)."""
        extra = "last_seen, speech_seconds" if self.upgraded else "NULL, NULL"
        where, args = ("WHERE name = ?", (name,)) if name is not None else ("", ())
        with self._read() as con:
            q = f"SELECT name, n, created, {extra} FROM speakers {where} ORDER BY name"
            rows = con.execute(q, args).fetchall()
        return [SpeakerRow(str(a), int(b), str(c), d, e) for a, b, c, d, e in rows]

    def incomplete(self, seconds: float) -> set[str]:
        """Speakers enrolled through the login service with less net speech than ``seconds``."""
        if not self.upgraded:
            return set()
        with self._read() as con:
            q = "SELECT name FROM speakers WHERE speech_seconds < ?"
            return {str(r[0]) for r in con.execute(q, (seconds,))}
