"""The embedding cache: keys, stale vectors, corrupt entries, concurrent writers, the CLI."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

from speaker_sim_cli.audio.frontend import FbankConfig
from speaker_sim_cli.cli.main import app
from speaker_sim_cli.engine.cache import EmbeddingCache, cache_info, setting_key
from speaker_sim_cli.engine.embedder import EngineConfig
from speaker_sim_cli.models.registry import DEFAULT_MODEL, get_model
from speaker_sim_cli.pipeline import Extractor

SR = 16000
CKPT_NAME = get_model(DEFAULT_MODEL).checkpoint


def make_audio(folder: Path, n: int, seconds: float = 1.2, seed: int = 0) -> list[Path]:
    """``n`` distinct recordings: a few harmonics of a random pitch in noise, 16-bit wav."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    paths = []
    for i in range(n):
        f0 = rng.uniform(90, 250)
        wav = sum(np.sin(2 * np.pi * f0 * k * t + rng.uniform(0, 6)) / k for k in range(1, 6))
        wav = 0.1 * wav + 0.01 * rng.standard_normal(t.shape)
        p = folder / f"rec{i}.wav"
        p.parent.mkdir(parents=True, exist_ok=True)
        sf.write(str(p), wav.astype(np.float32), SR, subtype="PCM_16")
        paths.append(p)
    return paths


def extractor(ckpt_dir: Path, cache: Path | None, model: object = DEFAULT_MODEL, **engine):
    cfg = EngineConfig(device="cpu", workers=0, **engine)
    return Extractor(model, ckpt_dir, cfg, cache, use_cache=cache is not None)  # type: ignore[arg-type]


def embed(ex: Extractor, paths: list[Path]):
    res = ex.embed_paths([str(p) for p in paths])
    assert not res.failures, res.failures
    return res


def stack(res, paths: list[Path]) -> np.ndarray:
    return np.stack([res.embeddings[str(p)] for p in paths])


# -- keys ------------------------------------------------------------------------------------
BASE = {
    "format": 1,
    "model": DEFAULT_MODEL,
    "checkpoint_sha256": "a" * 64,
    "frontend": FbankConfig().to_dict(),
    "mode": EngineConfig().mode(),
    "precision": "fp32",
}


def _variants():
    yield "model", {**BASE, "model": "iic/speech_campplus_sv_zh-cn_16k-common"}
    yield "checkpoint", {**BASE, "checkpoint_sha256": "b" * 64}
    yield "mode-chunk", {**BASE, "mode": EngineConfig(chunk_seconds=3.0).mode()}
    yield "mode-max-full", {**BASE, "mode": EngineConfig(max_full_seconds=60).mode()}
    yield "precision", {**BASE, "precision": "bf16"}
    yield "format", {**BASE, "format": 2}
    default = FbankConfig()
    valid_other = {"channel": "mean", "loudness_db": -20.0, "resampler": "kaiser_best"}
    for f in dataclasses.fields(FbankConfig):
        if f.name == "dither":  # only 0 is accepted
            continue
        value = getattr(default, f.name)
        if f.name in valid_other:
            other: object = valid_other[f.name]
        elif isinstance(value, bool):
            other = not value
        elif isinstance(value, int | float):
            other = value / 2 + 1
        else:
            other = value + "x"
        fe = dataclasses.replace(default, **{f.name: other}).to_dict()
        yield f"frontend.{f.name}", {**BASE, "frontend": fe}


def test_setting_key_changes_with_each_ingredient():
    keys = {"base": setting_key(BASE)}
    for name, ing in _variants():
        keys[name] = setting_key(ing)
    assert len(set(keys.values())) == len(keys), keys
    assert setting_key(dict(reversed(BASE.items()))) == keys["base"]  # order does not matter


@pytest.mark.weights
def test_extractor_key_follows_engine_and_model(real_ckpt, tmp_path):
    ckpt = real_ckpt.parent
    keys = {
        "default": extractor(ckpt, tmp_path).cache.key,
        "chunk": extractor(ckpt, tmp_path, chunk_seconds=2.0).cache.key,
        "bf16": extractor(ckpt, tmp_path, precision="bf16").cache.key,
    }
    spec = get_model(DEFAULT_MODEL)
    hamming = dataclasses.replace(spec, frontend=dataclasses.replace(spec.frontend,
                                                                    window="hamming"))  # fmt: skip
    keys["frontend"] = extractor(ckpt, tmp_path, model=hamming).cache.key
    # Batch size and workers do not change a vector, so they do not change the key.
    assert extractor(ckpt, tmp_path, batch_size=3).cache.key == keys["default"]
    assert len(set(keys.values())) == len(keys)


