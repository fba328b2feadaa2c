"""The GPU path without a GPU (issue 17): what can be simulated on a CPU is.

- out-of-memory: a test double raising ``torch.OutOfMemoryError`` above a batch size proves the
  split, retry and the remembered budget;
- shards as CPU processes (``cpu,cpu``) prove streaming per batch, the cache filling as results
  arrive and a failing shard costing only its batch;
- TF32 switches: saved and restored around our forward, off inside the fp32 submodules;
- host syncs and uploads per batch counted with a ``TorchFunctionMode`` around the launch;
- device and dtype mistakes: every architecture on the meta device (a tensor made without the
  input's device fails there) and as fake tensors under bf16/fp16 autocast. A fake *CUDA* device
  is not workable with a CPU-only torch: building parameters or arange on it initialises CUDA
  ("PyTorch is not linked with support for cuda devices") and autocast("cuda") is disabled, so
  the checks use meta and the CPU's autocast rules (CUDA's op lists differ).
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from speaker_sim_cli.engine import embedder as emb_mod
from speaker_sim_cli.engine.cache import EmbeddingCache
from speaker_sim_cli.engine.config import (
    DEFAULT_BATCH_ROWS,
    EngineConfig,
    check_device_syntax,
    default_workers,
    gpu_batch_frames,
    usable_cores,
)
from speaker_sim_cli.engine.data import plan_batches
from speaker_sim_cli.engine.embedder import Embedder, is_oom, shm_plan, tf32_off
from speaker_sim_cli.errors import UsageError
from speaker_sim_cli.models.masking import count_divide, masked_mean, masked_std
from speaker_sim_cli.models.registry import ARCHS, DEFAULT_MODEL, get_model


# -- test doubles ------------------------------------------------------------------------------
class _Tiny(torch.nn.Module):
    """(B, T, F) -> (B, 4): a 'head' conv then a masked mean and a 'body' linear.

    ``oom_above``: raise ``torch.OutOfMemoryError`` (as the CUDA allocator does) when a batch
    holds more than this many padded frames. ``seen`` records (rows, frames) of every call that
    ran, ``flags`` the TF32 switches inside the head.
    """

    def __init__(self, oom_above: int = 0) -> None:
        super().__init__()
        self.head = torch.nn.Conv1d(4, 8, 3, padding=1)
        self.body = torch.nn.Linear(8, 4)
        self.oom_above = oom_above
        self.seen: list[tuple[int, int]] = []
        self.flags: list[tuple[bool, bool]] = []
        self.head.register_forward_hook(self._record_flags)

    def _record_flags(self, *_: Any) -> None:
        b = torch.backends
        self.flags.append((b.cudnn.allow_tf32, b.cuda.matmul.allow_tf32))

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        rows, frames = feats.shape[0], feats.shape[1]
        if self.oom_above and rows * frames > self.oom_above:
            raise torch.OutOfMemoryError(
                f"CUDA out of memory. Tried to allocate {rows * frames} frames (test double)"
            )
        self.seen.append((rows, frames))
        h = self.head(feats[..., :4].transpose(1, 2))
        from speaker_sim_cli.models.masking import masked_mean as mm

        return self.body(mm(h, lengths).to(h.dtype))


def _spec(arch: str = "tinynet") -> Any:
    return dataclasses.replace(get_model(DEFAULT_MODEL), arch=arch, dim=4)


def _waves(n: int, seed: int = 0) -> list[torch.Tensor]:
    rng = np.random.default_rng(seed)
    return [torch.from_numpy(0.1 * rng.standard_normal(int(16000 * rng.uniform(0.5, 4))))
            .float() for _ in range(n)]  # fmt: skip


# -- 1. out of memory -------------------------------------------------------------------------
def test_oom_splits_the_batch_retries_and_remembers_the_budget(monkeypatch):
    monkeypatch.setattr(emb_mod, "_LEARNED_FRAMES", {})
    waves = _waves(24)
    model = _Tiny()
    ref = Embedder(_spec(), model, EngineConfig(device="cpu", batch_size=1)).embed_waves(waves)
    model.oom_above, model.seen = 3_000, []
    big = Embedder(_spec(), model, EngineConfig(device="cpu", batch_size=64,
                                                batch_frames=100_000))  # fmt: skip
    got = big.embed_waves(waves)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)  # same vectors, split or not
    assert big.stats.extra["oom_splits"] >= 1
    assert all(r * t <= 3_000 for r, t in model.seen), "every batch that ran fitted"
    assert big.batch_frames <= 3_000 < 100_000
    # Remembered for the rest of the run: a new Embedder of this arch on this device starts there
    again = Embedder(_spec(), model, EngineConfig(device="cpu", batch_frames=100_000))
    assert again.batch_frames == big.batch_frames
    splits = big.stats.extra["oom_splits"]
    big.embed_waves(waves)
    assert big.stats.extra["oom_splits"] == splits, "no new out-of-memory once the budget shrank"


def test_oom_of_a_single_recording_fails_only_it(tmp_path, monkeypatch):
    import soundfile as sf

    monkeypatch.setattr(emb_mod, "_LEARNED_FRAMES", {})
    paths = []
    for i, sec in enumerate([1.0, 1.5, 9.0, 2.0]):
        p = tmp_path / f"r{i}.wav"
        sf.write(str(p), 0.1 * np.random.default_rng(i).standard_normal(int(16000 * sec)), 16000)
        paths.append(str(p))
    emb = Embedder(_spec(), _Tiny(oom_above=600), EngineConfig(device="cpu", workers=0,
                                                               batch_frames=10_000))  # fmt: skip
    out = {i: (e, err) for i, e, err in emb.embed_files(paths)}
    assert sorted(out) == [0, 1, 2, 3]
    assert out[2][0] is None and "out of memory on cpu even alone (898 frames)" in out[2][1]
    assert all(out[i][0] is not None for i in (0, 1, 3))


def test_oom_is_recognised_on_every_backend():
    assert is_oom(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_oom(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to ..."))
    assert is_oom(RuntimeError("MPS backend out of memory (MPS allocated: 1 GB)"))
    assert not is_oom(RuntimeError("expected scalar type Float but found Half"))


def test_default_gpu_budgets_follow_memory_and_rows_are_hundreds():
    free = 79 * 2**30  # an 80 GB card
    cam, huge = gpu_batch_frames("campplus192", free), gpu_batch_frames("eres2net_huge192", free)
    assert cam == 1_000_000 and 100_000 < huge < 130_000
    assert gpu_batch_frames("ecapa1024", free) < gpu_batch_frames("campplus192", free)
    assert gpu_batch_frames("campplus192", None) == 200_000  # no figure: the old default
    # 8 s clips (798 frames) on an 80 GB card: hundreds of rows per batch, not 32.
    plan = plan_batches([798] * 5000, cam, DEFAULT_BATCH_ROWS["cuda"])
    assert min(len(b) for b in plan[:-1]) >= 1000


# -- 2. shards stream; a failing shard costs only its batch -----------------------------------
def _fail_second_batch_of_shard_1(shard: int, module: torch.nn.Module) -> torch.nn.Module:
    """Model hook run in the shard processes: shard 1's second forward raises."""
    if shard == 1:
        calls = [0]
        forward = module.forward

        def failing(*args: Any, **kwargs: Any) -> Any:
            calls[0] += 1
            if calls[0] == 2:
                raise RuntimeError("injected failure on the second batch")
            return forward(*args, **kwargs)

        module.forward = failing  # type: ignore[method-assign]
    return module


