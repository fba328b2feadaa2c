"""Many objects at once: one asyncio loop, aiohttp, ``in_flight`` requests open together.

The per-object cost of fsspec/s3fs (a botocore request object, its event hooks, XML error
parsing, one coroutine hop per call) is ~4.7 ms of client CPU; here an ``s3://`` object costs one
SigV4 query-string signature and one plain HTTP GET, and ``http(s)://`` objects are fetched as
they are. Used by :func:`.storage.read_many` and :func:`.storage.content_sha256_many`;
everything else (one object, writes, listings, other
schemes) stays on fsspec. The signature: botocore's presigner signs one URL per bucket, method,
day and credential, and this module signs the others the same way from it (~12 us a URL instead
of botocore's ~230-310 us; byte for byte botocore's URLs, tested); keys it does not quote exactly
as botocore (non-ASCII, ``%``, dot or empty segments) are signed by botocore.

Errors come back per URL, in place: 404 is ``FileNotFoundError``; 5xx, 429, a reset connection,
a truncated body or a timeout are retried (``storage.RETRIES`` tries, 0.2 s then 0.4 s
back-off) and then an ``OSError`` naming the status; 401/403 over HTTP is ``PermissionError``.
Any other answer from S3 (403 with a reason, a region redirect, a 400) is left to s3fs
(:data:`FALLBACK`), which knows how to follow regions and word the reason. So do S3 options this
module does not understand and a missing credential chain: the batch path is a fast path, never
a second opinion.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import hashlib
import hmac
import json
import os
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote, urlsplit

#: Requests open at once (``$SPEAKER_SIM_FETCH_IN_FLIGHT`` overrides).
IN_FLIGHT = 64
ENV_IN_FLIGHT = "SPEAKER_SIM_FETCH_IN_FLIGHT"
#: ``batch`` (default) or ``fsspec``: every object through fsspec, one request per thread, as
#: before this module (the baseline of ``benchmarks/bench_store.py --s3``).
ENV_MODE = "SPEAKER_SIM_FETCH"
RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
TIMEOUT_S = 60.0

# s3fs options the signer understands; any other makes the URL go through s3fs.
_S3_OPTIONS = frozenset(
    {
        "key",
        "secret",
        "token",
        "anon",
        "profile",
        "client_kwargs",
        "config_kwargs",
        "use_ssl",
        "endpoint_url",
    }
)
_S3_CLIENT_KWARGS = frozenset(
    {"endpoint_url", "region_name", "aws_access_key_id", "aws_secret_access_key",
     "aws_session_token"}
)  # fmt: skip
_AWS_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
            "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
            "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE")  # fmt: skip


class _Fallback:
    """Marks a URL the batch path leaves to fsspec."""

    def __repr__(self) -> str:
        return "FALLBACK"


FALLBACK: Any = _Fallback()
#: Objects this process fetched through the batch path and left to fsspec (tests, benchmarks).
COUNTS = {"fetched": 0, "fallback": 0}


@dataclass(frozen=True)
class Got:
    """One answer: the body (``b""`` for a HEAD), the object's size and its ETag (quoted, as
    S3 and s3fs give it; None when the server sends none)."""

    data: bytes
    size: int
    etag: str | None


def in_flight() -> int:
    raw = os.environ.get(ENV_IN_FLIGHT, "")
    try:
        n = int(raw) if raw.strip() else IN_FLIGHT
    except ValueError:
        n = IN_FLIGHT
    return max(1, n)


def enabled() -> bool:
    if os.environ.get(ENV_MODE, "batch").strip().lower() == "fsspec":
        return False
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        return False
    return True


# -- signing ---------------------------------------------------------------------------------------
_PROBE = "k"
_MISSING: Any = object()
_SAFE_KEY = re.compile(r"[A-Za-z0-9._~!$&'()*+,;=:@ /-]*")
_AMZ_DATE: list[Any] = [0, ""]


def _plain_key(key: str) -> bool:
    """A key our signer quotes as botocore does: ASCII, no dot segment, no empty segment
    (anything else is signed by botocore itself)."""
    if not key or _SAFE_KEY.fullmatch(key) is None or "//" in key:
        return False
    return not any(part in (".", "..") for part in key.split("/"))


def _amz_date() -> str:
    """SigV4's timestamp of this second (UTC), made once a second."""
    now = int(time.time())
    if _AMZ_DATE[0] != now:
        _AMZ_DATE[:] = [now, time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))]
    return str(_AMZ_DATE[1])