def test_content_digest_is_the_content_not_the_name(tmp_path, monkeypatch):
    a = make_audio(tmp_path / "spk1", 1, seed=1)[0]
    b = make_audio(tmp_path / "spk2", 1, seed=2)[0]  # same basename, other content
    c = tmp_path / "copy" / "other-name.wav"
    c.parent.mkdir()
    shutil.copy(a, c)
    cache = EmbeddingCache(tmp_path / "cache", BASE, 192)
    assert a.name == b.name
    assert cache.file_hash(a) != cache.file_hash(b)
    assert cache.file_hash(a) == cache.file_hash(c)
    assert cache.file_hash(a) == hashlib.sha256(a.read_bytes()).hexdigest()
    # The same relative name from two working folders, same size and mtime: two contents.
    os.utime(b, ns=(a.stat().st_atime_ns, a.stat().st_mtime_ns))
    assert a.stat().st_size == b.stat().st_size
    monkeypatch.chdir(a.parent)
    da = cache.file_hash(Path(a.name))
    monkeypatch.chdir(b.parent)
    assert cache.file_hash(Path(b.name)) != da
    # An edit (new size / mtime) is seen, whatever the memo says.
    make_audio(tmp_path / "spk1", 1, seconds=1.5, seed=9)
    assert cache.file_hash(a) == hashlib.sha256(a.read_bytes()).hexdigest()


def test_file_hashes_in_threads_keep_order_and_errors(tmp_path):
    paths = make_audio(tmp_path / "a", 6, seconds=0.2, seed=4)
    paths.insert(2, tmp_path / "missing.wav")
    cache = EmbeddingCache(tmp_path / "cache", BASE, 192)
    got = cache.file_hashes(paths, threads=4)
    assert isinstance(got[2], FileNotFoundError)
    for p, d in zip(paths, got):
        if p.exists():
            assert d == hashlib.sha256(p.read_bytes()).hexdigest()
    assert cache.file_hashes(paths, threads=1)[3] == got[3]


# -- through the Extractor: warm reruns, stale vectors, corrupt entries ----------------------
@pytest.fixture(scope="module")
def audio(tmp_path_factory) -> list[Path]:
    return make_audio(tmp_path_factory.mktemp("audio"), 4)


@pytest.mark.weights
def test_warm_rerun_embeds_nothing(real_ckpt, audio, tmp_path):
    cold = embed(extractor(real_ckpt.parent, tmp_path), audio)
    assert (cold.embedded, cold.cached) == (len(audio), 0)
    ex = extractor(real_ckpt.parent, tmp_path)  # a new run on the same cache
    warm = embed(ex, audio)
    assert (warm.embedded, warm.cached) == (0, len(audio))
    assert ex.stats.batches == 0 and ex.stats.recordings == 0
    assert not ex.loaded  # nothing to embed: the model was never built
    assert ex.cache.stats.hits == len(audio) and ex.cache.stats.writes == 0
    np.testing.assert_array_equal(stack(cold, audio), stack(warm, audio))


@pytest.mark.weights
def test_a_partly_cached_run_loads_the_model_once(real_ckpt, audio, tmp_path):
    embed(extractor(real_ckpt.parent, tmp_path), audio[:2])
    ex = extractor(real_ckpt.parent, tmp_path)
    assert not ex.loaded
    res = embed(ex, audio)
    assert (res.embedded, res.cached) == (len(audio) - 2, 2)
    assert ex.loaded and ex.stats.recordings == len(audio) - 2 and ex.load_seconds > 0
    assert ex.describe()["loaded"] is True and ex.describe()["device"] == "cpu"


