"""Worker side of ``--ray``: the actor that does all the file work for its work items.

For each path it is handed it stats and content-hashes the file (the cache key), looks it up in
the embedding store, probes and decodes the misses, embeds them and writes the store; the driver
gets back one small row per unit (status bytes, 32-byte digests, failure reasons). Runs on the
cluster's nodes, so it must stay importable from the installed package.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .config import EngineConfig

# One status byte per recording in a result row.
OK, CACHED, FAILED = 0, 1, 2
NON_FINITE = "the model produced a non-finite embedding"
CACHE_HINT = (
    "with --ray, --cache-dir must be a path that every node and this machine can read and "
    "write (NFS, or a bucket URL such as s3://bucket/store with --storage-options or each "
    "node's credentials): the workers write the embeddings there and this process reads them "
    "back"
)
# Test hooks, off unless the variable is set. CRASH_ENV (read on the driver, handed to the
# actors): a regex; a work item whose path matches makes the worker process os._exit, as a
# decoder segfault would. HIDE_ENV (read in the worker's own environment, i.e. per node): a
# path prefix this node behaves as if it could not see (a node without the shared mount).
# HOLD_ENV (read on the driver, handed to the actors): a file; while it exists, every unit
# waits before it starts, after leaving a marker ``<file>.<node id>`` (a test then acts while
# units are in flight on nodes it knows, without racing the job).
CRASH_ENV = "SPEAKER_SIM_TEST_RAY_CRASH"
HOLD_ENV = "SPEAKER_SIM_TEST_RAY_HOLD"
# A unit is embedded in sub-batches of at most this many recordings / seconds of audio.
SUB_ROWS = {"cpu": 32, "cuda": 128}
SUB_SECONDS = {"cpu": 600.0, "cuda": 4_000.0}
HIDE_ENV = "SPEAKER_SIM_TEST_RAY_HIDE"
# A worker fetches the objects of the URLs among its next this many items at once.
URL_WINDOW = 64


def pack_paths(paths: Sequence[str]) -> bytes | list[str]:
    """A unit's paths as one block to send: NUL-separated UTF-8 (no path can hold a NUL), so
    the driver hands Ray one bytes object per unit, not a list of str objects to pickle. A
    list where some path does hold a NUL goes as the list (that path then fails on the worker
    as it would locally)."""
    block = "\0".join(paths).encode("utf-8", "surrogatepass")
    return block if block.count(0) == len(paths) - 1 else list(paths)


def unpack_paths(block: bytes | Sequence[str]) -> list[str]:
    """The paths of :func:`pack_paths`'s block (a list passes as it is)."""
    if isinstance(block, bytes | bytearray):
        return bytes(block).decode("utf-8", "surrogatepass").split("\0")
    return list(block)


def absolute(path: str, cwd: str) -> str:
    """``path`` as the driver named it, made absolute against the driver's ``cwd`` (a URL or a
    wav.scp command stays as it is; an empty ``cwd``: this process's)."""
    from ..io.storage import as_url, is_url

    if is_url(path):  # also one that went through pathlib (``http:/host/...``)
        return as_url(path)
    if path[:1] == "/" or "://" in path or path.rstrip().endswith("|"):
        return path
    return os.path.normpath(os.path.join(cwd, path)) if cwd else os.path.abspath(path)


def read_failure(exc: OSError) -> str:
    """The reason a file that cannot be stat'ed or read fails with (as the local engine)."""
    if isinstance(exc, FileNotFoundError):
        return "file not found"
    if isinstance(exc, IsADirectoryError):
        return "is a directory, not an audio file"
    return f"cannot read ({exc.strerror or exc})"


def _hidden(path: str | Path) -> bool:
    prefix = os.environ.get(HIDE_ENV)
    return bool(prefix) and str(path).startswith(prefix)  # type: ignore[arg-type]


def _node_id() -> str:
    try:
        import ray

        if not ray.is_initialized():  # built outside Ray (tests): asking would start one
            return "?"
        return str(ray.get_runtime_context().get_node_id())
    except Exception:
        return "?"


