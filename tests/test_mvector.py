"""mvector checkpoints end to end, against mvector 1.1.7's own outputs (``fixtures/mvector``).

Front ends bit for bit (``frontend_*.npz``), resampling and loudness, every case's ``predict``
embeddings and ``contrast`` values through the engine from the trainer's folder and config,
``evaluate()``'s EER / MinDCF / threshold, the evaluation lists as a trial source, checkpoint
prefixes, the shipped-config fallback and its errors, and batch invariance per architecture on
``dev_hard``. The full 18-case parity and the per-architecture batch runs are ``slow``.

Comparisons with the stored fixtures (made on another CPU, torch 2.11) hold to bounds derived
from the measured spread of mvector itself and of this implementation across CPU kernels
(``ATEN_CPU_CAPABILITY``, numpy without AVX-512): docs/portability.md has the table. Comparisons
computed in one process (a padded batch against each row alone) stay exact or tight.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from speaker_sim_cli.audio.decode import load
from speaker_sim_cli.audio.features import compute_features
from speaker_sim_cli.audio.frontend import (
    MelSpectrogramConfig,
    MFCCConfig,
    MvectorFbankConfig,
    SpectrogramConfig,
)
from speaker_sim_cli.audio.kaiser import kaiser_best_resample
from speaker_sim_cli.audio.loudness import LoudnessError, normalize_loudness, normalize_recording
from speaker_sim_cli.engine.config import EngineConfig
from speaker_sim_cli.errors import AudioError, CheckpointMismatchError, UsageError
from speaker_sim_cli.io.mvector_lists import read_mvector_lists
from speaker_sim_cli.models.mvector_config import mvector_spec
from speaker_sim_cli.pipeline import Extractor
from speaker_sim_cli.scoring.mvector_eval import mvector_metrics

pytestmark = pytest.mark.shared

CASES = [
    "CAMPPlus_Fbank", "CAMPPlus_MFCC", "CAMPPlus_MelSpectrogram", "ERes2NetV2_Fbank",
    "ERes2NetV2_MelSpectrogram", "ERes2Net_Fbank", "ERes2Net_MelSpectrogram", "EcapaTdnn_Fbank",
    "EcapaTdnn_MFCC", "EcapaTdnn_MelSpectrogram", "EcapaTdnn_MelSpectrogramDefault",
    "EcapaTdnn_Spectrogram", "Res2Net_Fbank", "Res2Net_MelSpectrogram", "ResNetSE_Fbank",
    "ResNetSE_MelSpectrogram", "TDNN_Fbank", "TDNN_MelSpectrogram",
]  # fmt: skip
# In the fast tier: one case per front end, small networks.
FAST = {"TDNN_Fbank", "TDNN_MelSpectrogram", "EcapaTdnn_MFCC", "EcapaTdnn_Spectrogram"}
EVAL_CASES = ["CAMPPlus_Fbank", "EcapaTdnn_Fbank", "ERes2Net_Fbank"]
ARCHS = ["CAMPPlus", "EcapaTdnn", "ERes2Net", "ERes2NetV2", "Res2Net", "ResNetSE", "TDNN"]
RESAMPLED = ("derived_audio/resampled_22050_pcm16.wav", "derived_audio/stereo_44100_pcm16.flac")
FRONTENDS = {
    "Fbank": MvectorFbankConfig(num_mel_bins=80),
    "MFCC": MFCCConfig(),
    "MelSpectrogram": MelSpectrogramConfig(n_fft=1024, hop_length=320, win_length=1024,
                                           f_min=50.0, f_max=14000.0, n_mels=64),
    "MelSpectrogramDefault": MelSpectrogramConfig(),
    "Spectrogram": SpectrogramConfig(),
}  # fmt: skip
# Cross-machine bounds, about 5x the largest spread measured (docs/portability.md): across CPU
# kernels, of mvector itself and of this code, and against the fixtures made on another CPU.
FEAT_RL2 = 2e-5  # front-end features, relative L2 per recording (spread 3.5e-6)
WAVE_ABS = 4e-6  # decoded, resampled, -20 dB samples, max abs (spread 7.2e-7)
EMB_RL2 = 4e-3  # predict embeddings, relative L2 per recording (spread 7.9e-4)
CONTRAST_ABS = 6e-4  # contrast cosines, abs (spread 1.1e-4)


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def mv(shared: Path) -> Path:
    return shared / "fixtures" / "mvector"


def case_dirs(mv: Path, case: str) -> tuple[Path, Path]:
    """(trainer's best_model folder, config.yml) of a fixture case."""
    d = mv / "cases" / case
    info = json.loads((d / "info.json").read_text())
    return mv / info["model_dir"], d / "config.yml"


def input_path(shared: Path, mv: Path, name: str) -> Path:
    return mv / name if name.startswith("derived_audio/") else shared / "audio" / "vctk" / name


def extractor(mv: Path, case: str, **kw: object) -> Extractor:
    model_dir, config = case_dirs(mv, case)
    engine = EngineConfig(device="cpu", workers=0, **kw)  # type: ignore[arg-type]
    return Extractor("mvector", model_dir, engine, use_cache=False, model_config=config)


# -- front ends -------------------------------------------------------------------------------
def _padded(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(r) for r in rows])
    waves = torch.zeros(len(rows), int(lengths.max()))
    for i, r in enumerate(rows):
        waves[i, : len(r)] = r
    return waves, lengths


