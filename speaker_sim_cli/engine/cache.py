"""Content-keyed embedding cache: the sharded store of each extraction setting.

Layout under the cache root (a folder, or an fsspec URL such as ``s3://bucket/cache``)::

    files.sqlite                        content-hash memo (:mod:`.hash_memo`): abs path -> size,
                                        mtime_ns, inode, sha256 (a URL: size, ETag), so a warm
                                        run does not re-read the audio to hash it (for a URL
                                        root: in the local default cache folder; the
                                        ``files/*.txt`` memos of older versions are still read)
    emb/<setting>/meta.json             what the setting is (model id, checkpoint sha256,
                                        front end, mode, precision)
    emb/<setting>/shards/*.arrow        the embeddings (float32, unnormalised) in shards, and
    emb/<setting>/index/*.idx           their key index (:mod:`.store`)
    emb/<setting>/<h[:2]>/<h>.npy       the legacy per-recording files of older versions: still
                                        read on a store miss; ``speaker-sim cache migrate``
                                        moves them into shards

``setting`` is a hash of everything that changes the vector, so a change of model, checkpoint,
front end, extraction mode or precision never returns a stale one. The key is never the
basename. ``put`` buffers rows; a shard is committed atomically every ``SHARD_ROWS`` rows, by
:meth:`EmbeddingCache.flush` (the pipeline calls it when a run's embedding ends; Ray workers at
the end of each task) and at interpreter exit. A damaged row or shard is a miss, never a
wrong vector.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..io import storage
from ..paths import atomic_write_bytes, default_cache_dir, file_sha256, map_in_threads
from .hash_memo import HashMemo
from .store import ShardStore

__all__ = [
    "EmbeddingCache",
    "atomic_write_bytes",
    "cache_clear",
    "cache_info",
    "default_cache_dir",
]


def setting_key(ingredients: dict[str, Any]) -> str:
    blob = json.dumps(ingredients, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def npy_bytes(arr: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    writes: int = 0
    corrupt: int = 0
    write_errors: int = 0


_OPEN: weakref.WeakSet[EmbeddingCache] = weakref.WeakSet()


@atexit.register
def _flush_all() -> None:
    """Commit what every open cache still buffers, at interpreter exit (also after Ctrl-C)."""
    for cache in list(_OPEN):
        try:
            cache.flush()
        except Exception as exc:  # never a traceback at exit; the rows are recomputed next run
            import sys

            print(f"speaker-sim: could not commit cached embeddings: {exc}", file=sys.stderr)


class EmbeddingCache:
    """Embeddings of one extraction setting. ``root=None`` disables caching (all misses).

    ``root`` is a folder or a URL (``s3://bucket/prefix``); ``dir`` is the setting's folder
    (a Path, or a URL string for a URL root).
    """

    def __init__(
        self,
        root: Path | str | None,
        ingredients: dict[str, Any],
        dim: int,
        shard_rows: int | None = None,
    ) -> None:
        if root is not None:  # a URL that went through Path() is restored
            root = storage.as_url(root) if storage.is_url(root) else Path(root)
        self.root = root
        self.ingredients = ingredients
        self.dim = dim
        self.key = setting_key(ingredients)
        self.stats = CacheStats()
        self.write_error: str | None = None
        self.store: ShardStore | None = None
        self._memo: HashMemo | None = None
        if root is not None:
            self.dir: Any = (
                f"{str(root).rstrip('/')}/emb/{self.key}" if isinstance(root, str)
                else root / "emb" / self.key
            )  # fmt: skip
            kw = {"shard_rows": shard_rows} if shard_rows else {}
            self.store = ShardStore(str(self.dir), dim, **kw)
            meta = f"{self.dir}/meta.json"
            try:
                if not storage.exists(meta):
                    storage.atomic_write(
                        meta, json.dumps({**ingredients, "dim": dim}, indent=2).encode()
                    )
            except OSError as exc:
                self.write_error = f"{root}: {exc.strerror or exc}"
            _OPEN.add(self)

    @classmethod
    def hasher(cls, root: Path | str) -> EmbeddingCache:
        """An instance for :meth:`file_hashes` with the memo of ``root``, holding no setting
        (nothing is created under ``emb/``)."""
        self = cls(None, {}, 1)
        self.root = storage.as_url(root) if storage.is_url(root) else Path(root)
        return self

    # -- content hashes -------------------------------------------------------------------
    def memo(self) -> HashMemo | None:
        """The content-hash memo (``files.sqlite``; local default cache for a URL root)."""
        if self.root is None:
            return None
        if self._memo is None:
            base = self.root if isinstance(self.root, Path) else default_cache_dir()
            self._memo = HashMemo(base / "files.sqlite", base / "files",
                                  write=self.write_error is None)  # fmt: skip
        return self._memo

    def _hash(self, path: Path | str) -> str:
        memo = self.memo()
        if storage.is_url(path):
            return storage.content_sha256(storage.as_url(path), memo)
        p = Path(path)
        if memo is None:
            return file_sha256(p)
        st = p.stat()
        stamp = f"{st.st_size} {st.st_mtime_ns} {st.st_ino}"
        key = os.path.abspath(p)  # "a.wav" from two working folders is two files
        digest = memo.get(key, stamp)
        if digest is None:
            digest = file_sha256(p)
            memo.put(key, stamp, digest)
        return digest

    def file_hash(self, path: Path | str) -> str:
        """Content sha256 of ``path`` (a file, or a URL's object), memoised against its size,
        mtime and inode (a URL: its ETag and size)."""
        digest = self._hash(path)
        if self._memo is not None:
            self._memo.commit()
        return digest

    def file_hashes(self, paths: Sequence[Path | str], threads: int = 8) -> list[str | OSError]:
        """:meth:`file_hash` of each path, in input order; a path that cannot be read gives its
        OSError instead. Files are hashed ``threads`` at a time (hashlib and file reads release
        the GIL); URLs through :func:`storage.content_sha256_many` (many requests in flight).
        New hashes are remembered in one transaction."""

        def one(p: Path | str) -> str | OSError:
            try:
                return self._hash(p)
            except OSError as exc:
                return exc

        out: list[str | OSError | None] = [None] * len(paths)
        urls = [i for i, p in enumerate(paths) if storage.is_url(p)]
        local = [i for i, p in enumerate(paths) if not storage.is_url(p)]
        try:
            if urls:  # fetched many at once, their bytes kept for the decode
                got = storage.content_sha256_many([str(paths[i]) for i in urls], self.memo())
                for i, d in zip(urls, got):
                    out[i] = d
            for i, d in zip(local, map_in_threads(one, [paths[i] for i in local], threads)):
                out[i] = d
            return out  # type: ignore[return-value]
        finally:
            if self._memo is not None:
                self._memo.commit()

    # -- embeddings -----------------------------------------------------------------------
    def _path(self, digest: str) -> Path:
        return Path(self.dir) / digest[:2] / f"{digest}.npy"

    def _legacy(self, digest: str) -> np.ndarray | None:
        """The per-recording ``.npy`` of older versions (local roots only), or None."""
        if not isinstance(self.root, Path):
            return None
        try:
            arr = np.load(self._path(digest), allow_pickle=False)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, EOFError):
            self.stats.corrupt += 1
            return None
        if arr.shape != (self.dim,) or arr.dtype != np.float32 or not np.isfinite(arr).all():
            self.stats.corrupt += 1
            return None
        return arr

    def get(self, digest: str) -> np.ndarray | None:
        if self.store is None:
            self.stats.misses += 1
            return None
        mat, found = self._lookup([digest], cheap=True)
        if found[0]:
            self.stats.hits += 1
            return mat[0]
        self.stats.misses += 1
        return None

    def get_many(
        self,
        digests: Sequence[str] | np.ndarray,
        out: np.ndarray | None = None,
        dest: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(matrix (n, dim) float32, found (n,) bool)`` for many keys at once (one index
        search; rows not found are zero). ``digests``: hex strings, or raw keys as an (n, 32)
        uint8 array (what Ray workers send: no hex on the way); for raw keys, ``out`` and
        ``dest`` put key ``i``'s vector straight into ``out[dest[i]]`` (returned as the
        matrix)."""
        if self.store is None:
            self.stats.misses += len(digests)
            return np.zeros((len(digests), self.dim), np.float32), np.zeros(len(digests), bool)
        mat, found = self._lookup(digests, out=out, dest=dest)
        n_found = int(found.sum())
        self.stats.hits += n_found
        self.stats.misses += len(digests) - n_found
        return mat, found

    def _lookup(
        self,
        digests: Sequence[str] | np.ndarray,
        cheap: bool = False,
        out: np.ndarray | None = None,
        dest: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        assert self.store is not None
        raw = isinstance(digests, np.ndarray)
        if out is None:
            dest = None
        before = self.store.corrupt
        try:
            if isinstance(digests, np.ndarray):  # (raw, spelled out for the type checker)
                mat, found = self.store.get_keys(digests, cheap=cheap, out=out, dest=dest)
            else:
                out = dest = None  # hex digests: the store's own matrix
                mat, found = self.store.get_many(digests, cheap=cheap)
        except OSError:  # an unreadable store is a cold cache
            mat = np.zeros((len(digests), self.dim), np.float32) if out is None else out
            found = np.zeros(len(digests), bool)
        self.stats.corrupt += self.store.corrupt - before
        for i in np.flatnonzero(~found).tolist():
            arr = self._legacy(digests[i].tobytes().hex() if raw else digests[i])
            if arr is not None:
                mat[i if dest is None else dest[i]], found[i] = arr, True
        return mat, found

    def put(self, digest: str, emb: np.ndarray) -> None:
        self.put_many([digest], np.asarray(emb, dtype=np.float32)[None])

    def put_many(self, digests: Sequence[str], embs: np.ndarray) -> None:
        """Buffer rows for the store; a full buffer is committed as a shard."""
        if self.store is None or self.write_error is not None or not len(digests):
            return
        try:
            self.store.put_many(digests, embs)
            self.stats.writes += len(digests)
        except OSError as exc:
            self._failed(exc)

    def flush(self) -> None:
        """Commit the buffered rows as one shard (atomic). Never raises: a failure sets
        :attr:`write_error` (the vectors of this run are still returned to the caller)."""
        if self.store is None or self.write_error is not None:
            return
        try:
            self.store.flush()
        except OSError as exc:
            self._failed(exc)

    close = flush

    def _failed(self, exc: OSError) -> None:
        self.stats.write_errors += 1
        self.write_error = f"{self.root}: {exc.strerror or exc}"


def cache_info(root: Path | str) -> list[dict[str, Any]]:
    """One row per extraction setting: model, entries, bytes, shards (see :mod:`.store_admin`)."""
    from .store_admin import cache_info as info

    return info(root)


def cache_clear(root: Path | str, model: str | None = None) -> int:
    """Remove every setting (or those of ``model``); returns the number of entries removed."""
    from .store_admin import cache_clear as clear

    return clear(root, model)
