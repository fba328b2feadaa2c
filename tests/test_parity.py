"""Real CAM++ weights on every file of ../shared/audio against 3D-Speaker's embeddings.

The reference embeddings were made on another CPU. 3D-Speaker's own pipeline (speakerlab's
``FBank(80, mean_nor=True)`` and ``CAMPPlus``, torch 2.9.1; non-16 kHz files through sox's
``rate 16000``, as infer_sv.py resamples), rerun here on every file under
ATEN_CPU_CAPABILITY=default / avx2 / avx512, moves from the stored embeddings and between
settings by at most 1 - cosine 5.4e-11 and |norm ratio - 1| 9.8e-7. This code is further off,
for reasons that are its own and do not depend on the CPU (docs/portability.md):

- 16 kHz files (no resampling): 1 - cosine 4.7e-10, norm ratio 3.7e-6 (its torch fbank is not
  torchaudio's: up to 6.5e-4 max abs in near-empty log-mel bands). NATIVE_* = 4.3x, 5.4x those.
- resampled files (8 / 22.05 / 44.1 / 48 kHz): 2.0e-7 and 1.5e-4, from soxr (HQ) standing in
  for sox's ``rate``: up to 8e-4 apart in samples. Bounds RESAMPLED_* = 5x those.
"""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from speaker_sim_cli.engine.embedder import EngineConfig
from speaker_sim_cli.models.registry import DEFAULT_MODEL
from speaker_sim_cli.pipeline import Extractor

pytestmark = [pytest.mark.weights, pytest.mark.slow]

NATIVE_COS, NATIVE_NORM = 2e-9, 2e-5  # 1 - cosine, |norm ratio - 1|: 16 kHz files
RESAMPLED_COS, RESAMPLED_NORM = 1e-6, 8e-4  # files that go through the resampler


@pytest.fixture(scope="module")
def extractor(real_ckpt):
    return Extractor(DEFAULT_MODEL, real_ckpt.parent, EngineConfig(device="cpu", workers=1))


def test_every_shared_file_matches_reference(shared, extractor):
    ref = np.load(shared / "fixtures" / "reference" / "campplus_zh_en_advanced.npz")
    keys = list(ref.files)
    assert len(keys) >= 130
    res = extractor.embed_paths([str(shared / k) for k in keys])
    assert not res.failures
    checked = {True: 0, False: 0}
    for k in keys:
        a = res.embeddings[str(shared / k)].astype(np.float64)  # unnormalised, as 3D-Speaker's
        b = ref[k].astype(np.float64)
        native = sf.info(str(shared / k)).samplerate == 16000
        bounds = (NATIVE_COS, NATIVE_NORM) if native else (RESAMPLED_COS, RESAMPLED_NORM)
        one_minus_cos = 1 - a @ b / np.linalg.norm(a) / np.linalg.norm(b)
        norm = abs(np.linalg.norm(a) / np.linalg.norm(b) - 1)
        assert one_minus_cos <= bounds[0], f"{k}: 1 - cosine {one_minus_cos:.3g}"
        assert norm <= bounds[1], f"{k}: norm ratio - 1 {norm:.3g}"
        checked[native] += 1
    assert checked == {True: 98, False: 40}, checked