@pytest.mark.parametrize("tag", sorted(FRONTENDS))
def test_frontend_in_a_padded_batch(mv: Path, tag: str) -> None:
    """All 8 recordings as one padded batch: each row is that recording computed alone, bit
    for bit (one process), and mvector's features within FEAT_RL2 (another CPU's kernels).
    Zero-padding without the lengths (the padded frames in the time mean) fails that bound."""
    z = np.load(mv / f"frontend_{tag}.npz")
    rows = [torch.from_numpy(z[f"samples_{i}"]) for i in range(len(z["inputs"]))]
    waves, lengths = _padded(rows)
    feats, n = compute_features(waves, lengths, FRONTENDS[tag])
    unmasked, _ = compute_features(waves, None, FRONTENDS[tag])
    padded_rows = 0
    for i in range(len(rows)):
        ref = z[f"feat_{i}"]
        assert int(n[i]) == ref.shape[0]
        alone, _ = compute_features(rows[i][None], None, FRONTENDS[tag])
        np.testing.assert_array_equal(feats[i, : int(n[i])].numpy(), alone[0].numpy())
        assert rel_l2(feats[i, : int(n[i])].numpy(), ref) <= FEAT_RL2, i
        assert not feats[i, int(n[i]) :].any()
        if len(rows[i]) < waves.shape[1] - 8000:  # half a second or more of padding
            assert rel_l2(unmasked[i, : int(n[i])].numpy(), ref) > FEAT_RL2 * 10, i
            padded_rows += 1
    assert padded_rows == 4


def test_frontend_dims_and_frames() -> None:
    assert SpectrogramConfig().num_features == 201
    assert MelSpectrogramConfig().num_frames(16000) == 1 + 16000 // 200
    assert MFCCConfig(n_mfcc=20).num_features == 20
    with pytest.raises(ValueError, match="n_mfcc"):
        MFCCConfig(n_mfcc=200)


def test_decode_channel_mean_loudness_and_resampler(shared: Path, mv: Path) -> None:
    """Decoding as the front end says (channel mean, kaiser_best, -20 dB) gives mvector's
    samples within WAVE_ABS, 16 kHz (stereo and float32 included) and resampled alike (the
    mean of squares and resampy's float32 tap sums round differently per CPU). soxr instead of
    kaiser_best, or no loudness normalisation, misses the bound by orders of magnitude."""
    z = np.load(mv / "frontend_Fbank.npz")
    for i, name in enumerate(z["inputs"]):
        path = input_path(shared, mv, str(name))
        wav = load(path, 16000, "mean", resampler="kaiser_best")
        got, ref = normalize_recording(wav, -20), z[f"samples_{i}"]
        assert got.shape == ref.shape and got.dtype == np.float32
        assert np.abs(got - ref).max() <= WAVE_ABS, name
        assert np.abs(wav - ref).max() > 100 * WAVE_ABS, name  # without -20 dB
        if str(name) in RESAMPLED:
            soxr = normalize_recording(load(path, 16000, "mean", resampler="soxr"), -20)
            n = min(len(soxr), len(ref))
            assert np.abs(soxr[:n] - ref[:n]).max() > 100 * WAVE_ABS, name