@pytest.mark.weights
@pytest.mark.slow  # four spawned processes loading torch and CAM++ (as test_shard.py's)
def test_a_failing_shard_keeps_every_other_embedding_cached(shared, real_ckpt, tmp_path,
                                                            monkeypatch):  # fmt: skip
    import functools

    from speaker_sim_cli import pipeline
    from speaker_sim_cli.engine.shard import embed_sharded

    files = [str(p) for p in sorted((shared / "audio" / "speechbrain_samples").glob("*.wav"))]
    hooked = functools.partial(embed_sharded, model_hook=_fail_second_batch_of_shard_1)
    monkeypatch.setattr(pipeline, "embed_sharded", hooked)
    cfg = EngineConfig(device="cpu,cpu", workers=0, runners=1, batch_frames=300)
    seconds: list[float] = []
    ex = pipeline.Extractor(DEFAULT_MODEL, real_ckpt.parent, cfg, cache_dir=tmp_path)
    res = ex.embed_paths(files, progress=lambda n, s: seconds.append(s))
    assert res.failures, "shard 1's second batch failed"
    assert all("injected failure" in why for why in res.failures.values())
    assert len(res.failures) <= 2, "only the in-flight batch (<= 2 of these clips) is lost"
    assert len(res.embeddings) == len(files) - len(res.failures) == res.embedded
    # Progress reported audio seconds as batches finished (not 0).
    assert len(seconds) > 2 and sum(seconds) > 20.0
    # Everything embedded is in the cache: a rerun embeds only the failed ones.
    monkeypatch.setattr(pipeline, "embed_sharded", embed_sharded)
    again = pipeline.Extractor(DEFAULT_MODEL, real_ckpt.parent, cfg, cache_dir=tmp_path)
    res2 = again.embed_paths(files)
    assert res2.cached == len(files) - len(res.failures) and res2.embedded == len(res.failures)
    assert not res2.failures
    for f in res.embeddings:
        np.testing.assert_array_equal(res.embeddings[f], res2.embeddings[f])