@dataclass(frozen=True)
class _Template:
    """SigV4 query signing of one bucket, method, day and credential, derived from one URL that
    botocore presigned: the signing key once, then per URL one SHA-256 and one HMAC (~14 us
    instead of botocore's ~300 us). The same bytes as botocore's presigner
    (tests/test_fetch_sign.py)."""

    method: str
    origin: str  # scheme://host[:port]
    path_prefix: str  # the path up to the key
    params: tuple[tuple[str, str], ...]  # the query as botocore orders it, without the signature
    host: str  # as SigV4 signs it (no default port)
    scope: str
    key: bytes

    @classmethod
    def derive(cls, url: str, method: str, secret: str) -> _Template | None:
        parts = urlsplit(url)
        pairs = [q.split("=", 1) for q in parts.query.split("&")]
        if not parts.path.endswith("/" + _PROBE) or any(len(q) != 2 for q in pairs):
            return None
        query = [(q[0], q[1]) for q in pairs]
        params = tuple((k, v) for k, v in query if k != "X-Amz-Signature")
        got = dict(query)
        try:
            date = got["X-Amz-Date"]
            _, day, region, service, _ = unquote(got["X-Amz-Credential"]).rsplit("/", 4)
        except (KeyError, ValueError):
            return None
        key = f"AWS4{secret}".encode()
        for part in (day, region, service, "aws4_request"):
            key = hmac.new(key, part.encode(), hashlib.sha256).digest()
        default = {"http": 80, "https": 443}.get(parts.scheme)
        host = parts.hostname or ""
        if parts.port is not None and parts.port != default:
            host = f"{host}:{parts.port}"
        path_prefix = parts.path[: -len(_PROBE)]
        t = cls(method, f"{parts.scheme}://{parts.netloc}", path_prefix, params, host,
                f"{day}/{region}/{service}/aws4_request", key)  # fmt: skip
        return t if t.sign(_PROBE, date) == url else None

    def sign(self, key: str, amz_date: str) -> str:
        path = self.path_prefix + quote(key, safe="/~")
        params = [(k, amz_date if k == "X-Amz-Date" else v) for k, v in self.params]
        query = "&".join(f"{k}={v}" for k, v in params)
        canonical = "\n".join(
            (self.method, path, "&".join(f"{k}={v}" for k, v in sorted(params)),
             f"host:{self.host}\n", "host", "UNSIGNED-PAYLOAD")
        )  # fmt: skip
        digest = hashlib.sha256(canonical.encode()).hexdigest()
        text = f"AWS4-HMAC-SHA256\n{amz_date}\n{self.scope}\n{digest}"
        sig = hmac.new(self.key, text.encode(), hashlib.sha256).hexdigest()
        return f"{self.origin}{path}?{query}&X-Amz-Signature={sig}"


