"""The 13 ids: each loads its official checkpoint layout (synthetic weights here, since only
the CAM++ zh-en weights exist on these machines) and batching never changes an embedding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from speaker_sim_cli.audio.decode import load
from speaker_sim_cli.cli.main import app
from speaker_sim_cli.engine.embedder import Embedder, EngineConfig
from speaker_sim_cli.models.registry import ARCHS, MODELS

pytestmark = [pytest.mark.slow]

# WavLM-Large (324 M parameters) is too heavy for these per-id loops on CI's CPUs; its own file
# (test_wavlm_sim.py) runs its registry entry end to end at the tiny geometry and the Large
# geometry against the reference.
ZOO = [m for m in MODELS if ARCHS[m.arch].fixture != "wavlm_sim"]
ZOO_ARCHS = sorted(a for a, arch in ARCHS.items() if arch.fixture != "wavlm_sim")


def _save(sd, path, style):
    if style == "wrapped":
        torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)
    elif style == "model":
        torch.save({"model": sd, "optimizer": {}}, path)
    else:
        torch.save(sd, path)


@pytest.mark.parametrize("spec", ZOO, ids=[m.alias for m in ZOO])
def test_embed_with_model_dir_for_every_id(spec, synth_state_dict, shared, tmp_path):
    style = ["plain", "wrapped", "model"][MODELS.index(spec) % 3]
    _save(synth_state_dict(spec.arch), tmp_path / spec.checkpoint, style)
    wavs = [shared / "audio" / "speechbrain_samples" / f"spk1_snt{i}.wav" for i in (1, 2)]
    out = tmp_path / "out"
    res = CliRunner().invoke(
        app,
        ["embed", *map(str, wavs), "--out", str(out), "--model", spec.id,
         "--model-dir", str(tmp_path), "--no-cache", "--workers", "0", "-q"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    mat = np.load(out / "embeddings.npy")
    assert mat.shape == (2, spec.dim) and np.isfinite(mat).all()


@pytest.fixture(scope="module")
def dev_hard_waves(shared):
    """A few dev_hard files: the shortest of each container (wav, mp3, flac, ogg), the two
    shortest overall and the longest, so the batch mixes rates, formats and lengths.

    All 80 files x 9 archs take too long for CI on two cores (ERes2Net-huge alone needs
    minutes); ``python benchmarks/bench_batching.py`` runs them all (figures in the README).
    """
    files = sorted(p for p in (shared / "audio" / "dev_hard").rglob("*") if p.suffix != ".csv"
                   and p.is_file())  # fmt: skip
    assert len(files) == 80
    waves = {p: torch.from_numpy(load(p, 16000)) for p in files}
    by_len = sorted(files, key=lambda p: len(waves[p]))
    pick = {next(p for p in by_len if p.suffix == suf) for suf in (".wav", ".mp3", ".flac", ".ogg")}
    pick |= set(by_len[:2]) | {by_len[-1]}
    return [waves[p] for p in sorted(pick)]


@pytest.mark.parametrize("arch", ZOO_ARCHS)
def test_batch_of_32_equals_one_by_one(arch, synth_state_dict, dev_hard_waves):
    model = ARCHS[arch].build()
    model.load_state_dict(synth_state_dict(arch), strict=True)
    spec = next(m for m in MODELS if m.arch == arch)
    one = Embedder(spec, model, EngineConfig(device="cpu", batch_size=1, batch_frames=10**9))
    many = Embedder(spec, model, EngineConfig(device="cpu", batch_size=32, batch_frames=10**9))
    a = one.embed_waves(dev_hard_waves)
    b = many.embed_waves(dev_hard_waves)
    assert many.stats.batches == 1 and one.stats.batches == len(dev_hard_waves)
    rel = np.linalg.norm(a - b, axis=1) / np.linalg.norm(a, axis=1)
    assert rel.max() <= 1e-4, f"{arch}: max relative L2 {rel.max():.2e}"