def test_shard_process_sets_its_device_and_reports_failures(monkeypatch):
    import queue

    from speaker_sim_cli.engine.shard import _embed_shard

    calls: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(torch.device(d)))
    out: queue.Queue[Any] = queue.Queue()
    cfg = dataclasses.replace(EngineConfig(device="cpu"), device="cuda:1")
    _embed_shard(0, DEFAULT_MODEL, "/nonexistent/ckpt.pt", cfg, ["a.wav"], [16000], out)
    msgs = [out.get_nowait() for _ in range(out.qsize())]
    assert calls == [torch.device("cuda:1")]
    assert msgs[-1] == ("done", 0) and msgs[0][0] == "error"


# -- 3 and 4. TF32: off inside our forward (fp32 submodules included), restored after ------------
def test_tf32_is_off_in_fp32_submodules_and_restored_after(monkeypatch):
    monkeypatch.setitem(emb_mod.FP32_SUBMODULES, ("tinynet", "bf16"), ("head",))
    b = torch.backends
    saved = (b.cudnn.allow_tf32, b.cuda.matmul.allow_tf32)
    try:
        b.cudnn.allow_tf32, b.cuda.matmul.allow_tf32 = True, True  # an application's choice
        for precision in ("fp32", "bf16", "fp16"):
            model = _Tiny()
            emb = Embedder(_spec(), model, EngineConfig(device="cpu", precision=precision))
            assert (b.cudnn.allow_tf32, b.cuda.matmul.allow_tf32) == (True, True)
            emb.embed_waves(_waves(3))
            assert model.flags and set(model.flags) == {(False, False)}, precision
            assert (b.cudnn.allow_tf32, b.cuda.matmul.allow_tf32) == (True, True)
        # Overlapping scopes (CPU runner threads): the last one out restores.
        inside = threading.Event()
        release = threading.Event()

        def hold() -> None:
            with tf32_off():
                inside.set()
                release.wait(5)

        t = threading.Thread(target=hold)
        t.start()
        inside.wait(5)
        with tf32_off():
            assert not b.cudnn.allow_tf32
        assert not b.cudnn.allow_tf32, "still inside the other thread's scope"
        release.set()
        t.join()
        assert (b.cudnn.allow_tf32, b.cuda.matmul.allow_tf32) == (True, True)
        with pytest.raises(RuntimeError), tf32_off():
            raise RuntimeError("an error inside")
        assert b.cudnn.allow_tf32
    finally:
        b.cudnn.allow_tf32, b.cuda.matmul.allow_tf32 = saved


# -- 5. devices -------------------------------------------------------------------------------
@pytest.mark.parametrize("device", ["cuda,cuda", "cuda:0,cuda:0", "cuda,cuda:0", "cuda:1, cuda:1"])
def test_a_gpu_named_twice_is_a_usage_error(device):
    with pytest.raises(UsageError, match="named twice"):
        check_device_syntax(device)
    with pytest.raises(UsageError):
        EngineConfig(device=device)


def test_duplicate_device_exits_2_from_the_cli(tmp_path):
    from typer.testing import CliRunner

    from speaker_sim_cli.cli.main import app

    wav = tmp_path / "a.wav"
    wav.write_bytes(b"")
    r = CliRunner().invoke(app, ["embed", str(wav), "--device", "cuda:0,cuda:0", "-o",
                                 str(tmp_path / "out")])  # fmt: skip
    assert r.exit_code == 2 and "named twice" in r.output


def test_distinct_devices_and_cpu_lists_are_accepted():
    for device in ("cuda:0,cuda:1", "cpu,cpu", "cuda", "auto", "cpu"):
        check_device_syntax(device)


def test_decode_workers_follow_the_cores_split_across_shards():
    cores = usable_cores()
    assert default_workers() == cores - 1
    assert default_workers(2) == (cores - 1) // 2


