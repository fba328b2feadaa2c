"""``speaker-sim serve``: the protocol, the batching loop, and the real server as a subprocess."""

from __future__ import annotations

import doctest
import io
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from speaker_sim_cli import serve as serve_module
from speaker_sim_cli.serve import Request, Server, parse_jsonl, parse_text, read_lines_fd

SCORE_LINE = re.compile(r"^(?P<id>[^\s]+)->(?P<score>-?\d+\.\d{6})$")
ERROR_LINE = re.compile(r"^Error: (?P<id>\S+) (?P<reason>.+)$")


# -- the protocol ---------------------------------------------------------------------------
def test_parse_text():
    assert parse_text("u1->/a b/x.wav,/c/y.wav\r\n") == Request("u1", "/a b/x.wav", "/c/y.wav")
    assert parse_text("u1-> x.wav , y.wav ") == Request("u1", "x.wav", "y.wav")
    assert parse_text("u1->close") is None
    assert parse_text("   ") is None
    assert parse_text("u2->x.wav").error == "expected 2 comma-separated paths, got 1"
    assert parse_text("u2->x,y,z").error == "expected 2 comma-separated paths, got 3"
    assert parse_text("u2->").error == "expected 2 comma-separated paths, got 0"
    assert parse_text("u2->x.wav,").error == "empty path"
    bad = parse_text("no arrow here")
    assert bad is not None and bad.id == "-" and "expected <id>->" in (bad.error or "")
    empty = parse_text("->x,y")
    assert empty is not None and empty.id == "-" and "empty id" in (empty.error or "")
    assert parse_text("u3->a->b.wav,c.wav") == Request("u3", "a->b.wav", "c.wav")


def test_doctests():
    res = doctest.testmod(serve_module)
    assert res.failed == 0 and res.attempted >= 4


def test_parse_text_comma_in_a_file_name(tmp_path):
    a, b = tmp_path / "a,1.wav", tmp_path / "b.wav"
    a.write_bytes(b"x")
    b.write_bytes(b"x")
    assert parse_text(f"u->{a},{b}") == Request("u", str(a), str(b))


def test_parse_jsonl():
    assert parse_jsonl('{"id": "x", "a": "p.wav", "b": "q.wav"}') == Request("x", "p.wav", "q.wav")
    assert parse_jsonl("") is None
    assert parse_jsonl('{"id": 3, "a": "p.wav"}').error.startswith("'a' and 'b'")
    r = parse_jsonl("{not json")
    assert r is not None and r.id is None and r.error.startswith("invalid JSON")
    assert parse_jsonl("[1, 2]").error.startswith("expected a JSON object")


def test_read_lines_fd_streams_lines_and_keeps_odd_bytes():
    r, w = os.pipe()
    os.write(w, b"a->x,y\nb->\xff.wav,z\nlast")
    os.close(w)
    lines = list(read_lines_fd(r))
    os.close(r)
    assert lines == ["a->x,y", "b->\udcff.wav,z", "last"]
    assert os.fsencode(lines[1].split("->")[1].split(",")[0]) == b"\xff.wav"


# -- the serving loop with a fake model -----------------------------------------------------
class FakeBackend:
    """Deterministic vectors per path; paths containing 'bad' fail; calls are recorded."""

    def __init__(self, delay: float = 0.0) -> None:
        self.memory: dict[str, np.ndarray] = {}
        self.calls: list[list[str]] = []
        self.embedded: list[str] = []
        self.delay = delay

    def vec(self, p: str) -> np.ndarray:
        rng = np.random.default_rng(abs(hash(p)) % (1 << 32))
        return rng.standard_normal(8).astype(np.float32)

    def cached(self, path: str) -> np.ndarray | None:
        return self.memory.get(path)

    def lookup(self, paths):
        paths = list(paths)
        self.calls.append(paths)
        time.sleep(self.delay)
        embs, fails = {}, {}
        for p in paths:
            if "bad" in p:
                fails[p] = "cannot decode audio"
            elif p in self.memory:
                embs[p] = self.memory[p]
            else:
                self.embedded.append(p)
                embs[p] = self.memory[p] = self.vec(p)
        return embs, fails


