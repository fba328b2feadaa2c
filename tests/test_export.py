"""``speaker-sim export`` and the ONNX Runtime backend.

Every architecture of the registry is exported (ONNX and TorchScript) with synthetic weights
from its fixture schema, and the exported file, run by ONNX Runtime or by torch, must give the
project's eager embeddings of fixture features within relative L2 1e-4 per row, in one batch
of rows of unequal lengths (so the graph keeps its time axis dynamic and its padding masks):
the nine 3D-Speaker geometries, FunASR's x-vector (whose stride-2 padding depends on each row's
own length parity), the seven mvector backbones (each from a fixture case's trained
checkpoint) and WavLM + ECAPA (tiny and Large geometry). Where the family's own outputs are in
the fixtures (FunASR, mvector, WavLM) the exported graph is compared with those too. CAM++
TorchScript, FunASR ONNX and the tiny WavLM run in the fast tier; the rest are marked slow
(2-40 s each on two cores).

The real CAM++ checkpoint is exported through the CLI once; the sidecar, the export cache and
``score --backend onnxruntime`` on dev_hard (scores equal torch's within 1e-5) use that file.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from speaker_sim_cli.cli.main import app
from speaker_sim_cli.engine.config import AUTO_ORT_MIN_AUDIO_S, EngineConfig, choose_backend
from speaker_sim_cli.engine.export import (
    INPUT_NAMES,
    OPSET,
    OUTPUT_NAMES,
    ExportError,
    export_model,
    export_path,
    load_exported,
    rel_l2_rows,
)
from speaker_sim_cli.errors import UsageError
from speaker_sim_cli.models.registry import ARCHS, DEFAULT_MODEL, MODELS, get_model
from speaker_sim_cli.models.weights import checkpoint_hash

onnxruntime = pytest.importorskip("onnxruntime")

TOL = 1e-4
SCORE_TOL = 1e-5
# The fast tier: CAM++ as TorchScript here (its ONNX export, of the real weights, runs through
# the CLI below). An export plus its check costs 3-30 s of CPU per architecture.
FAST = {("campplus192", "torchscript")}
ARCH_NAMES = [a for a, spec in ARCHS.items() if spec.fixture == "arch"]


def _marks(arch: str, fmt: str) -> list[pytest.MarkDecorator]:
    return [] if (arch, fmt) in FAST else [pytest.mark.slow]


CASES = [
    pytest.param(a, f, marks=_marks(a, f), id=f"{a}-{f}")
    for a in ARCH_NAMES
    for f in ("onnx", "torchscript")
]


def _spec_of(arch: str):
    return next(m for m in MODELS if m.arch == arch)


def _padded(feats: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows (T_i, ...) zero-padded into (B, max T_i, ...) and their lengths."""
    n = torch.tensor([f.shape[0] for f in feats], dtype=torch.int64)
    x = torch.zeros(len(feats), int(n.max()), *feats[0].shape[1:])
    for i, f in enumerate(feats):
        x[i, : f.shape[0]] = f
    return x, n


@pytest.fixture(scope="module")
def exported(shared: Path, synth_state_dict, tmp_path_factory: pytest.TempPathFactory):
    """Function (arch, fmt) -> (fixture feats, 3D-Speaker's embeddings of them, exported path),
    each export done once."""
    root = tmp_path_factory.mktemp("exports")

    def get(arch: str, fmt: str):
        model = ARCHS[arch].build()
        model.load_state_dict(synth_state_dict(arch), strict=True)
        out = root / f"{arch}.{fmt}"
        # The test checks the file itself, more strictly than the export check (skipped).
        export_model(
            _spec_of(arch), fmt, out, model=model.eval(), checkpoint_sha256="synth", check=False
        )
        data = np.load(shared / "fixtures" / "arch" / f"{arch}.npz")
        k = len([f for f in data.files if f.startswith("feats_")])
        feats = [torch.from_numpy(data[f"feats_{i}"]).float() for i in range(k)]
        return feats, np.stack([data[f"emb_{i}"] for i in range(k)]), out

    return get