# -- bf16 frame counts ---------------------------------------------------------------------------
def test_frame_counts_are_exact_in_bf16():
    counts = torch.tensor([1499, 1023, 777, 257])
    total = counts.to(torch.float32)[:, None] * 3.0
    assert torch.equal(count_divide(total, counts), torch.full((4, 1), 3.0))
    assert counts.to(torch.bfloat16).tolist() != counts.tolist(), "the hazard is real"
    x = torch.randn(4, 16, 1600).to(torch.bfloat16)
    got = masked_mean(x, counts)
    want = masked_mean(x.float(), counts).to(torch.bfloat16)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want), "only the final rounding"
    sd = masked_std(x, counts).float()
    ref = masked_std(x.float(), counts)
    assert torch.allclose(sd, ref, rtol=2e-2)


# -- host syncs and uploads per batch ---------------------------------------------------------
_READS = {"item", "tolist", "__int__", "__float__", "__bool__", "__index__", "cpu", "numpy"}


class _Count(TorchFunctionMode):
    """Counts reads of tensor values into Python (syncs on a GPU) and uploads: ``.to`` with a
    device applied to a tensor this region did not make (host data; on a CPU run the move is a
    no-op, so it is counted by what it would be on a GPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()
        self.made: list[torch.Tensor] = []  # kept alive so that ids stay unique
        self.ids: set[int] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in _READS:
            self.calls["read"] += 1
        elif (
            name == "to"
            and ("device" in kwargs or any(isinstance(a, (str, torch.device)) for a in args[1:]))
            and id(args[0]) not in self.ids
        ):
            self.calls["upload"] += 1
        out = func(*args, **kwargs)
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.made.append(t)
                self.ids.add(id(t))
        return out


@pytest.mark.parametrize("arch", ["campplus192"])
def test_no_host_sync_and_two_uploads_per_batch(arch, tmp_path, monkeypatch):
    import soundfile as sf

    spec = dataclasses.replace(get_model(DEFAULT_MODEL), arch=arch)
    model = ARCHS[arch].build().eval()
    paths = []
    for i in range(6):
        p = tmp_path / f"r{i}.wav"
        sf.write(str(p), 0.1 * np.random.default_rng(i).standard_normal(16000 + 800 * i), 16000)
        paths.append(str(p))
    syncs = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: syncs.append(a))
    emb = Embedder(spec, model, EngineConfig(device="cpu", workers=0, runners=1,
                                             batch_frames=400))  # fmt: skip
    emb.embed_waves(_waves(1))  # window and filterbank placed on the device once, here
    launches: list[Counter[str]] = []
    finishes: list[Counter[str]] = []
    launch, finish = Embedder._launch, Embedder._finish

    def counted_launch(self: Embedder, rows: Any) -> Any:
        with _Count() as c:
            out = launch(self, rows)
        launches.append(c.calls)
        return out

    def counted_finish(self: Embedder, *args: Any) -> Any:
        with _Count() as c:
            out = finish(self, *args)
        finishes.append(c.calls)
        return out

    monkeypatch.setattr(Embedder, "_launch", counted_launch)
    monkeypatch.setattr(Embedder, "_finish", counted_finish)
    out = list(emb.embed_files(paths))
    assert len(out) == 6 and all(e is not None for _, e, _ in out)
    assert len(launches) >= 3
    for c in launches:  # waves and lengths go up; nothing is read back between stages
        assert c["read"] == 0 and c["upload"] == 2, c
    assert all(c["upload"] == 0 for c in finishes)
    assert sum(c["read"] for c in finishes) == len(launches), "one read per model batch"
    assert not syncs, "no torch.cuda.synchronize"


# -- device / dtype mistakes on meta and fake tensors -----------------------------------------
def _spec_of(arch: str) -> Any:
    from speaker_sim_cli.models.registry import MODELS

    return next((m for m in MODELS if m.arch == arch), get_model(DEFAULT_MODEL))


@pytest.mark.parametrize(
    "arch", [a if a == "campplus192" else pytest.param(a, marks=pytest.mark.slow) for a in ARCHS]
)
def test_every_arch_runs_on_meta_and_under_low_precision_autocast(arch):
    """Meta: any tensor an arch makes without the input's device lands on the CPU and the op
    fails; a value read on the host (a sync per batch on a GPU) fails too. Fake tensors under
    CPU autocast (bf16, fp16, with the fp32 submodules held in fp32): any dtype mismatch fails.
    3 rows of 2.0, 1.5 and 1.0 s through the model's own front end."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from speaker_sim_cli.audio.features import compute_features

    frontend = _spec_of(arch).frontend
    sr = frontend.sample_rate
    lengths = torch.tensor([2 * sr, 3 * sr // 2, sr])
    with torch.device("meta"):
        net = ARCHS[arch].build().eval()
    with torch.no_grad():
        try:
            waves = torch.empty(3, 2 * sr, device="meta")
            out = net(*compute_features(waves, lengths.to("meta"), frontend))
        except (NotImplementedError, RuntimeError) as exc:
            if "meta" not in str(exc):
                raise
            pytest.fail(f"{arch} reads a tensor value on the host (a sync per batch on a GPU): "
                        f"{exc}")  # fmt: skip
        assert out.device.type == "meta" and out.shape[0] == 3
        state = {**dict(net.named_parameters()), **dict(net.named_buffers())}
        for precision, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
            ids = frozenset(emb_mod._keep_fp32(net, arch, precision).values())
            with FakeTensorMode(allow_non_fake_inputs=True) as mode:
                params = {k: mode.from_tensor(torch.empty_like(v, device="cpu"))
                          for k, v in state.items()}  # fmt: skip
                waves = mode.from_tensor(torch.empty(3, 2 * sr))
                feats, n = compute_features(waves, mode.from_tensor(lengths), frontend)
                with torch.autocast("cpu", dtype=dtype), emb_mod._fp32_scope(ids):
                    emb = torch.func.functional_call(net, params, (feats, n))
            assert emb.shape[0] == 3 and emb.dtype in (torch.float32, dtype), (precision, emb)
    # Nothing fake was cached on the way (the front end's window and filterbank cache).
    feats, _ = compute_features(torch.zeros(1, sr).uniform_(-0.1, 0.1), None, frontend)
    assert type(feats) is torch.Tensor


# -- shared memory and persistent workers -------------------------------------------------------
def test_small_dev_shm_lowers_prefetch_then_decodes_in_process(monkeypatch):
    class St:
        f_frsize = 4096

        def __init__(self, mb: int) -> None:
            self.f_bavail = mb * 2**20 // 4096

    mb = 2**20
    monkeypatch.setattr(os, "statvfs", lambda _: St(64))  # Docker's default
    assert shm_plan(8, 4, 1 * mb) == (8, 4, "")
    w, p, note = shm_plan(8, 4, 3 * mb)
    assert (w, p, note) == (8, 1, "")
    w, p, note = shm_plan(8, 4, 100 * mb)
    assert w == 0 and "/dev/shm has 64 MB free" in note and "--shm-size" in note
    monkeypatch.setattr(os, "statvfs", lambda _: St(24 * 1024))
    assert shm_plan(8, 4, 100 * mb) == (8, 4, "")


def test_decode_workers_persist_across_calls(tmp_path):
    import soundfile as sf

    paths = []
    for i in range(4):
        p = tmp_path / f"r{i}.wav"
        sf.write(str(p), 0.1 * np.random.default_rng(i).standard_normal(16000), 16000)
        paths.append(str(p))
    emb = Embedder(_spec(), _Tiny(), EngineConfig(device="cpu", workers=1, runners=1))
    try:
        first = list(emb.embed_files(paths))
        pids = [w.pid for w in emb._loader._iterator._workers]  # type: ignore[union-attr]
        assert emb.stats.extra["workers_warm"] is False
        second = list(emb.embed_files(paths[:2]))
        assert [w.pid for w in emb._loader._iterator._workers] == pids  # type: ignore[union-attr]
        assert emb.stats.extra["workers_warm"] is True and "first_batch_s" in emb.stats.extra
        assert len(first) == 4 and len(second) == 2
    finally:
        emb.close()


def test_cache_writes_happen_off_the_feeding_thread(real_ckpt, tmp_path, monkeypatch):
    from speaker_sim_cli import pipeline

    writers: set[str] = set()
    put = EmbeddingCache.put

    def spy(self: EmbeddingCache, digest: str, emb: np.ndarray) -> None:
        writers.add(threading.current_thread().name)
        put(self, digest, emb)

    monkeypatch.setattr(EmbeddingCache, "put", spy)
    files = sorted(str(p) for p in (Path(real_ckpt).parents[2] / "audio" / "speechbrain_samples")
                   .glob("*.wav"))[:3]  # fmt: skip
    ex = pipeline.Extractor(DEFAULT_MODEL, real_ckpt.parent, EngineConfig(device="cpu",
                            workers=0), cache_dir=tmp_path)  # fmt: skip
    res = ex.embed_paths(files)
    assert res.embedded == 3 and ex.cache.stats.writes == 3
    assert writers and threading.current_thread().name not in writers
