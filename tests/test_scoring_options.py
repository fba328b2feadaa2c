"""Multi-recording enrolment, score normalisation and mean subtraction through `score`."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from speaker_sim_cli.cli.main import app
from speaker_sim_cli.scoring.norm import asnorm

pytestmark = [pytest.mark.weights]
EX = "audio/3dspeaker_examples"


@pytest.fixture(scope="module")
def ref(shared):
    z = np.load(shared / "fixtures" / "reference" / "campplus_zh_en_advanced.npz")
    return {k: z[k].astype(np.float64) for k in z.files}


def cos(a, b):
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_enrolment_speaker_is_the_mean_of_its_recordings(shared, real_ckpt, ref, tmp_path):
    spk2utt = tmp_path / "enroll.spk2utt"
    spk2utt.write_text(f"spk1 {EX}/speaker1_a_en_16k.wav {EX}/speaker1_b_en_16k.wav\n")
    trials = tmp_path / "trials.csv"
    trials.write_text(
        "enrollment,test,label\n"
        f"spk1,{EX}/speaker1_b_en_16k.wav,1\nspk1,{EX}/speaker2_a_en_16k.wav,0\n"
        f"{EX}/speaker1_a_en_16k.wav,{EX}/speaker2_a_en_16k.wav,0\n"
    )
    res = CliRunner().invoke(
        app, ["score", str(trials), "--root", str(shared), "--enroll-map", str(spk2utt), "-q"]
    )
    assert res.exit_code == 0, res.output
    got = pd.read_csv(pd.io.common.StringIO(res.stdout))
    mean = (ref[f"{EX}/speaker1_a_en_16k.wav"] + ref[f"{EX}/speaker1_b_en_16k.wav"]) / 2
    assert abs(got.score[0] - cos(mean, ref[f"{EX}/speaker1_b_en_16k.wav"])) < 1e-3
    assert abs(got.score[1] - cos(mean, ref[f"{EX}/speaker2_a_en_16k.wav"])) < 1e-3
    single = cos(ref[f"{EX}/speaker1_a_en_16k.wav"], ref[f"{EX}/speaker2_a_en_16k.wav"])
    assert abs(got.score[2] - single) < 1e-3


def test_asnorm_through_score_matches_the_library(shared, real_ckpt, ref, tmp_path):
    files = sorted(f"{EX}/{p.name}" for p in (shared / EX).glob("*.wav"))
    cohort_files = sorted(
        str(p.relative_to(shared)) for p in (shared / "audio" / "speechbrain_samples").glob("*.wav")
    )
    cohort = tmp_path / "cohort.lst"
    cohort.write_text("".join(f"{shared / f}\n" for f in cohort_files))
    trials = tmp_path / "trials.csv"
    pairs = [(files[i], files[j]) for i in range(len(files)) for j in range(i + 1, len(files))]
    pd.DataFrame(pairs, columns=["enrollment", "test"]).to_csv(trials, index=False)
    report = tmp_path / "r.json"
    res = CliRunner().invoke(
        app,
        ["score", str(trials), "--root", str(shared), "--norm", "asnorm", "--cohort", str(cohort),
         "--top-n", "5", "--report", str(report), "-q"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    got = pd.read_csv(pd.io.common.StringIO(res.stdout)).score.to_numpy()
    emb = np.stack([ref[f] for f in files])
    idx = {f: i for i, f in enumerate(files)}
    pr = np.array([[idx[a], idx[b]] for a, b in pairs])
    raw = np.array([cos(emb[a], emb[b]) for a, b in pr])
    want = asnorm(raw, pr, emb, emb, np.stack([ref[f] for f in cohort_files]), top_n=5)
    assert np.abs(got - want).max() < 5e-3
    assert json.loads(report.read_text())["scoring"]["norm"] == {
        "method": "asnorm", "cohort": 12, "top_n": 5}  # fmt: skip


def test_norm_without_cohort_is_a_usage_error(tmp_path):
    trials = tmp_path / "t.csv"
    trials.write_text("enrollment,test\na.wav,b.wav\n")
    res = CliRunner().invoke(app, ["score", str(trials), "--norm", "snorm"])
    assert res.exit_code == 2 and "--cohort" in res.output
