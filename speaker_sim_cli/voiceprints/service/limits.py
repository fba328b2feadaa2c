"""Limits that keep the service up under abuse: the request body is capped while it is received
(413 before it is read whole), identify/verify are rate-limited per key, and at most
``--max-inflight`` requests are worked on at once (503 beyond)."""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from typing import Any

from .errors import ServiceError

Scope = dict[str, Any]


class _TooLarge(ServiceError):
    """Raised while the body arrives: the app's handler answers it 413 like any ServiceError."""


def error_response_parts(err: ServiceError) -> tuple[dict[str, Any], bytes]:
    body = json.dumps(err.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
    return {"type": "http.response.start", "status": err.status, "headers": headers}, body


class BodyLimit:
    """ASGI middleware: a declared Content-Length over ``max_bytes`` is answered 413 before any
    of the body is read; a body without one (chunked) is counted as it arrives and cut off at
    the limit. The connection is closed after a 413 so the rest is never read."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes
        too_large = ServiceError(
            "too_large", f"the request body is over the limit of {limit} bytes (--max-body)"
        )
        too_large.headers["Connection"] = "close"
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                n = int(declared)
            except ValueError:
                n = -1
            if n < 0 or n > limit:
                if n < 0:
                    too_large = ServiceError("invalid_request", "bad Content-Length header")
                await _send_error(send, too_large)
                return
        seen = 0
        started = False

        async def counted() -> Any:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > limit:
                    raise _TooLarge(too_large.code, too_large.message, too_large.headers)
            return msg

        async def tracked(msg: Any) -> None:
            nonlocal started
            if msg["type"] == "http.response.start":
                started = True
            await send(msg)

        try:
            await self.app(scope, counted, tracked)
        except _TooLarge:
            if not started:
                await _send_error(send, too_large)


async def _send_error(send: Any, err: ServiceError) -> None:
    start, body = error_response_parts(err)
    await send(start)
    await send({"type": "http.response.body", "body": body})


class RateLimiter:
    """A token bucket per principal: ``rate`` requests per ``period`` seconds, bursts up to
    ``rate``. Remembers at most ``max_keys`` principals (least recently seen forgotten)."""

    def __init__(self, rate: int, period: float, max_keys: int = 10_000) -> None:
        self.rate = rate
        self.period = period
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def take(self, who: str, now: float | None = None) -> None:
        """Spend one token of ``who``, or raise ``rate_limited`` with Retry-After."""
        now = time.monotonic() if now is None else now
        per_s = self.rate / self.period
        with self._lock:
            tokens, last = self._buckets.pop(who, (float(self.rate), now))
            tokens = min(float(self.rate), tokens + (now - last) * per_s)
            if tokens < 1.0:
                self._buckets[who] = (tokens, now)
                wait = max(1, int((1.0 - tokens) / per_s + 0.999))
                raise ServiceError(
                    "rate_limited",
                    f"over {self.rate} requests per {self.period:g} s for this key; retry later",
                    {"Retry-After": str(wait)},
                )
            self._buckets[who] = (tokens - 1.0, now)
            while len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)


class Inflight:
    """At most ``limit`` requests worked on at once; the next is answered ``busy`` (503)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.now = 0
        self.peak = 0
        self._lock = threading.Lock()

    def __enter__(self) -> Inflight:
        with self._lock:
            if self.now >= self.limit:
                raise ServiceError(
                    "busy", f"{self.limit} requests in flight (--max-inflight); retry shortly",
                    {"Retry-After": "1"},
                )  # fmt: skip
            self.now += 1
            self.peak = max(self.peak, self.now)
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self.now -= 1
