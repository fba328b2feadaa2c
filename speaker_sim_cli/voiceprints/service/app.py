"""The HTTP API and the page: routes, keys, limits and JSON errors around a :class:`LoginEngine`.

Admin key: enrol, list, get, delete, stats. Client key (or admin): verify, identify. Every error
is ``{"error": {"code", "message"}}`` with a stable code (:data:`.errors.CODES`).
"""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager
from importlib import resources
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .auth import Authenticator
from .errors import ServiceError
from .limits import BodyLimit, Inflight, RateLimiter
from .uploads import Clip, decode_upload

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from .engine import LoginEngine

log = logging.getLogger("speaker_sim.voiceprints.service")
AUDIO_TYPES = ("audio/", "application/octet-stream")
_STATIC = {
    "app.js": "text/javascript",
    "recorder-worklet.js": "text/javascript",
    "style.css": "text/css",
}
_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; media-src 'self' blob:; "
    "connect-src 'self'; object-src 'none'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
_STATUS_CODES = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}


def _static(name: str) -> bytes:
    return resources.files(__package__).joinpath("static").joinpath(name).read_bytes()


def create_app(engine: LoginEngine) -> Any:
    """The ASGI application (FastAPI inside the body-size limit)."""
    cfg = engine.cfg
    auth = Authenticator(cfg.admin_keys, cfg.client_keys)
    rate = RateLimiter(cfg.rate, cfg.rate_period)
    inflight = Inflight(cfg.max_inflight)
    counts: dict[str, int] = {}

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        engine.stop()  # after uvicorn has finished the requests in flight

    app = FastAPI(
        title="speaker-sim voiceprint login",
        version="1",
        lifespan=lifespan,
        description="Enrol, verify and identify speakers against one voiceprint library. "
        "Spoofing and liveness are out of scope: see docs/voiceprints.md.",
    )

    @app.exception_handler(ServiceError)
    async def _service_error(_: Request, exc: ServiceError) -> JSONResponse:
        counts[exc.code] = counts.get(exc.code, 0) + 1
        return JSONResponse(exc.body(), exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _STATUS_CODES.get(exc.status_code, "invalid_request")
        return JSONResponse(
            {"error": {"code": code, "message": str(exc.detail)}}, exc.status_code,
            headers=getattr(exc, "headers", None),
        )  # fmt: skip

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        where = "; ".join(
            f"{'.'.join(str(x) for x in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()
        )
        return JSONResponse({"error": {"code": "invalid_request", "message": where}}, 400)

    @app.exception_handler(Exception)
    async def _bug(_: Request, exc: Exception) -> JSONResponse:  # never a traceback to clients
        log.error("internal error: %s: %s", type(exc).__name__, exc)
        return JSONResponse({"error": {"code": "internal", "message": "internal error"}}, 500)

    def principal(request: Request, admin: bool) -> str:
        who = auth.require(dict(request.headers), admin)
        if who == "open" and request.client is not None:
            who = f"addr:{request.client.host}"
        return who

    async def read_clip(request: Request) -> tuple[Clip, bytes]:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "multipart/form-data":
            form = await request.form(max_files=1, max_fields=4)
            up = form.get("audio")
            if up is None or isinstance(up, str):
                raise ServiceError("invalid_request", "multipart upload: no file field 'audio'")
            data = await up.read()
        elif ctype.startswith(AUDIO_TYPES):
            data = await request.body()
        else:
            raise ServiceError(
                "unsupported_media_type",
                f"Content-Type {ctype or 'missing'}: send audio/* (e.g. audio/wav), "
                "application/octet-stream, or multipart/form-data with a file field 'audio'",
            )
        clip = await _decode(data)
        return clip, data

    def _decode_timed(data: bytes) -> Clip:
        t0 = time.perf_counter()
        try:
            return decode_upload(
                data, engine.sample_rate, min_seconds=cfg.min_seconds,
                max_seconds=cfg.max_seconds, resampler=engine.resampler,
                loudness_db=engine.loudness_db,
            )  # fmt: skip
        finally:
            engine.batcher.times.add("decode", time.perf_counter() - t0)

    async def _decode(data: bytes) -> Clip:
        import asyncio

        return await asyncio.to_thread(_decode_timed, data)

    def count(what: str) -> None:
        counts[what] = counts.get(what, 0) + 1

    # -- page -----------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(_static("index.html"), headers=_HEADERS)

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str) -> Response:
        if name not in _STATIC:
            raise ServiceError("not_found", "no such file")
        return Response(_static(name), media_type=_STATIC[name], headers=_HEADERS)

    # -- health ---------------------------------------------------------------------------------
    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        if not engine.ready:
            raise ServiceError("not_ready", "the model is loading or the server is stopping")
        return JSONResponse({"status": "ready", "model": engine.lib.model.model})

    # -- admin ----------------------------------------------------------------------------------
    @app.post("/v1/speakers/{speaker}/enrol")
    async def enrol(speaker: str, request: Request) -> dict[str, Any]:
        """Add a recording to ``speaker`` (created on first use); the answer says the net
        speech enrolled so far and how much more a complete voiceprint needs."""
        principal(request, admin=True)
        from .engine import check_speaker_id

        check_speaker_id(speaker)
        with inflight:
            clip, data = await read_clip(request)
            out = await engine.enrol(speaker, clip, data)
        count("enrol")
        return out

    @app.get("/v1/speakers")
    async def list_speakers(request: Request, offset: int = 0, limit: int = 1000) -> dict[str, Any]:
        """Speakers by name, ``limit`` (1..10000) from ``offset``."""
        import asyncio

        principal(request, admin=True)
        if offset < 0 or not 1 <= limit <= 10_000:
            raise ServiceError("invalid_request", "offset must be >= 0 and limit 1..10000")
        rows = await asyncio.to_thread(engine.speakers)
        return {
            "speakers": rows[offset : offset + limit],
            "total": len(rows),
            "required_seconds": cfg.enrol_seconds,
        }

    @app.get("/v1/speakers/{speaker}")
    async def get_speaker(speaker: str, request: Request) -> dict[str, Any]:
        import asyncio

        from .engine import check_speaker_id

        principal(request, admin=True)
        check_speaker_id(speaker)
        out = await asyncio.to_thread(engine.progress, speaker)
        out["stored_audio"] = await asyncio.to_thread(engine.lib.store.audio_count, speaker)
        return out

    @app.delete("/v1/speakers/{speaker}")
    async def delete_speaker(speaker: str, request: Request) -> dict[str, Any]:
        import asyncio

        principal(request, admin=True)
        out = await asyncio.to_thread(engine.delete, speaker)
        count("delete")
        return out

    @app.get("/v1/stats")
    async def stats(request: Request) -> dict[str, Any]:
        principal(request, admin=True)
        return {
            "batching": engine.batcher.stats(),
            "inflight": inflight.now,
            "inflight_peak": inflight.peak,
            "counts": dict(counts),
            "threshold": engine.threshold,
        }

    # -- client ---------------------------------------------------------------------------------
    @app.post("/v1/speakers/{speaker}/verify")
    async def verify(speaker: str, request: Request) -> dict[str, Any]:
        """Is this recording ``speaker``? accept/reject, the score and the threshold used."""
        rate.take(principal(request, admin=False))
        from .engine import check_speaker_id

        check_speaker_id(speaker)
        with inflight:
            clip, _ = await read_clip(request)
            out = await engine.verify(speaker, clip)
        count("verify")
        return out

    @app.post("/v1/identify")
    async def identify(request: Request, top_k: int | None = None) -> dict[str, Any]:
        """Who is speaking: the best enrolled speaker, or ``unknown`` below the threshold."""
        rate.take(principal(request, admin=False))
        k = cfg.top_k if top_k is None else top_k
        if not 1 <= k <= 100:
            raise ServiceError("invalid_request", "top_k must be 1..100")
        t0 = time.perf_counter()
        with inflight:
            clip, _ = await read_clip(request)
            out = await engine.identify(clip, k)
        engine.batcher.times.add("identify_request", time.perf_counter() - t0)
        count("identify")
        return out

    if cfg.cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware, allow_origins=cfg.cors_origins, allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "X-API-Key", "Content-Type"], max_age=600,
        )  # fmt: skip
    return BodyLimit(app, cfg.max_body_bytes)
