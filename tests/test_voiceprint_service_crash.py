"""SIGKILL of the login service in the middle of an enrolment (inside the SQLite transaction,
held open by the store's test hook): restarted, the library is consistent and the enrolment is
not there at all; enrolling again works, and delete removes the embeddings and the retained
audio."""

from __future__ import annotations

import contextlib
import signal
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from test_voiceprint_service import ADMIN, auth, code, httpx, post_audio, start_server, vctk

pytestmark = pytest.mark.slow
DELAY_ENV = "SPEAKER_SIM_VOICEPRINTS_TEST_INSERT_DELAY"


def _counts(db: Path) -> tuple[int, int, int, str]:
    with sqlite3.connect(db) as con:
        return (
            con.execute("SELECT count(*) FROM speakers").fetchone()[0],
            con.execute("SELECT count(*) FROM recordings").fetchone()[0],
            con.execute("SELECT count(*) FROM audio").fetchone()[0],
            con.execute("PRAGMA integrity_check").fetchone()[0],
        )


def test_sigkill_mid_enrolment_leaves_the_library_whole(shared, real_ckpt, tmp_path):
    audio = vctk(shared, "p225", "003").read_bytes()
    srv = start_server(tmp_path, ["--retain-audio"], env={DELAY_ENV: "60"})
    try:
        sent = threading.Thread(
            target=lambda: _quiet_post(f"{srv.url}/v1/speakers/p225/enrol", audio), daemon=True
        )
        sent.start()
        deadline = time.monotonic() + 120
        while "voiceprints-test: inserted" not in srv.tail():
            assert time.monotonic() < deadline, srv.tail()
            assert srv.proc.poll() is None, srv.tail()
            time.sleep(0.1)
        srv.stop(signal.SIGKILL)  # inside the transaction
        sent.join(30)
    finally:
        srv.stop(signal.SIGKILL)
    srv = start_server(tmp_path, ["--retain-audio"])  # restarted on the same file
    try:
        assert _counts(srv.db) == (0, 0, 0, "ok")
        r = httpx.get(f"{srv.url}/v1/speakers/p225", headers=auth(ADMIN))
        assert (r.status_code, code(r)) == (404, "unknown_speaker")
        r = post_audio(f"{srv.url}/v1/speakers/p225/enrol", audio, ADMIN)
        assert r.status_code == 200 and r.json()["recordings"] == 1, r.text
        got = httpx.get(f"{srv.url}/v1/speakers/p225", headers=auth(ADMIN)).json()
        assert got["stored_audio"] == 1  # --retain-audio keeps the upload
        assert _counts(srv.db) == (1, 1, 1, "ok")
        r = httpx.delete(f"{srv.url}/v1/speakers/p225", headers=auth(ADMIN))
        assert r.status_code == 200
        assert _counts(srv.db) == (0, 0, 0, "ok")  # embeddings and audio gone
    finally:
        assert srv.stop() == 0, srv.tail()


def _quiet_post(url: str, data: bytes) -> None:
    with contextlib.suppress(httpx.TransportError):  # the server is killed under it
        post_audio(url, data, ADMIN)
