"""The voiceprint login service, driven over HTTP: uvicorn in a subprocess on 127.0.0.1 with the
real CAM++ weights, real VCTK speech. Enrol three speakers, identify held-out recordings (and a
fourth, unenrolled speaker: unknown), verify, and every malformed request we could think of: each
gets its 4xx and code, the server stays up and the library is unchanged.

The helpers at the top (start_server, wav_bytes, ...) are used by the other
test_voiceprint_service_* modules too.
"""

from __future__ import annotations

import doctest
import importlib
import io
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import REPO, free_port, need


def _module(name: str) -> Any:
    """Import ``name``; missing: skip, or fail where the full install is required (CI)."""
    try:
        return importlib.import_module(name)
    except ImportError:
        msg = f"{name} is not installed (the server extra: pip install -e '.[dev,server]')"
        if os.environ.get("SPEAKER_SIM_REQUIRE_SHARED") == "1":
            pytest.fail(f"{msg} (SPEAKER_SIM_REQUIRE_SHARED=1)", pytrace=False)
        pytest.skip(msg, allow_module_level=True)


httpx = _module("httpx")
_module("fastapi")
_module("uvicorn")
_module("python_multipart")
sf = _module("soundfile")

ADMIN = "admin-key-0123456789abcdef"
CLIENT = "client-key-0123456789abcdef"
CLIENT2 = "client-key-two-0123456789abcdef"
ENROL = ("003", "008", "011")  # ~14 s of net speech per speaker: a complete voiceprint
HELD_OUT = ("016", "019")


# -- helpers (also imported by the other service test modules) ----------------------------------
@dataclass
class Server:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path
    db: Path

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(extra)
    return env


def start_server(
    folder: Path, args: list[str] = (), env: dict[str, str] | None = None, wait: float = 240
) -> Server:
    """``speaker-sim voiceprints serve`` in a subprocess; returns once /readyz answers 200."""
    port = free_port()
    db = folder / "voices.db"
    log = folder / f"server-{port}.log"
    cmd = [
        sys.executable,
        "-m",
        "speaker_sim_cli.cli.main",
        "voiceprints",
        "serve",
        "--library",
        str(db),
        "--port",
        str(port),
        *args,
    ]
    keys = {"SPEAKER_SIM_ADMIN_KEY": ADMIN, "SPEAKER_SIM_CLIENT_KEY": f"{CLIENT},{CLIENT2}"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=cli_env(**{**keys, **(env or {})}),
            cwd=folder,
        )
    srv = Server(f"http://127.0.0.1:{port}", proc, log, db)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the server exited {proc.returncode}:\n{srv.tail()}")
        try:
            if httpx.get(f"{srv.url}/readyz", timeout=2).status_code == 200:
                return srv
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    srv.stop(signal.SIGKILL)
    pytest.fail(f"the server was not ready in {wait:g} s:\n{srv.tail()}")


def vctk(shared: Path, speaker: str, n: str) -> Path:
    return need(shared / "audio" / "vctk" / speaker / f"{speaker}_{n}.wav", "VCTK speech")


def wav_bytes(
    wave: np.ndarray, rate: int = 16000, fmt: str = "WAV", subtype: str = "PCM_16"
) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, wave, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def post_audio(url: str, data: bytes, key: str, ctype: str = "audio/wav", **kw: Any) -> Any:
    return httpx.post(
        url, content=data, headers={**auth(key), "Content-Type": ctype}, timeout=120, **kw
    )


def code(r: Any) -> str:
    return r.json()["error"]["code"]


# -- the module's server ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(shared: Path, real_ckpt: Path, tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("service")
    srv = start_server(folder, ["--rate-limit", "20/min", "--max-seconds", "30"])
    yield srv
    rc = srv.stop()
    assert rc == 0, f"SIGTERM: expected a graceful exit 0, got {rc}\n{srv.tail()}"
    assert "Traceback" not in srv.tail(), srv.tail()


@pytest.fixture(scope="module")
def enrolled(server: Server, shared: Path) -> dict[str, list[dict[str, Any]]]:
    """p225, p226, p227 enrolled with three recordings each; the answers in order."""
    out: dict[str, list[dict[str, Any]]] = {}
    for spk in ("p225", "p226", "p227"):
        for n in ENROL:
            r = post_audio(
                f"{server.url}/v1/speakers/{spk}/enrol", vctk(shared, spk, n).read_bytes(), ADMIN
            )
            assert r.status_code == 200, r.text
            out.setdefault(spk, []).append(r.json())
    return out


