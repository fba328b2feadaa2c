"""Content-keyed embedding cache: one ``.npy`` per recording and extraction setting.

Layout under the cache root::

    files/<sha1(abs path)>.txt          "size mtime_ns inode content-sha256" memo, so a warm run
                                        does not re-read the audio to hash it
    emb/<setting>/meta.json             what the setting is (model id, checkpoint sha256,
                                        front end, mode, precision)
    emb/<setting>/<h[:2]>/<h>.npy       the embedding (float32, unnormalised) of content h

``setting`` is a hash of everything that changes the vector, so a change of model, checkpoint,
front end, extraction mode or precision never returns a stale one. The key is never the
basename. Every write goes to a temp file in the same folder and is renamed into place, so
concurrent runs never see half a file; an unreadable or truncated entry is a miss.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..paths import (
    atomic_write_bytes,
    default_cache_dir,
    file_sha256,
    map_in_threads,
    memoised_sha256,
)

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


class EmbeddingCache:
    """Embeddings of one extraction setting. ``root=None`` disables caching (all misses)."""

    def __init__(self, root: Path | None, ingredients: dict[str, Any], dim: int) -> None:
        self.root = root
        self.ingredients = ingredients
        self.dim = dim
        self.key = setting_key(ingredients)
        self.stats = CacheStats()
        self.write_error: str | None = None
        if root is not None:
            self.dir = root / "emb" / self.key
            meta = self.dir / "meta.json"
            if not meta.exists():
                try:
                    atomic_write_bytes(
                        meta, json.dumps({**ingredients, "dim": dim}, indent=2).encode()
                    )
                except OSError as exc:
                    self.write_error = f"{root}: {exc.strerror or exc}"

    # -- content hashes -------------------------------------------------------------------
    def file_hash(self, path: Path) -> str:
        """Content sha256 of ``path``, memoised against its size, mtime and inode."""
        if self.root is None:
            return file_sha256(path)
        return memoised_sha256(path, self.root / "files", write=self.write_error is None)

    def file_hashes(self, paths: Sequence[Path], threads: int = 8) -> list[str | OSError]:
        """:meth:`file_hash` of each path, ``threads`` at a time (hashlib and file reads release
        the GIL), in input order; a path that cannot be read gives its OSError instead."""

        def one(p: Path) -> str | OSError:
            try:
                return self.file_hash(p)
            except OSError as exc:
                return exc

        return map_in_threads(one, paths, threads)

    # -- embeddings -----------------------------------------------------------------------
    def _path(self, digest: str) -> Path:
        return self.dir / digest[:2] / f"{digest}.npy"

    def get(self, digest: str) -> np.ndarray | None:
        if self.root is None:
            self.stats.misses += 1
            return None
        p = self._path(digest)
        try:
            arr = np.load(p, allow_pickle=False)
        except FileNotFoundError:
            self.stats.misses += 1
            return None
        except (OSError, ValueError, EOFError):
            self.stats.corrupt += 1
            self.stats.misses += 1
            return None
        if arr.shape != (self.dim,) or arr.dtype != np.float32 or not np.isfinite(arr).all():
            self.stats.corrupt += 1
            self.stats.misses += 1
            return None
        self.stats.hits += 1
        return arr

    def put(self, digest: str, emb: np.ndarray) -> None:
        if self.root is None or self.write_error is not None:
            return
        try:
            atomic_write_bytes(self._path(digest), npy_bytes(np.asarray(emb, dtype=np.float32)))
            self.stats.writes += 1
        except OSError as exc:
            self.stats.write_errors += 1
            self.write_error = f"{self.root}: {exc.strerror or exc}"


def cache_info(root: Path) -> list[dict[str, Any]]:
    """One row per extraction setting: model, entries, bytes."""
    rows: list[dict[str, Any]] = []
    emb = root / "emb"
    if not emb.is_dir():
        return rows
    for d in sorted(emb.iterdir()):
        if not d.is_dir():
            continue
        try:
            meta = json.loads((d / "meta.json").read_text())
        except (OSError, ValueError):
            meta = {}
        entries, size = 0, 0
        for f in d.glob("*/*.npy"):
            try:  # another run may be clearing the cache while we count
                size += f.stat().st_size
            except OSError:
                continue
            entries += 1
        rows.append({
            "setting": d.name,
            "model": meta.get("model", "?"),
            "mode": meta.get("mode", "?"),
            "precision": meta.get("precision", "?"),
            "entries": entries,
            "bytes": size,
        })  # fmt: skip
    return rows


def cache_clear(root: Path, model: str | None = None) -> int:
    """Remove every setting (or those of ``model``); returns the number of entries removed."""
    removed = 0
    for row in cache_info(root):
        if model is None or row["model"] == model:
            removed += row["entries"]
            shutil.rmtree(root / "emb" / row["setting"], ignore_errors=True)
    if model is None:
        shutil.rmtree(root / "files", ignore_errors=True)
    return removed
