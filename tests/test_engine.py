"""The engine: length-bucketing batch planner, batch-size invariance, lower precision."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from speaker_sim_cli.benchmark import compare_embeddings, flop_model, list_audio, read_corpus
from speaker_sim_cli.engine.data import plan_batches
from speaker_sim_cli.engine.embedder import Embedder, EngineConfig
from speaker_sim_cli.models.registry import DEFAULT_MODEL
from speaker_sim_cli.pipeline import Extractor


# -- plan_batches ----------------------------------------------------------------------------
def _check_plan(lengths: list[int], batch_frames: int, batch_size: int) -> list[list[int]]:
    plan = plan_batches(lengths, batch_frames, batch_size)
    flat = [i for b in plan for i in b]
    assert sorted(flat) == list(range(len(lengths))), "every index exactly once"
    for b in plan:
        assert 1 <= len(b) <= batch_size
        if len(b) > 1:  # a lone recording may exceed the budget; a shared batch may not
            assert max(max(lengths[i], 1) for i in b) * len(b) <= batch_frames
    return plan


@pytest.mark.parametrize("seed", range(40))
def test_plan_batches_covers_every_index_once_within_budget(seed):
    rng = random.Random(seed)
    n = rng.choice([0, 1, 2, 7, 50, 333])
    lengths = [rng.choice([0, 1, rng.randint(1, 3000), rng.randint(1, 60_000)]) for _ in range(n)]
    batch_frames = rng.choice([1, 50, 1000, 12_000, 200_000])
    batch_size = rng.choice([1, 2, 8, 32, 1000])
    _check_plan(lengths, batch_frames, batch_size)


def test_plan_batches_groups_similar_lengths_longest_first():
    lengths = [100, 300, 110, 290, 105, 310]
    plan = _check_plan(lengths, batch_frames=1000, batch_size=3)
    assert plan == [[5, 1, 3], [2, 4, 0]]
    assert plan_batches([5, 1, 4, 2], batch_frames=8, batch_size=8) == [[0], [2, 3], [1]]


def test_plan_batches_long_recording_alone_and_bad_budgets():
    assert plan_batches([10, 5_000, 10], batch_frames=100, batch_size=8) == [[1], [0, 2]]
    assert plan_batches([], 10, 2) == []
    with pytest.raises(ValueError):
        plan_batches([1], 0, 1)
    with pytest.raises(ValueError):
        plan_batches([1], 1, 0)


# -- real CAM++ ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def extractor(real_ckpt, device):
    return Extractor(
        DEFAULT_MODEL, real_ckpt.parent, EngineConfig(device=device, workers=0), use_cache=False
    )


def _waves(paths, sr):
    from speaker_sim_cli.audio.decode import load

    return [torch.from_numpy(load(p, sr)) for p in paths]


@pytest.mark.weights
@pytest.mark.slow
def test_batch_size_does_not_change_embeddings(shared, extractor, device):
    paths = list_audio(shared / "audio" / "dev_hard")
    assert len(paths) == 80
    waves = _waves(paths, extractor.spec.sample_rate)
    one = Embedder(extractor.spec, extractor.embedder.model, EngineConfig(device, batch_size=1))
    many = extractor.embedder
    e1, e32 = one.embed_waves(waves), many.embed_waves(waves)
    assert one.stats.batches == len(paths)
    assert many.batch_size == 32 and many.stats.batches < len(paths) // 4
    rel = np.linalg.norm(e1 - e32, axis=1) / np.linalg.norm(e1, axis=1)
    worst = int(np.argmax(rel))
    assert rel.max() <= 1e-4, f"{paths[worst].name}: relative L2 {rel.max():.2e}"


def _cpu_autocast_ok(dtype: torch.dtype) -> str | None:
    """None when CPU autocast runs a conv in ``dtype``; else the reason it cannot."""
    try:
        conv = torch.nn.Conv1d(4, 4, 3)
        with torch.autocast("cpu", dtype=dtype), torch.inference_mode():
            y = conv(torch.randn(1, 4, 8))
    except (RuntimeError, AssertionError) as exc:
        return f"CPU autocast to {dtype} unsupported in torch {torch.__version__}: {exc}"
    if y.dtype != dtype:
        return f"CPU autocast to {dtype} does not lower conv1d in torch {torch.__version__}"
    return None


@pytest.mark.weights
@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_lower_precision_within_cosine_0999_of_fp32(shared, extractor, precision, device):
    from speaker_sim_cli.engine.embedder import PRECISIONS

    dtype = PRECISIONS[precision]
    if torch.device(device).type == "cpu" and (reason := _cpu_autocast_ok(dtype)):
        pytest.skip(reason)
    paths = list_audio(shared / "audio")[::7]  # ~20 recordings of every corpus and format
    assert len(paths) >= 19
    waves = _waves(paths, extractor.spec.sample_rate)
    cfg = EngineConfig(device=device, precision=precision)
    low = Embedder(extractor.spec, extractor.embedder.model, cfg)
    ref, got = extractor.embedder.embed_waves(waves), low.embed_waves(waves)
    assert got.dtype == np.float32 and np.isfinite(got).all()
    cos = (
        np.einsum("ij,ij->i", ref, got) / np.linalg.norm(ref, axis=1) / np.linalg.norm(got, axis=1)
    )
    worst = int(np.argmin(cos))
    assert cos.min() >= 0.999, f"{precision} {paths[worst].name}: cosine {cos.min():.5f}"


@pytest.mark.weights
def test_precision_is_part_of_the_report_and_key(real_ckpt, tmp_path):
    a = Extractor(DEFAULT_MODEL, real_ckpt.parent, EngineConfig(device="cpu"), tmp_path)
    b = Extractor(DEFAULT_MODEL, real_ckpt.parent, EngineConfig(device="cpu", precision="bf16"),
                  tmp_path)  # fmt: skip
    assert a.describe()["precision"] == "fp32" and b.describe()["precision"] == "bf16"
    assert a.cache.key != b.cache.key


class _Tiny(torch.nn.Module):
    """(B, T, F) -> (B, D): a 'head' conv, then a 'body' linear; records the dtypes it saw."""

    def __init__(self) -> None:
        super().__init__()
        self.head = torch.nn.Conv1d(4, 8, 3, padding=1)
        self.body = torch.nn.Linear(8, 4)
        self.seen: list[torch.dtype] = []

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        h = self.head(feats[..., :4].transpose(1, 2))
        self.seen.append(h.dtype)
        out = self.body(h.mean(-1))
        self.seen.append(out.dtype)
        return out


def test_fp32_submodules_run_in_fp32_under_autocast(monkeypatch):
    import dataclasses

    from speaker_sim_cli.engine import embedder as emb_mod
    from speaker_sim_cli.models.registry import get_model

    monkeypatch.setitem(emb_mod.FP32_SUBMODULES, ("tinynet", "bf16"), ("head", "missing"))
    spec = dataclasses.replace(get_model(DEFAULT_MODEL), arch="tinynet", dim=4)
    model = _Tiny()
    waves = [torch.randn(4000) * 0.1]
    low = Embedder(spec, model, EngineConfig(device="cpu", precision="bf16"))
    assert low.fp32_modules == ("head",)
    low.embed_waves(waves)
    assert model.seen == [torch.float32, torch.bfloat16]
    # The hooks stay on the shared module but act only for the Embedder that asked.
    model.seen.clear()
    Embedder(spec, model, EngineConfig(device="cpu", precision="fp16")).embed_waves(waves)
    assert model.seen == [torch.float16, torch.float16]
    model.seen.clear()
    Embedder(spec, model, EngineConfig(device="cpu")).embed_waves(waves)
    assert model.seen == [torch.float32, torch.float32]

    # An error inside an fp32 submodule leaves autocast as it was, in and out of the Embedder.
    def boom(_module, _args):
        raise RuntimeError("boom")

    handle = model.head.register_forward_pre_hook(boom)  # runs after the fp32 hook entered
    with pytest.raises(RuntimeError, match="boom"):
        low.embed_waves(waves)
    assert not torch.is_autocast_enabled("cpu")
    assert not any(emb_mod._FP32.stacks.values()), "an autocast context left entered"
    handle.remove()
    model.seen.clear()
    low.embed_waves(waves)
    assert model.seen == [torch.float32, torch.bfloat16]


def test_cpu_runners_match_one_runner_and_restore_threads(tmp_path):
    import dataclasses

    import soundfile as sf

    from speaker_sim_cli.models.registry import get_model

    rng = np.random.default_rng(3)
    paths = []
    for i in range(23):
        p = tmp_path / f"r{i}.wav"
        sf.write(str(p), (0.1 * rng.standard_normal(int(16000 * rng.uniform(0.5, 3)))), 16000)
        paths.append(str(p))
    (tmp_path / "bad.wav").write_bytes(b"not audio")
    paths.insert(5, str(tmp_path / "bad.wav"))
    spec = dataclasses.replace(get_model(DEFAULT_MODEL), arch="tinynet", dim=4)
    model = _Tiny()
    threads = torch.get_num_threads()
    got = {}
    for runners in (1, 3):
        cfg = EngineConfig(device="cpu", workers=0, runners=runners, batch_frames=600)
        emb = Embedder(spec, model, cfg)
        out = list(emb.embed_files(paths))
        assert torch.get_num_threads() == threads
        assert sorted(i for i, _, _ in out) == list(range(len(paths)))
        assert [i for i, e, _ in out if e is None] == [5]
        assert emb.stats.recordings == len(paths) - 1 and emb.stats.batches > 3
        got[runners] = {i: e for i, e, _ in out if e is not None}
    for i, e in got[1].items():
        np.testing.assert_allclose(got[3][i], e, rtol=1e-5, atol=1e-6)


def test_unknown_precision_is_rejected():
    from speaker_sim_cli.models.registry import get_model

    spec = get_model(DEFAULT_MODEL)
    with pytest.raises(ValueError, match="precision"):
        Embedder(spec, torch.nn.Identity(), EngineConfig(device="cpu", precision="fp8"))


# -- benchmark helpers -----------------------------------------------------------------------
def test_compare_embeddings_scores_and_tolerance():
    rng = np.random.default_rng(0)
    a = {f"r{i}": rng.standard_normal(8).astype(np.float32) for i in range(5)}
    same = compare_embeddings(a, dict(a))
    assert same["identical"] and same["max_score_diff"] == 0 and same["compared"] == 5
    b = dict(a)
    b["r0"] = -a["r0"]
    diff = compare_embeddings(a, b)
    assert not diff["identical"] and diff["max_score_diff"] > 1 and diff["min_cosine"] < -0.99
    missing = compare_embeddings(a, {k: v for k, v in a.items() if k != "r4"})
    assert missing["only_baseline"] == 1 and not missing["identical"]


def test_flop_model_is_linear_in_frames():
    lin = torch.nn.Linear(80, 10)

    def model(feats):  # (1, T, 80) -> a matmul per frame, plus a fixed head
        return lin(feats).mean(1) @ torch.ones(10, 3)

    intercept, per_frame = flop_model(model, 80, torch.device("cpu"))
    assert per_frame == pytest.approx(2 * 80 * 10)
    assert intercept == pytest.approx(2 * 10 * 3)


def test_read_corpus_folder_and_list(tmp_path):
    import soundfile as sf

    for name in ("a.wav", "sub/b.flac", "notes.txt"):
        p = tmp_path / "audio" / name
        p.parent.mkdir(parents=True, exist_ok=True)
        if p.suffix == ".txt":
            p.write_text("x")
        else:
            sf.write(str(p), np.zeros(1600, np.float32), 16000)
    got = read_corpus(tmp_path / "audio")
    assert [p.name for p in got] == ["a.wav", "b.flac"]
    lst = tmp_path / "list.txt"
    lst.write_text("# corpus\naudio/a.wav\n\n" + str(tmp_path / "audio/sub/b.flac") + "\n")
    assert read_corpus(lst) == got


def test_expand_corpus_makes_distinct_copies(tmp_path):
    import hashlib

    import soundfile as sf

    from speaker_sim_cli.benchmark import expand_corpus

    src = []
    for name, sub in (("a.wav", "PCM_16"), ("b.flac", "PCM_24")):
        p = tmp_path / "src" / name
        p.parent.mkdir(exist_ok=True)
        sf.write(str(p), 0.1 * np.sin(np.arange(8000) / 7.0), 16000, subtype=sub)
        src.append(p)
    out = expand_corpus(src, 3, tmp_path / "copies")
    assert len(out) == 6 and out[:2] == src
    digests = {hashlib.sha256(p.read_bytes()).hexdigest() for p in out}
    assert len(digests) == 6  # the cache cannot share them
    for p in out:
        info = sf.info(str(p))
        assert info.samplerate == 16000 and info.frames == 8000
    assert sf.info(str(out[3])).subtype == "PCM_24"


def test_device_errors_are_usage_errors_that_say_why(tmp_path):
    """A typo fails before any work (torch-free syntax check); a missing GPU names the cause."""
    from typer.testing import CliRunner

    from speaker_sim_cli.cli.main import app
    from speaker_sim_cli.engine.config import EngineConfig
    from speaker_sim_cli.engine.embedder import resolve_device
    from speaker_sim_cli.errors import UsageError

    for bad in ("gpu", "cuda:x", "cpu,", "auto,cuda:0"):
        with pytest.raises(UsageError, match="--device"):
            EngineConfig(device=bad)
    for good in ("auto", "cpu", "cuda", "cuda:1", "cuda:0, cuda:1", "cpu,cpu"):
        EngineConfig(device=good)
    trials = tmp_path / "t.csv"
    trials.write_text("enrollment,test\na.wav,b.wav\n")
    res = CliRunner().invoke(app, ["score", str(trials), "--device", "gpu"])
    assert res.exit_code == 2 and "'gpu' is not a device" in res.stderr
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match=r"CUDA is not available: .*use --device cpu"):
            resolve_device("cuda")
    else:
        n = torch.cuda.device_count()
        with pytest.raises(UsageError, match=f"has {n} GPU"):
            resolve_device(f"cuda:{n}")
