"""Weight lookup order, clear errors when missing, wrapped checkpoints, strict loading."""

from __future__ import annotations

import pytest
import torch

from speaker_sim_cli.errors import CheckpointMismatchError, UsageError, WeightsNotFoundError
from speaker_sim_cli.models.registry import ARCHS, DEFAULT_MODEL, MODELS, get_model
from speaker_sim_cli.models.weights import (
    Found,
    find_checkpoint,
    load_checkpoint_into,
    resolve_checkpoint,
    unwrap_state_dict,
)


def test_ids_aliases_and_damo_prefix():
    spec = get_model(DEFAULT_MODEL)
    assert get_model("damo/speech_campplus_sv_zh_en_16k-common_advanced") is spec
    assert get_model("campplus-zh-en") is spec
    assert get_model("eres2net-large-3dspeaker").arch == "eres2net_large512"
    assert len([m for m in MODELS if ARCHS[m.arch].fixture == "arch"]) == 13  # 3D-Speaker's
    assert len({m.alias for m in MODELS}) == len(MODELS)
    with pytest.raises(UsageError, match="unknown model 'nope'"):
        get_model("nope")


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    monkeypatch.delenv("SPEAKER_SIM_PRETRAINED", raising=False)
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "ms"))
    monkeypatch.setenv("SPEAKER_SIM_DATA", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _touch(folder, name):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(b"x")
    return (folder / name).resolve()


def test_lookup_order(clean_env, monkeypatch):
    spec = get_model("campplus-zh")
    tmp = clean_env
    ms = _touch(tmp / "ms" / "models" / "iic" / spec.name, spec.checkpoint)
    assert find_checkpoint(spec).path == ms
    user = _touch(tmp / "data" / "pretrained" / spec.name, spec.checkpoint)
    assert find_checkpoint(spec) == Found(user, "user-pretrained")
    local = _touch(tmp / "pretrained" / spec.name, spec.checkpoint)
    assert find_checkpoint(spec) == find_checkpoint(spec)
    assert find_checkpoint(spec).path == local
    env = _touch(tmp / "envdir" / spec.name, spec.checkpoint)
    monkeypatch.setenv("SPEAKER_SIM_PRETRAINED", str(tmp / "envdir"))
    assert find_checkpoint(spec).path == env
    given = _touch(tmp / "given", spec.checkpoint)
    found = find_checkpoint(spec, tmp / "given")
    assert found.path == given and found.source == "model-dir"


def test_missing_offline_names_file_and_folder(clean_env, monkeypatch):
    monkeypatch.setenv("SPEAKER_SIM_OFFLINE", "1")
    spec = get_model("ecapa-vox")
    with pytest.raises(WeightsNotFoundError) as err:
        resolve_checkpoint(spec)
    msg = str(err.value)
    assert "ecapa_tdnn.bin" in msg and str(clean_env / "pretrained" / spec.name) in msg
    # every place searched is named, the user-level folder included
    assert str(clean_env / "data" / "pretrained" / spec.name) in msg
    assert str(clean_env / "ms" / "models" / "iic" / spec.name) in msg
    with pytest.raises(WeightsNotFoundError, match="not found in --model-dir"):
        resolve_checkpoint(spec, clean_env / "nowhere")


def test_unwrap_variants():
    sd = {"a.weight": torch.ones(2), "b.bias": torch.zeros(1)}
    assert unwrap_state_dict(sd).keys() == sd.keys()
    assert unwrap_state_dict({"state_dict": sd, "epoch": 3}).keys() == sd.keys()
    wrapped = {"model": {f"module.{k}": v for k, v in sd.items()}, "optimizer": {}}
    assert unwrap_state_dict(wrapped).keys() == sd.keys()


def test_wrapped_real_checkpoint_loads(real_ckpt, tmp_path):
    spec = get_model(DEFAULT_MODEL)
    sd = torch.load(real_ckpt, map_location="cpu", weights_only=True)
    wrapped = tmp_path / spec.checkpoint
    torch.save({"epoch": 10, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, wrapped)
    model = spec.build()
    load_checkpoint_into(model, wrapped, spec.arch)
    ref = spec.build()
    ref.load_state_dict(sd, strict=True)
    for (k, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), k


def test_mismatch_lists_missing_and_unexpected_keys(real_ckpt, tmp_path):
    sd = torch.load(real_ckpt, map_location="cpu", weights_only=True)
    first = next(iter(sd))
    sd["extra.weight"] = torch.zeros(1)
    del sd[first]
    bad = tmp_path / "bad.pt"
    torch.save(sd, bad)
    spec = get_model(DEFAULT_MODEL)
    with pytest.raises(CheckpointMismatchError) as err:
        load_checkpoint_into(spec.build(), bad, spec.arch)
    msg = str(err.value)
    assert "1 missing keys" in msg and first in msg
    assert "1 unexpected keys" in msg and "extra.weight" in msg


def test_not_a_checkpoint(tmp_path):
    p = tmp_path / "junk.pt"
    p.write_text("hello")
    spec = get_model(DEFAULT_MODEL)
    with pytest.raises(CheckpointMismatchError, match="cannot read as a torch checkpoint"):
        load_checkpoint_into(spec.build(), p, spec.arch)