def test_kaiser_polyphase_matches_direct_form() -> None:
    from speaker_sim_cli.audio import kaiser

    x = np.random.default_rng(0).standard_normal(5000).astype(np.float32)
    for rate in (44100, 22050, 8000, 48000):
        fast = kaiser.kaiser_best_resample(x, rate, 16000)
        n_out = int(len(x) * 16000 / rate)
        slow = kaiser._resample_taps(x, 16000 / rate, n_out)
        assert fast.shape == slow.shape == (n_out,)
        assert np.abs(fast - slow).max() < 1e-5
    with pytest.raises(ValueError, match="too few"):
        kaiser_best_resample(np.ones(1, np.float32), 48000, 16000)


def test_loudness_batch_matches_per_recording_and_cap() -> None:
    rng = np.random.default_rng(1)
    a = (0.3 * rng.standard_normal(3000)).astype(np.float32)
    b = (0.01 * rng.standard_normal(1000)).astype(np.float32)
    waves = torch.zeros(2, 3000)
    waves[0], waves[1, :1000] = torch.from_numpy(a), torch.from_numpy(b)
    out = normalize_loudness(waves, torch.tensor([3000, 1000]), -20.0)
    np.testing.assert_allclose(out[0].numpy(), normalize_recording(a, -20), rtol=1e-5)
    np.testing.assert_allclose(out[1, :1000].numpy(), normalize_recording(b, -20), rtol=1e-5)
    assert not out[1, 1000:].any()
    tiny = np.full(100, 1e-20, dtype=np.float32)  # -400 dB: needs 380 dB of gain
    with pytest.raises(AudioError, match="300 dB"):
        normalize_recording(tiny, -20)
    waves[1, :100], waves[1, 100:] = 1e-20, 0
    with pytest.raises(LoudnessError, match="row 1"):
        normalize_loudness(waves, torch.tensor([3000, 100]), -20.0)


def test_too_quiet_recording_fails_alone(shared: Path, mv: Path, tmp_path: Path) -> None:
    import soundfile as sf

    quiet = tmp_path / "quiet.wav"
    sf.write(quiet, np.full(16000, 1e-20, dtype=np.float32), 16000, subtype="FLOAT")
    good = shared / "audio" / "vctk" / "p225" / "p225_003.wav"
    res = extractor(mv, "TDNN_Fbank").embed_paths([str(good), str(quiet)])
    assert str(good) in res.embeddings
    assert "300 dB" in res.failures[str(quiet)]


