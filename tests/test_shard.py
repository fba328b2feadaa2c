"""Sharding recordings across devices (run as two CPU processes here; CUDA where lent)."""

from __future__ import annotations

import numpy as np
import pytest

from speaker_sim_cli.engine.embedder import EngineConfig
from speaker_sim_cli.engine.shard import balance, split_devices
from speaker_sim_cli.models.registry import DEFAULT_MODEL
from speaker_sim_cli.pipeline import Extractor


def test_split_and_balance():
    assert split_devices("cuda:0, cuda:1") == ["cuda:0", "cuda:1"]
    assert split_devices("cpu") == ["cpu"]
    shards = balance([10, 1, 9, 2, 5, 5], 2)
    assert sorted(i for s in shards for i in s) == list(range(6))
    loads = [sum([10, 1, 9, 2, 5, 5][i] for i in s) for s in shards]
    assert max(loads) - min(loads) <= 2


@pytest.mark.weights
@pytest.mark.slow
def test_two_processes_give_the_same_embeddings(shared, real_ckpt, tmp_path):
    files = [str(p) for p in sorted((shared / "audio" / "speechbrain_samples").glob("*.wav"))]
    files.append(str(tmp_path / "missing.wav"))
    one = Extractor(DEFAULT_MODEL, real_ckpt.parent, EngineConfig(device="cpu", workers=0),
                    use_cache=False).embed_paths(files)  # fmt: skip
    two = Extractor(DEFAULT_MODEL, real_ckpt.parent, EngineConfig(device="cpu,cpu", workers=0),
                    use_cache=False).embed_paths(files)  # fmt: skip
    assert two.failures == one.failures and len(two.embeddings) == len(files) - 1
    for f in files[:-1]:
        a, b = one.embeddings[f], two.embeddings[f]
        assert np.linalg.norm(a - b) / np.linalg.norm(a) < 1e-5
