"""SpeakerSim, the Python API, with the real CAM++ weights on the shared audio."""

from __future__ import annotations

import doctest
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from speaker_sim_cli.api import MemoryLRU

REPO = Path(__file__).resolve().parents[1]


def test_import_stays_torch_free():
    code = (
        "import sys, speaker_sim_cli; assert 'torch' not in sys.modules; "
        "assert 'SpeakerSim' in dir(speaker_sim_cli); "
        "from speaker_sim_cli import SpeakerSim; assert 'torch' not in sys.modules; "
        "print(SpeakerSim.__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "SpeakerSim"


def test_unknown_attribute_is_an_attribute_error():
    import speaker_sim_cli

    with pytest.raises(AttributeError):
        _ = speaker_sim_cli.NoSuchThing


def test_memory_lru_is_bounded_and_least_recent_first():
    lru = MemoryLRU(2)
    one, two, three = (np.full(3, i, np.float32) for i in (1, 2, 3))
    lru.put("a", one)
    lru.put("b", two)
    assert lru.get("a") is one  # a is now the most recent
    lru.put("c", three)
    assert lru.get("b") is None and lru.get("a") is one and lru.get("c") is three
    assert len(lru) == 2 and lru.evictions == 1
    off = MemoryLRU(0)
    off.put("a", one)
    assert off.get("a") is None
    with pytest.raises(ValueError):
        MemoryLRU(-1)


# -- with the real weights ------------------------------------------------------------------


@pytest.fixture(scope="module")
def sim(real_ckpt, device):
    from speaker_sim_cli import SpeakerSim

    return SpeakerSim(model_dir=real_ckpt.parent, device=device)


@pytest.fixture(scope="module")
def ex(shared):
    d = shared / "audio" / "3dspeaker_examples"
    return {k: str(d / f"{k}_cn_16k.wav") for k in ("speaker1_a", "speaker1_b", "speaker2_a")}


def _cos(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.mark.weights
def test_embed_shapes_and_reference(sim, shared, ex):
    ref = np.load(shared / "fixtures" / "reference" / "campplus_zh_en_advanced.npz")
    one = sim.embed(ex["speaker1_a"])
    assert one.shape == (192,) and one.dtype == np.float32
    many = sim.embed([ex["speaker1_a"], Path(ex["speaker1_b"]), ex["speaker1_a"]])
    assert many.shape == (3, 192) and many.dtype == np.float32
    np.testing.assert_array_equal(many[0], many[2])
    np.testing.assert_array_equal(many[0], one)
    assert sim.embed([]).shape == (0, 192)
    for key, row in (("speaker1_a", many[0]), ("speaker1_b", many[1])):
        r = ref[f"audio/3dspeaker_examples/{key}_cn_16k.wav"]
        assert _cos(row, r) >= 0.9999
        assert abs(np.linalg.norm(row) / np.linalg.norm(r) - 1) < 1e-3


@pytest.fixture(scope="module")
def short(shared):
    """Short speechbrain samples (about 2 s): speaker 2, three of them."""
    d = shared / "audio" / "speechbrain_samples"
    return [str(d / f"spk2_snt{i}.wav") for i in (2, 3, 6)]


@pytest.mark.weights
def test_each_file_embedded_once_then_from_memory(real_ckpt, device, short, tmp_path):
    from speaker_sim_cli import SpeakerSim

    s = SpeakerSim(model_dir=real_ckpt.parent, device=device, cache_dir=tmp_path / "cache")
    s.embed([short[0], short[1]])
    s.similarity(short[0], short[1])
    s.embed(short[0])
    st = s.stats()
    assert st["embedded"] == 2 and st["engine_recordings"] == 2 and st["disk_hits"] == 0
    assert st["memory_hits"] == 3
    # A second instance on the same disk cache embeds nothing.
    s2 = SpeakerSim(model_dir=real_ckpt.parent, device=device, cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(s2.embed(short[0]), s.embed(short[0]))
    assert s2.stats()["embedded"] == 0 and s2.stats()["disk_hits"] == 1


@pytest.mark.weights
def test_a_changed_file_is_embedded_again(sim, short, ex, tmp_path):
    p = tmp_path / "x.wav"
    p.write_bytes(Path(short[2]).read_bytes())
    first = sim.embed(str(p))
    p.write_bytes(Path(ex["speaker1_a"]).read_bytes())  # same name, other speaker
    second = sim.embed(str(p))
    np.testing.assert_allclose(second, sim.embed(ex["speaker1_a"]), rtol=1e-5, atol=1e-6)
    assert _cos(first, second) < 0.5


@pytest.mark.weights
def test_similarity_is_the_score_commands_cosine(sim, ex):
    from speaker_sim_cli.pipeline import cosine_pairs

    same = sim.similarity(ex["speaker1_a"], ex["speaker1_b"])
    diff = sim.similarity(ex["speaker1_a"], ex["speaker2_a"])
    emb = sim.embed([ex["speaker1_a"], ex["speaker1_b"]])
    assert same == float(cosine_pairs(emb, np.array([0]), np.array([1]))[0])
    assert isinstance(same, float) and -1 <= diff < same <= 1
    assert round(same, 4) == 0.6668 and round(diff, 4) == 0.0670  # the README's demo table


@pytest.mark.weights
def test_waveforms_numpy_torch_and_resampled(sim, shared, short):
    import soundfile as sf
    import torch

    wave, _ = sf.read(short[0], dtype="float32")
    from_file = sim.embed(short[0])
    # Paths and arrays mixed keep their order; numpy and torch give the file's embedding.
    mixed = sim.embed([short[1], wave, torch.from_numpy(wave)])
    assert mixed.shape == (3, 192)
    assert _cos(mixed[0], sim.embed(short[1])) > 0.99999
    assert _cos(mixed[1], from_file) > 0.99999 and _cos(mixed[2], from_file) > 0.99999
    assert sim.embed(np.stack([wave, wave])).shape == (2, 192)  # (batch, samples)
    # A file at another rate, given as an array at its own rate, is resampled as the file is.
    hard = sorted((shared / "audio" / "dev_hard").glob("*/*.wav"))
    p8 = next(p for p in hard if sf.info(str(p)).samplerate == 8000)
    w8, r8 = sf.read(p8, dtype="float32", always_2d=True)
    assert _cos(sim.embed(w8[:, 0], sample_rate=r8), sim.embed(p8)) > 0.9999
    assert sim.stats()["arrays_embedded"] >= 5


@pytest.mark.weights
def test_bad_inputs_raise_naming_the_recording(sim, ex, tmp_path):
    from speaker_sim_cli.errors import AudioError

    with pytest.raises(AudioError, match=r"nope\.wav: file not found"):
        sim.embed([ex["speaker1_a"], str(tmp_path / "nope.wav")])
    (tmp_path / "text.wav").write_text("not audio")
    with pytest.raises(AudioError, match=r"text\.wav: "):
        sim.similarity(ex["speaker1_a"], str(tmp_path / "text.wav"))
    with pytest.raises(AudioError, match="too short"):
        sim.embed(np.ones(100, np.float32))
    with pytest.raises(AudioError, match="silent"):
        sim.embed(np.zeros(16000, np.float32))
    with pytest.raises(AudioError, match="NaN"):
        sim.embed(np.full(16000, np.nan, np.float32))
    with pytest.raises(ValueError, match="1-D"):
        sim.embed([np.zeros((10, 2, 2), np.float32)])


@pytest.mark.weights
def test_score_pairs_dataframe_and_file(sim, shared, ex, tmp_path, monkeypatch):
    a, b, c = ex["speaker1_a"], ex["speaker1_b"], ex["speaker2_a"]
    df = sim.score([(a, b, 1), (a, c, 0), (a, str(tmp_path / "gone.wav"), 0)])
    assert list(df.columns) == ["enrollment", "test", "label", "score", "error"]
    assert df.label.tolist() == [1, 0, 0]
    assert df.score[0] == pytest.approx(sim.similarity(a, b), abs=1e-12)
    assert np.isnan(df.score[2]) and df.error[2].endswith("gone.wav: file not found")
    assert df.error[0] is None and df.error[1] is None

    frame = pd.DataFrame({"enroll": [a, a], "test": [b, c]})
    df2 = sim.score(frame)
    assert "label" not in df2.columns
    np.testing.assert_allclose(df2.score, df.score[:2], atol=1e-12)

    # Relative items resolve against the current folder for in-memory trials.
    monkeypatch.chdir(Path(a).parent)
    df3 = sim.score([(Path(a).name, Path(b).name)])
    assert df3.score[0] == pytest.approx(df.score[0], abs=1e-12)

    # A trial file: the dev trials among the example recordings, against the reference
    # pipeline's scores.
    name = "dev_trials_campplus_zh_en_advanced.scores.csv"
    ref = pd.read_csv(shared / "fixtures" / "reference" / name)
    mine = ref.enrollment.str.contains("3dspeaker_examples") & ref.test.str.contains("3dspeaker")
    sub = ref[mine].reset_index(drop=True)
    assert len(sub) >= 10
    trials = tmp_path / "trials.csv"
    sub[["enrollment", "test", "label"]].to_csv(trials, index=False)
    got = sim.score(trials, root=shared)
    assert got.error.isna().all()
    assert got.label.tolist() == sub.label.tolist()
    assert np.abs(got.score.to_numpy() - sub.score.to_numpy()).max() < 5e-4


@pytest.mark.weights
def test_score_rejects_malformed_trials(sim, ex):
    from speaker_sim_cli.errors import UsageError

    with pytest.raises(UsageError, match="no trials"):
        sim.score([])
    with pytest.raises(UsageError, match="expected"):
        sim.score([(ex["speaker1_a"],)])
    with pytest.raises(UsageError, match="label"):
        sim.score([(ex["speaker1_a"], ex["speaker1_b"], 1), (ex["speaker1_a"], ex["speaker2_a"])])


@pytest.mark.weights
@pytest.mark.parametrize(("name", "least"), [("docs/api.md", 10), ("README.md", 4)])
def test_doc_examples_run(real_ckpt, shared, monkeypatch, name, least):
    """README.md and docs/api.md run as doctests from the repository root."""
    doc = REPO / name
    if shared.resolve() != (REPO.parent / "shared").resolve():
        pytest.skip("the examples read ../shared relative to the repository root")
    monkeypatch.chdir(REPO)
    res = doctest.testfile(str(doc), module_relative=False, optionflags=doctest.ELLIPSIS)
    assert res.failed == 0, f"{res.failed} of {res.attempted} examples of {name} failed"
    assert res.attempted >= least