class _S3Signer:
    """Presigned GET/HEAD URLs from one botocore client (credentials and endpoint resolved as
    s3fs resolves them: options first, then the environment and ``~/.aws``)."""

    def __init__(self, options: dict[str, Any]) -> None:
        import botocore.session
        from botocore import UNSIGNED
        from botocore.config import Config

        kw = dict(options.get("client_kwargs") or {})
        session = botocore.session.Session(profile=options.get("profile"))
        cfg = {"signature_version": "s3v4", **dict(options.get("config_kwargs") or {})}
        if options.get("anon"):
            cfg["signature_version"] = UNSIGNED
        self.client = session.create_client(
            "s3",
            endpoint_url=options.get("endpoint_url") or kw.get("endpoint_url"),
            region_name=kw.get("region_name"),
            aws_access_key_id=options.get("key") or kw.get("aws_access_key_id"),
            aws_secret_access_key=options.get("secret") or kw.get("aws_secret_access_key"),
            aws_session_token=options.get("token") or kw.get("aws_session_token"),
            use_ssl=bool(options.get("use_ssl", True)),
            config=Config(**cfg),
        )
        self.anon = bool(options.get("anon"))
        self._templates: dict[tuple, _Template | None] = {}
        if not self.anon and self.client._request_signer._credentials is None:
            raise LookupError("no S3 credentials")  # s3fs decides what that means

    def url(self, rest: str, method: str) -> str:
        bucket, _, key = rest.partition("/")
        if not self.anon and _plain_key(key):
            date = _amz_date()
            t = self._template(bucket, method, date[:8])
            if t is not None and t.scope.startswith(date[:8]):  # not across midnight
                return t.sign(key, date)
        return self._botocore_url(bucket, key, method)

    def _botocore_url(self, bucket: str, key: str, method: str) -> str:
        op = "head_object" if method == "HEAD" else "get_object"
        return str(
            self.client.generate_presigned_url(
                op, Params={"Bucket": bucket, "Key": key}, ExpiresIn=3600
            )
        )

    def _template(self, bucket: str, method: str, day: str) -> _Template | None:
        """The signing template of ``bucket`` and ``method`` for ``day`` and the current
        credentials (derived again from botocore when either changes; None when our signature
        of botocore's own URL does not reproduce botocore's: then botocore signs every URL)."""
        creds = self.client._request_signer._credentials.get_frozen_credentials()
        ident = (bucket, method, day, creds.access_key, creds.secret_key, creds.token)
        t = self._templates.get(ident, _MISSING)
        if t is _MISSING:
            t = _Template.derive(self._botocore_url(bucket, _PROBE, method), method,
                                 creds.secret_key)  # fmt: skip
            if len(self._templates) >= 64:  # a few buckets, methods and days at a time
                self._templates.clear()
            self._templates[ident] = t
        return t


_SIGNERS: dict[str, _S3Signer | None] = {}
_SIGNERS_LOCK = threading.Lock()


def _s3_signer(options: dict[str, Any]) -> _S3Signer | None:
    """The signer of these options (and of the AWS environment), or None when the batch path
    cannot sign like s3fs would."""
    if set(options) - _S3_OPTIONS or set(options.get("client_kwargs") or {}) - _S3_CLIENT_KWARGS:
        return None
    env = {k: os.environ.get(k) for k in _AWS_ENV}
    ident = json.dumps([options, env], sort_keys=True, default=str)
    with _SIGNERS_LOCK:
        if ident not in _SIGNERS:
            try:
                _SIGNERS[ident] = _S3Signer(options)
            except Exception:  # no credentials, a bad option: s3fs reports it its own way
                _SIGNERS[ident] = None
        return _SIGNERS[ident]


def _target(url: str, signers: dict[str, Any]) -> tuple[str, Any] | None:
    """``(kind, signer-or-url)`` for a URL the batch path can fetch, else None. ``signers``:
    the signer of each scheme seen so far in this call."""
    from . import storage

    scheme, rest = storage.parse_url(url)
    if scheme in ("http", "https"):
        return "http", f"{scheme}://{rest}"  # aiohttp quotes what needs quoting
    if scheme in ("s3", "s3a"):
        if scheme not in signers:
            signers[scheme] = _s3_signer(storage.options_for(scheme))
        signer = signers[scheme]
        return ("s3", (signer, rest)) if signer is not None else None
    return None


# -- fetching --------------------------------------------------------------------------------------
def fetch(urls: Sequence[str], head: bool = False, limit: int | None = None) -> list[Any]:
    """GET (or HEAD) every URL, ``limit`` (default :func:`in_flight`) at a time. Returns, in
    input order, a :class:`Got`, an ``OSError`` naming the URL, or :data:`FALLBACK` for a URL
    to read through fsspec instead."""
    targets: list[Any] = []
    signers: dict[str, Any] = {}  # one options lookup per scheme and call, not per URL
    for u in urls:
        try:
            targets.append(_target(u, signers))
        except ValueError:
            targets.append(None)
    out: list[Any] = [FALLBACK] * len(urls)
    todo = [i for i, t in enumerate(targets) if t is not None]
    if not todo:
        COUNTS["fallback"] += len(out)
        return out
    jobs = [(urls[i], targets[i]) for i in todo]
    got = _run(_fetch_all(jobs, "HEAD" if head else "GET", limit or in_flight()))
    for i, g in zip(todo, got):
        out[i] = g
    n_fallback = sum(g is FALLBACK for g in out)
    COUNTS["fallback"] += n_fallback
    COUNTS["fetched"] += len(out) - n_fallback
    return out