def _cos(a, b):
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_server_answers_every_request_once_and_batches():
    be = FakeBackend(delay=0.02)
    out = io.StringIO()
    files = [f"/d/{i}.wav" for i in range(10)]
    rng = np.random.default_rng(0)
    pairs = [(files[i], files[j]) for i, j in rng.integers(0, 10, (300, 2))]
    lines = [f"r{k}->{a},{b}" for k, (a, b) in enumerate(pairs)]
    lines[5:5] = ["r-x->/d/0.wav", "r-bad->/d/1.wav,/d/bad.wav", "r0->close", ""]
    stats = Server(be, out, window=0.005, max_batch=64).serve(iter(lines))
    answers = out.getvalue().splitlines()
    assert len(answers) == 302
    got = {}
    for ln in answers:
        m = SCORE_LINE.match(ln)
        if m:
            assert m["id"] not in got
            got[m["id"]] = float(m["score"])
    for k, (a, b) in enumerate(pairs):
        assert abs(got[f"r{k}"] - _cos(be.vec(a), be.vec(b))) <= 5e-7
    assert "Error: r-x expected 2 comma-separated paths, got 1" in answers
    assert "Error: r-bad /d/bad.wav: cannot decode audio" in answers
    assert sorted(be.embedded) == sorted(set(files))  # each recording once
    assert stats.scored == 300 and stats.errors == 2 and stats.ignored == 2
    assert stats.requests == 302
    assert len(be.calls) < 20 and max(len(c) for c in be.calls) > 2
    assert stats.from_memory > 200


def test_memory_hits_do_not_wait_for_the_model():
    be = FakeBackend()
    be.memory["/d/a.wav"] = be.vec("/d/a.wav")
    be.memory["/d/b.wav"] = be.vec("/d/b.wav")
    out = io.StringIO()
    Server(be, out).serve(iter(["x->/d/a.wav,/d/b.wav"]))
    assert out.getvalue().startswith("x->") and be.calls == []


def test_jsonl_answers():
    be = FakeBackend()
    out = io.StringIO()
    lines = [
        json.dumps({"id": "a", "a": "/d/1.wav", "b": "/d/2.wav"}),
        json.dumps({"id": 7, "a": "/d/1.wav", "b": "/d/bad.wav"}),
        "not json",
    ]
    Server(be, out, jsonl=True).serve(iter(lines))
    docs = [json.loads(x) for x in out.getvalue().splitlines()]
    by_id = {d["id"]: d for d in docs}
    assert by_id["a"]["score"] == pytest.approx(_cos(be.vec("/d/1.wav"), be.vec("/d/2.wav")))
    assert by_id[7]["error"] == "/d/bad.wav: cannot decode audio"
    assert by_id[None]["error"].startswith("invalid JSON")


def test_an_engine_failure_costs_one_batch_not_the_server():
    class Flaky(FakeBackend):
        def lookup(self, paths):
            paths = list(paths)
            if any("boom" in p for p in paths):
                raise RuntimeError("CUDA out of memory")
            return super().lookup(paths)

    out = io.StringIO()
    logs: list[str] = []
    Server(Flaky(), out, window=0, log=logs.append).serve(
        iter(["a->/d/boom.wav,/d/1.wav", "b->/d/1.wav,/d/2.wav"])
    )
    answers = out.getvalue().splitlines()
    assert any(a.startswith("Error: a internal error: RuntimeError") for a in answers)
    assert any(a.startswith("b->") for a in answers) and logs


def test_stop_finishes_what_was_read_then_returns():
    be = FakeBackend(delay=0.05)
    out = io.StringIO()
    srv = Server(be, out)
    r, w = os.pipe()
    try:
        os.write(w, b"".join(f"q{i}->/d/{i}.wav,/d/{i + 1}.wav\n".encode() for i in range(20)))
        done: list[object] = []
        t = threading.Thread(target=lambda: done.append(srv.serve(read_lines_fd(r))))
        t.start()
        deadline = time.time() + 10
        while srv.stats.requests < 20 and time.time() < deadline:
            time.sleep(0.01)
        srv.stop()  # stdin stays open: only stop() can end this
        t.join(10)
        assert not t.is_alive() and done
        assert len(out.getvalue().splitlines()) == 20
    finally:
        os.close(w)
        os.close(r)


def test_a_closed_stdout_stops_serving():
    class Closed(io.StringIO):
        def write(self, s):
            raise BrokenPipeError(32, "Broken pipe")

    logs: list[str] = []
    stats = Server(FakeBackend(), Closed(), log=logs.append).serve(
        iter([f"q{i}->/d/{i}.wav,/d/x.wav" for i in range(50)])
    )
    assert stats.stdout_closed and any("cannot write" in x for x in logs)


