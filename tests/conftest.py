"""Shared test fixtures.

Tests that need ``../shared`` (real audio, fixtures, weights) use the ``shared`` fixture: it
skips with a reason when the folder is absent, and fails instead when
``SPEAKER_SIM_REQUIRE_SHARED=1`` (as ``.ci/run`` sets). ``--device`` runs the device-aware tests
on another torch device (SpeechBrain's habit).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SPEAKER_SIM_SHARED", REPO.parent / "shared")).resolve()
REAL_CKPT = (
    SHARED
    / "pretrained"
    / "speech_campplus_sv_zh_en_16k-common_advanced"
    / "campplus_cn_en_common.pt"
)


# pytest-xdist workers share the cores. torch (OpenMP), OpenBLAS and MKL each default to one
# thread per core, so two workers on two cores run four busy threads, and OpenMP's spinning
# barriers then slow conv-heavy tests 3-6x (dev_hard's batch test: 16 s alone, 108 s in the
# parallel suite). Each worker gets its share of the cores instead; set before torch is
# imported, and inherited by the CLI subprocesses and Ray workers the tests start.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
if _WORKERS > 1:
    _SHARE = str(max(1, (os.cpu_count() or 1) // _WORKERS))
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(_var, _SHARE)

# Tests never download and never touch the user's cache.
os.environ.setdefault("SPEAKER_SIM_OFFLINE", "1")
os.environ.setdefault("MODELSCOPE_OFFLINE", "1")
if SHARED.joinpath("pretrained").is_dir():
    os.environ.setdefault("SPEAKER_SIM_PRETRAINED", str(SHARED / "pretrained"))


@pytest.fixture(autouse=True, scope="session")
def _thread_share() -> None:
    """The worker's share of the cores, also when torch was imported before this conftest."""
    if _WORKERS > 1:
        import torch

        torch.set_num_threads(int(_SHARE))


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    os.environ["SPEAKER_SIM_CACHE"] = str(tmp_path_factory.mktemp("cache"))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--device", default="cpu", help="torch device for device-aware tests")


@pytest.fixture(scope="session")
def device(request: pytest.FixtureRequest) -> str:
    dev = str(request.config.getoption("--device"))
    if dev.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            pytest.skip("CUDA is not available on this machine")
    return dev


def need(path: Path, what: str) -> Path:
    """Return ``path`` if it exists; otherwise skip (or fail when shared data is required)."""
    if path.exists():
        return path
    msg = f"{what} not found at {path}"
    if os.environ.get("SPEAKER_SIM_REQUIRE_SHARED") == "1":
        pytest.fail(f"{msg} (SPEAKER_SIM_REQUIRE_SHARED=1)")
    pytest.skip(msg)


@pytest.fixture(scope="session")
def shared() -> Path:
    return need(SHARED, "../shared (real audio and fixtures)")


@pytest.fixture(scope="session")
def real_ckpt(shared: Path) -> Path:
    return need(REAL_CKPT, "real CAM++ checkpoint")


@pytest.fixture(scope="session")
def synth_state_dict(shared: Path):
    """Function (arch name) -> synthetic state dict of torch tensors for that arch's schema."""
    import torch

    sys.path.insert(0, str(shared / "tools"))
    from synth_weights import synth_state_dict as synth  # type: ignore[import-not-found]

    from speaker_sim_cli.models.registry import ARCHS

    def build(arch: str) -> dict[str, torch.Tensor]:
        folder = ARCHS[arch].fixture if arch in ARCHS else "arch"
        schema = json.loads((shared / "fixtures" / folder / f"{arch}.schema.json").read_text())
        return {k: torch.from_numpy(v) for k, v in synth(schema).items()}

    return build


def pad_rows(rows: list[Any], fill: float = 0.0) -> tuple[Any, Any]:
    """Rows (T_i, ...) stacked into (B, max T_i, ...) filled with ``fill`` past each row, and
    their lengths (B,) int64."""
    import torch

    lengths = torch.tensor([r.shape[0] for r in rows], dtype=torch.int64)
    x = torch.full((len(rows), int(lengths.max()), *rows[0].shape[1:]), fill)
    for i, r in enumerate(rows):
        x[i, : r.shape[0]] = r
    return x, lengths