class EmbedActor:
    """Ray actor: the model on this actor's device; runs work units and writes the store.

    The constructor only records who and where this actor is, so :meth:`ready` answers as soon
    as Ray has placed it on a node; :meth:`setup` loads the model and opens the store (the
    driver calls it next; :meth:`run` calls it too if nobody did). Neither raises: a node that
    cannot serve (checkpoint missing or different, store not writable, model does not load)
    says so in the answer, and the driver stops the job with that message (naming the node and
    the path) instead of a restart loop.
    ``standin=True`` (benchmarks only) replaces the file work and the network by a hash of the
    item's key, so that the driver's own cost per item can be measured on synthetic items.
    """

    def __init__(
        self,
        spec: Any,
        checkpoint: str,
        cfg: EngineConfig,
        cache_root: str,
        ingredients: dict[str, Any],
        threads: int = 1,
        decode_threads: int = 2,
        crash_pattern: str = "",
        standin: bool = False,
        cwd: str = "",
        hold: str = "",
        storage_options: str = "",
    ) -> None:
        self.host = socket.gethostname()
        self.node_id = _node_id()
        self.key = f"{self.host}:{os.getpid()}"
        self.where = f"Ray worker {self.key} (node {self.node_id[:12]})"
        self.fatal = ""
        self.embedder: Any = None
        self.cache: Any = None
        self.cfg = cfg
        self.spec = spec
        self.decode_threads = max(1, decode_threads)
        self.crash = re.compile(crash_pattern) if crash_pattern else None
        self.hold = hold
        self.standin = standin
        self.cwd = cwd  # the driver's working directory: relative paths are relative to it
        if storage_options:  # the driver's --storage-options (endpoints, keys) hold here too
            from ..io.storage import set_options

            set_options(storage_options)
        self._todo: tuple[Any, ...] | None = (
            None if standin else (spec, checkpoint, cfg, cache_root, ingredients, threads)
        )

    def setup(self) -> dict[str, Any]:
        """Load the model and open the store (once); then :meth:`ready`'s answer."""
        if self._todo is not None:
            spec, checkpoint, cfg, cache_root, ingredients, threads = self._todo
            self._todo = None
            try:
                root = cache_root if "://" in cache_root else Path(cache_root)  # or a bucket
                self._setup(spec, Path(checkpoint), cfg, root, ingredients, threads)
            except Exception as exc:
                self.fatal = self.fatal or (
                    f"{self.where}: cannot load the model: {type(exc).__name__}: {exc}"
                )
        return self.ready()

    def _setup(
        self,
        spec: Any,
        checkpoint: Path,
        cfg: EngineConfig,
        root: Path | str,
        ingredients: dict[str, Any],
        threads: int,
    ) -> None:
        import torch

        from ..io import storage
        from ..models.weights import checkpoint_hash
        from ..paths import atomic_write_bytes
        from .cache import EmbeddingCache
        from .embedder import Embedder

        torch.set_num_threads(max(1, threads))
        if not checkpoint.is_file() or _hidden(checkpoint):
            self.fatal = (f"{self.where}: checkpoint {checkpoint} not found on that node: every "
                          "node needs the checkpoint at the same path (or pass --model-dir with "
                          "a shared folder)")  # fmt: skip
            return
        want = ingredients.get("checkpoint_sha256")
        if want and checkpoint_hash(checkpoint) != want:
            self.fatal = (f"{self.where}: checkpoint {checkpoint} differs from the driver's "
                          f"(sha256 {want[:12]}...): use the same file on every node")  # fmt: skip
            return
        try:
            if _hidden(root):
                raise FileNotFoundError(2, "No such file or directory")
            cache = EmbeddingCache(root, ingredients, spec.dim)
            if cache.write_error:
                raise OSError(cache.write_error)
            probe = f"{cache.dir}/.probe-{self.host}-{os.getpid()}"
            if isinstance(cache.root, str):  # a bucket (s3://...)
                storage.atomic_write(probe, b"")
                storage.remove(probe)
            else:
                atomic_write_bytes(Path(probe), b"")
                Path(probe).unlink()
        except OSError as exc:
            self.fatal = (f"{self.where}: cannot write the cache {root} "
                          f"({exc.strerror or exc}); {CACHE_HINT}")  # fmt: skip
            return
        module = spec.build()
        from .ray_engine import load_weights

        load_weights(module, checkpoint, spec)
        embedder = Embedder(spec, module, cfg)
        if list(embedder.fp32_modules) != list(ingredients.get("fp32_modules", [])):
            self.fatal = f"{self.where}: fp32 submodules {embedder.fp32_modules} differ"
            return
        self.cache = cache
        self.embedder = embedder

    def ready(self) -> dict[str, Any]:
        """Who this actor is, and the reason it cannot serve ("" when it can)."""
        return {"key": self.key, "host": self.host, "node_id": self.node_id, "fatal": self.fatal}

    # -- one work unit ---------------------------------------------------------------------
    def run(self, lo: int, block: bytes | Sequence[str]) -> dict[str, Any]:
        """Process items ``lo .. lo+n-1`` (their paths: a :func:`pack_paths` block, or a list);
        returns the unit's small result row."""
        self.setup()
        if self.hold:
            self._wait_while_held()
        t0, c0 = time.perf_counter(), time.process_time()
        paths = [absolute(p, self.cwd) for p in unpack_paths(block)]
        n = len(paths)
        status = bytearray(n)
        digests = bytearray(32 * n)
        reasons: dict[int, str] = {}
        row: dict[str, Any] = {"lo": lo, "n": n, "actor": self.key, "host": self.host,
                               "node_id": self.node_id, "fatal": self.fatal, "audio_s": 0.0,
                               "frames": 0, "padded": 0.0, "chunked": 0, "batches": 0}  # fmt: skip
        if self.fatal:
            return row
        if self.standin:
            for j, p in enumerate(paths):
                self._maybe_crash(p)
                digests[32 * j : 32 * j + 32] = hashlib.sha256(p.encode()).digest()
        else:
            self._files(paths, status, digests, reasons, row)
        # busy_s: wall time of the unit; cpu_s: CPU time of this worker process meanwhile
        # (decode threads included), so a loaded node shows as cpu_s well below busy_s.
        row.update(status=bytes(status), digest=bytes(digests), reasons=reasons,
                   busy_s=time.perf_counter() - t0, cpu_s=time.process_time() - c0)  # fmt: skip
        return row

    def _wait_while_held(self, limit_s: float = 600.0) -> None:
        """Test hook (HOLD_ENV): mark this node as holding a unit, then wait while the file
        exists (at most ``limit_s``)."""
        if not os.path.exists(self.hold):
            return
        Path(f"{self.hold}.{self.node_id}").touch()
        deadline = time.monotonic() + limit_s
        while os.path.exists(self.hold) and time.monotonic() < deadline:
            time.sleep(0.02)

    def _maybe_crash(self, path: str) -> None:
        if self.crash is not None and self.crash.search(path):
            os._exit(70)  # test hook (CRASH_ENV): what a decoder segfault does to the worker

    def _files(
        self,
        paths: list[str],
        status: bytearray,
        digests: bytearray,
        reasons: dict[int, str],
        row: dict[str, Any],
    ) -> None:
        from collections import deque
        from concurrent.futures import Future, ThreadPoolExecutor

        for p in paths:
            self._maybe_crash(p)
        # The CPU stage (hash, probe, decode) runs ahead in its threads while the model embeds
        # the previous sub-batch; a unit is embedded in sub-batches, so its size sets only the
        # scheduling grain, never the memory.
        dev = "cuda" if self.cfg.device == "cuda" else "cpu"
        rows, seconds = SUB_ROWS[dev], SUB_SECONDS[dev]
        sr = self.spec.sample_rate
        waves: list[Any] = []
        where: list[int] = []
        held = 0.0
        todo = iter(enumerate(paths))
        ahead: deque[tuple[int, Future[Any]]] = deque()
        known: dict[str, str | OSError] = {}  # content keys of URLs fetched many at a time
        with ThreadPoolExecutor(self.decode_threads, thread_name_prefix="decode") as pool:

            def fill() -> None:
                while len(ahead) < 2 * self.decode_threads:
                    nxt = next(todo, None)
                    if nxt is None:
                        return
                    self._fetch_ahead(paths, nxt[0], known)
                    ahead.append((nxt[0], pool.submit(self._load, nxt[1], known.get(nxt[1]))))

            fill()
            while ahead:
                j, fut = ahead.popleft()
                fill()
                digest, wave, why, cached = fut.result()
                if digest is not None:
                    digests[32 * j : 32 * j + 32] = bytes.fromhex(digest)
                if why is not None:
                    status[j], reasons[j] = FAILED, why
                elif cached:
                    status[j] = CACHED
                else:
                    waves.append(wave)
                    where.append(j)
                    held += int(wave.shape[0]) / sr
                if waves and (len(waves) >= rows or held >= seconds or not ahead):
                    self._embed(waves, where, paths, status, digests, reasons, row)
                    waves, where, held = [], [], 0.0
        flush = getattr(self.cache, "flush", None)  # the sharded store commits its shard here
        if flush is not None:
            flush()
        if self.cache.write_error:
            row["fatal"] = (f"{self.where}: cannot write the cache "
                            f"({self.cache.write_error}); {CACHE_HINT}")  # fmt: skip

    def _fetch_ahead(self, paths: list[str], k: int, known: dict[str, str | OSError]) -> None:
        """When item ``k`` is a URL not fetched yet: the content keys of the URLs among the next
        ``URL_WINDOW`` items, their objects fetched many at a time (:mod:`..io.fetch`) and their
        bytes kept for the decode, instead of one request per decode thread."""
        from ..io import storage

        if paths[k] in known or not storage.is_url(paths[k]):
            return
        window = list(dict.fromkeys(
            p for p in paths[k : k + URL_WINDOW]
            if p not in known and storage.is_url(p) and not _hidden(p)
        ))  # fmt: skip
        if len(window) > 1:
            known.update(zip(window, self.cache.file_hashes(window), strict=True))

    def _load(self, path: str, known: str | OSError | None = None
              ) -> tuple[str | None, Any, str | None, bool]:  # fmt: skip
        """(digest, waveform, failure reason, already in the store) of one work item;
        ``known``: its content key (or why it could not be read), when already fetched."""
        from ..audio.decode import is_command, probe
        from ..errors import AudioError
        from .data import AudioDataset

        cfg, sr = self.cfg, self.spec.sample_rate
        if isinstance(known, OSError):
            return None, None, read_failure(known), False
        if known is not None:
            digest = known
        elif is_command(path):
            digest = hashlib.sha256(f"command:{path}".encode()).hexdigest()
        else:
            try:
                if _hidden(path):
                    raise FileNotFoundError(2, "No such file or directory", path)
                digest = self.cache.file_hash(Path(path))
            except OSError as exc:
                return None, None, read_failure(exc), False
        if self.cache.get(digest) is not None:
            return digest, None, None, True
        try:
            info = probe(path)
        except AudioError as exc:
            return digest, None, exc.reason, False
        if cfg.max_duration and info.duration > cfg.max_duration:
            why = (f"too long: {info.duration:.0f} s > --max-duration {cfg.max_duration:g} s "
                   "(split it, or raise the limit)")  # fmt: skip
            return digest, None, why, False
        fe = self.spec.frontend
        got = AudioDataset([path], sr, int(cfg.min_duration * sr), int(cfg.max_duration * sr),
                           fe.channel, fe.loudness_db, fe.resampler)[0]  # fmt: skip
        if got.wave is None:
            return digest, None, got.error or "unknown error", False
        return digest, got.wave, None, False

    def _embed(
        self,
        waves: list[Any],
        where: list[int],
        paths: list[str],
        status: bytearray,
        digests: bytearray,
        reasons: dict[int, str],
        row: dict[str, Any],
    ) -> None:
        st = self.embedder.stats
        before = (st.frames, st.padded_frames, st.chunked, st.batches)
        embs = self.embedder.embed_waves(waves)
        row["frames"] += st.frames - before[0]
        row["padded"] += st.padded_frames - before[1]
        row["chunked"] += st.chunked - before[2]
        row["batches"] += st.batches - before[3]
        sr = self.embedder.frontend.sample_rate
        for k, j in enumerate(where):
            emb = np.asarray(embs[k], dtype=np.float32)
            if not np.isfinite(emb).all():
                status[j], reasons[j] = FAILED, NON_FINITE
                continue
            self.cache.put(digests[32 * j : 32 * j + 32].hex(), emb)
            row["audio_s"] += int(waves[k].shape[0]) / sr