def speakers(server: Server) -> list[dict[str, Any]]:
    r = httpx.get(f"{server.url}/v1/speakers", headers=auth(ADMIN), timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["speakers"]


# -- enrol, identify, verify ----------------------------------------------------------------------
def test_enrolment_accumulates_net_speech(enrolled, server, shared):
    for spk, answers in enrolled.items():
        secs = [a["speech_seconds"] for a in answers]
        assert secs == sorted(secs) and secs[0] > 2.0, (spk, secs)  # net speech < duration
        assert not answers[0]["complete"] and answers[0]["remaining_seconds"] > 0
        assert answers[0]["required_seconds"] == 10.0
        assert answers[-1]["complete"] and answers[-1]["remaining_seconds"] == 0.0
        assert answers[-1]["recordings"] == 3
    # The same upload again is a no-op: nothing added, no seconds counted twice.
    again = post_audio(
        f"{server.url}/v1/speakers/p225/enrol", vctk(shared, "p225", ENROL[0]).read_bytes(), ADMIN
    )
    assert again.status_code == 200 and again.json()["duplicate"] is True
    assert again.json()["speech_seconds"] == enrolled["p225"][-1]["speech_seconds"]


def test_identify_held_out_and_unknown(enrolled, server, shared):
    for spk in ("p225", "p226", "p227"):
        for n in HELD_OUT:
            r = post_audio(
                f"{server.url}/v1/identify?top_k=3", vctk(shared, spk, n).read_bytes(), CLIENT
            )
            assert r.status_code == 200, r.text
            a = r.json()
            assert a["speaker"] == spk, a
            assert a["score"] >= a["threshold"] and len(a["candidates"]) == 3
    r = post_audio(f"{server.url}/v1/identify", vctk(shared, "p228", "016").read_bytes(), CLIENT)
    assert r.status_code == 200 and r.json()["speaker"] == "unknown", r.text
    assert r.json()["score"] < r.json()["threshold"]


def test_verify_accepts_the_speaker_and_rejects_another(enrolled, server, shared):
    url = f"{server.url}/v1/speakers/p226/verify"
    ok = httpx.post(
        url,
        files={"audio": ("a.wav", vctk(shared, "p226", "016").read_bytes())},
        headers=auth(CLIENT),
        timeout=120,
    ).json()
    assert ok["decision"] == "accept" and ok["score"] >= ok["threshold"], ok
    no = post_audio(url, vctk(shared, "p227", "016").read_bytes(), CLIENT).json()
    assert no["decision"] == "reject" and no["score"] < no["threshold"], no
    assert no["threshold"] == ok["threshold"] == 0.6  # CAM++ zh-en publishes none: the fallback
    seen = {s["speaker"]: s for s in speakers(server)}["p226"]["last_seen"]
    assert seen is not None


def test_incomplete_enrolment_is_neither_verified_nor_identified(enrolled, server, shared):
    r = post_audio(
        f"{server.url}/v1/speakers/partial/enrol", vctk(shared, "p228", "003").read_bytes(), ADMIN
    )
    assert r.status_code == 200 and not r.json()["complete"], r.text
    v = post_audio(
        f"{server.url}/v1/speakers/partial/verify", vctk(shared, "p228", "008").read_bytes(), CLIENT
    )
    assert v.status_code == 409 and code(v) == "enrolment_incomplete"
    i = post_audio(
        f"{server.url}/v1/identify?top_k=5", vctk(shared, "p228", "008").read_bytes(), CLIENT
    )
    assert i.json()["speaker"] == "unknown"
    assert "partial" not in [c["speaker"] for c in i.json()["candidates"]]
    d = httpx.delete(f"{server.url}/v1/speakers/partial", headers=auth(ADMIN), timeout=30)
    assert d.status_code == 200 and d.json()["recordings"] == 1


# -- keys ---------------------------------------------------------------------------------------
def test_keys(enrolled, server, shared):
    audio = vctk(shared, "p225", "016").read_bytes()
    u = server.url
    no_key = httpx.post(
        f"{u}/v1/identify", content=audio, headers={"Content-Type": "audio/wav"}, timeout=60
    )
    assert no_key.status_code == 401 and code(no_key) == "unauthorized"
    assert no_key.headers["www-authenticate"] == "Bearer"
    wrong = post_audio(f"{u}/v1/identify", audio, CLIENT[:-1] + "X")
    assert wrong.status_code == 401 and code(wrong) == "unauthorized"
    assert CLIENT[:8] not in wrong.text
    for method, path in (
        ("POST", "/v1/speakers/p225/enrol"),
        ("GET", "/v1/speakers"),
        ("DELETE", "/v1/speakers/p225"),
        ("GET", "/v1/speakers/p225"),
    ):
        r = httpx.request(method, f"{u}{path}", headers=auth(CLIENT), timeout=30)
        assert r.status_code == 403 and code(r) == "forbidden", (method, path, r.text)
        r = httpx.request(method, f"{u}{path}", timeout=30)
        assert r.status_code == 401, (method, path)
    x = httpx.post(
        f"{u}/v1/identify",
        content=audio,
        timeout=60,
        headers={"X-API-Key": ADMIN, "Content-Type": "audio/wav"},
    )
    assert x.status_code == 200 and x.json()["speaker"] == "p225"  # admin may do everything
    assert ADMIN not in server.tail() and CLIENT not in server.tail()  # never logged


# -- malformed requests -----------------------------------------------------------------------
def _raw_request(url: str, head: str, body: bytes = b"", timeout: float = 30) -> tuple[int, bytes]:
    """Send a hand-made request; returns (status, the whole answer)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(head.encode() + b"\r\n" + body)
        got = b""
        while b"\r\n\r\n" not in got or len(got) < 20:
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
        try:
            while chunk := s.recv(65536):
                got += chunk
        except OSError:
            pass
    return int(got.split(b" ", 2)[1]), got


def test_malformed_requests_get_their_codes_and_change_nothing(enrolled, server, shared, tmp_path):
    before = speakers(server)
    files_before = sorted(p.name for p in server.db.parent.iterdir())
    u = server.url
    rng = np.random.default_rng(0)
    speech, _ = sf.read(vctk(shared, "p226", "019"), dtype="float32")
    tone10min = (0.01 * np.sin(np.arange(8000 * 600) / 8000 * 2 * np.pi * 100)).astype(np.float32)
    long_flac = wav_bytes(tone10min, 8000, "FLAC", "PCM_16")
    assert len(long_flac) < 5 * 1024 * 1024  # over the duration cap, under the body cap
    good = vctk(shared, "p225", "019").read_bytes()
    nan = np.full(16000 * 2, np.nan, np.float32)
    cases = [
        ("empty", b"", "audio/wav", 422, "unreadable"),
        ("truncated header", good[:30], "audio/wav", 422, "unreadable"),
        ("truncated data", good[: len(good) // 2], "audio/wav", 422, "unreadable"),
        ("text file", b"speaker,score\nalice,0.9\n" * 50, "audio/wav", 422, "unreadable"),
        ("wrong content type", good, "text/plain", 415, "unsupported_media_type"),
        ("json content type", b"{}", "application/json", 415, "unsupported_media_type"),
        ("10-minute file", long_flac, "audio/flac", 422, "too_long"),
        ("0.4 s of speech", wav_bytes(speech[16000:22400]), "audio/wav", 422, "too_short"),
        ("silence", wav_bytes(np.zeros(16000 * 3, np.float32)), "audio/wav", 422, "no_voice"),
        (
            "steady noise",
            wav_bytes((rng.standard_normal(48000) * 0.05).astype(np.float32)),
            "audio/wav",
            422,
            "no_voice",
        ),
        ("NaN samples", wav_bytes(nan, subtype="FLOAT"), "audio/wav", 422, "unreadable"),
    ]
    for name, data, ctype, status, want in cases:
        for path in ("/v1/identify", "/v1/speakers/p225/enrol"):
            r = post_audio(f"{u}{path}", data, ADMIN, ctype)
            assert (r.status_code, code(r)) == (status, want), (name, path, r.text)
            assert "Traceback" not in r.text
    # Multipart without the audio field; bad query values.
    r = httpx.post(f"{u}/v1/identify", files={"sound": ("a.wav", good)}, headers=auth(ADMIN))
    assert (r.status_code, code(r)) == (400, "invalid_request")
    for q in ("top_k=0", "top_k=abc", "top_k=1000"):
        r = post_audio(f"{u}/v1/identify?{q}", good, ADMIN)
        assert (r.status_code, code(r)) == (400, "invalid_request"), q
    # 50 MB declared: answered 413 at once, before the body is sent (a few bytes are).
    t0 = time.monotonic()
    status, answer = _raw_request(
        u,
        f"POST /v1/speakers/p225/enrol HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN}\r\n"
        f"Content-Type: audio/wav\r\nContent-Length: {50 * 1024 * 1024}\r\n",
        b"RIFF",
    )
    assert status == 413 and b'"too_large"' in answer, answer[:300]
    assert time.monotonic() - t0 < 20
    # A chunked 50 MB body (no length declared): cut off at the cap, 413.
    r = httpx.post(
        f"{u}/v1/speakers/p225/enrol",
        headers={**auth(ADMIN), "Content-Type": "audio/wav"},
        content=(b"\0" * 65536 for _ in range(800)),
        timeout=120,
    )
    assert (r.status_code, code(r)) == (413, "too_large")
    # Speaker ids are database keys, never paths.
    for sid, status, want in (
        ("..%2F..%2Fetc%2Fpasswd", 404, "not_found"),  # a slash: no such route
        ("%2E%2E", 400, "invalid_speaker_id"),
        ("..", 404, "not_found"),  # the client already resolves it: /v1/enrol
        (".hidden", 400, "invalid_speaker_id"),
        ("a%00b", 400, "invalid_speaker_id"),
        ("a%20b", 400, "invalid_speaker_id"),
        ("unknown", 400, "invalid_speaker_id"),
        ("x" * 65, 400, "invalid_speaker_id"),
        ("%C3%A9l%C3%A8ve", 400, "invalid_speaker_id"),
    ):
        r = post_audio(f"{u}/v1/speakers/{sid}/enrol", good, ADMIN)
        assert (r.status_code, code(r)) == (status, want), (sid, r.text)
        status2, raw = _raw_request(
            u,
            f"GET /v1/speakers/{sid} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN}\r\n"
            "Connection: close\r\n",
        )
        assert status2 in (400, 404), raw[:300]
    r = httpx.delete(f"{u}/v1/speakers/nobody", headers=auth(ADMIN))
    assert (r.status_code, code(r)) == (404, "unknown_speaker")
    r = post_audio(f"{u}/v1/speakers/nobody/verify", good, ADMIN)
    assert (r.status_code, code(r)) == (404, "unknown_speaker")
    # Up, and nothing changed: the same speakers, recordings and seconds; no file appeared.
    assert httpx.get(f"{u}/healthz").json() == {"status": "ok"}
    assert speakers(server) == before
    assert sorted(p.name for p in server.db.parent.iterdir()) == files_before


def test_cors_is_closed(server):
    pre = httpx.options(
        f"{server.url}/v1/identify",
        headers={
            "Origin": "http://evil.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        },
    )
    assert "access-control-allow-origin" not in pre.headers
    get = httpx.get(f"{server.url}/healthz", headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in get.headers


def test_rate_limit_per_key(enrolled, server):
    u = f"{server.url}/v1/identify"
    codes = []
    for _ in range(40):  # 20 a minute: one token back every 3 s, so 40 fast ones must hit it
        r = post_audio(u, b"", CLIENT2)
        codes.append(code(r))
        if r.status_code == 429:
            break
    assert codes[:20] == ["unreadable"] * 20  # a key's first 20 requests a minute go through
    assert codes[-1] == "rate_limited" and int(r.headers["retry-after"]) >= 1, codes
    assert code(post_audio(u, b"", CLIENT)) == "unreadable"  # another key: its own budget


def test_pages_and_health(server):
    page = httpx.get(f"{server.url}/")
    assert page.status_code == 200 and "getUserMedia" not in page.text  # the script is separate
    assert "script-src" not in page.headers["content-security-policy"]  # default-src 'self'
    js = httpx.get(f"{server.url}/static/app.js")
    assert "OfflineAudioContext" in js.text and "getUserMedia" in js.text
    assert httpx.get(f"{server.url}/static/../../etc/passwd").status_code == 404
    assert httpx.get(f"{server.url}/openapi.json").json()["info"]["title"].startswith("speaker")
    assert httpx.get(f"{server.url}/readyz").json()["status"] == "ready"


def test_delete_removes_the_speaker(enrolled, server, shared):
    r = httpx.delete(f"{server.url}/v1/speakers/p227", headers=auth(ADMIN))
    assert r.status_code == 200 and r.json() == {
        "speaker": "p227",
        "deleted": True,
        "recordings": 3,
    }
    r = httpx.get(f"{server.url}/v1/speakers/p227", headers=auth(ADMIN))
    assert (r.status_code, code(r)) == (404, "unknown_speaker")
    a = post_audio(f"{server.url}/v1/identify", vctk(shared, "p227", "016").read_bytes(), CLIENT)
    assert a.json()["speaker"] != "p227"
    with sqlite3.connect(server.db) as con:  # no embedding of p227 is left
        n = con.execute("SELECT count(*) FROM recordings WHERE path LIKE 'upload:%'").fetchone()[0]
    assert n == 6  # p225's and p226's three each


# -- start-up refusals and the CLI --------------------------------------------------------------
def _cli(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "speaker_sim_cli.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=cli_env(**(env or {})),
    )


def test_no_key_beyond_loopback_refuses_to_start(tmp_path):
    env = {"SPEAKER_SIM_ADMIN_KEY": "", "SPEAKER_SIM_CLIENT_KEY": ""}
    r = _cli(
        ["voiceprints", "serve", "--library", str(tmp_path / "v.db"), "--host", "0.0.0.0"], env
    )
    assert r.returncode == 2 and "no API key" in r.stderr, r.stderr
    r = _cli(
        ["voiceprints", "serve", "--library", str(tmp_path / "v.db"), "--cors-origin", "*"], env
    )
    assert r.returncode == 2 and "refused" in r.stderr
    short = {"SPEAKER_SIM_ADMIN_KEY": "short", "SPEAKER_SIM_CLIENT_KEY": CLIENT}
    r = _cli(["voiceprints", "serve", "--library", str(tmp_path / "v.db")], short)
    assert r.returncode == 2 and "shorter" in r.stderr and "short," not in r.stderr
    assert not (tmp_path / "v.db").exists()


def test_record_without_an_input_device_is_one_line_exit_2(tmp_path):
    try:
        import sounddevice as sd

        sd.query_devices(kind="input")
        pytest.skip("this machine has an audio input device")
    except (ImportError, OSError, Exception):
        pass
    for args in (
        ["enroll", str(tmp_path / "v.db"), "alice", "--record", "3"],
        ["voiceprints", "identify", str(tmp_path / "v.db"), "--record", "3"],
    ):
        r = _cli(args)
        assert r.returncode == 2, r.stderr
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and "cannot record" in lines[0] and "Traceback" not in r.stderr


def test_prune_deletes_speakers_not_seen(tmp_path):
    from speaker_sim_cli.voiceprints.library import Voiceprints
    from speaker_sim_cli.voiceprints.store import Enrolment, ModelInfo

    db = tmp_path / "v.db"
    rng = np.random.default_rng(1)
    with Voiceprints.for_vectors(db, ModelInfo("x/m", "0" * 64, {}, 8)) as lib:
        lib.enroll_vectors(
            [
                Enrolment(
                    n,
                    n * 8,
                    n,
                    rng.standard_normal(8).astype(np.float32),
                    seconds=5.0,
                    audio=b"RIFF",
                )
                for n in ("old", "new", "never")
            ]
        )
        lib.store.touch(["new"])
    with sqlite3.connect(db) as con:
        con.execute("UPDATE speakers SET last_seen = '2024-01-01T00:00:00+00:00' WHERE name='old'")
        con.execute(
            "UPDATE speakers SET last_seen = NULL, created = '2020-01-01' WHERE name='never'"
        )
    r = _cli(["voiceprints", "prune", "--library", str(db), "--not-seen-for", "365d", "--dry-run"])
    assert r.returncode == 0 and r.stdout.split() == ["never", "old"], r.stderr
    r = _cli(["voiceprints", "prune", "--library", str(db), "--not-seen-for", "365d"])
    assert r.returncode == 0 and r.stdout.split() == ["never", "old"]
    with sqlite3.connect(db) as con:
        assert [n for (n,) in con.execute("SELECT name FROM speakers")] == ["new"]
        assert con.execute("SELECT count(*) FROM audio").fetchone()[0] == 1  # "new"'s only
    r = _cli(["voiceprints", "prune", "--library", str(db), "--not-seen-for", "soon"])
    assert r.returncode == 2


def test_module_doctests():
    from speaker_sim_cli.voiceprints.service import config, uploads

    for mod in (config, uploads):
        res = doctest.testmod(mod)
        assert res.failed == 0 and res.attempted >= 1, mod.__name__