def test_recording_under_the_backbones_minimum_fails_alone(
    shared: Path, mv: Path, tmp_path: Path
) -> None:
    """TDNN takes at least 15 frames. With --min-duration 0 a 0.1 s crop (8 frames) batched
    with real recordings fails with the reason, on both backends, and costs the others nothing
    (before, the network raised and the whole batch failed)."""
    import soundfile as sf

    good = [shared / "audio" / "vctk" / "p225" / f"p225_{i:03d}.wav" for i in (3, 8, 11)]
    wav, sr = sf.read(good[0], dtype="float32")
    short = tmp_path / "short.wav"
    sf.write(short, wav[sr : sr + sr // 10], sr)
    paths = [str(p) for p in (*good, short)]
    ref = extractor(mv, "TDNN_Fbank").embed_paths([str(p) for p in good])
    for backend in ("torch", "onnxruntime"):
        ex = extractor(mv, "TDNN_Fbank", min_duration=0.0, backend=backend, batch_size=8)
        ex.cache_root = tmp_path / "cache"
        res = ex.embed_paths(paths)
        assert ex.backend == backend and ex.embedder.stats.batches >= 1
        assert set(res.embeddings) == {str(p) for p in good}, res.failures
        assert "too short for this model: under 15 feature frames" in res.failures[str(short)]
        for p in good:
            a, b = res.embeddings[str(p)], ref.embeddings[str(p)]
            assert np.linalg.norm(a - b) <= 1e-4 * np.linalg.norm(b)


# -- parity on every case ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "case", [c if c in FAST else pytest.param(c, marks=pytest.mark.slow) for c in CASES]
)
def test_predict_parity(shared: Path, mv: Path, case: str) -> None:
    """mvector's ``predict`` of all 9 inputs from the trainer's folder and config: relative L2
    <= EMB_RL2 (16 kHz, stereo, float32 and resampled alike); the ``contrast`` pairs; the
    threshold from model.state."""
    z = np.load(mv / "cases" / case / "reference.npz")
    ex = extractor(mv, case)
    paths = [str(input_path(shared, mv, str(n))) for n in z["inputs"]]
    res = ex.embed_paths(paths)
    assert not res.failures
    emb = np.stack([res.embeddings[p] for p in paths])
    for name, got, ref in zip(z["inputs"], emb, z["emb_predict"]):
        assert rel_l2(got, ref) <= EMB_RL2, name
    for (i, j), want in zip(z["contrast_pairs"], z["contrast"]):
        assert abs(cosine(emb[i], emb[j]) - want) <= CONTRAST_ABS
    state = json.loads((case_dirs(mv, case)[0] / "model.state").read_text())
    assert ex.spec.threshold == state["threshold"]
    assert ex.spec.dim == z["emb_predict"].shape[1]


def _variant_embedder(mv: Path, case: str) -> Any:
    """``embed(path, resampler=..., loudness=...)``: one recording through the case's network,
    decoded as told (the right way or a known wrong one)."""
    from speaker_sim_cli.models.weights import load_spec_checkpoint

    ex = extractor(mv, case)
    module = ex.spec.build()
    load_spec_checkpoint(module, ex.found.path, ex.spec)
    module.eval()

    def embed(path: Path, resampler: str = "kaiser_best", loudness: bool = True) -> np.ndarray:
        wav = load(path, 16000, "mean", resampler=resampler)
        if loudness:
            wav = normalize_recording(wav, -20)
        feats, n = compute_features(torch.from_numpy(wav)[None], None, ex.spec.frontend)
        with torch.no_grad():
            return module(feats, n)[0].numpy()

    return embed


def test_the_bound_catches_the_wrong_variants(shared: Path, mv: Path) -> None:
    """EMB_RL2 passes the right decoding and fails the known wrong ones tenfold: soxr instead
    of resampy's kaiser_best on the 22.05 / 44.1 kHz inputs (CAM++ on Fbank: relative L2
    0.16-0.19, cosine 0.98), and no -20 dB loudness normalisation (linear mel power scales with
    the gain: 2.7-3.2; a log front end's mean subtraction hides the gain). On linear-power
    front ends soxr moves embeddings by only 1.5e-3-3.4e-3; the decode test's WAVE_ABS catches
    it there at the samples."""
    for case, wrong in (("CAMPPlus_Fbank", {"resampler": "soxr"}),
                        ("TDNN_MelSpectrogram", {"loudness": False})):  # fmt: skip
        embed = _variant_embedder(mv, case)
        z = np.load(mv / "cases" / case / "reference.npz")
        names = [str(n) for n in z["inputs"]]
        picked = RESAMPLED if "resampler" in wrong else names[:2]
        for name in picked:
            ref = z["emb_predict"][names.index(name)]
            path = input_path(shared, mv, name)
            assert rel_l2(embed(path), ref) <= EMB_RL2, (case, name)
            err = rel_l2(embed(path, **wrong), ref)
            assert err > 10 * EMB_RL2, (case, name, wrong, err)


# -- evaluation -------------------------------------------------------------------------------
@pytest.mark.parametrize("case", EVAL_CASES)
def test_eval_metrics_reproduce_mvector(mv: Path, case: str) -> None:
    z = np.load(mv / "cases" / case / "reference.npz")
    m = mvector_metrics(z["eval_scores"], z["eval_labels"])
    assert m.eer == pytest.approx(float(z["eval_eer"]), abs=1e-12)
    assert m.min_dcf == pytest.approx(float(z["eval_min_dcf"]), abs=1e-12)
    assert m.threshold == float(z["eval_threshold"])
    lists = mv / "cases" / case / "eval_lists"
    tl = read_mvector_lists(lists / "enroll_list.txt", lists / "trials_list.txt")
    assert tl.labels is not None and len(tl) == len(z["eval_labels"])
    assert int(tl.labels.sum()) == int(z["eval_labels"].sum())


def test_eval_lists_are_trial_major(tmp_path: Path) -> None:
    (tmp_path / "e.txt").write_text("a.wav\t0\nb.wav\t1\n")
    (tmp_path / "t.txt").write_text("x.wav\t1\ny.wav\t0\nz.wav\t2\n")
    tl = read_mvector_lists(tmp_path / "e.txt", tmp_path / "t.txt")
    assert list(zip(tl.enroll, tl.test)) == [("a.wav", "x.wav"), ("b.wav", "x.wav"),
                                             ("a.wav", "y.wav"), ("b.wav", "y.wav"),
                                             ("a.wav", "z.wav"), ("b.wav", "z.wav")]  # fmt: skip
    assert tl.labels is not None and tl.labels.tolist() == [0, 1, 1, 0, 0, 0]
    (tmp_path / "bad.txt").write_text("a.wav 0\n")
    with pytest.raises(UsageError, match=r"bad.txt:1: expected 'path<TAB>speaker-id'"):
        read_mvector_lists(tmp_path / "bad.txt", tmp_path / "t.txt")


def test_score_mvector_lists_cli(mv: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from speaker_sim_cli.cli.main import app

    case = "EcapaTdnn_Fbank"
    model_dir, config = case_dirs(mv, case)
    lists = mv / "cases" / case / "eval_lists"
    out, report = tmp_path / "s.csv", tmp_path / "r.json"
    r = CliRunner().invoke(app, [
        "score", "--mvector-lists", str(lists / "enroll_list.txt"), str(lists / "trials_list.txt"),
        "--model", "mvector", "--model-dir", str(model_dir), "--model-config", str(config),
        "--device", "cpu", "--no-cache", "-o", str(out), "--report", str(report), "-q",
    ])  # fmt: skip
    assert r.exit_code == 0, r.output
    import pandas as pd

    df = pd.read_csv(out)
    assert len(df) == 64 and df["label"].sum() == 16
    doc = json.loads(report.read_text())
    m = mvector_metrics(df["score"].to_numpy(), df["label"].to_numpy())
    assert doc["mvector"]["threshold"] == pytest.approx(m.threshold, abs=1e-6)
    assert doc["mvector"]["eer"] == pytest.approx(doc["metrics"]["eer"], abs=1e-9)
    assert doc["model"]["id"] == "mvector/EcapaTdnn_Fbank"


# -- loading what the user has ----------------------------------------------------------------
def test_missing_or_mismatched_config_errors(mv: Path, tmp_path: Path) -> None:
    mel_dir, mel_cfg = case_dirs(mv, "TDNN_MelSpectrogram")
    with pytest.raises(UsageError, match=r"feature_method MelSpectrogram.*--model-config"):
        mvector_spec(mel_dir, None)
    fb_dir, _ = case_dirs(mv, "TDNN_Fbank")
    with pytest.raises(UsageError, match=r"says model_conf.model EcapaTdnn but .*model.state"):
        mvector_spec(fb_dir, case_dirs(mv, "EcapaTdnn_Fbank")[1])
    with pytest.raises(UsageError, match=r"did you mean .*best_model"):
        mvector_spec(fb_dir.parent, None)
    with pytest.raises(UsageError, match="needs --model-dir"):
        mvector_spec(None, mel_cfg)
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(fb_dir / "model.pth", bare / "model.pth")
    with pytest.raises(UsageError, match=r"no model\.state and no --model-config"):
        mvector_spec(bare, None)
    # The Fbank fallback is mvector's shipped tdnn.yml: full-size, so this tiny checkpoint does
    # not fit, and the error names the file, the config used and the keys.
    ex = Extractor("mvector", fb_dir, EngineConfig(device="cpu"), use_cache=False)
    assert "shipped tdnn.yml" in ex.spec.trained_on
    with pytest.raises(CheckpointMismatchError, match=r"model.pth .*shipped tdnn.yml.*shape"):
        ex.load()
    bad_cfg = tmp_path / "config.yml"
    bad_cfg.write_text(mel_cfg.read_text().replace("n_mels: 64", "n_mels: 48"))
    ex = Extractor("mvector", mel_dir, EngineConfig(device="cpu"), use_cache=False,
                   model_config=bad_cfg)  # fmt: skip
    with pytest.raises(CheckpointMismatchError, match=rf"{bad_cfg.name}.*shape"):
        ex.load()
    with pytest.raises(UsageError, match="--model-config is read for mvector"):
        Extractor("campplus-zh-en", None, model_config=bad_cfg)


def test_shipped_config_fallback_and_prefixes(shared: Path, tmp_path: Path) -> None:
    """An Fbank checkpoint without its yml runs on mvector's shipped config for its model;
    ``_orig_mod.`` / ``module.`` prefixes are stripped and the classifier dropped."""
    from speaker_sim_cli.models.mvector import build_backbone

    torch.manual_seed(0)
    net = build_backbone("TDNN", 80, {"embd_dim": 192, "channels": 512, "pooling_type": "ASP"})
    for m in net.modules():  # BatchNorm statistics that are not the identity
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    net.eval()
    state = {f"_orig_mod.0.{k}": v for k, v in net.state_dict().items()}
    state["_orig_mod.1.weight"] = torch.randn(10, 192)  # the Cosine classifier
    d = tmp_path / "models" / "TDNN_Fbank" / "best_model"
    d.mkdir(parents=True)
    torch.save(state, d / "model.pth")
    (d / "model.state").write_text(json.dumps(
        {"model_conf.model": "TDNN", "feature_method": "Fbank", "threshold": 0.42}))  # fmt: skip
    wav = shared / "audio" / "vctk" / "p226" / "p226_003.wav"
    ex = Extractor("mvector", d, EngineConfig(device="cpu", workers=0), use_cache=False)
    assert ex.spec.threshold == 0.42 and ex.spec.dim == 192
    got = ex.embed_paths([str(wav)]).embeddings[str(wav)]
    x = normalize_recording(load(wav, 16000, "mean"), -20)
    feats, n = compute_features(torch.from_numpy(x)[None], None, ex.spec.frontend)
    with torch.no_grad():
        want = net(feats, n)[0].numpy()
    assert rel_l2(got, want) <= 1e-5


def test_cache_key_has_config_and_checkpoint(mv: Path, tmp_path: Path) -> None:
    model_dir, config = case_dirs(mv, "TDNN_Fbank")
    a = Extractor("mvector", model_dir, model_config=config, use_cache=False).ingredients()
    other = tmp_path / "config.yml"
    other.write_text(config.read_text().replace("channels: 64", "channels: 65"))
    b = Extractor("mvector", model_dir, model_config=other, use_cache=False).ingredients()
    assert a["arch"] != b["arch"] and a["checkpoint_sha256"] == b["checkpoint_sha256"]
    assert a["frontend"]["kind"] == "mvector_fbank" and a["frontend"]["loudness_db"] == -20.0
    assert a["frontend"]["channel"] == "mean" and a["frontend"]["resampler"] == "kaiser_best"


# -- batch invariance per architecture --------------------------------------------------------
@pytest.fixture(scope="module")
def dev_hard_waves(shared: Path) -> list[torch.Tensor]:
    from speaker_sim_cli.audio.formats import is_audio_path

    files = sorted(p for p in (shared / "audio" / "dev_hard").rglob("*") if is_audio_path(p))
    assert len(files) == 80
    files = files[::2][:32]  # every format and speaker; one batch of 32 vs 32 batches of 1
    return [
        torch.from_numpy(normalize_recording(load(p, 16000, "mean", resampler="kaiser_best"), -20))
        for p in files
    ]


@pytest.mark.parametrize(
    "arch", [a if a == "TDNN" else pytest.param(a, marks=pytest.mark.slow) for a in ARCHS]
)
def test_batch_invariance_dev_hard(mv: Path, dev_hard_waves: list[torch.Tensor], arch: str) -> None:
    """Batches of 32 (padded, mixed lengths) give each recording's batch-of-1 embedding."""
    from speaker_sim_cli.engine.embedder import Embedder

    ex = extractor(mv, f"{arch}_Fbank")
    module = ex.spec.build()
    from speaker_sim_cli.models.weights import load_spec_checkpoint

    load_spec_checkpoint(module, ex.found.path, ex.spec)
    one = Embedder(ex.spec, module, EngineConfig(device="cpu", batch_size=1, runners=1))
    many = Embedder(ex.spec, module, EngineConfig(device="cpu", batch_size=32,
                                                  batch_frames=10**7, runners=1))  # fmt: skip
    e1, e32 = one.embed_waves(dev_hard_waves), many.embed_waves(dev_hard_waves)
    worst = max(rel_l2(a, b) for a, b in zip(e32, e1))
    assert worst <= 1e-4, worst


def test_models_lists_the_family() -> None:
    from typer.testing import CliRunner

    from speaker_sim_cli.cli.main import app

    r = CliRunner().invoke(app, ["models"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert "--model mvector --model-dir" in r.output and "--model-config" in r.output
