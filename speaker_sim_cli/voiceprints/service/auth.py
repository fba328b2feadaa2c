"""API keys: an admin key (enrol, list, delete) and client keys (verify, identify), read from an
environment variable or a file, compared in constant time, never logged or echoed."""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

from ...errors import UsageError
from .errors import ServiceError

ADMIN_ENV = "SPEAKER_SIM_ADMIN_KEY"
#: One or several client keys, comma-separated (each client app its own: rate limits are per key).
CLIENT_ENV = "SPEAKER_SIM_CLIENT_KEY"
MIN_KEY_CHARS = 16


def load_keys(env: str, file: Path | None) -> list[str]:
    """Keys from ``file`` (one a line; # comments) or else from the variable ``env``."""
    if file is not None:
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"{file}: cannot read the key file ({type(exc).__name__})") from None
        keys = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
        where = str(file)
    else:
        keys = [k.strip() for k in os.environ.get(env, "").split(",") if k.strip()]
        where = f"${env}"
    for i, k in enumerate(keys, 1):
        if len(k) < MIN_KEY_CHARS:  # the key itself is never printed
            raise UsageError(f"{where}: key {i} is shorter than {MIN_KEY_CHARS} characters")
    return keys


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


class Authenticator:
    """Who a request is: ``"admin"``, ``"client-N"``, or ``"open"`` when no key is configured
    (loopback only: :meth:`ServiceConfig.check` refuses anything else)."""

    def __init__(self, admin_keys: list[str], client_keys: list[str]) -> None:
        self._admin = [_digest(k) for k in admin_keys]
        self._client = [_digest(k) for k in client_keys]

    @property
    def open(self) -> bool:
        return not (self._admin or self._client)

    def identify(self, headers: dict[str, str]) -> str | None:
        """The principal the request's key names, None for a missing or wrong key."""
        given = _presented(headers)
        if given is None:
            return None
        d = _digest(given)
        who = None
        # Every key is compared, each in constant time: the time says nothing about which.
        for k in self._admin:
            if hmac.compare_digest(d, k):
                who = who or "admin"
        for i, k in enumerate(self._client):
            if hmac.compare_digest(d, k):
                who = who or f"client-{i + 1}"
        return who

    def require(self, headers: dict[str, str], admin: bool) -> str:
        """The principal, or ServiceError ``unauthorized`` (no or wrong key) / ``forbidden``
        (a client key where the admin key is needed). The admin key may do everything."""
        if self.open:
            return "open"
        who = self.identify(headers)
        if who is None:
            raise ServiceError(
                "unauthorized",
                "a valid API key is required (Authorization: Bearer KEY, or X-API-Key)",
                {"WWW-Authenticate": "Bearer"},
            )
        if admin and who != "admin":
            raise ServiceError("forbidden", "this needs the admin key")
        return who


def _presented(headers: dict[str, str]) -> str | None:
    auth = headers.get("authorization", "")
    if auth[:7].lower() == "bearer " and auth[7:].strip():
        return auth[7:].strip()
    key = headers.get("x-api-key", "").strip()
    return key or None
