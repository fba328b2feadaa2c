"""``speaker-sim export`` of the families beyond 3D-Speaker (test_export.py has those).

Each exported file, run by ONNX Runtime or by torch, must give the eager embeddings of fixture
inputs within relative L2 1e-4 per row in one padded batch of rows of unequal lengths, and the
family's own outputs where the fixtures hold them: FunASR's x-vector (whose stride-2 padding
depends on each row's own length parity) against FunASR 0.8.8's embeddings, the seven mvector
backbones (each from a fixture case's trainer folder) against mvector's ``predict``, and
WavLM + ECAPA (tiny and Large geometry) against the reference implementation. FunASR ONNX and
the tiny WavLM run in the fast tier; the rest are marked slow.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import pad_rows  # type: ignore[import-not-found]
from speaker_sim_cli.engine.export import export_model, load_exported, rel_l2_rows
from speaker_sim_cli.models.registry import get_model

pytest.importorskip("onnxruntime")

TOL = 1e-4


def _check_family(
    spec, model, feats: list[torch.Tensor], out: Path, fmt: str, reference: np.ndarray | None = None
) -> np.ndarray:
    """Export ``model`` as ``fmt``; the exported file on one padded batch of ``feats`` (rows of
    unequal length) gives each row's lone eager embedding, and ``reference`` (the family's own
    outputs) when given. Returns the per-row errors against eager."""
    export_model(spec, fmt, out, model=model, checkpoint_sha256="synth", check=False)
    x, n = pad_rows(feats)
    assert int(n.min()) < int(n.max())
    with torch.no_grad():
        alone = np.stack([model(f[None], n[i : i + 1])[0].numpy() for i, f in enumerate(feats)])
    got = np.asarray(load_exported(out, fmt)(x, n))
    err = rel_l2_rows(got, alone)
    assert err.max() <= TOL, f"{spec.arch} {fmt}: relative L2 per row {err}"
    if reference is not None:
        ref_err = rel_l2_rows(got, reference)
        assert ref_err.max() <= TOL, f"{spec.arch} {fmt} vs the family's own: {ref_err}"
    return err


@pytest.mark.parametrize("fmt", ["onnx", pytest.param("torchscript", marks=pytest.mark.slow)])
def test_funasr_xvector_exports(fmt: str, shared: Path, synth_state_dict, tmp_path: Path) -> None:
    """FunASR's stride-2 'same' padding depends on each row's own length parity; the export
    keeps that per row (8 fixture rows, lengths 508-818 frames: T mod 8 = 2, 3, 4, 7), and the
    graph reproduces FunASR 0.8.8's own embeddings of the fixture features."""
    spec = get_model("xvector-cnceleb")
    model = spec.build()
    model.load_state_dict(synth_state_dict("funasr_xvector"), strict=True)
    z = np.load(shared / "fixtures" / "funasr" / "funasr_xvector.npz")
    k = len([f for f in z.files if f.startswith("feats_")])
    feats = [torch.from_numpy(z[f"feats_{i}"]).float() for i in range(k)]
    assert len({int(f.shape[0]) % 2 for f in feats}) == 2  # both parities in the batch
    ref = np.stack([z[f"emb_{i}"] for i in range(k)])
    _check_family(spec, model.eval(), feats, tmp_path / f"xvector.{fmt}", fmt, ref)


MVECTOR_BACKBONES = ["CAMPPlus", "ERes2NetV2", "ERes2Net", "EcapaTdnn", "Res2Net", "ResNetSE",
                     "TDNN"]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("backbone", MVECTOR_BACKBONES)
def test_mvector_backbone_exports(backbone: str, fmt: str, shared: Path, tmp_path: Path) -> None:
    """Each mvector backbone from its fixture case's trainer folder (``--model mvector
    --model-dir .../best_model --model-config config.yml``), on mvector's own Fbank features of
    four recordings of unequal length, against eager and mvector's own ``predict``."""
    import json as _json

    from speaker_sim_cli.models.registry import resolve_model
    from speaker_sim_cli.models.weights import resolve_checkpoint

    mv = shared / "fixtures" / "mvector"
    case = mv / "cases" / f"{backbone}_Fbank"
    info = _json.loads((case / "info.json").read_text())
    spec = resolve_model("mvector", mv / info["model_dir"], case / "config.yml")
    found = resolve_checkpoint(spec, mv / info["model_dir"])
    from speaker_sim_cli.models.weights import load_spec_checkpoint

    model = spec.build()
    load_spec_checkpoint(model, found.path, spec)
    front = np.load(mv / "frontend_Fbank.npz")
    names = [str(x) for x in front["inputs"]]
    rows = [0, 1, 3, 5]  # unequal lengths, the stereo file included
    feats = [torch.from_numpy(front[f"feat_{i}"]).float() for i in rows]
    ref_all = np.load(case / "reference.npz")
    ref_names = [str(x) for x in ref_all["inputs"]]
    ref = ref_all["emb_predict"][[ref_names.index(names[i]) for i in rows]]
    _check_family(spec, model.eval(), feats, tmp_path / f"{backbone}.{fmt}", fmt, ref)


def _wavlm(shared: Path, geometry: str):
    import sys

    from speaker_sim_cli.audio.features import compute_features
    from speaker_sim_cli.audio.frontend import WaveformConfig
    from speaker_sim_cli.models.wavlm_ecapa import TINY, WavLMECAPA

    z = np.load(shared / "fixtures" / "wavlm_sim" / f"sim_{geometry}.npz")
    meta = json.loads(str(z["meta_json"]))
    sys.path.insert(0, str(shared / "tools"))
    from synth_sim_weights import synth  # type: ignore[import-not-found]

    spec = get_model("wavlm-ecapa-sim")
    model = WavLMECAPA(**TINY) if geometry == "tiny" else spec.build()
    model.load_state_dict({k: torch.from_numpy(synth(k, s)) for k, s in meta["shapes"].items()},
                          strict=True)  # fmt: skip
    names = ["v120_3s", "v210_2s", "noise_1s"]  # 3, 2 and 1 s
    feats = []
    for name in names:
        w = torch.from_numpy(z[f"wav_{name}"]).float()[None]
        f, _ = compute_features(w, torch.tensor([w.shape[1]]), WaveformConfig())
        feats.append(f[0])
    ref = np.stack([z[f"emb_{name}"] for name in names])
    return spec, model.eval(), feats, ref


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_wavlm_ecapa_tiny_exports(fmt: str, shared: Path, tmp_path: Path) -> None:
    """WavLM + ECAPA at the tiny fixture geometry (same code as Large): three clips of unequal
    length in one batch, against eager and the reference implementation's embeddings."""
    spec, model, feats, ref = _wavlm(shared, "tiny")
    _check_family(spec, model, feats, tmp_path / f"wavlm.{fmt}", fmt, ref)


@pytest.fixture(scope="module")
def wavlm_large(shared: Path):
    return _wavlm(shared, "large")


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_wavlm_ecapa_large_exports(fmt: str, wavlm_large, tmp_path: Path) -> None:
    """The registry's WavLM-Large + ECAPA geometry (324 M parameters, a 1.3 GB file either
    way), two clips of 3 and 2 s in one batch."""
    spec, model, feats, ref = wavlm_large
    out = tmp_path / f"wavlm_large.{fmt}"
    try:
        _check_family(spec, model, feats[:2], out, fmt, ref[:2])
    finally:
        out.unlink(missing_ok=True)  # 1.3 GB
