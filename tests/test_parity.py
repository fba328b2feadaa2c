"""Real CAM++ weights on every file of ../shared/audio against 3D-Speaker's embeddings.

The reference embeddings were made on another CPU. Measured against them here under every
kernel setting (docs/portability.md): 1 - cosine 2e-7, norm ratio 1.5e-4 (the CPU kernels
alone: 4e-12 and 4.5e-7). Bounds, about 5x: 1 - cosine <= 1e-6, |norm ratio - 1| <= 8e-4.
"""

from __future__ import annotations

import numpy as np
import pytest

from speaker_sim_cli.engine.embedder import EngineConfig
from speaker_sim_cli.models.registry import DEFAULT_MODEL
from speaker_sim_cli.pipeline import Extractor

pytestmark = [pytest.mark.weights, pytest.mark.slow]


@pytest.fixture(scope="module")
def extractor(real_ckpt):
    return Extractor(DEFAULT_MODEL, real_ckpt.parent, EngineConfig(device="cpu", workers=1))


def test_every_shared_file_matches_reference(shared, extractor):
    ref = np.load(shared / "fixtures" / "reference" / "campplus_zh_en_advanced.npz")
    keys = list(ref.files)
    assert len(keys) >= 130
    res = extractor.embed_paths([str(shared / k) for k in keys])
    assert not res.failures
    cos = []
    for k in keys:
        a = res.embeddings[str(shared / k)].astype(np.float64)
        b = ref[k].astype(np.float64)
        cos.append(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
    worst = int(np.argmin(cos))
    assert min(cos) >= 1 - 1e-6, f"{keys[worst]}: cosine {cos[worst]:.8f}"
    # Unnormalised, as 3D-Speaker writes them: the norms agree too.
    for k in keys:
        a, b = res.embeddings[str(shared / k)], ref[k]
        assert abs(np.linalg.norm(a) / np.linalg.norm(b) - 1) <= 8e-4, k
