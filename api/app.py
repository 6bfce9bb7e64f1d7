"""The usage API: daily usage of a subscriber, read from the HVS (Redis).

    uvicorn api.app:app --host 127.0.0.1 --port 18089

`GET /data_usage?msisdn=...&start_time=YYYYmmddHHMMSS&end_time=YYYYmmddHHMMSS` (HTTP basic
auth) answers the data contract's format, one item per day, category and usage type for every
day the half-open range [start_time, end_time) touches. `/health` checks Redis, `/metrics` is
Prometheus, `/docs` and `/openapi.json` describe it all. See docs/usage-api.md.
"""

import asyncio
import base64
import gc
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import date, datetime, timedelta
from typing import Any

import anyio
import orjson
import redis.asyncio as aioredis
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest
from pydantic import BaseModel, Field
from redis.exceptions import RedisError

from api.auth import Authenticator, parse_users
from api.settings import ApiSettings
from hvs import keys as K

REQUESTS = Counter("api_requests_total", "HTTP requests", ["path", "status"])
LATENCY = Histogram(
    "api_request_seconds",
    "HTTP request duration",
    ["path"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)
_PATHS = {"/data_usage", "/health", "/metrics"}

CATEGORY_ORDER = {"data": 0, "call": 1}
MEASURE = {"data": "bytes", "call": "seconds"}


# ------------------------------------------------------------------------------ response models


class UsageItem(BaseModel):
    category: str = Field(description="`data` or `call`", examples=["data"])
    usage_type: str = Field(description="data_type or call_type", examples=["video"])
    total: int = Field(description="up + down bytes (data) or call seconds (call)")
    measure: str = Field(description="`bytes` or `seconds`")
    start_time: str = Field(description="start of the day, `YYYY-mm-dd HH:MM:SS`")
    events: int = Field(description="number of CDR events")
    up_bytes: int | None = Field(default=None, description="data only")
    down_bytes: int | None = Field(default=None, description="data only")
    cost_zar: str = Field(description="cost in ZAR, exact decimal string (10 decimals)")
    cost_wak: str = Field(description="cost in WAK of the priced part, exact decimal string")
    cost_zar_unpriced: str | None = Field(
        default=None, description="ZAR cost whose WAK is pending (no rate known yet); absent if 0"
    )


class UsageResponse(BaseModel):
    msisdn: str
    start_time: str = Field(description="the request's start_time, as given")
    end_time: str = Field(description="the request's end_time, as given")
    usage: list[UsageItem]


class ErrorBody(BaseModel):
    detail: str


# ------------------------------------------------------------------------------------ helpers


class BadRequest(Exception):
    def __init__(self, detail: str) -> None:
        self.detail = detail


def parse_msisdn(value: str) -> str:
    if not (9 <= len(value) <= 15 and value.isascii() and value.isdigit()):
        raise BadRequest(f"msisdn must be 9 to 15 digits, got {value[:40]!r}")
    return value


def parse_time(name: str, value: str) -> datetime:
    if not (len(value) == 14 and value.isascii() and value.isdigit()):
        raise BadRequest(f"{name} must be YYYYmmddHHMMSS (14 digits), got {value[:40]!r}")
    try:
        return datetime(
            int(value[0:4]),
            int(value[4:6]),
            int(value[6:8]),
            int(value[8:10]),
            int(value[10:12]),
            int(value[12:14]),
        )
    except ValueError as exc:
        raise BadRequest(f"{name} {value!r} is not a valid time: {exc}") from None


def parse_basic(header: str | None) -> tuple[str, str] | None:
    """(user, password) of an `Authorization: Basic ...` header, None if absent or malformed."""
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        return None
    user, sep, password = decoded.partition(":")
    return (user, password) if sep else None


USAGE_PARAMETERS = [
    {
        "name": "msisdn",
        "in": "query",
        "required": True,
        "description": "the subscriber: 9 to 15 digits (leading zeros kept)",
        "schema": {"type": "string", "example": "0123456789012"},
    },
    {
        "name": "start_time",
        "in": "query",
        "required": True,
        "description": "range start (inclusive), YYYYmmddHHMMSS, UTC",
        "schema": {"type": "string", "example": "20240101000000"},
    },
    {
        "name": "end_time",
        "in": "query",
        "required": True,
        "description": "range end (exclusive), YYYYmmddHHMMSS, UTC; at most the retention after "
        "start_time",
        "schema": {"type": "string", "example": "20240102000000"},
    },
]


def _money(units: int) -> str:
    return format(K.money(units), "f")


def usage_items(day: date, raw: K.UsageHash) -> list[dict[str, Any]]:
    """The response items of one usage hash (hvs/keys.py layout)."""
    groups = K.parse_usage(raw)
    start = f"{day:%Y-%m-%d} 00:00:00"
    items = []
    for category, usage_type in sorted(
        groups, key=lambda g: (CATEGORY_ORDER.get(g[0], 9), g[0], g[1])
    ):
        m = groups[(category, usage_type)]
        item: dict[str, Any] = {"category": category, "usage_type": usage_type}
        if category == "data":
            up, dn = m.get(K.UP, 0), m.get(K.DOWN, 0)
            item["total"] = m.get(K.BYTES, up + dn)
        else:
            item["total"] = m.get(K.SECONDS, 0)
        item["measure"] = MEASURE.get(category, "units")
        item["start_time"] = start
        item["events"] = m.get(K.EVENTS, 0)
        if category == "data":
            item["up_bytes"] = up
            item["down_bytes"] = dn
        item["cost_zar"] = _money(m.get(K.ZAR, 0))
        item["cost_wak"] = _money(m.get(K.WAK, 0))
        if m.get(K.ZAR_PENDING, 0):
            item["cost_zar_unpriced"] = _money(m[K.ZAR_PENDING])
        items.append(item)
    return items


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status, headers, media_type="application/json")


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