# One event loop per process, in a daemon thread, with one aiohttp session on it: keep-alive
# connections (and TLS sessions) are reused from one call to the next, and a caller that runs
# its own loop (the login service) is not blocked by ours. A forked child starts its own.
_LOOP: tuple[int, asyncio.AbstractEventLoop] | None = None
_LOOP_LOCK = threading.Lock()
_SESSION: Any = None  # touched on the loop's thread only


def _loop() -> asyncio.AbstractEventLoop:
    global _LOOP, _SESSION
    with _LOOP_LOCK:
        if _LOOP is None or _LOOP[0] != os.getpid():
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="speaker-sim-fetch", daemon=True).start()
            _LOOP, _SESSION = (os.getpid(), loop), None
        return _LOOP[1]


def _run(coro: Any) -> Any:
    """Run ``coro`` on the fetch loop and wait for its result."""
    return asyncio.run_coroutine_threadsafe(coro, _loop()).result()


async def _session() -> Any:
    import aiohttp

    global _SESSION
    if _SESSION is None or _SESSION.closed:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=TIMEOUT_S, sock_read=TIMEOUT_S)
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)  # calls bound their own
        # auto_decompress off (and Accept-Encoding identity): the stored bytes, as s3fs gives.
        _SESSION = aiohttp.ClientSession(
            connector=connector, timeout=timeout, auto_decompress=False
        )
    return _SESSION


@atexit.register
def _close() -> None:
    with _LOOP_LOCK:
        if _LOOP is None or _LOOP[0] != os.getpid():
            return
        loop = _LOOP[1]
    session = _SESSION
    with contextlib.suppress(Exception):
        if session is not None and not session.closed:
            asyncio.run_coroutine_threadsafe(session.close(), loop).result(timeout=5)
    loop.call_soon_threadsafe(loop.stop)


async def _fetch_all(jobs: list[tuple[str, Any]], method: str, limit: int) -> list[Any]:
    import aiohttp

    from .storage import RETRIES

    out: list[Any] = [None] * len(jobs)
    headers = {"Accept-Encoding": "identity"}

    async def one(name: str, target: tuple[str, Any], session: Any) -> Any:
        kind, where = target
        err: OSError | None = None
        for attempt in range(RETRIES):
            if attempt:
                await asyncio.sleep(0.2 * 2 ** (attempt - 1))
            try:
                url = where if kind == "http" else where[0].url(where[1], method)
            except Exception:
                return FALLBACK
            try:
                async with session.request(method, url, headers=headers,
                                           allow_redirects=kind == "http") as r:  # fmt: skip
                    if r.status == 200:
                        data = await r.read() if method == "GET" else b""
                        size = (
                            len(data)
                            if method == "GET"
                            else int(r.headers.get("Content-Length") or 0)
                        )
                        return Got(data, size, r.headers.get("ETag"))
                    if r.status in (404, 410):
                        return FileNotFoundError(2, "object not found", name)
                    reason = f"HTTP {r.status} {r.reason or ''}".strip()
                    if r.status in RETRY_STATUS:
                        err = OSError(5, reason, name)
                        continue
                    if kind == "s3":  # a region, a policy, a signature: s3fs words it
                        return FALLBACK
                    if r.status in (401, 403):
                        return PermissionError(13, f"access denied ({reason})", name)
                    return OSError(5, reason, name)
            except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError) as exc:
                text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
                err = OSError(5, f"{type(exc).__name__}: {text}".rstrip(": "), name)
        return err

    session = await _session()
    queue = iter(range(len(jobs)))

    async def worker() -> None:
        for i in queue:  # shared iterator: each index is taken once
            out[i] = await one(jobs[i][0], jobs[i][1], session)

    await asyncio.gather(*(worker() for _ in range(min(limit, len(jobs)))))
    return out
