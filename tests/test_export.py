"""``speaker-sim export`` and the ONNX Runtime backend.

The nine 3D-Speaker geometries are exported (ONNX and TorchScript) with synthetic weights from
their fixture schemas, and the exported file, run by ONNX Runtime or by torch, must give
3D-Speaker's own embeddings of fixture features within relative L2 1e-4 per row, in batches of
rows of unequal lengths (so the graph keeps its time axis dynamic and its padding masks). CAM++
TorchScript runs in the fast tier, the rest are marked slow. The other families' exports are
tested in test_export_families.py.

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

from conftest import pad_rows  # type: ignore[import-not-found]
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


@pytest.fixture(scope="module")
def exported(shared: Path, synth_state_dict, tmp_path_factory: pytest.TempPathFactory):
    """Function (arch, fmt) -> (fixture feats, 3D-Speaker's embeddings of them, exported path);
    each case exports its own file."""
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
        assert [int(f.shape[0]) for f in feats] == [285, 370, 679, 48]
        return feats, np.stack([data[f"emb_{i}"] for i in range(k)]), out

    return get


@pytest.mark.parametrize(("arch", "fmt"), CASES)
def test_export_reproduces_3dspeaker_embeddings(exported, arch: str, fmt: str) -> None:
    """The exported file on three fixture rows (48, 285 and 370 frames) in one padded batch,
    two of them in another order, and one alone gives 3D-Speaker's own embeddings of them
    (``emb_i``, the numbers the eager model reproduces in test_archs)."""
    feats, ref, path = exported(arch, fmt)
    run = load_exported(path, fmt)
    for rows in ([3, 0, 1], [1, 3], [0]):
        x, n = pad_rows([feats[i] for i in rows])
        got = np.asarray(run(x, n))
        assert got.shape == ref[rows].shape
        err = rel_l2_rows(got, ref[rows])
        assert err.max() <= TOL, f"{arch} {fmt} rows {rows}: relative L2 per row {err}"


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


def test_export_key_follows_the_models_code(monkeypatch: pytest.MonkeyPatch) -> None:
    """A graph exported by another version of the networks' code is never reused: the key
    (and so the cached file's name) holds a hash of speaker_sim_cli/models' source."""
    from speaker_sim_cli.engine import export as ex

    spec = get_model(DEFAULT_MODEL)
    key = ex.export_key(spec, "sha", "onnx")
    assert key == ex.export_key(spec, "sha", "onnx")
    assert len(ex.models_code_sha256()) == 64
    monkeypatch.setattr(ex, "models_code_sha256", lambda: "0" * 64)
    assert ex.export_key(spec, "sha", "onnx") != key
