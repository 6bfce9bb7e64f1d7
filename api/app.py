"""The usage API: daily usage of a subscriber, read from the HVS (Redis).

    uvicorn api.app:app --host 127.0.0.1 --port 18089

`GET /data_usage?msisdn=...&start_time=YYYYmmddHHMMSS&end_time=YYYYmmddHHMMSS` (HTTP basic
auth) answers the data contract's format, one item per day, category and usage type for every
day the half-open range [start_time, end_time) touches. `/health` checks Redis, `/docs` and
`/openapi.json` describe it all. Prometheus metrics are served on their own port
(`API_METRICS_HOST`:`API_METRICS_PORT`, 127.0.0.1:19106), not on the API's. See
docs/usage-api.md and docs/security.md.

This module builds the app: settings, the shared objects on `app.state`, error answers,
metrics and the lifespan. The routes are in api/routes.py, their dependencies in api/deps.py.
"""

import gc
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response
from prometheus_client import Counter, Histogram, start_http_server

from api.auth import Authenticator, parse_users
from api.deps import ApiError, Guard, Store
from api.routes import add_routes
from api.settings import ApiSettings

log = logging.getLogger("api")

REQUESTS = Counter("api_requests_total", "HTTP requests", ["path", "status"])
LATENCY = Histogram(
    "api_request_seconds",
    "HTTP request duration",
    ["path"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)
_PATHS = {"/data_usage", "/health"}

# What a malformed parameter gets told (the patterns are in the OpenAPI spec too).
_FORMATS = {
    "msisdn": "must be 9 to 15 digits",
    "start_time": "must be YYYYmmddHHMMSS (14 digits)",
    "end_time": "must be YYYYmmddHHMMSS (14 digits)",
    "usage_type": "must be a word of 1 to 32 letters, digits or _",
    "category": "must be `data` or `call`",
}


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status, headers, media_type="application/json")


def validation_detail(exc: RequestValidationError) -> str:
    """One line per bad parameter: what is missing, or what a value must look like."""
    missing, parts = [], []
    for err in exc.errors():
        loc = [str(x) for x in err.get("loc", ()) if x != "query"]
        name = loc[-1] if loc else "request"
        if err.get("type") == "missing":
            missing.append(name)
        elif name in _FORMATS:
            parts.append(f"{name} {_FORMATS[name]}, got {str(err.get('input'))[:40]!r}")
        else:
            parts.append(f"{name}: {err.get('msg')}")
    if missing:
        parts.insert(0, f"missing query parameter(s): {', '.join(missing)}")
    return "; ".join(parts) or "invalid request"


class Metrics:
    """Pure ASGI middleware: request count and duration per known path (cheap, no body copy)."""

    def __init__(self, app: Callable[..., Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"] if scope["path"] in _PATHS else "other"
        status = 500
        t0 = time.perf_counter()

        async def send_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            LATENCY.labels(path).observe(time.perf_counter() - t0)
            REQUESTS.labels(path, str(status)).inc()


def create_app(settings: ApiSettings | None = None) -> FastAPI:
    settings = settings or ApiSettings()
    authenticator = Authenticator(parse_users(settings.api_users), settings.auth_cache_seconds)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # The app's import-time objects never die: keep them out of the cyclic GC's scans, and
        # collect the young generation less often (requests make no cycles).
        gc.collect()
        gc.freeze()
        gc.set_threshold(10_000, 20, 100)
        server = None
        if settings.metrics_port:
            server, _thread = start_http_server(settings.metrics_port, addr=settings.metrics_host)
            log.info(
                "metrics served",
                extra={"host": settings.metrics_host, "port": settings.metrics_port},
            )
        try:
            yield
        finally:
            if server is not None:
                server.shutdown()
                server.server_close()
            await app.state.store.close()

    app = FastAPI(
        title="WTC usage API",
        version="1.1.0",
        description="Daily usage per subscriber from the high velocity store (Redis), near "
        "real time. HTTP basic authentication.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.store = Store(settings)
    app.state.guard = Guard(settings, authenticator)

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError) -> Response:
        return _json({"detail": exc.detail}, exc.status, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> Response:
        return _json({"detail": validation_detail(exc)}, 400)

    add_routes(app.router)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            schemes = spec.setdefault("components", {}).setdefault("securitySchemes", {})
            schemes["HTTPBasic"] = {"type": "http", "scheme": "basic"}
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    app.add_middleware(Metrics)
    return app


def __getattr__(name: str) -> Any:
    # `uvicorn api.app:app` builds the app on first access, from the environment.
    if name == "app":
        value = create_app()
        globals()["app"] = value
        return value
    raise AttributeError(name)