def test_serve_command_is_registered():
    from typer.testing import CliRunner

    from speaker_sim_cli.cli.main import app

    res = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "120"})
    assert res.exit_code == 0
    for opt in ("--model", "--device", "--jsonl", "--window-ms", "--stats-file"):
        assert opt in res.output


# -- the real server, as the harness runs it ------------------------------------------------
def _forty(shared: Path) -> list[Path]:
    """40 recordings: the 12 speechbrain samples and 28 of dev_hard (several formats and
    rates, names with spaces and non-ASCII characters)."""
    sb = sorted((shared / "audio" / "speechbrain_samples").glob("*.wav"))
    hard = sorted(p for p in (shared / "audio" / "dev_hard").glob("*/*") if p.suffix != ".csv")
    files = sb + hard[:28]
    assert len(files) == 40 and not any("," in str(p) for p in files)
    return files


def _serve_cmd(*args: str) -> list[str]:
    return [
        sys.executable,
        "-c",
        "from speaker_sim_cli.cli.main import main; main()",
        "serve",
        "--device",
        "cpu",
        *args,
    ]


class Pipe:
    """A serve subprocess with its stdout and stderr drained by threads."""

    def __init__(self, cmd: list[str], env: dict[str, str]) -> None:
        self.p = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.err: list[bytes] = []
        threading.Thread(target=self._out, daemon=True).start()
        threading.Thread(target=self._errs, daemon=True).start()

    def _out(self) -> None:
        assert self.p.stdout is not None
        for raw in self.p.stdout:
            self.lines.put(raw.decode("utf-8", "surrogateescape").rstrip("\n"))
        self.lines.put(None)

    def _errs(self) -> None:
        assert self.p.stderr is not None
        self.err.extend(self.p.stderr)

    def send(self, text: str) -> None:
        assert self.p.stdin is not None
        self.p.stdin.write(text.encode("utf-8", "surrogateescape"))
        self.p.stdin.flush()

    def read(self, n: int, timeout: float) -> list[str]:
        out: list[str] = []
        deadline = time.monotonic() + timeout
        while len(out) < n:
            line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            if line is None:
                break
            out.append(line)
        return out

    def rest(self, timeout: float) -> list[str]:
        return self.read(10**9, timeout)

    def stderr(self) -> str:
        return b"".join(self.err).decode("utf-8", "replace")

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait(10)


def _score_cli(trials: Path, out: Path, *extra: str) -> dict[tuple[str, str], float]:
    """`speaker-sim score` in-process; returns {(enrollment, test): score}."""
    import pandas as pd
    from typer.testing import CliRunner

    from speaker_sim_cli.cli.main import app

    args = ["score", str(trials), "-o", str(out), "--device", "cpu", "-q", *extra]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    df = pd.read_csv(out, keep_default_na=False)
    return {(a, b): float(s) for a, b, s in zip(df.enrollment, df.test, df.score, strict=True)}


