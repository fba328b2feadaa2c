"""The login service's settings: the defaults are the safe ones; loosening is explicit."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import UsageError

#: Speaker ids: database keys only, never paths. A letter or digit, then letters, digits, ``._-``.
SPEAKER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass
class ServiceConfig:
    """Everything ``speaker-sim voiceprints serve`` takes (see its ``--help``)."""

    library: Path
    model: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    #: Raw-cosine decision threshold; None: the model's published one, else FALLBACK_THRESHOLD.
    threshold: float | None = None
    top_k: int = 5
    #: Net speech a complete voiceprint needs, over all of a speaker's enrolments.
    enrol_seconds: float = 10.0
    #: Net speech one request needs, and the most audio (duration) one request may carry.
    min_seconds: float = 1.0
    max_seconds: float = 30.0
    max_body_bytes: int = 5 * 1024 * 1024
    #: identify/verify requests per key (or per client address without keys) and period.
    rate: int = 60
    rate_period: float = 60.0
    max_inflight: int = 32
    max_batch: int = 16
    batch_wait_ms: float = 10.0
    queue_size: int = 64
    cors_origins: list[str] = field(default_factory=list)
    retain_audio: bool = False
    admin_keys: list[str] = field(default_factory=list)
    client_keys: list[str] = field(default_factory=list)
    device: str = "cpu"
    #: Seconds uvicorn waits for in-flight requests at shutdown.
    graceful_seconds: float = 30.0

    def check(self) -> None:
        """Refuse settings that would be unsafe or meaningless (UsageError)."""
        if not (self.admin_keys or self.client_keys) and not is_loopback(self.host):
            raise UsageError(
                f"--host {self.host} is not a loopback address and no API key is configured: "
                "set SPEAKER_SIM_ADMIN_KEY and SPEAKER_SIM_CLIENT_KEY (or --admin-key-file / "
                "--client-key-file) before serving beyond this machine"
            )
        if bool(self.admin_keys) != bool(self.client_keys):
            raise UsageError("configure both an admin key and a client key, or neither")
        if set(self.admin_keys) & set(self.client_keys):
            raise UsageError("an admin key and a client key are the same: use different keys")
        if not 0 < self.min_seconds <= self.max_seconds:
            raise UsageError("--min-seconds must be > 0 and <= --max-seconds")
        if self.enrol_seconds < self.min_seconds:
            raise UsageError("--enrol-seconds must be >= --min-seconds")
        if "*" in self.cors_origins:
            raise UsageError("--cors-origin '*' is refused: name the origins that may call")
        for o in self.cors_origins:
            if not re.fullmatch(r"https?://[^/\s]+", o):
                raise UsageError(f"--cors-origin {o!r}: expected scheme://host[:port]")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_rate(text: str) -> tuple[int, float]:
    """``"60/min"`` -> (60, 60.0); units s, min, h.

    >>> parse_rate("60/min"), parse_rate("5/s")
    ((60, 60.0), (5, 1.0))
    """
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(s|sec|min|h)\s*", text)
    if not m or int(m.group(1)) < 1:
        raise UsageError(f"--rate-limit {text!r}: expected N/s, N/min or N/h with N >= 1")
    return int(m.group(1)), {"s": 1.0, "sec": 1.0, "min": 60.0, "h": 3600.0}[m.group(2)]