@pytest.mark.parametrize(("arch", "fmt"), CASES)
def test_export_reproduces_3dspeaker_embeddings(exported, arch: str, fmt: str) -> None:
    """The exported file on the fixture's four rows (48-679 frames) in one padded batch, in
    another order, and a row alone gives 3D-Speaker's own embeddings of them (``emb_i``, the
    same numbers the eager model reproduces in test_archs)."""
    feats, ref, path = exported(arch, fmt)
    run = load_exported(path, fmt)
    x, n = _padded(feats)
    assert int(n.min()) < int(n.max())
    got = np.asarray(run(x, n))
    assert got.shape == ref.shape
    err = rel_l2_rows(got, ref)
    assert err.max() <= TOL, f"{arch} {fmt}: relative L2 per row {err}"
    # Three rows in another order, shorter padding, and a batch of one: the graph is not tied
    # to the trace's batch.
    perm = [3, 0, 1]
    x3, n3 = _padded([feats[i] for i in perm])
    assert rel_l2_rows(np.asarray(run(x3, n3)), ref[perm]).max() <= TOL
    one = np.asarray(run(feats[0][None], n[:1]))
    assert rel_l2_rows(one, ref[:1]).max() <= TOL


# -- the other families ---------------------------------------------------------------------
def _check_family(
    spec, model, feats: list[torch.Tensor], out: Path, fmt: str, reference: np.ndarray | None = None
) -> np.ndarray:
    """Export ``model`` as ``fmt``; the exported file on one padded batch of ``feats`` (rows of
    unequal length) gives each row's lone eager embedding, and ``reference`` (the family's own
    outputs) when given. Returns the per-row errors against eager."""
    export_model(spec, fmt, out, model=model, checkpoint_sha256="synth", check=False)
    x, n = _padded(feats)
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


@pytest.mark.slow
def test_wavlm_ecapa_large_exports_to_onnx(shared: Path, tmp_path: Path) -> None:
    """The registry's WavLM-Large + ECAPA geometry (324 M parameters, a 1.3 GB ONNX file)."""
    spec, model, feats, ref = _wavlm(shared, "large")
    _check_family(spec, model, feats[:2], tmp_path / "wavlm_large.onnx", "onnx", ref[:2])