@pytest.mark.weights
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_key_without_the_model_is_the_key_with_it(real_ckpt, tmp_path, precision):
    """The cache key is computed before the model is built; building it must not change it."""
    ex = extractor(real_ckpt.parent, tmp_path, precision=precision)
    before = ex.ingredients()
    ex.load()
    assert ex.ingredients() == before
    assert list(ex.embedder.fp32_modules) == before["fp32_modules"]
    assert bool(before["fp32_modules"]) == (precision == "bf16")


@pytest.mark.weights
def test_a_fully_cached_score_never_imports_torch(real_ckpt, audio, tmp_path):
    """The warm path: trials whose every recording is cached are scored without torch."""
    import subprocess
    import sys

    trials = tmp_path / "trials.csv"
    trials.write_text("enrollment,test\n" + "".join(
        f"{a},{b}\n" for a in audio for b in audio if a != b))  # fmt: skip
    args = ["score", str(trials), "--model-dir", str(real_ckpt.parent), "--cache-dir",
            str(tmp_path / "cache"), "--device", "cpu", "-q"]  # fmt: skip
    code = (
        "import json, sys\n"
        "from speaker_sim_cli.cli.main import app\n"
        "try:\n"
        "    app(sys.argv[1:-1], standalone_mode=False)\n"
        "finally:\n"
        "    open(sys.argv[-1], 'w').write(json.dumps('torch' in sys.modules))\n"
    )
    runs = []
    for name in ("cold", "warm"):
        flag = tmp_path / f"{name}.torch"
        report = tmp_path / f"{name}.json"
        out = tmp_path / f"{name}.csv"
        cmd = [sys.executable, "-c", code, *args, "-o", str(out), "--report", str(report),
               str(flag)]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        runs.append((json.loads(flag.read_text()), json.loads(report.read_text()), out))
    (cold_torch, cold, cold_out), (warm_torch, warm, warm_out) = runs
    assert cold_torch and cold["counts"]["embedded"] == len(audio)
    assert cold["model"]["loaded"] is True
    assert not warm_torch, "a fully cached score imported torch"
    assert warm["counts"]["embedded"] == 0 and warm["counts"]["from_cache"] == len(audio)
    assert warm["model"]["loaded"] is False
    assert warm["model"]["checkpoint_sha256"] == cold["model"]["checkpoint_sha256"]
    assert warm_out.read_bytes() == cold_out.read_bytes()


@pytest.mark.weights
def test_changed_setting_never_returns_stale_vectors(real_ckpt, synth_state_dict, audio, tmp_path):
    import torch

    cache = tmp_path / "cache"
    ckpt = real_ckpt.parent
    base = embed(extractor(ckpt, cache), audio)
    ref = stack(base, audio)

    other_ckpt = tmp_path / "synth"
    other_ckpt.mkdir()
    torch.save(synth_state_dict("campplus192"), other_ckpt / CKPT_NAME)
    same_weights_other_id = tmp_path / "zh"
    same_weights_other_id.mkdir()
    (same_weights_other_id / get_model("campplus-zh").checkpoint).symlink_to(real_ckpt)
    spec = get_model(DEFAULT_MODEL)
    hamming = dataclasses.replace(spec, frontend=dataclasses.replace(spec.frontend,
                                                                    window="hamming"))  # fmt: skip
    changes = {
        "mode": extractor(ckpt, cache, chunk_seconds=0.5),
        "precision": extractor(ckpt, cache, precision="bf16"),
        "frontend": extractor(ckpt, cache, model=hamming),
        "checkpoint": extractor(other_ckpt, cache),
        "model": extractor(same_weights_other_id, cache, model="campplus-zh"),
    }
    for what, ex in changes.items():
        res = embed(ex, audio)
        assert (res.embedded, res.cached) == (len(audio), 0), what
        got = stack(res, audio)
        if what != "model":  # same weights and settings under another id: same vectors
            assert not np.allclose(got, ref, rtol=0, atol=1e-6), what
    back = embed(extractor(ckpt, cache), audio)
    assert (back.embedded, back.cached) == (0, len(audio))
    np.testing.assert_array_equal(stack(back, audio), ref)
    assert len(cache_info(cache)) == 1 + len(changes)


