"""Bad input costs only its own trials; clear messages; exit codes; interrupted runs resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
from typer.testing import CliRunner

from speaker_sim_cli.cli.main import app

pytestmark = [pytest.mark.weights]

EXAMPLES = "audio/3dspeaker_examples"


def make_bad_files(d: Path) -> dict[str, tuple[Path, str]]:
    """name -> (path, the words the reason must contain)."""
    d.mkdir(parents=True, exist_ok=True)
    sr = 16000
    rng = np.random.default_rng(0)
    speech_like = (0.1 * rng.standard_normal(sr * 2)).astype(np.float32)
    files: dict[str, tuple[Path, str]] = {}

    files["missing"] = (d / "missing.wav", "file not found")
    (d / "empty.wav").write_bytes(b"")
    files["empty"] = (d / "empty.wav", "empty file")
    sf.write(d / "zero.wav", np.zeros(0, np.float32), sr)
    files["zero samples"] = (d / "zero.wav", "no samples")
    good = d / "tmp_good.wav"
    sf.write(good, speech_like, sr)
    raw = good.read_bytes()
    (d / "corrupt header.wav").write_bytes(b"RIFX" + raw[4:12] + b"junk" + raw[16:])
    files["corrupt header"] = (d / "corrupt header.wav", "cannot decode")
    good.unlink()
    (d / "notes.wav").write_text("enrollment,test\nthis is a text file\n" * 10)
    files["text named .wav"] = (d / "notes.wav", "text file")
    (d / "clip.m4a").write_bytes(b"\x00\x00\x00\x20ftypM4A " + bytes(200))
    files["unsupported container"] = (d / "clip.m4a", "unsupported container")
    sf.write(d / "silent.wav", np.zeros(sr * 2, np.float32), sr)
    files["digital silence"] = (d / "silent.wav", "digitally silent")
    sf.write(d / "short.wav", speech_like[: sr // 10], sr)
    files["too short"] = (d / "short.wav", "too short")
    nan = speech_like.copy()
    nan[1000] = np.inf
    sf.write(d / "inf.wav", nan, sr, subtype="FLOAT")
    files["NaN or Inf"] = (d / "inf.wav", "NaN or Inf")
    return files


@pytest.fixture
def runner():
    return CliRunner()


def test_mixed_good_and_bad(runner, shared, real_ckpt, tmp_path):
    bad = make_bad_files(tmp_path / "bad ä")
    ex = sorted((shared / EXAMPLES).glob("*.wav"))
    good_pairs = [(a, b) for i, a in enumerate(ex) for b in ex[i + 1 :]][:12]
    chosen = list(bad.items())[:7]
    rows = [(str(a), str(b)) for a, b in good_pairs]
    rows += [(str(ex[0]), str(p)) for _, (p, _) in chosen]
    trials = tmp_path / "trials.csv"
    pd.DataFrame(rows, columns=["enrollment", "test"]).to_csv(trials, index=False)
    out, report = tmp_path / "s.csv", tmp_path / "r.json"
    res = runner.invoke(app, ["score", str(trials), "-o", str(out), "--report", str(report)])
    assert res.exit_code == 3, res.output
    got = pd.read_csv(out, keep_default_na=False)
    assert len(got) == 19 and list(got.columns)[-1] == "error"
    scored = got[got.error == ""]
    assert len(scored) == 12
    ref = np.load(shared / "fixtures" / "reference" / "campplus_zh_en_advanced.npz")
    for _, r in scored.iterrows():
        a = ref[str(Path(r.enrollment).relative_to(shared))]
        b = ref[str(Path(r.test).relative_to(shared))]
        assert abs(float(r.score) - a @ b / np.linalg.norm(a) / np.linalg.norm(b)) < 1e-3
    failed = got[got.error != ""]
    for (_, (path, words)), (_, row) in zip(chosen, failed.iterrows()):
        assert str(path) in row.error and words in row.error, row.error
    rep = json.loads(report.read_text())
    assert rep["counts"]["scored"] == 12 and rep["counts"]["failed"] == 7
    assert rep["counts"]["failed_recordings"] == 7 and len(rep["failures"]) == 7
    assert "Traceback" not in res.output
    for _, (path, _) in chosen:  # the stderr summary names each failed recording
        assert path.name in res.output.replace("\n", "")


def test_every_bad_case_has_its_reason(runner, shared, real_ckpt, tmp_path):
    bad = make_bad_files(tmp_path / "bad")
    anchor = shared / EXAMPLES / "speaker1_a_en_16k.wav"
    trials = tmp_path / "t.csv"
    pd.DataFrame(
        [(str(anchor), str(p)) for p, _ in bad.values()], columns=["enrollment", "test"]
    ).to_csv(trials, index=False)
    out = tmp_path / "s.csv"
    res = runner.invoke(app, ["score", str(trials), "-o", str(out), "-q"])
    assert res.exit_code == 3, res.output
    got = pd.read_csv(out, keep_default_na=False)
    for (name, (_, words)), err in zip(bad.items(), got.error):
        assert words in err, (name, err)


def test_skip_leaves_failed_rows_out_but_counts_them(runner, shared, real_ckpt, tmp_path):
    bad = make_bad_files(tmp_path / "bad")
    a, b = shared / EXAMPLES / "speaker1_a_en_16k.wav", shared / EXAMPLES / "speaker1_b_en_16k.wav"
    trials = tmp_path / "t.csv"
    trials.write_text(f"enrollment,test\n{a},{b}\n{a},{bad['empty'][0]}\n")
    out, report = tmp_path / "s.csv", tmp_path / "r.json"
    res = runner.invoke(
        app, ["score", str(trials), "-o", str(out), "--report", str(report), "--on-error", "skip"]
    )
    assert res.exit_code == 3
    assert len(pd.read_csv(out)) == 1 and "error" not in pd.read_csv(out).columns
    assert json.loads(report.read_text())["counts"]["failed"] == 1


def test_fail_stops_at_first_bad_recording(runner, shared, real_ckpt, tmp_path):
    a, b = shared / EXAMPLES / "speaker1_a_en_16k.wav", shared / EXAMPLES / "speaker1_b_en_16k.wav"
    trials = tmp_path / "t.csv"
    trials.write_text(f"enrollment,test\n{a},{b}\n{a},{tmp_path / 'gone.wav'}\n")
    out = tmp_path / "s.csv"
    res = runner.invoke(app, ["score", str(trials), "-o", str(out), "--on-error", "fail"])
    assert res.exit_code == 1
    assert "gone.wav" in res.output and "first bad recording" in res.output
    assert out.exists()  # what was done is written


def test_usage_errors_exit_2_with_one_line(runner, tmp_path):
    bad = tmp_path / "t.csv"
    bad.write_text("enrollment,test,label\na.wav,b.wav,perhaps\n")
    res = runner.invoke(app, ["score", str(bad)])
    assert res.exit_code == 2 and "t.csv:2" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["score", str(tmp_path / "absent.csv")])
    assert res.exit_code == 2 and "file not found" in res.output
    res = runner.invoke(app, ["score", str(bad), "--batch-size", "0"])
    assert res.exit_code == 2


def test_id_missing_from_wav_scp_fails_only_its_trials(runner, shared, real_ckpt, tmp_path):
    a, b = shared / EXAMPLES / "speaker1_a_en_16k.wav", shared / EXAMPLES / "speaker1_b_en_16k.wav"
    scp = tmp_path / "wav.scp"
    scp.write_text(f"u1 {a}\nu2 {b}\n")
    trials = tmp_path / "trials"
    trials.write_text("u1 u2 target\nu1 u9 nontarget\n")
    res = runner.invoke(app, ["score", str(trials), "--wav-scp", str(scp)])
    assert res.exit_code == 3
    lines = res.stdout.strip().splitlines()
    assert lines[2].endswith("u9: utterance id not in wav.scp")


def test_wav_scp_commands_behind_a_flag(runner, shared, real_ckpt, tmp_path):
    a, b = shared / EXAMPLES / "speaker1_a_cn_16k.wav", shared / EXAMPLES / "speaker1_b_cn_16k.wav"
    scp = tmp_path / "wav.scp"
    scp.write_text(f"u1 cat '{a}' |\nu2 {b}\n")
    trials = tmp_path / "trials"
    trials.write_text("u1 u2 target\n")
    res = runner.invoke(app, ["score", str(trials), "--wav-scp", str(scp)])
    assert res.exit_code == 2 and "--allow-commands" in res.output
    res = runner.invoke(
        app, ["score", str(trials), "--wav-scp", str(scp), "--allow-commands", "-q"]
    )
    assert res.exit_code == 0, res.output
    assert abs(float(res.stdout.strip().splitlines()[1].split(",")[-1]) - 0.667) < 0.005


def test_duplicates_and_headerless_csv(runner, shared, real_ckpt, tmp_path):
    a, b = shared / EXAMPLES / "speaker1_a_cn_16k.wav", shared / EXAMPLES / "speaker1_b_cn_16k.wav"
    trials = tmp_path / "t.csv"
    trials.write_text(f"{a},{b},1\n{a},{b},1\n")
    report = tmp_path / "r.json"
    res = runner.invoke(app, ["score", str(trials), "--report", str(report)])
    assert res.exit_code == 0, res.output
    assert "1 duplicate trials" in res.output
    assert json.loads(report.read_text())["counts"]["duplicate_trials"] == 1


def test_unwritable_cache_warns_and_still_scores(runner, shared, real_ckpt, tmp_path):
    if os.geteuid() == 0:
        ro = Path("/proc/speaker-sim-cache")  # root ignores permissions; /proc refuses writes
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
    a, b = shared / EXAMPLES / "speaker1_a_cn_16k.wav", shared / EXAMPLES / "speaker1_b_cn_16k.wav"
    trials = tmp_path / "t.csv"
    trials.write_text(f"enrollment,test\n{a},{b}\n")
    res = runner.invoke(app, ["score", str(trials), "--cache-dir", str(ro)])
    assert res.exit_code == 0, res.output
    assert "could not be written" in res.output


def test_internal_errors_are_one_line_and_debug_shows_traceback(runner, tmp_path, monkeypatch):
    import speaker_sim_cli.io.trials as trials_mod
    import speaker_sim_cli.job.stream_stage as stream_mod

    def boom(*_: object) -> None:
        raise KeyError("bug")

    # A bug in reading the list, on either route (whole list, or the streamed first pass).
    monkeypatch.setattr(trials_mod, "read_trials", boom)
    monkeypatch.setattr(stream_mod, "scan", boom)
    t = tmp_path / "t.csv"
    t.write_text("enrollment,test\na,b\n")
    res = runner.invoke(app, ["score", str(t)])
    assert res.exit_code == 1 and "internal error" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["--debug", "score", str(t)])
    assert "Traceback" in res.output


@pytest.mark.slow
def test_interrupted_run_resumes(shared, real_ckpt, tmp_path):
    files = sorted((shared / "audio" / "dev_hard").rglob("*.wav"))[:16]
    trials = tmp_path / "t.csv"
    pd.DataFrame(
        [(str(files[i]), str(files[i + 1])) for i in range(len(files) - 1)],
        columns=["enrollment", "test"],
    ).to_csv(trials, index=False)
    cache, out = tmp_path / "cache", tmp_path / "scores.csv"
    cmd = [sys.executable, "-m", "speaker_sim_cli.cli.main", "score", str(trials), "-o", str(out),
           "--cache-dir", str(cache), "--batch-size", "1", "--workers", "0",
           "--device", "cpu"]  # fmt: skip
    from speaker_sim_cli.engine.cache import cache_info

    def stored() -> int:  # entries committed to the store so far
        return sum(r["entries"] for r in cache_info(cache)) if cache.is_dir() else 0

    # Commit a shard per embedding, so that the kill below lands between commits.
    env = {**os.environ, "SPEAKER_SIM_STORE_COMMIT_SECONDS": "0"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    deadline = time.time() + 300
    while time.time() < deadline and stored() < len(files) // 2:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert not out.exists()
    assert not list(tmp_path.glob(".scores.csv*"))
    done = stored()
    assert len(files) // 2 <= done < len(files)
    assert not list(cache.rglob("*.tmp"))
    report = tmp_path / "r.json"
    res = subprocess.run([*cmd, "--report", str(report)], capture_output=True, timeout=300,
                         env=env)  # fmt: skip
    assert res.returncode == 0, res.stderr
    counts = json.loads(report.read_text())["counts"]
    assert counts["embedded"] == len(files) - done and counts["from_cache"] == done
