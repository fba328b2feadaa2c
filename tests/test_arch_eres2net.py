"""ERes2Net family: fixture parity with 3D-Speaker and batch (padding) invariance."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from speaker_sim_cli.models.eres2net import ERes2Net, ERes2NetHuge

TOL = 1e-4

# fixture arch -> (class, constructor kwargs)
ARCHS: dict[str, tuple[type[torch.nn.Module], dict[str, Any]]] = {
    "eres2net_vox": (ERes2Net, {"feat_dim": 80, "embedding_size": 192, "m_channels": 32}),
    "eres2net_base512": (ERes2Net, {"feat_dim": 80, "embedding_size": 512, "m_channels": 32}),
    "eres2net_large512": (ERes2Net, {"feat_dim": 80, "embedding_size": 512, "m_channels": 64}),
    "eres2net_huge192": (ERes2NetHuge, {"feat_dim": 80, "embedding_size": 192, "m_channels": 64}),
}
# Each of these takes well over 10 s on a 2-core CPU; they still run in CI.
SLOW = {"eres2net_large512", "eres2net_huge192"}
ARCH_PARAMS = [pytest.param(a, marks=pytest.mark.slow) if a in SLOW else a for a in ARCHS]


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).norm() / b.norm()).detach())


@dataclass
class Case:
    model: torch.nn.Module
    feats: list[torch.Tensor]
    refs: list[torch.Tensor]
    alone: list[torch.Tensor]


_CACHE: dict[str, Case] = {}


@pytest.fixture(scope="module")
def case(shared: Path, synth_state_dict):
    """Function arch -> Case: the model with synthetic weights, fixture data, lone embeddings."""

    def build(arch: str) -> Case:
        if arch not in _CACHE:
            cls, kwargs = ARCHS[arch]
            model = cls(**kwargs)
            model.load_state_dict(synth_state_dict(arch), strict=True)
            model.eval()
            data = np.load(shared / "fixtures" / "arch" / f"{arch}.npz")
            n = len([k for k in data.files if k.startswith("feats_")])
            feats = [torch.from_numpy(data[f"feats_{i}"]) for i in range(n)]
            refs = [torch.from_numpy(data[f"emb_{i}"]) for i in range(n)]
            with torch.no_grad():
                alone = [model(f[None])[0] for f in feats]
            _CACHE[arch] = Case(model, feats, refs, alone)
        return _CACHE[arch]

    return build


def pad(feats: list[torch.Tensor], fill: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([f.shape[0] for f in feats], dtype=torch.int64)
    x = torch.full((len(feats), int(lengths.max()), feats[0].shape[1]), fill)
    for i, f in enumerate(feats):
        x[i, : f.shape[0]] = f
    return x, lengths


@pytest.mark.parametrize("arch", ARCH_PARAMS)
def test_state_dict_matches_schema(shared: Path, arch: str) -> None:
    import json

    schema = json.loads((shared / "fixtures" / "arch" / f"{arch}.schema.json").read_text())
    cls, kwargs = ARCHS[arch]
    got = [(k, list(v.shape)) for k, v in cls(**kwargs).state_dict().items()]
    assert got == [(k, list(s)) for k, s, _ in schema]


@pytest.mark.parametrize("arch", ARCH_PARAMS)
def test_fixture_parity(case, arch: str) -> None:
    c = case(arch)
    assert len(c.feats) == 4
    for i, (emb, ref) in enumerate(zip(c.alone, c.refs, strict=True)):
        assert emb.shape == ref.shape
        err = rel_l2(emb, ref)
        assert err <= TOL, f"{arch} utt {i}: relative L2 {err:.3g}"


@pytest.mark.parametrize("arch", ARCH_PARAMS)
def test_batch_invariance(case, arch: str) -> None:
    c = case(arch)
    x, lengths = pad(c.feats)
    assert int(lengths.min()) < int(lengths.max())
    with torch.no_grad():
        batch = c.model(x, lengths)
    errs = [rel_l2(batch[i], c.alone[i]) for i in range(len(c.feats))]
    assert max(errs) <= TOL, f"{arch}: relative L2 per row {errs}"


@pytest.fixture(scope="module")
def tiny() -> dict[str, torch.nn.Module]:
    """Small seeded models (no shared data) for the masking edge cases, both block types."""
    torch.manual_seed(0)
    models: dict[str, torch.nn.Module] = {
        "eres2net": ERes2Net(embedding_size=16, m_channels=8),
        "huge": ERes2NetHuge(embedding_size=16, m_channels=8),
    }
    for m in models.values():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):  # non-trivial BN so biases leak
                torch.nn.init.normal_(mod.bias, 0.0, 0.3)
                torch.nn.init.normal_(mod.running_mean, 0.0, 0.3)
        m.eval()
    return models


@pytest.mark.parametrize("which", ["eres2net", "huge"])
@pytest.mark.parametrize("length", [9, 57, 58, 64])
def test_odd_and_even_lengths(tiny, which: str, length: int) -> None:
    """Stride-2 stages round up (ceil(L/2)); odd, even and power-of-two lengths all hold."""
    model = tiny[which]
    g = torch.Generator().manual_seed(length)
    short = torch.randn(length, 80, generator=g)
    long = torch.randn(101, 80, generator=g)
    x, lengths = pad([short, long])
    with torch.no_grad():
        alone = model(short[None])[0]
        batch = model(x, lengths)
        unmasked = model(x)
        long_alone = model(long[None])[0]
    assert rel_l2(batch[0], alone) <= TOL
    assert rel_l2(batch[1], long_alone) <= TOL
    # Sanity check that this test can fail: ignoring lengths shifts the padded row.
    assert rel_l2(unmasked[0], alone) > 1e-3


@pytest.mark.parametrize("fill", [3.0, float("nan")])
def test_padding_content_is_ignored(tiny, fill: float) -> None:
    """Garbage (not zeros, even NaN) past the valid length changes nothing given lengths."""
    model = tiny["eres2net"]
    g = torch.Generator().manual_seed(1)
    feats = [torch.randn(n, 80, generator=g) for n in (40, 77, 120)]
    x, lengths = pad(feats, fill=fill)
    with torch.no_grad():
        batch = model(x, lengths)
        for i, f in enumerate(feats):
            assert rel_l2(batch[i], model(f[None])[0]) <= TOL


@pytest.mark.parametrize("which", ["eres2net", "huge"])
def test_none_lengths_equal_full_lengths(tiny, which: str) -> None:
    model = tiny[which]
    x = torch.randn(2, 123, 80, generator=torch.Generator().manual_seed(2))
    full = torch.full((2,), 123, dtype=torch.int64)
    with torch.no_grad():
        a = model(x)
        b = model(x, full)
    assert a.shape == (2, 16)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_huge_differs_in_block_shape() -> None:
    m = ERes2NetHuge()
    block = m.layer3[0]
    assert len(block.convs) == 3 and block.fuse_models is not None
    assert len(block.fuse_models) == 2
    assert m.seg_1.in_features == 2 * 10 * 64 * 4 * 8