def test_an_untraceable_model_fails_the_export_check(tmp_path: Path) -> None:
    """The check can fail: a model whose time length is fixed at trace time is refused."""

    class Fixed(torch.nn.Module):
        def forward(self, feats: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
            t = int(feats.shape[1])  # a Python int: the trace bakes it in
            return feats.sum(dim=1) / t + n[:, None].float() * 0

    spec = get_model(DEFAULT_MODEL)
    with pytest.raises(ExportError, match="does not reproduce"):
        export_model(spec, "torchscript", tmp_path / "x.pt", model=Fixed(), checkpoint_sha256="-")
    assert not (tmp_path / "x.pt").exists()


# -- the real CAM++ through the CLI -------------------------------------------------------------
@pytest.fixture(scope="module")
def cli_export(real_ckpt: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("cli") / "campplus.onnx"
    res = CliRunner().invoke(
        app, ["export", "--model", "campplus-zh-en", "--model-dir", str(real_ckpt.parent),
              "--format", "onnx", "--out", str(out)],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    return out, res


def test_cli_export_writes_the_file_and_its_sidecar(cli_export, real_ckpt: Path) -> None:
    out, res = cli_export
    assert "relative L2" in res.output
    meta = json.loads(out.with_name(out.name + ".json").read_text())
    spec = get_model("campplus-zh-en")
    assert meta["model"] == spec.id and meta["arch"] == "campplus192"
    assert meta["checkpoint_sha256"] == checkpoint_hash(real_ckpt)
    assert meta["embedding_dim"] == 192 and meta["format"] == "onnx" and meta["opset"] == OPSET
    fe = meta["frontend"]
    assert {k: fe[k] for k in spec.frontend.to_dict()} == spec.frontend.to_dict()
    assert "fbank" in fe["description"] and "mean" in fe["description"]
    assert [i["name"] for i in meta["inputs"]] == list(INPUT_NAMES)
    assert [o["name"] for o in meta["outputs"]] == list(OUTPUT_NAMES)
    assert meta["inputs"][0]["shape"] == ["batch", "frames", 80]
    assert meta["inputs"][1]["shape"] == ["batch"]
    assert meta["outputs"][0]["shape"] == ["batch", 192]
    assert meta["check"]["max_rel_l2"] <= TOL
    import hashlib

    assert meta["file_sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    # What the file declares is what the sidecar says.
    sess = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == list(INPUT_NAMES)
    assert sess.get_inputs()[0].shape == ["batch", "frames", 80]
    assert sess.get_outputs()[0].shape == ["batch", 192]


def test_cli_export_bad_format_is_a_usage_error(tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["export", "--format", "tflite", "--out", str(tmp_path / "x")])
    assert res.exit_code == 2


def _scores(path: Path) -> dict[tuple[str, str], float]:
    with path.open() as f:
        rows = list(csv.DictReader(f))
    return {(r["enrollment"], r["test"]): float(r["score"]) for r in rows}


def test_score_with_onnxruntime_equals_torch_on_dev_hard(
    cli_export, real_ckpt: Path, shared: Path, tmp_path: Path
) -> None:
    """The exported graph is found in the cache (not re-exported) and scores as torch does."""
    out, _ = cli_export
    spec = get_model("campplus-zh-en")
    cached = export_path(spec, checkpoint_hash(real_ckpt), "onnx", tmp_path / "ort")
    cached.parent.mkdir(parents=True)
    shutil.copy(out, cached)  # as if an earlier run had exported it
    shutil.copy(out.with_name(out.name + ".json"), cached.with_name(cached.name + ".json"))
    runner = CliRunner()
    trials = shared / "audio" / "dev_hard" / "trials.csv"
    reports = {}
    for backend in ("torch", "onnxruntime", "auto"):
        res = runner.invoke(app, [
            "score", str(trials), "--root", str(shared), "--out", str(tmp_path / f"{backend}.csv"),
            "--report", str(tmp_path / f"{backend}.json"), "--device", "cpu", "--quiet",
            "--backend", backend, "--no-cache",
            "--cache-dir", str(tmp_path / ("torch" if backend == "torch" else "ort")),
        ])  # fmt: skip
        assert res.exit_code == 0, res.output
        reports[backend] = json.loads((tmp_path / f"{backend}.json").read_text())
    assert reports["torch"]["model"]["backend"] == "torch"
    assert reports["onnxruntime"]["model"]["backend"] == "onnxruntime"
    # auto: CPU, fp32, the graph is cached -> ONNX Runtime.
    assert reports["auto"]["model"]["backend"] == "onnxruntime"
    assert "cached" in reports["auto"]["model"]["backend_reason"]
    a, b = _scores(tmp_path / "torch.csv"), _scores(tmp_path / "onnxruntime.csv")
    assert a.keys() == b.keys() and len(a) > 100
    diff = max(abs(a[k] - b[k]) for k in a)
    assert diff <= SCORE_TOL, diff
    # Nothing was re-exported: the cache folder holds the copied file and sidecar only.
    assert sorted(cached.parent.iterdir()) == sorted(
        [cached, cached.with_name(cached.name + ".json")]
    )
    assert cached.read_bytes() == out.read_bytes()


# -- the backend choice ---------------------------------------------------------------------
def test_backend_choice_rules() -> None:
    cfg = EngineConfig(backend="auto")
    assert choose_backend(cfg, "cpu", True, True, 0.0)[0] == "onnxruntime"
    assert choose_backend(cfg, "cpu", True, False, 10.0)[0] == "torch"
    assert choose_backend(cfg, "cpu", True, False, AUTO_ORT_MIN_AUDIO_S)[0] == "onnxruntime"
    assert choose_backend(cfg, "cpu", False, True, 1e9)[0] == "torch"
    assert choose_backend(cfg, "cuda", True, True, 1e9)[0] == "torch"
    assert choose_backend(EngineConfig(precision="bf16"), "cpu", True, True, 1e9)[0] == "torch"
    assert choose_backend(EngineConfig(backend="torch"), "cpu", True, True, 1e9)[0] == "torch"
    ort = EngineConfig(backend="onnxruntime")
    assert choose_backend(ort, "cpu", True, False, 0.0)[0] == "onnxruntime"
    with pytest.raises(UsageError, match="CPU"):
        choose_backend(ort, "cuda", True, False, 0.0)
    with pytest.raises(UsageError, match="onnxruntime"):
        choose_backend(ort, "cpu", False, False, 0.0)
    with pytest.raises(UsageError, match="fp32"):
        EngineConfig(backend="onnxruntime", precision="bf16")
    with pytest.raises(UsageError):
        EngineConfig(backend="tensorrt")
