"""Whole-cache maintenance: info, clear, migrate legacy ``.npy`` files, verify, prune, compact.

Torch-free; called by ``speaker-sim cache ...``. ``info`` reads the shard listing and the
compacted index (never every shard); ``verify`` reads every shard; ``migrate``, ``prune`` and
``compact`` rewrite shards and should run while no other process uses the same cache (a reader
that loses a shard recomputes its entries; it never reads a wrong one).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ..io import storage
from .store import SHARD_ROWS, ShardStore, digest_bytes


def _root(root: Path | str) -> str:
    return storage.as_url(root).rstrip("/")


def settings(root: Path | str) -> list[tuple[str, dict[str, Any]]]:
    """``(setting folder, meta.json)`` of each setting under ``root``."""
    base = f"{_root(root)}/emb"
    out = []
    for name in sorted(storage.list_names(base)) if not storage.is_url(base) else _dirs(base):
        d = f"{base}/{name}"
        if not storage.is_url(d) and not os.path.isdir(d):
            continue
        try:
            meta = json.loads(storage.read_bytes(f"{d}/meta.json"))
        except (OSError, ValueError):
            meta = {}
        out.append((d, meta if isinstance(meta, dict) else {}))
    return out


def _dirs(url: str) -> list[str]:
    fs, path = storage.filesystem(url)
    with contextlib.suppress(Exception):
        fs.invalidate_cache(path)
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return []
    return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries
                  if e.get("type") == "directory")  # fmt: skip


def _legacy_files(d: str) -> list[Path]:
    if storage.is_url(d):
        return []
    return [p for p in Path(d).glob("*/*.npy") if len(p.parent.name) == 2]


def _store(d: str, meta: dict[str, Any]) -> ShardStore | None:
    dim = meta.get("dim")
    return ShardStore(d, int(dim)) if isinstance(dim, int) and dim > 0 else None


def cache_info(root: Path | str) -> list[dict[str, Any]]:
    """One row per setting: model, mode, precision, entries, bytes, shards, legacy files."""
    rows: list[dict[str, Any]] = []
    for d, meta in settings(root):
        st = _store(d, meta)
        sizes = st.shard_sizes() if st is not None else {}
        legacy = _legacy_files(d)
        legacy_bytes = 0
        for f in legacy:
            with contextlib.suppress(OSError):  # another run may be clearing the cache
                legacy_bytes += f.stat().st_size
        rows.append({
            "setting": d.rstrip("/").rsplit("/", 1)[-1],
            "model": meta.get("model", "?"),
            "mode": meta.get("mode", "?"),
            "precision": meta.get("precision", "?"),
            "entries": (st.entries() if st is not None else 0) + len(legacy),
            "bytes": sum(sizes.values()) + legacy_bytes,
            "shards": len(sizes),
            "legacy_files": len(legacy),
        })  # fmt: skip
    return rows


def cache_clear(root: Path | str, model: str | None = None) -> int:
    """Remove every setting (or those of ``model``); returns the number of entries removed."""
    removed = 0
    r = _root(root)
    for row in cache_info(root):
        if model is None or row["model"] == model:
            removed += row["entries"]
            _rmtree(f"{r}/emb/{row['setting']}")
    if model is None:
        _rmtree(f"{r}/files")
        for suffix in ("", "-wal", "-shm"):  # the content-hash memo
            with contextlib.suppress(OSError):
                storage.remove(f"{r}/files.sqlite{suffix}")
    return removed


def _rmtree(d: str) -> None:
    if storage.is_url(d):
        fs, path = storage.filesystem(d)
        with contextlib.suppress(FileNotFoundError):
            fs.rm(path, recursive=True)
    else:
        shutil.rmtree(d, ignore_errors=True)


def migrate(root: Path | str) -> dict[str, int]:
    """Move legacy per-recording ``.npy`` files into shards: each file is removed only after
    the shard holding its vector is committed. Returns counts: moved, bad (left in place)."""
    moved = bad = 0
    for d, meta in settings(root):
        st = _store(d, meta)
        files = _legacy_files(d)
        if st is None or not files:
            continue
        for start in range(0, len(files), SHARD_ROWS):
            part = files[start : start + SHARD_ROWS]
            keys, vecs, done = [], [], []
            for f in part:
                try:
                    arr = np.load(f, allow_pickle=False)
                except (OSError, ValueError, EOFError):
                    bad += 1
                    continue
                if arr.shape != (st.dim,) or arr.dtype != np.float32 or not np.isfinite(arr).all():
                    bad += 1
                    continue
                keys.append(f.stem)
                vecs.append(arr)
                done.append(f)
            if keys:
                st.put_many(keys, np.stack(vecs))
                st.flush()
            for f in done:
                with contextlib.suppress(OSError):
                    f.unlink()
            moved += len(done)
        for sub in {f.parent for f in files}:
            with contextlib.suppress(OSError):
                sub.rmdir()  # only when empty
        if len(st.shard_names()) > 1:
            st.compact()
    return {"moved": moved, "bad": bad}


def verify(root: Path | str) -> tuple[int, list[dict[str, str]]]:
    """Check every row of every shard; ``(shards checked, problems)`` where each problem is
    ``{"setting", "shard", "problem"}``. An index file that fails its checks is listed too."""
    checked, problems = 0, []
    for d, meta in settings(root):
        st = _store(d, meta)
        setting = d.rsplit("/", 1)[-1]
        if st is None:
            problems.append({"setting": setting, "shard": "meta.json",
                             "problem": "no readable meta.json (dim unknown)"})  # fmt: skip
            continue
        for name in st.shard_names():
            checked += 1
            why = st.verify_shard(name)
            if why is not None:
                problems.append({"setting": setting, "shard": f"{d}/shards/{name}",
                                 "problem": why})  # fmt: skip
        st.refresh(force=True)
        for name, why in st.bad_shards.items():
            if name.startswith("index/"):
                problems.append({"setting": setting, "shard": f"{d}/{name}", "problem": why})
    return checked, problems


def remove_shards(paths: Iterable[str]) -> None:
    """Delete the named shards (their entries are recomputed by the next run)."""
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            storage.remove(p)


def prune(root: Path | str, keep: set[str]) -> dict[str, int]:
    """Keep only the entries whose content sha256 is in ``keep`` (every setting); shards are
    rewritten, legacy files not needed are removed. Returns counts: kept, removed."""
    want = {digest_bytes(k) for k in keep}
    kept = removed = 0
    for d, meta in settings(root):
        st = _store(d, meta)
        if st is None:
            continue
        old = st.shard_names()
        seen: set[bytes] = set()  # a key stored twice (a retried unit) is kept once: the newest
        for name in reversed(old):
            try:
                sh = st.open_shard(name)
            except Exception:
                continue  # a damaged shard is dropped below; its entries are recomputed
            sel = []
            for j in reversed(range(len(sh.keys))):  # within a shard, the later row wins
                k = sh.keys[j].tobytes()
                if k in seen:
                    continue
                seen.add(k)
                if k in want:
                    sel.append(j)
                else:
                    removed += 1
            if sel:
                st.put_many([sh.keys[j].tobytes().hex() for j in sel], np.asarray(sh.vec[sel]))
                kept += len(sel)
        st.flush()
        st.remove_shards(old)
        st.compact()
        for f in _legacy_files(d):
            if digest_bytes(f.stem) in want:
                kept += 1
            else:
                with contextlib.suppress(OSError):
                    f.unlink()
                removed += 1
    return {"kept": kept, "removed": removed}


def compact(root: Path | str, small: int = SHARD_ROWS // 2) -> dict[str, int]:
    """Merge the shards under ``small`` rows (runs commit every 10 s, so long runs leave many)
    into full ones, keeping the newest copy of each key; damaged shards are left for
    ``verify``. Returns counts: shards merged, shards written, entries."""
    merged = written = entries = 0
    for d, meta in settings(root):
        st = _store(d, meta)
        if st is None:
            continue
        names, keys, vecs = [], [], []
        for name in st.shard_names():
            try:
                sh = st.open_shard(name)
            except Exception:
                continue
            if len(sh.keys) >= small:
                continue
            names.append(name)
            keys.append(np.array(sh.keys))
            vecs.append(np.array(sh.vec))
        if len(names) < 2:
            continue
        k, v = np.concatenate(keys), np.concatenate(vecs)
        # Newest copy of each key: the last occurrence (shards are listed oldest first).
        _, last = np.unique(k[::-1], axis=0, return_index=True)
        keep = np.sort(len(k) - 1 - last)
        k, v = k[keep], v[keep]
        for s in range(0, len(k), SHARD_ROWS):
            st.put_many([x.tobytes().hex() for x in k[s : s + SHARD_ROWS]], v[s : s + SHARD_ROWS])
            st.flush()
            written += 1
        st.remove_shards(names)
        st.compact()
        merged += len(names)
        entries += len(k)
    return {"merged": merged, "written": written, "entries": entries}