@pytest.mark.weights
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_serve_1000_requests_match_score(shared, real_ckpt, tmp_path):
    files = _forty(shared)
    rng = np.random.default_rng(20240607)
    idx = [(k, (k + 1) % 40) for k in range(40)]  # every recording is used
    idx += [(int(i), int(j)) for i, j in rng.integers(0, 40, (960, 2))]
    pairs = [(str(files[i]), str(files[j])) for i, j in idx]
    ids = [str(uuid.UUID(bytes=rng.bytes(16), version=4)) for _ in pairs]

    # Malformed requests, interleaved with the good ones.
    not_audio = tmp_path / "notes.wav"
    not_audio.write_text("this is not audio\n")
    bad = {
        "bad-one-path": f"bad-one-path->{files[0]}",
        "bad-three-paths": f"bad-three-paths->{files[0]},{files[1]},{files[2]}",
        "bad-missing": f"bad-missing->{files[0]},{tmp_path / 'missing.wav'}",
        "bad-not-audio": f"bad-not-audio->{not_audio},{files[1]}",
    }
    expect_reason = {
        "bad-one-path": "expected 2 comma-separated paths, got 1",
        "bad-three-paths": "expected 2 comma-separated paths, got 3",
        "bad-missing": "missing.wav: file not found",
        "bad-not-audio": "notes.wav: ",
    }
    lines = [f"{i}->{a},{b}" for i, (a, b) in zip(ids, pairs, strict=True)]
    for k, text in enumerate(bad.values()):
        lines.insert(100 + 200 * k, text)
    lines.insert(500, "garbage without an arrow")
    lines.insert(600, "")
    lines.insert(700, f"{ids[0]}->close")  # the harness's acknowledgement: no answer

    cache = tmp_path / "serve-cache"  # empty: every recording must be embedded here
    stats_file = tmp_path / "stats.json"
    srv = Pipe(
        _serve_cmd("--cache-dir", str(cache), "--stats-file", str(stats_file)), {**os.environ}
    )
    try:
        # One request alone: answered (flushed) while stdin stays open.
        srv.send(lines[0] + "\n")
        first = srv.read(1, timeout=300)
        assert len(first) == 1 and first[0].startswith(ids[0] + "->"), srv.stderr()
        # Then everything else at once: many requests in flight.
        srv.send("".join(ln + "\n" for ln in lines[1:]))
        assert srv.p.stdin is not None
        srv.p.stdin.close()
        answers = first + srv.rest(timeout=600)
        rc = srv.p.wait(timeout=60)
    finally:
        srv.kill()
    assert rc == 0, srv.stderr()

    scored: dict[str, float] = {}
    errors: dict[str, str] = {}
    for ln in answers:  # stdout carries nothing but answers
        m = SCORE_LINE.match(ln)
        e = ERROR_LINE.match(ln)
        assert m or e, f"not an answer on stdout: {ln!r}"
        if m:
            assert m["id"] not in scored, f"answered twice: {m['id']}"
            scored[m["id"]] = float(m["score"])
        else:
            assert e is not None
            errors[e["id"]] = e["reason"]
    assert len(answers) == 1000 + len(bad) + 1
    assert set(scored) == set(ids)
    for key, reason in expect_reason.items():
        assert reason in errors[key], (key, errors[key])
    assert errors["-"].startswith("malformed request")

    stats = json.loads(stats_file.read_text())
    assert stats["embeddings"]["embedded"] == 40  # each recording embedded once
    assert stats["embeddings"]["engine_recordings"] == 40
    assert stats["serve"]["scored"] == 1000 and stats["serve"]["errors"] == len(bad) + 1
    assert stats["serve"]["ignored"] == 2
    assert stats["serve"]["largest_batch"] > 1  # requests in flight were batched
    assert "served 1005 requests" in srv.stderr()

    # `speaker-sim score` on the same pairs, with the same embeddings (the cache they share).
    trials = tmp_path / "trials.csv"
    uniq = list(dict.fromkeys(pairs))
    trials.write_text("enrollment,test\n" + "".join(f"{a},{b}\n" for a, b in uniq), "utf-8")
    report = tmp_path / "report.json"
    ref = _score_cli(
        trials, tmp_path / "s1.csv", "--cache-dir", str(cache), "--report", str(report)
    )
    assert json.loads(report.read_text())["counts"]["embedded"] == 0
    diffs = [abs(scored[i] - ref[p]) for i, p in zip(ids, pairs, strict=True)]
    assert max(diffs) <= 1e-6, f"largest difference from `score`: {max(diffs)}"
    assert sum(d == 0 for d in diffs) == 1000  # the very same numbers, in fact

    # And `score` embedding on its own (batched otherwise): equal to float32 precision.
    own = _score_cli(trials, tmp_path / "s2.csv")
    worst = max(abs(scored[i] - own[p]) for i, p in zip(ids, pairs, strict=True))
    print(f"serve vs an independent `score` run: largest difference {worst:.1e}")
    assert worst <= 5e-6


@pytest.mark.weights
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_serve_sigterm_answers_what_was_read_and_exits_0(shared, real_ckpt, tmp_path):
    files = _forty(shared)[:4]
    srv = Pipe(_serve_cmd("--jsonl"), dict(os.environ))
    try:
        reqs = [{"id": k, "a": str(files[k]), "b": str(files[k + 1])} for k in range(3)]
        srv.send("".join(json.dumps(r) + "\n" for r in reqs))
        got = srv.read(3, timeout=300)
        assert len(got) == 3, srv.stderr()
        assert sorted(json.loads(x)["id"] for x in got) == [0, 1, 2]
        assert all(-1 <= json.loads(x)["score"] <= 1 for x in got)
        srv.p.send_signal(signal.SIGTERM)  # stdin is still open
        rc = srv.p.wait(timeout=60)
        assert srv.rest(timeout=10) == []
    finally:
        srv.kill()
    assert rc == 0, srv.stderr()
    assert "stopped by signal" in srv.stderr()