def store_rows(cache: Path) -> dict[str, list[Any]]:
    """Every committed row of the embedding store under the cache root ``cache`` (all
    settings), by content sha256 hex; a key a retried unit stored twice has two rows. Asserts
    each row is whole: its setting's dim, finite, passing its shard's check word."""
    import numpy as np

    from speaker_sim_cli.engine.store import ShardStore, row_checks
    from speaker_sim_cli.engine.store_admin import settings

    out: dict[str, list[Any]] = {}
    for d, meta in settings(cache):
        store = ShardStore(d, int(meta["dim"]))
        for name, sh in store.iter_shards():
            assert not isinstance(sh, Exception), f"{name}: {sh}"
            assert sh.vec.shape == (len(sh.keys), store.dim), name
            assert np.isfinite(sh.vec).all() and (row_checks(sh.keys, sh.vec) == sh.crc).all()
            for k, v in zip(sh.keys, sh.vec):
                out.setdefault(k.tobytes().hex(), []).append(np.array(v))
    return out


def store_entries(cache: Path) -> dict[str, Any]:
    """The store's entries under ``cache``: one vector per distinct key (what a lookup
    returns), each row whole (:func:`store_rows`) and every copy of a key the same vector
    (within 1e-5 relative: a retried unit may batch differently)."""
    import numpy as np

    out = {}
    for key, vecs in store_rows(cache).items():
        for v in vecs[1:]:
            assert np.linalg.norm(v - vecs[0]) <= 1e-5 * np.linalg.norm(vecs[0]), key
        out[key] = vecs[-1]
    return out


def store_count(cache: Path) -> int:
    """Distinct keys committed under ``cache`` (from the shards' keys; cheap enough to poll)."""
    from speaker_sim_cli.engine.store_admin import cache_info

    return sum(int(r["entries"]) for r in cache_info(cache)) if cache.exists() else 0


def fuzz_settings(examples: int) -> Any:
    """Hypothesis settings of the fuzz tests: ``examples`` cases, reproducible (derandomised, no
    example database), no deadline."""
    from hypothesis import HealthCheck, Phase, settings

    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        print_blob=False,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen | None = None, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.communicate()}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {seconds} s")


@contextlib.contextmanager
def moto_s3(bucket: str) -> Iterator[dict[str, Any]]:
    """moto's S3 server on a free port of 127.0.0.1, with ``bucket`` made; the storage options
    and fake credentials of this process point at it (restored after)."""
    pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    from speaker_sim_cli.io import storage

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    saved = {
        k: os.environ.get(k)
        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", storage.ENV)
    }
    try:
        wait_for_port(port, proc)
        os.environ.update(
            AWS_ACCESS_KEY_ID="testing",
            AWS_SECRET_ACCESS_KEY="testing",
            AWS_DEFAULT_REGION="us-east-1",
        )
        endpoint = f"http://127.0.0.1:{port}"
        storage.set_options({"s3": {"endpoint_url": endpoint}})
        fs, _ = storage.filesystem(f"s3://{bucket}")
        fs.mkdir(bucket)
        yield {"fs": fs, "endpoint": endpoint, "options": os.environ[storage.ENV]}
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def bucket_trials(fs: Any, where: str, speech: list[Path], local: Path) -> list[tuple[str, str]]:
    """Every pair of ``speech`` as a trial list ``where/trials.csv`` (``where``: bucket/prefix)
    over ``where/audio/NAME``; the same list and files under ``local``. Returns the pairs."""
    names = [p.name for p in speech]
    pairs = [(a, b) for a in names for b in names if a < b]
    text = "enrollment,test\n" + "".join(f"audio/{a},audio/{b}\n" for a, b in pairs)
    (local / "audio").mkdir(parents=True)
    for p in speech:
        fs.put_file(str(p), f"{where}/audio/{p.name}")
        (local / "audio" / p.name).write_bytes(p.read_bytes())
    fs.pipe_file(f"{where}/trials.csv", text.encode())
    (local / "trials.csv").write_text(text)
    return pairs


def score_map(text: str) -> dict[tuple[str, str], float]:
    """A score file's scores by (enrollment, test) file names."""
    import csv
    import io

    rows = csv.DictReader(io.StringIO(text))
    return {
        (r["enrollment"].rsplit("/", 1)[-1], r["test"].rsplit("/", 1)[-1]): float(r["score"])
        for r in rows
        if r.get("score")
    }


# Ray keeps the first auth token it reads for the life of the process: a second cluster in the
# same test process with another token refuses this process's calls (every actor it creates
# fails at once). Every Ray cluster of the tests uses this one token.
RAY_TOKEN = secrets.token_hex(32)
