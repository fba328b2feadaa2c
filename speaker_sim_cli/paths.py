"""Where speaker-sim keeps things on disk, and how it writes and fingerprints files."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def default_cache_dir() -> Path:
    """``$SPEAKER_SIM_CACHE`` or the user cache dir (e.g. ``~/.cache/speaker-sim``)."""
    env = os.environ.get("SPEAKER_SIM_CACHE")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("speaker-sim"))


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# mkstemp creates 0600 files; renamed into place they should get the usual mode (0644 under the
# default umask), as an ordinary open() would: reports are shared, and so may a cache be.
_FILE_MODE = 0o666 & ~_umask()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a temp file beside ``path`` and rename it into place.

    Readers see the old file or the new one, never a half; an interrupted write leaves no file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            with contextlib.suppress(OSError):
                os.fchmod(f.fileno(), _FILE_MODE)
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def memoised_sha256(path: Path, memo_dir: Path, write: bool = True) -> str:
    """:func:`file_sha256` of ``path``, remembered in ``memo_dir`` against its size, mtime and
    inode (a file replaced by rename keeps none of them, even with a copied mtime), so a known
    file costs a stat and a small read. The memo is keyed by the absolute path: "a.wav" from two
    working folders is two files. Memo errors are never fatal; ``write=False`` only reads."""
    st = path.stat()
    stamp = f"{st.st_size} {st.st_mtime_ns} {st.st_ino}"
    where = os.path.abspath(path)
    memo = memo_dir / (hashlib.sha1(where.encode()).hexdigest() + ".txt")
    try:
        text = memo.read_text()
        if text.startswith(stamp + " "):
            digest = text[len(stamp) + 1 :].strip()
            if len(digest) == 64:
                return digest
    except OSError:
        pass
    digest = file_sha256(path)
    if write:
        with contextlib.suppress(OSError):
            atomic_write_bytes(memo, f"{stamp} {digest}".encode())
    return digest


def map_in_threads(fn: Callable[[T], R], items: Sequence[T], threads: int = 8) -> list[R]:
    """``[fn(x) for x in items]``, ``threads`` at a time, in input order: for file reads,
    hashing and header probes, which release the GIL. ``fn`` should return its errors."""
    if threads <= 1 or len(items) < 2:
        return [fn(x) for x in items]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(min(threads, len(items))) as pool:
        return list(pool.map(fn, items))
