"""CAM++ architecture: fixture parity with 3D-Speaker, batch invariance, real checkpoint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from speaker_sim_cli.models.campplus import CAMPPlus, _segment_means

ARCHS = {"campplus192": 192, "campplus512": 512}
TOL = 1e-4


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def load_fixture(shared: Path, arch: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    data = np.load(shared / "fixtures" / "arch" / f"{arch}.npz")
    n = sum(1 for k in data.files if k.startswith("feats_"))
    feats = [torch.from_numpy(data[f"feats_{i}"]).float() for i in range(n)]
    embs = [torch.from_numpy(data[f"emb_{i}"]).float() for i in range(n)]
    return feats, embs


def pad_batch(feats: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([f.shape[0] for f in feats], dtype=torch.int64)
    batch = torch.zeros(len(feats), int(lengths.max()), feats[0].shape[1])
    for i, f in enumerate(feats):
        batch[i, : f.shape[0]] = f
    return batch, lengths


@pytest.fixture(scope="module", params=list(ARCHS))
def synth_model(request: pytest.FixtureRequest, synth_state_dict) -> tuple[str, CAMPPlus]:
    arch = request.param
    model = CAMPPlus(feat_dim=80, embedding_size=ARCHS[arch])
    model.load_state_dict(synth_state_dict(arch), strict=True)
    return arch, model.eval()


def test_state_dict_keys_match_schema_order(shared: Path) -> None:
    import json

    for arch, dim in ARCHS.items():
        schema = json.loads((shared / "fixtures" / "arch" / f"{arch}.schema.json").read_text())
        ours = [(k, list(v.shape)) for k, v in CAMPPlus(embedding_size=dim).state_dict().items()]
        assert ours == [(k, shape) for k, shape, _ in schema]


@torch.no_grad()
def test_fixture_parity(shared: Path, synth_model: tuple[str, CAMPPlus]) -> None:
    arch, model = synth_model
    feats, embs = load_fixture(shared, arch)
    assert len(feats) >= 4
    errors = [rel_l2(model(f[None])[0], e) for f, e in zip(feats, embs, strict=True)]
    assert max(errors) <= TOL, f"{arch}: relative L2 errors {errors}"


@torch.no_grad()
def test_batch_invariance_on_fixtures(shared: Path, synth_model: tuple[str, CAMPPlus]) -> None:
    arch, model = synth_model
    feats, _ = load_fixture(shared, arch)
    singles = [model(f[None])[0] for f in feats]
    batch, lengths = pad_batch(feats)
    out = model(batch, lengths)
    assert out.shape == (len(feats), ARCHS[arch])
    errors = [rel_l2(out[i], singles[i]) for i in range(len(feats))]
    assert max(errors) <= TOL, f"{arch}: relative L2 errors {errors}"


@torch.no_grad()
def test_batch_invariance_edge_lengths(synth_model: tuple[str, CAMPPlus]) -> None:
    """Odd/even lengths (time stride 2) and lengths around the 100-frame segment boundaries."""
    _, model = synth_model
    gen = torch.Generator().manual_seed(0)
    lengths = [3, 4, 199, 200, 201, 202, 399, 401, 250]
    feats = [torch.randn(n, 80, generator=gen) for n in lengths]
    feats = [f - f.mean(dim=0) for f in feats]
    batch, lens = pad_batch(feats)
    out = model(batch, lens)
    for i, f in enumerate(feats):
        assert rel_l2(out[i], model(f[None])[0]) <= TOL, f"length {lengths[i]}"


@torch.no_grad()
def test_lengths_none_equals_full_lengths(shared: Path, synth_model: tuple[str, CAMPPlus]) -> None:
    arch, model = synth_model
    feats, _ = load_fixture(shared, arch)
    batch, _ = pad_batch(feats)
    full = torch.full((batch.shape[0],), batch.shape[1], dtype=torch.int64)
    torch.testing.assert_close(model(batch), model(batch, full), rtol=1e-5, atol=1e-6)


def test_garbage_in_padding_is_ignored() -> None:
    """Whatever the caller leaves past a row's length must not matter."""
    torch.manual_seed(0)
    model = CAMPPlus().eval()
    feats = torch.randn(2, 150, 80)
    lengths = torch.tensor([150, 97])
    noisy = feats.clone()
    noisy[1, 97:] = 1e3
    with torch.no_grad():
        torch.testing.assert_close(model(noisy, lengths), model(feats, lengths))


def test_segment_means_match_ceil_mode_avg_pool() -> None:
    torch.manual_seed(0)
    for frames in (1, 99, 100, 101, 250, 300):
        x = torch.randn(2, 3, frames)
        expected = F.avg_pool1d(x, kernel_size=100, stride=100, ceil_mode=True)
        torch.testing.assert_close(_segment_means(x, None, 100), expected)
        # the same rows zero-padded to a longer batch, with lengths
        padded = F.pad(x, (0, 77))
        got = _segment_means(padded, torch.tensor([frames, frames]), 100)
        torch.testing.assert_close(got[..., : expected.shape[-1]], expected)


def test_rejects_bad_shapes() -> None:
    model = CAMPPlus().eval()
    with pytest.raises(ValueError, match="feats"):
        model(torch.zeros(1, 50, 40))
    with pytest.raises(ValueError, match="lengths"):
        model(torch.zeros(2, 50, 80), torch.tensor([50]))


@pytest.mark.weights
def test_real_checkpoint_loads_strict(real_ckpt: Path) -> None:
    state = torch.load(real_ckpt, map_location="cpu", weights_only=True)
    model = CAMPPlus(feat_dim=80, embedding_size=192)
    model.load_state_dict(state, strict=True)
    model.eval()
    with torch.no_grad():
        emb = model(torch.randn(1, 200, 80))
    assert emb.shape == (1, 192)
    assert torch.isfinite(emb).all()


# fbank fixture rows -> the recordings they were computed from (fixtures/frontend/fbank.npz)
FBANK_SOURCES = {
    0: "audio/speechbrain_samples/spk1_snt1.wav",
    1: "audio/3dspeaker_examples/speaker1_a_cn_16k.wav",
    2: "audio/vctk/p226/p226_003.wav",
    3: "audio/vctk/p228/p228_011.wav",
}


@pytest.mark.weights
@torch.no_grad()
def test_real_checkpoint_reproduces_reference_embeddings(shared: Path, real_ckpt: Path) -> None:
    """Fixture fbank -> real weights gives 3D-Speaker's reference embeddings, alone and batched."""
    import soundfile as sf

    model = CAMPPlus()
    model.load_state_dict(torch.load(real_ckpt, map_location="cpu", weights_only=True))
    model.eval()
    fbank = np.load(shared / "fixtures" / "frontend" / "fbank.npz")
    ref = np.load(shared / "fixtures" / "reference" / "campplus_zh_en_advanced.npz")
    feats, refs = [], []
    for i, rel in FBANK_SOURCES.items():
        wav, _ = sf.read(shared / rel, dtype="float32", always_2d=True)
        assert np.array_equal(wav[:, 0], fbank[f"wav_{i}"]), f"fbank_{i} is not {rel}"
        fb = torch.from_numpy(fbank[f"fbank_{i}"])
        feats.append(fb - fb.mean(dim=0))
        refs.append(torch.from_numpy(ref[rel]).float())
    for f, r in zip(feats, refs, strict=True):
        assert rel_l2(model(f[None])[0], r) <= TOL
    batch, lengths = pad_batch(feats)
    out = model(batch, lengths)
    for i, r in enumerate(refs):
        assert rel_l2(out[i], r) <= TOL
