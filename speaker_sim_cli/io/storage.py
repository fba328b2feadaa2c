"""Local paths and object-storage URLs behind one small interface (fsspec for the URLs).

Every layer that opens a user's file or writes an output goes through here: ``read_bytes``,
``atomic_write`` / ``atomic_output``, ``exists``, ``info``, ``list_names``, ``remove``. A URL
is ``s3://``, ``gs://``/``gcs://``, ``az://``/``abfs://``, ``http(s)://`` or ``memory://``;
anything else is a local path. fsspec (and s3fs for S3, gcsfs for GCS) is imported only when a
URL is used. Credentials come from the usual places (environment, ``~/.aws``, ...);
``--storage-options JSON`` (or ``$SPEAKER_SIM_STORAGE_OPTIONS``) adds filesystem options such
as ``{"endpoint_url": "http://127.0.0.1:9000"}``, flat or per scheme (``{"s3": {...}}``). The
options live in the environment so worker processes (DataLoader, Ray) see them too.

Reads of a URL are retried on transient errors (3 tries, 0.2 s then 0.4 s back-off); a missing
object (FileNotFoundError) or a refused one (PermissionError) is not retried. Many objects at
once (``read_many``, ``content_sha256_many``: the hashing, header reads and decode of a run's
recordings) go through :mod:`.fetch`: presigned GETs over aiohttp, 64 in flight, instead of one
s3fs call per object. Writes are whole:
a local file is written to a temp name and renamed; an object is uploaded in one PUT, which
object stores publish atomically, so nothing is ever visible half written.

Content keys of URLs: the sha256 of the fetched bytes (the same key a local copy of the file
gets), memoised against the object's ETag and size, so a warm run costs one HEAD per URL and a
cold one a single GET (its ETag comes with the body).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from ..errors import UsageError

SCHEMES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "http", "https", "memory")
ENV = "SPEAKER_SIM_STORAGE_OPTIONS"
RETRIES = 3
#: Threads of :func:`read_many` for local files and for objects read through fsspec (the
#: batch path, :mod:`.fetch`, keeps its own number of requests in flight).
FETCH_THREADS = 16
_CHUNK = 1024  # objects hashed per batch of fetches (their bodies are held until hashed)
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$", re.S)
_COLLAPSED = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):/(?!/)(.*)$", re.S)
T = TypeVar("T")


def as_url(x: str | os.PathLike[str]) -> str:
    """``x`` as a string, with a URL that went through ``pathlib.Path`` (which turns
    ``s3://b/k`` into ``s3:/b/k``) restored."""
    s = os.fspath(x)
    m = _COLLAPSED.match(s)
    if m and m.group(1).lower() in SCHEMES:
        return f"{m.group(1)}://{m.group(2)}"
    return s


def is_url(x: str | os.PathLike[str]) -> bool:
    m = _URL.match(as_url(x))
    return bool(m) and m.group(1).lower() in SCHEMES  # type: ignore[union-attr]


def parse_url(url: str) -> tuple[str, str]:
    """``(scheme, rest)`` of a URL; raises ValueError naming what is wrong."""
    m = _URL.match(as_url(url))
    if not m:
        raise ValueError(f"{url!r}: not a URL (expected scheme://...)")
    scheme, rest = m.group(1).lower(), m.group(2)
    if scheme not in SCHEMES:
        raise ValueError(f"{url!r}: unsupported scheme {scheme!r} (use {', '.join(SCHEMES)})")
    if any(c in rest for c in "\0\r\n"):
        raise ValueError(f"{url!r}: control characters in the URL")
    host = rest.split("/", 1)[0]
    if scheme != "memory" and not host:
        raise ValueError(f"{url!r}: no {'host' if scheme.startswith('http') else 'bucket'}")
    return scheme, rest


def url_parent(url: str) -> str:
    scheme, rest = parse_url(url)
    head, _, _ = rest.rstrip("/").rpartition("/")
    return f"{scheme}://{head or rest}"


def join(base: str | os.PathLike[str], item: str) -> str:
    """``item`` if absolute (a URL or an absolute path), else ``base/item``."""
    if is_url(item) or os.path.isabs(os.path.expanduser(item)):
        return as_url(item) if is_url(item) else os.path.expanduser(item)
    b = as_url(base)
    if is_url(b):
        return b.rstrip("/") + "/" + item
    return os.path.join(b, item)


# -- options -----------------------------------------------------------------------------------
def set_options(text: str | dict[str, Any] | None) -> None:
    """Set the filesystem options (a JSON object, or None to clear), for this process and its
    children. Raises UsageError for text that is not a JSON object."""
    if text is None or text == "":
        os.environ.pop(ENV, None)
        return
    if isinstance(text, str):
        try:
            doc = json.loads(text)
        except ValueError as exc:
            raise UsageError(f"--storage-options: not JSON ({exc})") from None
    else:
        doc = text
    if not isinstance(doc, dict):
        raise UsageError("--storage-options: expected a JSON object, e.g. "
                         '\'{"endpoint_url": "http://127.0.0.1:9000"}\'')  # fmt: skip
    os.environ[ENV] = json.dumps(doc)


def options_for(scheme: str) -> dict[str, Any]:
    raw = os.environ.get(ENV)
    if not raw:
        return {}
    try:
        doc = json.loads(raw)
    except ValueError:
        raise UsageError(f"${ENV}: not JSON") from None
    if not isinstance(doc, dict):
        raise UsageError(f"${ENV}: expected a JSON object")
    if doc and all(k in SCHEMES for k in doc):  # per scheme
        sub = doc.get(scheme, doc.get({"s3a": "s3", "gcs": "gs"}.get(scheme, scheme), {}))
        return dict(sub) if isinstance(sub, dict) else {}
    if scheme.startswith("http") or scheme == "memory":
        return {}
    if scheme in ("s3", "s3a") and "endpoint_url" in doc:  # s3fs takes it inside client_kwargs
        doc = {**doc}
        doc.setdefault("client_kwargs", {})["endpoint_url"] = doc.pop("endpoint_url")
    return doc


def filesystem(url: str) -> tuple[Any, str]:
    """The fsspec filesystem of ``url`` and the path within it."""
    scheme, _ = parse_url(url)
    try:
        import fsspec
    except ImportError:
        raise UsageError(f"{url}: URLs need fsspec: pip install 'speaker-sim[storage]'") from None
    try:
        return fsspec.core.url_to_fs(as_url(url), **options_for(scheme))
    except ImportError as exc:
        raise UsageError(f"{url}: the {scheme}:// filesystem is not installed ({exc}); "
                         "pip install 'speaker-sim[storage]'") from None  # fmt: skip


# -- errors and retries --------------------------------------------------------------------------
def _as_oserror(url: str, exc: BaseException) -> OSError:
    if isinstance(exc, OSError):
        return exc
    text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
    status = getattr(exc, "status", None) or getattr(exc, "code", None)
    if status == 404 or "404" in text or "NoSuchKey" in text or "Not Found" in text:
        return FileNotFoundError(2, "object not found", url)
    if status in (401, 403) or "AccessDenied" in text or "Forbidden" in text:
        return PermissionError(13, f"access denied ({text})", url)
    return OSError(5, f"{type(exc).__name__}: {text}", url)


def _retrying(url: str, fn: Callable[[], T]) -> T:
    for attempt in range(RETRIES):
        try:
            return fn()
        except Exception as exc:
            err = _as_oserror(url, exc)
            permanent = isinstance(err, FileNotFoundError | PermissionError | IsADirectoryError)
            if permanent or attempt == RETRIES - 1:
                raise err from None
            time.sleep(0.2 * 2**attempt)
    raise AssertionError("unreachable")


# -- reads -------------------------------------------------------------------------------------
# Bytes of recent URL reads made with keep=True (content hashing, header probes), handed to
# the next read of the same URL (the decode that follows) instead of fetching it again; DataLoader
# workers forked afterwards inherit them. Bounded; a kept object is used once.
_KEPT: OrderedDict[str, bytes] = OrderedDict()
_KEPT_MAX = 256 << 20
_KEPT_LOCK = threading.Lock()
_KEPT_BYTES = 0  # sum of the kept lengths


def _keep(url: str, data: bytes) -> None:
    if len(data) > _KEPT_MAX // 8:
        return
    global _KEPT_BYTES
    with _KEPT_LOCK:
        _take_locked(url)
        _KEPT[url] = data
        _KEPT_BYTES += len(data)
        while _KEPT_BYTES > _KEPT_MAX:
            _KEPT_BYTES -= len(_KEPT.popitem(last=False)[1])


def _take_locked(url: str) -> bytes | None:
    """Pop the kept bytes of ``url`` (the caller holds ``_KEPT_LOCK``)."""
    global _KEPT_BYTES
    data = _KEPT.pop(url, None)
    if data is not None:
        _KEPT_BYTES -= len(data)
    return data


def is_kept(x: str | os.PathLike[str]) -> bool:
    """Whether the bytes of URL ``x`` are held for its next read."""
    with _KEPT_LOCK:
        return as_url(x) in _KEPT


def read_bytes(x: str | os.PathLike[str], keep: bool = False) -> bytes:
    """The whole file or object. Raises OSError (FileNotFoundError when it does not exist).
    ``keep``: hold a URL's bytes for the next read of it (see ``_KEPT``)."""
    s = as_url(x)
    if not is_url(s):
        return Path(s).read_bytes()
    with _KEPT_LOCK:
        data = _take_locked(s)
    if data is None:
        fs, path = filesystem(s)
        data = _retrying(s, lambda: fs.cat_file(path))
    if keep:
        _keep(s, data)
    return data


def read_many(
    items: Sequence[str], threads: int = FETCH_THREADS, keep: bool = False,
    in_flight: int | None = None,
) -> list[bytes | OSError]:  # fmt: skip
    """:func:`read_bytes` of each item, errors returned in place (an ``OSError`` naming the
    item). ``s3://`` and ``http(s)://`` objects are fetched ``in_flight`` at a time
    (:mod:`.fetch`: default 64, ``$SPEAKER_SIM_FETCH_IN_FLIGHT``), transient errors retried;
    local files, other schemes and what the batch path leaves to s3fs are read ``threads`` at a
    time. Bytes kept by an earlier read are used, not fetched again; ``keep``: keep these."""
    from ..paths import map_in_threads
    from . import fetch

    urls = [as_url(x) for x in items]
    out: list[bytes | OSError | None] = [None] * len(urls)
    remote = [i for i, u in enumerate(urls) if is_url(u)]
    with _KEPT_LOCK:
        for i in remote:
            out[i] = _take_locked(urls[i])
    batch = [i for i in remote if out[i] is None]
    if batch and fetch.enabled():
        for i, got in zip(batch, fetch.fetch([urls[i] for i in batch], limit=in_flight)):
            if isinstance(got, fetch.Got):
                out[i] = got.data
            elif isinstance(got, OSError):
                out[i] = got

    def one(i: int) -> bytes | OSError:
        try:
            return read_bytes(urls[i])
        except OSError as exc:
            return exc

    rest = [i for i, r in enumerate(out) if r is None]
    for i, r in zip(rest, map_in_threads(one, rest, threads)):
        out[i] = r
    if keep:
        for i in remote:
            data = out[i]
            if isinstance(data, bytes):
                _keep(urls[i], data)
    return out  # type: ignore[return-value]


def info(x: str | os.PathLike[str]) -> dict[str, Any]:
    """``{"size": int, "etag": str | None, "type": "file"|"directory"}``; raises OSError."""
    s = as_url(x)
    if not is_url(s):
        st = os.stat(s)
        kind = "directory" if os.path.isdir(s) else "file"
        return {"size": st.st_size, "etag": None, "type": kind}
    fs, path = filesystem(s)
    doc = _retrying(s, lambda: fs.info(path))
    etag = doc.get("ETag") or doc.get("etag") or doc.get("md5Hash")
    return {"size": int(doc.get("size") or 0), "etag": etag, "type": doc.get("type", "file")}


def exists(x: str | os.PathLike[str]) -> bool:
    try:
        info(x)
    except OSError:
        return False
    return True


def list_sizes(x: str | os.PathLike[str]) -> dict[str, int]:
    """Base name -> size of the files directly in a folder / under a prefix ({} if absent)."""
    s = as_url(x)
    if not is_url(s):
        out: dict[str, int] = {}
        try:
            with os.scandir(s) as it:
                for e in it:
                    with contextlib.suppress(OSError):
                        if e.is_file():
                            out[e.name] = e.stat().st_size
        except (FileNotFoundError, NotADirectoryError):
            pass
        return out
    fs, path = filesystem(s)
    with contextlib.suppress(Exception):
        fs.invalidate_cache(path)
    try:
        entries = _retrying(s, lambda: fs.ls(path, detail=True))
    except FileNotFoundError:
        return {}
    return {
        e["name"].rstrip("/").rsplit("/", 1)[-1]: int(e.get("size") or 0)
        for e in entries
        if e.get("type", "file") == "file"
    }


def list_names(x: str | os.PathLike[str]) -> list[str]:
    s = as_url(x)
    if not is_url(s):
        try:
            return os.listdir(s)
        except (FileNotFoundError, NotADirectoryError):
            return []
    return list(list_sizes(s))


# -- writes ------------------------------------------------------------------------------------
def atomic_write(x: str | os.PathLike[str], data: bytes) -> None:
    """Write all of ``data`` or nothing: temp + rename locally, one PUT to an object store."""
    s = as_url(x)
    if not is_url(s):
        from ..paths import atomic_write_bytes

        atomic_write_bytes(Path(s), data)
        return
    fs, path = filesystem(s)
    _retrying(s, lambda: fs.pipe_file(path, data))


@contextlib.contextmanager
def atomic_output(x: str | os.PathLike[str], suffix: str = "") -> Iterator[Path]:
    """A local temp path to write; on success it becomes ``x`` (renamed, or uploaded in one
    PUT); on an error nothing appears at ``x``."""
    s = as_url(x)
    local = not is_url(s)
    where = Path(s).parent if local else None
    if where is not None:
        where.mkdir(parents=True, exist_ok=True)
    name = os.path.basename(s.rstrip("/")) or "out"
    fd, tmp = tempfile.mkstemp(dir=where, prefix=f".{name}.", suffix=suffix + ".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        if local:
            from ..paths import _FILE_MODE

            with contextlib.suppress(OSError):
                os.chmod(tmp, _FILE_MODE)
            os.replace(tmp, s)
        else:
            fs, path = filesystem(s)
            _retrying(s, lambda: fs.put_file(tmp, path))
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def remove(x: str | os.PathLike[str]) -> None:
    s = as_url(x)
    if not is_url(s):
        os.unlink(s)
        return
    fs, path = filesystem(s)
    _retrying(s, lambda: fs.rm_file(path))


# -- content keys ------------------------------------------------------------------------------
def content_sha256(url: str, memo: Any = None) -> str:
    """sha256 of the object's bytes, remembered in ``memo`` (``get(key, stamp)`` /
    ``put(key, stamp, digest)``, e.g. :class:`engine.hash_memo.HashMemo`) against its ETag and
    size; an object without an ETag is hashed every time. Raises OSError."""
    url = as_url(url)
    doc = info(url)
    if doc["type"] == "directory":
        raise IsADirectoryError(21, "is a folder, not an object", url)
    stamp = f"url {doc['size']} {doc['etag']}"
    if memo is not None and doc["etag"]:
        digest = memo.get(url, stamp)
        if digest is not None:
            return str(digest)
    digest = hashlib.sha256(read_bytes(url, keep=True)).hexdigest()  # kept for the decode
    if memo is not None and doc["etag"]:
        memo.put(url, stamp, digest)
    return digest


def content_sha256_many(
    items: Sequence[str], memo: Any = None, threads: int = FETCH_THREADS,
    in_flight: int | None = None,
) -> list[str | OSError]:  # fmt: skip
    """:func:`content_sha256` of many URLs, errors in place. With the batch path
    (:mod:`.fetch`): a URL the memo has seen costs one HEAD (its ETag and size against the
    memo); any other one GET, whose ETag is remembered with the digest; ``in_flight`` requests
    at a time. The fetched bytes are kept for the header read and decode that follow."""
    from ..paths import map_in_threads
    from . import fetch

    urls = [as_url(x) for x in items]
    out: list[str | OSError | None] = [None] * len(urls)
    if urls and fetch.enabled():
        seen = []
        if memo is not None and hasattr(memo, "known"):
            seen = [i for i, u in enumerate(urls) if memo.known(u)]
        heads = fetch.fetch([urls[i] for i in seen], head=True, limit=in_flight) if seen else []
        for i, h in zip(seen, heads):
            if isinstance(h, fetch.Got) and h.etag:
                out[i] = memo.get(urls[i], f"url {h.size} {h.etag}")
            elif isinstance(h, OSError):
                out[i] = h
        todo = [i for i, d in enumerate(out) if d is None]
        for c in range(0, len(todo), _CHUNK):  # bounded memory: the bodies of one chunk
            part = todo[c : c + _CHUNK]
            for i, g in zip(part, fetch.fetch([urls[i] for i in part], limit=in_flight)):
                if isinstance(g, OSError):
                    out[i] = g
                elif isinstance(g, fetch.Got):
                    digest = hashlib.sha256(g.data).hexdigest()
                    _keep(urls[i], g.data)
                    if memo is not None and g.etag:
                        memo.put(urls[i], f"url {g.size} {g.etag}", digest)
                    out[i] = digest

    def one(i: int) -> str | OSError:
        try:
            return content_sha256(urls[i], memo)
        except OSError as exc:
            return exc

    rest = [i for i, d in enumerate(out) if d is None]
    for i, r in zip(rest, map_in_threads(one, rest, threads)):
        out[i] = r
    return out  # type: ignore[return-value]
