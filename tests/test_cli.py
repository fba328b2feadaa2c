"""The CLI end to end, in-process (CliRunner), on the shared audio with the real weights."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from speaker_sim_cli.cli.main import app
from speaker_sim_cli.models.registry import DEFAULT_MODEL

pytestmark = [pytest.mark.weights]


@pytest.fixture
def runner():
    return CliRunner()


def _ref(shared, name):
    ref = pd.read_csv(shared / "fixtures" / "reference" / f"{name}.scores.csv")
    metrics = json.loads((shared / "fixtures" / "reference" / f"{name}.metrics.json").read_text())
    return ref, metrics


@pytest.mark.slow
@pytest.mark.parametrize(
    ("trials", "ref_name"),
    [
        ("audio/dev_hard/trials.csv", "dev_hard_campplus_zh_en_advanced"),
        ("audio/trials.csv", "dev_trials_campplus_zh_en_advanced"),
    ],
)
def test_score_matches_reference_pipeline(runner, shared, real_ckpt, tmp_path, trials, ref_name):
    out, report = tmp_path / "scores.csv", tmp_path / "report.json"
    res = runner.invoke(
        app,
        ["score", str(shared / trials), "--root", str(shared), "--out", str(out),
         "--report", str(report), "--device", "cpu", "--quiet"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    got = pd.read_csv(out)
    ref, metrics = _ref(shared, ref_name)
    assert list(got.columns) == ["enrollment", "test", "label", "score"]
    assert (got.enrollment == ref.enrollment).all() and (got.test == ref.test).all()
    assert np.abs(got.score - ref.score).max() <= 1e-3
    rep = json.loads(report.read_text())
    m = rep["metrics"]
    assert round(m["eer"], 4) == round(metrics["eer"], 4)
    assert round(m["min_dcf"]["0.01"], 4) == round(metrics["min_dcf_p0.01"], 4)
    assert round(m["min_dcf"]["0.05"], 4) == round(metrics["min_dcf_p0.05"], 4)
    assert rep["counts"]["trials"] == len(ref)
    assert rep["counts"]["recordings"] == metrics["utterances"]
    assert rep["counts"]["failed"] == 0
    assert rep["counts"]["targets"] == metrics["targets"]
    assert rep["model"]["id"] == "iic/speech_campplus_sv_zh_en_16k-common_advanced"
    assert "total_s" in rep["timing"]


def _pairs(shared):
    ex = shared / "audio" / "3dspeaker_examples"
    a, b, c = (
        ex / "speaker1_a_cn_16k.wav",
        ex / "speaker1_b_cn_16k.wav",
        ex / "speaker2_a_cn_16k.wav",
    )
    return a, b, c


def test_score_kaldi_trials_with_wav_scp(runner, shared, real_ckpt, tmp_path):
    a, b, c = _pairs(shared)
    scp = tmp_path / "wav.scp"
    scp.write_text(f"s1a {a}\ns1b {b}\ns2a {c}\n")
    trials = tmp_path / "trials"
    trials.write_text("s1a s1b target\ns1a s2a nontarget\n")
    res = runner.invoke(app, ["score", str(trials), "--wav-scp", str(scp), "--quiet"])
    assert res.exit_code == 0, res.output
    lines = res.stdout.strip().splitlines()
    assert lines[0] == "enrollment,test,label,score"
    rows = [ln.split(",") for ln in lines[1:]]
    assert [r[:3] for r in rows] == [["s1a", "s1b", "1"], ["s1a", "s2a", "0"]]
    assert abs(float(rows[0][3]) - 0.667) < 0.01 and abs(float(rows[1][3]) - 0.067) < 0.01


def test_score_voxceleb_list_and_kaldi_output(runner, shared, real_ckpt, tmp_path):
    a, b, c = _pairs(shared)
    trials = tmp_path / "veri.txt"
    trials.write_text(f"1 {a} {b}\n0 {a} {c}\n")
    out = tmp_path / "scores.txt"
    res = runner.invoke(app, ["score", str(trials), "--format", "kaldi", "-o", str(out), "-q"])
    assert res.exit_code == 0, res.output
    rows = [ln.split() for ln in out.read_text().splitlines()]
    assert [r[2] for r in rows] == ["1", "0"] and len(rows[0]) == 4


def test_each_recording_embedded_once(runner, shared, real_ckpt, tmp_path):
    a, b, c = _pairs(shared)
    trials = tmp_path / "t.csv"
    trials.write_text(
        "enrollment,test\n" + "".join(f"{x},{y}\n" for x in (a, b, c) for y in (a, b, c))
    )
    report = tmp_path / "r.json"
    res = runner.invoke(app, ["score", str(trials), "--no-cache", "--report", str(report), "-q"])
    assert res.exit_code == 0, res.output
    counts = json.loads(report.read_text())["counts"]
    assert counts == {**counts, "trials": 9, "recordings": 3, "embedded": 3, "scored": 9}
    scores = pd.read_csv(tmp_path / "t.csv").assign(
        s=pd.read_csv(pd.io.common.StringIO(res.stdout)).score
    )
    assert np.allclose(scores.s[[0, 4, 8]], 1.0)


def test_embed_writes_matrix_and_index(runner, shared, real_ckpt, tmp_path):
    a, b, c = _pairs(shared)
    lst = tmp_path / "list.txt"
    lst.write_text(f"{b}\n{c}\n")
    out = tmp_path / "emb"
    res = runner.invoke(app, ["embed", str(a), str(lst), "--out", str(out), "-q"])
    assert res.exit_code == 0, res.output
    mat = np.load(out / "embeddings.npy")
    idx = pd.read_csv(out / "index.csv")
    assert mat.shape == (3, 192) and mat.dtype == np.float32
    assert list(idx.columns) == ["key", "path"] and idx.key.tolist() == [str(a), str(b), str(c)]
    ref = np.load(shared / "fixtures" / "reference" / "campplus_zh_en_advanced.npz")
    want = ref["audio/3dspeaker_examples/speaker1_a_cn_16k.wav"]
    assert np.dot(mat[0], want) / np.linalg.norm(mat[0]) / np.linalg.norm(want) > 0.9999


def test_embed_kaldi_ark_reads_back_with_kaldiio(runner, shared, real_ckpt, tmp_path):
    """--format kaldi writes xvector.ark/scp as WeSpeaker does; kaldiio (an independent
    reader) gets the same vectors as the npy output; a stale failures.csv is removed."""
    kaldiio = pytest.importorskip("kaldiio")
    a, b, c = _pairs(shared)
    scp_in = tmp_path / "wav.scp"
    scp_in.write_text(f"utt-a {a}\nutt-b {b}\nutt-c {c}\n")
    out = tmp_path / "emb"
    out.mkdir()
    (out / "failures.csv").write_text("key,path,error\nold,old.wav,from an earlier run\n")
    res = runner.invoke(app, ["embed", str(scp_in), "--out", str(out), "-q", "--format", "kaldi"])
    assert res.exit_code == 0, res.output
    assert not (out / "failures.csv").exists()
    got = dict(kaldiio.load_scp(str(out / "xvector.scp")))
    assert list(got) == ["utt-a", "utt-b", "utt-c"]
    npy = tmp_path / "npy"
    res = runner.invoke(app, ["embed", str(scp_in), "--out", str(npy), "-q"])
    assert res.exit_code == 0, res.output
    mat = np.load(npy / "embeddings.npy")
    for i, key in enumerate(got):
        assert got[key].dtype == np.float32
        np.testing.assert_array_equal(got[key], mat[i])
    from speaker_sim_cli.io.kaldi_vectors import read_kaldi_vectors

    ours = read_kaldi_vectors(out / "xvector.scp")
    assert all(np.array_equal(ours[k], got[k]) for k in got)
    # Keys with spaces cannot live in an ark: refused up front, naming the key.
    spaced = tmp_path / "list.txt"
    spaced.write_text(f"{a}\n")
    (tmp_path / "with space.wav").symlink_to(a)
    spaced.write_text(str(tmp_path / "with space.wav") + "\n")
    res = runner.invoke(app, ["embed", str(spaced), "--out", str(tmp_path / "x"), "--format",
                              "kaldi"])  # fmt: skip
    assert res.exit_code == 2 and "with space.wav" in res.stderr and "--format npy" in res.stderr


def test_score_from_precomputed_embeddings(runner, shared, real_ckpt, tmp_path):
    """score --embeddings (an embed folder, npy or kaldi, or an xvector.scp) gives the bytes
    score gives from the audio; items are keys; a key with no vector fails only its trials."""
    a, b, c = _pairs(shared)
    scp_in = tmp_path / "wav.scp"
    scp_in.write_text(f"spk1-a {a}\nspk1-b {b}\nspk2-a {c}\n")
    for fmt in ("npy", "kaldi"):
        res = runner.invoke(app, ["embed", str(scp_in), "-o", str(tmp_path / fmt), "-q",
                                  "--format", fmt])  # fmt: skip
        assert res.exit_code == 0, res.output
    trials = tmp_path / "trials"
    trials.write_text("spk1-a spk1-b target\nspk1-a spk2-a nontarget\nspk1-b spk2-a nontarget\n")
    audio = tmp_path / "audio.txt"
    res = runner.invoke(app, ["score", str(trials), "--wav-scp", str(scp_in), "-o", str(audio),
                              "--format", "kaldi", "-q"])  # fmt: skip
    assert res.exit_code == 0, res.output
    sources = [tmp_path / "npy", tmp_path / "kaldi", tmp_path / "kaldi" / "xvector.scp"]
    for src in sources:
        out, rep = tmp_path / "pre.txt", tmp_path / "pre.json"
        res = runner.invoke(app, ["score", str(trials), "--embeddings", str(src), "-o", str(out),
                                  "--format", "kaldi", "--report", str(rep)])  # fmt: skip
        assert res.exit_code == 0, res.output
        assert out.read_bytes() == audio.read_bytes(), src
        doc = json.loads(rep.read_text())
        assert doc["model"]["embeddings"] == str(src) and doc["model"]["dim"] == 192
        assert doc["model"]["model"]["id"] == DEFAULT_MODEL  # what embed's model.json says
        assert doc["counts"]["embedded"] == 0
    # An unknown key fails its trials only (exit 3), naming the key and the source.
    trials.write_text("spk1-a spk1-b\nspk1-a nobody\n")
    res = runner.invoke(app, ["score", str(trials), "--embeddings", str(tmp_path / "npy")])
    assert res.exit_code == 3
    df = pd.read_csv(pd.io.common.StringIO(res.stdout))
    assert np.isfinite(df.score[0]) and np.isnan(df.score[1])
    assert "nobody" in df.error[1] and "no embedding with this key" in df.error[1]
    # Enrolment maps work on keys too.
    spk2utt = tmp_path / "spk2utt"
    spk2utt.write_text("spk1 spk1-a spk1-b\n")
    trials.write_text("spk1 spk2-a\n")
    res = runner.invoke(app, ["score", str(trials), "--embeddings", str(tmp_path / "npy"),
                              "--enroll-map", str(spk2utt), "-q"])  # fmt: skip
    ref = runner.invoke(app, ["score", str(trials), "--wav-scp", str(scp_in),
                              "--enroll-map", str(spk2utt), "-q"])  # fmt: skip
    assert res.exit_code == ref.exit_code == 0, res.output + ref.output
    assert res.stdout == ref.stdout and "spk1,spk2-a," in res.stdout
    # Misuse is a usage error.
    res = runner.invoke(app, ["score", str(trials), "--embeddings", str(tmp_path / "npy"),
                              "--wav-scp", str(scp_in)])  # fmt: skip
    assert res.exit_code == 2 and "do not go together" in res.stderr
    res = runner.invoke(app, ["score", str(trials), "--embeddings", str(tmp_path / "none")])
    assert res.exit_code == 2 and "not found" in res.stderr


def test_compare_prints_the_demo_table(runner, shared, real_ckpt):
    ex = real_ckpt.parent / "examples"
    res = runner.invoke(app, ["compare", str(ex), "--no-cache"])
    assert res.exit_code == 0, res.output
    line = next(
        ln for ln in res.stdout.splitlines() if "speaker1_a_cn" in ln and "speaker1_b_cn" in ln
    )
    assert abs(float(line.split("│")[-2]) - 0.667) < 0.005


def test_models_lists_the_zoo(runner, real_ckpt):
    res = runner.invoke(app, ["models", "--json"])
    assert res.exit_code == 0
    rows = json.loads(res.stdout)
    from speaker_sim_cli.models.registry import MODELS

    # the 13 ids 3D-Speaker's infer_sv.py serves, plus FunASR's x-vector and the WavLM SIM model
    assert len(rows) == len(MODELS) == 15
    assert sum(r["id"].startswith("iic/speech_") and "xvector" not in r["id"] for r in rows) == 13
    default = next(r for r in rows if r["default"])
    assert default["weights"].endswith("campplus_cn_en_common.pt")
    assert sum(r["weights"] == "missing" for r in rows) == len(rows) - 1


def test_missing_weights_is_one_clear_message(runner, shared, tmp_path, monkeypatch):
    monkeypatch.setenv("SPEAKER_SIM_PRETRAINED", str(tmp_path / "none"))
    monkeypatch.chdir(tmp_path)
    trials = tmp_path / "t.csv"
    trials.write_text("enrollment,test\na.wav,b.wav\n")
    res = runner.invoke(app, ["score", str(trials), "--model", "ecapa-vox"])
    assert res.exit_code == 1
    assert "ecapa_tdnn.bin" in res.output and "Traceback" not in res.output


def test_unknown_model_is_a_usage_error(runner, tmp_path):
    trials = tmp_path / "t.csv"
    trials.write_text("enrollment,test\na.wav,b.wav\n")
    res = runner.invoke(app, ["score", str(trials), "--model", "no-such-model"])
    assert res.exit_code == 2 and "unknown model" in res.output


def test_eval_on_reference_scores(runner, shared):
    ref = shared / "fixtures" / "reference" / "dev_hard_campplus_zh_en_advanced.scores.csv"
    res = runner.invoke(app, ["eval", str(ref), "-q"])
    assert res.exit_code == 0, res.output
    m = json.loads(res.stdout)["metrics"]
    assert round(m["eer"], 5) == 0.14342 and round(m["min_dcf"]["0.01"], 4) == 0.6838
