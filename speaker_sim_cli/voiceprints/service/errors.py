"""Errors the login service answers with: an HTTP status and a stable ``code`` that clients can
branch on, rendered as ``{"error": {"code": ..., "message": ...}}``."""

from __future__ import annotations

from typing import Any

#: code -> HTTP status. Codes are part of the API: never renamed, only added.
CODES: dict[str, int] = {
    "invalid_request": 400,
    "invalid_speaker_id": 400,
    "unauthorized": 401,
    "forbidden": 403,
    "not_found": 404,
    "unknown_speaker": 404,
    "method_not_allowed": 405,
    "enrolment_incomplete": 409,
    "too_large": 413,
    "unsupported_media_type": 415,
    "unreadable": 422,
    "too_short": 422,
    "too_long": 422,
    "no_voice": 422,
    "rate_limited": 429,
    "internal": 500,
    "busy": 503,
    "not_ready": 503,
}


class ServiceError(Exception):
    """An answer other than success: ``code`` (one of :data:`CODES`) and a message for people."""

    def __init__(self, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.status = CODES[code]
        self.message = message
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message}}
