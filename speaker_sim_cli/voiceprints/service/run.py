"""Start the login service: check the settings, load the model and the library, serve with
uvicorn until SIGINT/SIGTERM, then finish the requests in flight and the queued batch."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from .config import ServiceConfig


def serve(cfg: ServiceConfig) -> None:
    """Run until stopped (blocking). Raises UsageError for unsafe or impossible settings."""
    cfg.check()
    try:
        import uvicorn
    except ImportError:
        from ...errors import UsageError

        raise UsageError(
            "the login service needs the server extra: pip install 'speaker-sim[server]'"
        ) from None
    from .app import create_app
    from .engine import LoginEngine

    engine = LoginEngine(cfg)
    try:
        engine.start()
    except BaseException:
        engine.lib.close()
        raise
    app = create_app(engine)
    keys = "API keys required" if cfg.admin_keys else "no API keys (this machine only)"
    print(
        f"voiceprint login: {cfg.library} ({engine.lib.load()} speakers, "
        f"{engine.lib.model.model}, threshold {engine.threshold:g}); {keys}; "
        f"http://{cfg.host}:{cfg.port}/",
        file=sys.stderr,
        flush=True,
    )
    config = uvicorn.Config(
        app,
        host=cfg.host,
        port=cfg.port,
        log_level="info",
        timeout_graceful_shutdown=int(cfg.graceful_seconds),
        server_header=False,
        lifespan="on",
    )

    class Server(uvicorn.Server):
        @contextmanager
        def capture_signals(self) -> Iterator[None]:
            with super().capture_signals():
                yield
                # The signal that stopped it has been handled (requests finished): uvicorn
                # would raise it again, and the CLI would report an interruption.
                self._captured_signals.clear()

    try:
        Server(config).run()
    finally:
        if engine.ready:  # the lifespan did not run (start-up failed): stop here
            engine.stop()