# ---------------------------------------------------------------------------------------- app


def create_app(settings: ApiSettings | None = None) -> FastAPI:
    settings = settings or ApiSettings()
    auth = Authenticator(parse_users(settings.api_users))
    retention = timedelta(days=settings.retention_days)
    unauthorized = {"WWW-Authenticate": f'Basic realm="{settings.realm}", charset="UTF-8"'}

    def store(request: Request) -> aioredis.Redis:
        """The app's Redis client, made on first use in the running event loop (the lifespan
        closes it; a client is bound to one loop, and test clients may run several loops)."""
        state = request.app.state
        loop = asyncio.get_running_loop()
        client = getattr(state, "redis", None)
        if client is None or state.redis_loop is not loop:
            client = aioredis.Redis.from_url(
                settings.redis_url,
                max_connections=settings.redis_max_connections,
                socket_timeout=2.0,
                socket_connect_timeout=2.0,
            )
            state.redis, state.redis_loop = client, loop
        return client

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # The app's import-time objects never die: keep them out of the cyclic GC's scans, and
        # collect the young generation less often (requests make no cycles).
        gc.collect()
        gc.freeze()
        gc.set_threshold(10_000, 20, 100)
        try:
            yield
        finally:
            client = getattr(app.state, "redis", None)
            if client is not None:
                app.state.redis = None
                await client.aclose()

    app = FastAPI(
        title="WTC usage API",
        version="1.0.0",
        description="Daily usage per subscriber from the high velocity store (Redis), near "
        "real time. HTTP basic authentication.",
        lifespan=lifespan,
    )

    @app.exception_handler(BadRequest)
    async def bad_request(_request: Request, exc: BadRequest) -> Response:
        return _json({"detail": exc.detail}, 400)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> Response:
        parts = []
        for err in exc.errors():
            where = ".".join(str(x) for x in err.get("loc", ()) if x != "query")
            parts.append(f"{where}: {err.get('msg')}")
        return _json({"detail": "; ".join(parts) or "invalid request"}, 400)

    async def authenticate(header: str | None) -> None:
        """Raise 401 unless `header` carries valid basic credentials."""
        user = parse_basic(header)
        if user is not None:
            ok = auth.check_cached(*user)
            if ok is None:
                ok = await anyio.to_thread.run_sync(auth.check, *user)
            if ok:
                return
        raise HTTPException(401, "missing or wrong credentials", headers=unauthorized)

    # The hot route reads its headers and query itself (FastAPI's dependency and parameter
    # machinery costs more than the Redis round trip); its parameters and security are
    # declared for OpenAPI by hand.
    @app.get(
        "/data_usage",
        response_model=UsageResponse,
        responses={
            400: {"model": ErrorBody, "description": "bad or missing input"},
            401: {"model": ErrorBody, "description": "missing or wrong credentials"},
            503: {"model": ErrorBody, "description": "the store is unavailable"},
        },
        summary="Daily usage of a subscriber",
        openapi_extra={"parameters": USAGE_PARAMETERS, "security": [{"HTTPBasic": []}]},
    )
    async def data_usage(request: Request) -> Response:
        """Usage per day, category and usage type for every day that [start_time, end_time)
        touches (whole days: the store keeps daily totals). Unknown msisdn: empty usage."""
        await authenticate(request.headers.get("authorization"))
        query = request.query_params
        missing = [p for p in ("msisdn", "start_time", "end_time") if p not in query]
        if missing:
            raise BadRequest(f"missing query parameter(s): {', '.join(missing)}")
        start_time, end_time = query["start_time"], query["end_time"]
        msisdn = parse_msisdn(query["msisdn"])
        start = parse_time("start_time", start_time)
        end = parse_time("end_time", end_time)
        if end <= start:
            raise BadRequest("end_time must be after start_time")
        if end - start > retention:
            raise BadRequest(
                f"the range is longer than the store's retention of {settings.retention_days} days"
            )
        days = K.days_between(start, end)
        keys = K.usage_keys(msisdn, days)
        try:
            client = store(request)
            if len(keys) == 1:  # one command is one round trip; a pipeline object costs more
                hashes = [await client.hgetall(keys[0])]
            else:
                pipe = client.pipeline(transaction=False)
                for key in keys:
                    pipe.hgetall(key)
                hashes = await pipe.execute()
        except RedisError:
            return _json({"detail": "the usage store is unavailable"}, 503)
        usage: list[dict[str, Any]] = []
        for day, raw in zip(days, hashes, strict=True):
            if raw:
                usage += usage_items(day, raw)
        return _json(
            {"msisdn": msisdn, "start_time": start_time, "end_time": end_time, "usage": usage}
        )

    @app.get("/health", responses={503: {"model": ErrorBody}})
    async def health(request: Request) -> Response:
        """200 when Redis answers a PING."""
        try:
            await store(request).ping()
        except (RedisError, OSError) as exc:
            return _json({"status": "unavailable", "detail": f"redis: {exc}"}, 503)
        return _json({"status": "ok", "redis": "ok"})

    @app.get("/metrics", include_in_schema=True)
    async def metrics() -> Response:
        """Prometheus metrics of this process."""
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

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
