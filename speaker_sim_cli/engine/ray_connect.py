"""Joining a Ray cluster for ``--ray``: connect (or start a local Ray), check that an address
answers before Ray's own minutes of retries, and explain a refused connection (token auth).
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from typing import Any

from ..errors import SpeakerSimError, UsageError

INSTALL_HINT = "pip install 'speaker-sim[ray]'"
_HOSTPORT_RE = r"(?P<host>\[[0-9a-fA-F:]+\]|[A-Za-z0-9_.-]+):(?P<port>\d{1,5})"


def import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise UsageError(
            f"--ray needs Ray, which cannot be imported ({exc}): {INSTALL_HINT}"
        ) from None
    return ray


# -- connecting ---------------------------------------------------------------------------------
@dataclass
class Connection:
    ray: Any
    address: str
    started_here: bool
    cpus: float
    gpus: float
    nodes: int


def connect(opts: Any) -> Connection:
    """Join the cluster (or start a local one). Raises SpeakerSimError saying what to set."""
    import signal
    import threading

    ray = import_ray()
    target = opts.address or os.environ.get("RAY_ADDRESS") or None
    if ray.is_initialized():  # e.g. a library caller or a test that owns the connection
        conn = _describe(ray, started_here=False)
        wanted = opts.address or "auto"
        if wanted not in ("auto", "local") and wanted.removeprefix("ray://") != conn.address:
            raise SpeakerSimError(f"--ray {opts.address}: this process is already connected "
                                  f"to the Ray cluster at {conn.address}")  # fmt: skip
        return conn
    if target is not None and target not in ("auto", "local"):
        _check_reachable(target)
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None
    try:
        if target in (None, "local"):
            # One command's private cluster: Ray's notice that it turned token auth on is noise.
            import logging

            logging.getLogger("ray._private.authentication").setLevel(logging.ERROR)
            ray.init(address=target, include_dashboard=False, logging_level="WARNING")
        else:
            ray.init(address=target, logging_level="WARNING")
    except ConnectionError as exc:
        raise SpeakerSimError(_refused(target, exc)) from None
    except Exception as exc:
        if type(exc).__name__ == "AuthenticationError":
            raise SpeakerSimError(_refused(target, exc)) from None
        raise
    finally:
        # Ray's driver turns SIGTERM into an exit; the CLI's handler (exit 130, nothing
        # partial) must stay in charge.
        if main and previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return _describe(ray, started_here=True)


def _describe(ray: Any, started_here: bool) -> Connection:
    res = ray.cluster_resources()
    try:
        address = ray.get_runtime_context().gcs_address
    except Exception:
        address = "?"
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    return Connection(ray, str(address), started_here, float(res.get("CPU", 0.0)),
                       float(res.get("GPU", 0.0)), nodes)  # fmt: skip


def _check_reachable(target: str) -> None:
    """Fail in seconds when nothing listens at HOST:PORT (Ray itself retries for minutes)."""
    m = re.fullmatch(_HOSTPORT_RE, target.removeprefix("ray://"))
    if m is None:
        return
    host, port = m["host"].strip("[]"), int(m["port"])
    try:
        with socket.create_connection((host, port), timeout=5):
            pass
    except OSError as exc:
        raise SpeakerSimError(
            f"--ray {target}: nothing answers at {host}:{port} ({exc.strerror or exc}); start "
            "a cluster with `ray start --head` and pass the address it prints, or --ray auto "
            "on one of its nodes"
        ) from None


def _refused(target: str | None, exc: BaseException) -> str:
    where = target or "the local Ray"
    if target == "auto" and "find any running Ray" in str(exc):
        return ("--ray auto: no Ray cluster runs on this machine; start one with "
                "`ray start --head`, or give its address (--ray HOST:PORT)")  # fmt: skip
    token_mode = os.environ.get("RAY_AUTH_MODE", "").lower() == "token"
    if token_mode:
        hint = (
            "RAY_AUTH_MODE=token is set, so the token was most likely refused: set the "
            "cluster's token in RAY_AUTH_TOKEN (or its file in RAY_AUTH_TOKEN_PATH; "
            "`ray get-auth-token` on the head node prints it)"
        )
    else:
        hint = (
            "the cluster is up but refused the connection; clusters started with `ray start` "
            "use token authentication: set RAY_AUTH_MODE=token and the cluster's token in "
            "RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH; `ray get-auth-token` on the head node "
            "prints it)"
        )
    first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
    return f"--ray: cannot connect to {where}: {first}. {hint}"
