"""ECAPA-TDNN: fixture parity with 3D-Speaker and batch (padding) invariance."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from speaker_sim_cli.models.ecapa import ECAPATDNN, _reflect_index

TOL = 1e-4
ARCH = "ecapa1024"
KWARGS: dict[str, Any] = {
    "input_size": 80,
    "lin_neurons": 192,
    "channels": [1024, 1024, 1024, 1024, 3072],
}


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@dataclass
class Case:
    model: ECAPATDNN
    feats: list[torch.Tensor]
    refs: list[torch.Tensor]
    alone: list[torch.Tensor]


@pytest.fixture(scope="module")
def case(shared: Path, synth_state_dict) -> Case:
    """The model with synthetic weights, fixture data and each utterance's lone embedding."""
    model = ECAPATDNN(**KWARGS)
    model.load_state_dict(synth_state_dict(ARCH), strict=True)
    model.eval()
    data = np.load(shared / "fixtures" / "arch" / f"{ARCH}.npz")
    n = len([k for k in data.files if k.startswith("feats_")])
    feats = [torch.from_numpy(data[f"feats_{i}"]) for i in range(n)]
    refs = [torch.from_numpy(data[f"emb_{i}"]) for i in range(n)]
    with torch.no_grad():
        alone = [model(f[None])[0] for f in feats]
    return Case(model, feats, refs, alone)


def pad(feats: list[torch.Tensor], fill: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([f.shape[0] for f in feats], dtype=torch.int64)
    x = torch.full((len(feats), int(lengths.max()), feats[0].shape[1]), fill)
    for i, f in enumerate(feats):
        x[i, : f.shape[0]] = f
    return x, lengths


def test_state_dict_matches_schema(shared: Path) -> None:
    schema = json.loads((shared / "fixtures" / "arch" / f"{ARCH}.schema.json").read_text())
    got = [(k, list(v.shape)) for k, v in ECAPATDNN(**KWARGS).state_dict().items()]
    assert got == [(k, list(s)) for k, s, _ in schema]


def test_fixture_parity(case: Case) -> None:
    assert len(case.feats) == 4
    for i, (emb, ref) in enumerate(zip(case.alone, case.refs, strict=True)):
        assert emb.shape == ref.shape
        err = rel_l2(emb, ref)
        assert err <= TOL, f"{ARCH} utt {i}: relative L2 {err:.3g}"


def test_batch_invariance(case: Case) -> None:
    x, lengths = pad(case.feats)
    assert int(lengths.min()) < int(lengths.max())
    with torch.no_grad():
        batch = case.model(x, lengths)
    errs = [rel_l2(batch[i], case.alone[i]) for i in range(len(case.feats))]
    assert max(errs) <= TOL, f"{ARCH}: relative L2 per row {errs}"


def test_padding_content_is_ignored(case: Case) -> None:
    """Garbage (not zeros) past the valid length changes nothing when lengths are given."""
    x, lengths = pad(case.feats, fill=3.0)
    with torch.no_grad():
        batch = case.model(x, lengths)
    for i in range(len(case.feats)):
        assert rel_l2(batch[i], case.alone[i]) <= TOL


def test_padding_without_lengths_changes_short_rows(case: Case) -> None:
    """Sanity check that the invariance test can fail: ignoring lengths shifts padded rows."""
    x, lengths = pad(case.feats)
    with torch.no_grad():
        batch = case.model(x)
    shortest = int(lengths.argmin())
    assert rel_l2(batch[shortest], case.alone[shortest]) > 1e-2


def test_none_lengths_equal_full_lengths(case: Case) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 123, 80)
    full = torch.full((2,), 123, dtype=torch.int64)
    with torch.no_grad():
        a = case.model(x)
        b = case.model(x, full)
    assert a.shape == (2, 192)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pad_width", [1, 2, 4])
def test_reflect_index_matches_f_pad_per_row(pad_width: int) -> None:
    """Per-row reflect padding equals F.pad(mode='reflect') on each row cut to its length."""
    torch.manual_seed(pad_width)
    x = torch.randn(3, 2, 17)
    lengths = torch.tensor([17, 9, pad_width + 1])
    idx = _reflect_index(lengths, x.shape[-1], pad_width)
    padded = x.gather(-1, idx[:, None, :].expand(3, 2, -1))
    for i, n in enumerate(lengths.tolist()):
        want = F.pad(x[i : i + 1, :, :n], (pad_width, pad_width), mode="reflect")[0]
        torch.testing.assert_close(padded[i, :, : n + 2 * pad_width], want, rtol=0, atol=0)


def test_small_model_invariance_and_short_rows() -> None:
    torch.manual_seed(0)
    model = ECAPATDNN(channels=[32, 32, 32, 32, 96], lin_neurons=16).eval()
    short, long = torch.randn(5, 80), torch.randn(40, 80)
    x, lengths = pad([short, long])
    with torch.no_grad():
        batch = model(x, lengths)
        alone = model(short[None])[0]
    assert batch.shape == (2, 16)
    assert rel_l2(batch[0], alone) <= TOL
    with pytest.raises(ValueError, match="valid frames"):
        model(x, torch.tensor([4, 40]))