@pytest.mark.weights
def test_same_basename_different_content_gets_its_own_vector(real_ckpt, tmp_path):
    a = make_audio(tmp_path / "id1" / "vid", 1, seed=11)[0]
    b = make_audio(tmp_path / "id2" / "vid", 1, seed=12)[0]
    c = tmp_path / "dup.wav"
    shutil.copy(a, c)
    res = embed(extractor(real_ckpt.parent, tmp_path / "cache"), [a, b, c])
    assert res.embedded == 2  # a and c share content, so one embedding
    ea, eb, ec = (res.embeddings[str(p)] for p in (a, b, c))
    np.testing.assert_array_equal(ea, ec)
    assert not np.allclose(ea, eb)
    warm = embed(extractor(real_ckpt.parent, tmp_path / "cache"), [b, a])
    np.testing.assert_array_equal(warm.embeddings[str(b)], eb)


def _corrupt(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "garbage":
        path.write_bytes(b"\x93NUMPY garbage" + bytes(range(256)))
    elif how == "wrong-shape":
        np.save(path, np.ones(10, np.float32))
    elif how == "non-finite":
        np.save(path, np.full(192, np.nan, np.float32))
    elif how == "pickled":
        np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    else:
        raise AssertionError(how)


@pytest.mark.weights
def test_corrupt_entries_are_detected_and_recomputed(real_ckpt, tmp_path):
    kinds = ["truncated", "empty", "garbage", "wrong-shape", "non-finite", "pickled"]
    paths = make_audio(tmp_path / "audio", len(kinds) + 1, seed=5)
    cache = tmp_path / "cache"
    first = extractor(real_ckpt.parent, cache)
    ref = stack(embed(first, paths), paths)
    # As an older version left them: one .npy per recording (read on a store miss).
    shutil.rmtree(first.cache.dir / "shards")
    for p, v in zip(paths, ref):
        legacy = first.cache._path(first.cache.file_hash(p))
        legacy.parent.mkdir(parents=True, exist_ok=True)
        np.save(legacy, v)
    for p, how in zip(paths, kinds):
        _corrupt(first.cache._path(first.cache.file_hash(p)), how)
    ex = extractor(real_ckpt.parent, cache)
    res = embed(ex, paths)
    assert (res.embedded, res.cached) == (len(kinds), 1)
    assert ex.cache.stats.corrupt == len(kinds)
    np.testing.assert_allclose(stack(res, paths), ref, rtol=0, atol=1e-5)
    # Recomputed into the store: every entry loads valid now, and a third run embeds nothing.
    for p in paths:
        assert ex.cache.get(ex.cache.file_hash(p)) is not None
    again = embed(extractor(real_ckpt.parent, cache), paths)
    assert (again.embedded, again.cached) == (0, len(paths))


# -- concurrency -----------------------------------------------------------------------------
def _vector(digest: str) -> np.ndarray:
    return np.random.default_rng(int(digest[:12], 16)).standard_normal(192).astype(np.float32)


# One writer: a separate Python process (as a second run would be) that puts the shared keys and
# its own, and reads shared ones back while the others write them. Prints (bad reads, corrupt).
WRITER = """
import hashlib, json, sys
from pathlib import Path
import numpy as np
from speaker_sim_cli.engine.cache import EmbeddingCache

root, worker, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
base, shared = json.loads(sys.argv[4]), json.loads(sys.argv[5])
vec = lambda d: np.random.default_rng(int(d[:12], 16)).standard_normal(192).astype(np.float32)
cache = EmbeddingCache(Path(root), base, 192)
bad = 0
for r in range(rounds):
    for d in shared:
        cache.put(d, vec(d))
        own = hashlib.sha256(f"{worker}-{r}-{d}".encode()).hexdigest()
        cache.put(own, vec(own))
        other = shared[(r + worker) % len(shared)]
        got = cache.get(other)
        if got is not None and not np.array_equal(got, vec(other)):
            bad += 1
print(json.dumps([bad, cache.stats.corrupt, cache.stats.write_errors]))
"""


def test_concurrent_writers_never_corrupt_the_cache(tmp_path):
    import subprocess
    import sys

    root = tmp_path / "cache"
    shared = [hashlib.sha256(f"shared{i}".encode()).hexdigest() for i in range(8)]
    n_proc, rounds = 4, 40
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                WRITER,
                str(root),
                str(w),
                str(rounds),
                json.dumps(BASE),
                json.dumps(shared),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for w in range(n_proc)
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        results.append(json.loads(out))
    # No reader ever saw a half-written or wrong entry, and no write failed.
    assert results == [[0, 0, 0]] * n_proc
    cache = EmbeddingCache(root, BASE, 192)
    own = [
        hashlib.sha256(f"{w}-{r}-{d}".encode()).hexdigest()
        for w in range(n_proc)
        for r in range(rounds)
        for d in shared
    ]
    for d in shared + own:
        got = cache.get(d)
        assert got is not None, d
        np.testing.assert_array_equal(got, _vector(d))
    assert cache.stats.corrupt == 0
    assert not list(root.rglob("*.tmp")), "temp files left behind"
    (row,) = cache_info(root)
    assert row["entries"] == len(shared) + len(own)
    assert (
        json.loads((root / "emb" / cache.key / "meta.json").read_text())["model"] == BASE["model"]
    )


# -- unwritable cache ------------------------------------------------------------------------
@pytest.mark.weights
def test_unwritable_cache_dir_warns_and_still_works(real_ckpt, audio, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    cache = blocker / "cache"
    ex = extractor(real_ckpt.parent, cache)
    assert ex.cache.write_error
    res = embed(ex, audio)
    assert res.embedded == len(audio)
    trials = tmp_path / "trials.csv"
    trials.write_text("enrollment,test\n" + f"{audio[0]},{audio[1]}\n{audio[2]},{audio[3]}\n")
    out = CliRunner().invoke(
        app,
        ["score", str(trials), "--model-dir", str(real_ckpt.parent), "--cache-dir", str(cache),
         "--device", "cpu", "--workers", "0"],
    )  # fmt: skip
    assert out.exit_code == 0, out.output
    warning = [ln for ln in out.stderr.splitlines() if ln.startswith("warning:")]
    assert warning and "cache" in warning[0] and str(cache) in out.stderr.replace("\n", "")
    assert len(out.stdout.strip().splitlines()) == 3  # header + 2 scores


# -- cache info / clear ----------------------------------------------------------------------
@pytest.mark.weights
def test_cache_info_and_clear_cli(real_ckpt, audio, tmp_path):
    cache = tmp_path / "cache"
    embed(extractor(real_ckpt.parent, cache), audio)
    embed(extractor(real_ckpt.parent, cache, chunk_seconds=0.5), audio[:2])
    runner = CliRunner()

    def info() -> dict:
        res = runner.invoke(app, ["cache", "info", "--cache-dir", str(cache), "--json"])
        assert res.exit_code == 0, res.output
        return json.loads(res.stdout)

    doc = info()
    assert doc["entries"] == len(audio) + 2 and doc["models"] == [DEFAULT_MODEL]
    assert doc["bytes"] > 0 and len(doc["settings"]) == 2
    table = runner.invoke(app, ["cache", "info", "--cache-dir", str(cache)])
    assert table.exit_code == 0 and "campplus-zh-en" in table.stdout, table.stdout
    assert f"{len(audio) + 2} entries" in " ".join(table.stdout.split())  # Rich may wrap it

    res = runner.invoke(
        app, ["cache", "clear", "--model", "campplus-zh", "--cache-dir", str(cache)]
    )
    assert res.exit_code == 0 and "removed 0" in res.stderr
    assert info()["entries"] == len(audio) + 2
    res = runner.invoke(app, ["cache", "clear", "--model", "nonsense", "--cache-dir", str(cache)])
    assert res.exit_code == 2 and "unknown model" in res.stderr
    res = runner.invoke(app, ["cache", "clear", "-m", "campplus-zh-en", "--cache-dir", str(cache)])
    assert res.exit_code == 0 and f"removed {len(audio) + 2}" in res.stderr
    assert info()["entries"] == 0
    # A cleared cache recomputes, then clear without --model empties everything.
    assert embed(extractor(real_ckpt.parent, cache), audio).embedded == len(audio)
    res = runner.invoke(app, ["cache", "clear", "--cache-dir", str(cache)])
    assert res.exit_code == 0 and info()["entries"] == 0
    empty = runner.invoke(app, ["cache", "info", "--cache-dir", str(tmp_path / "none"), "--json"])
    assert empty.exit_code == 0 and json.loads(empty.stdout)["entries"] == 0
