"""The usage API's routes: `GET /data_usage` and `GET /health` (HEAD answered like GET).

Parameters, login and the store come in as dependencies (api/deps.py); the answer is written
with orjson straight into a Response (the response models describe it for OpenAPI). The routes
are `CompiledRoute`s (api/compiled_route.py): their dependencies and query parameters are
solved per request by a plan made once from these declarations, not by FastAPI's solver, which
cost more than the Redis round trip (docs/usage-api.md, Performance).
"""

from __future__ import annotations

from datetime import date
from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, Depends
from fastapi.responses import Response
from pydantic import BaseModel, Field
from redis.exceptions import RedisError

from api.compiled_route import CompiledRoute
from api.deps import Category, Store, UsageQuery, store, usage_query, user
from hvs import keys as K

CATEGORY_ORDER = {"data": 0, "call": 1}
MEASURE = {"data": "bytes", "call": "seconds"}


class UsageItem(BaseModel):
    category: Category = Field(description="`data` or `call`", examples=["data"])
    usage_type: str = Field(description="data_type or call_type", examples=["video"])
    total: int = Field(description="up + down bytes (data) or call seconds (call)")
    measure: Literal["bytes", "seconds"] = Field(description="`bytes` or `seconds`")
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


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    redis: str | None = None
    detail: str | None = None


ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "a parameter is malformed, missing or out of range"},
    401: {"model": ErrorBody, "description": "missing or wrong credentials"},
    422: {"model": ErrorBody, "description": "a query parameter is given more than once"},
    429: {"model": ErrorBody, "description": "too many failed logins from this client"},
    503: {"model": ErrorBody, "description": "the store is unavailable"},
}


def _json(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status, media_type="application/json")


def _money(units: int) -> str:
    return format(K.money(units), "f")


def usage_items(day: date, raw: K.UsageHash, query: UsageQuery | None = None) -> list[dict]:
    """The response items of one usage hash (hvs/keys.py layout), filtered as `query` asks."""
    groups = K.parse_usage(raw)
    start = f"{day:%Y-%m-%d} 00:00:00"
    items = []
    for category, usage_type in sorted(
        groups, key=lambda g: (CATEGORY_ORDER.get(g[0], 9), g[0], g[1])
    ):
        if query is not None and (
            (query.category is not None and category != query.category)
            or (query.usage_type is not None and usage_type != query.usage_type)
        ):
            continue
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


async def data_usage(
    query: Annotated[UsageQuery, Depends(usage_query)], hvs: Annotated[Store, Depends(store)]
) -> Response:
    """Usage per day, category and usage type for every day that [start_time, end_time)
    touches (whole days: the store keeps daily totals). Unknown msisdn: empty usage."""
    days = query.days
    try:
        hashes = await hvs.hashes(K.usage_keys(query.msisdn, days))
    except RedisError:
        return _json({"detail": "the usage store is unavailable"}, 503)
    usage: list[dict[str, Any]] = []
    for day, raw in zip(days, hashes, strict=True):
        if raw:
            usage += usage_items(day, raw, query)
    return _json(
        {
            "msisdn": query.msisdn,
            "start_time": query.start_time,
            "end_time": query.end_time,
            "usage": usage,
        }
    )


async def health(hvs: Annotated[Store, Depends(store)]) -> Response:
    """200 when Redis answers a PING."""
    try:
        await hvs.ping()
    except (RedisError, OSError) as exc:
        return _json({"status": "unavailable", "detail": f"redis: {exc}"}, 503)
    return _json({"status": "ok", "redis": "ok"})


def add_routes(router: APIRouter) -> None:
    """The routes on `router`, as `CompiledRoute`s. The app passes its own router (where
    `@app.get` puts a route): `include_router` of a router of their own would add FastAPI's
    routing layer for included routers, about 110 Python calls per request, 13 % of the hot
    path (measured, docs/usage-api.md); the app's router also applies `app.dependency_overrides`.
    HEAD is answered like GET (the server sends the headers only); not repeated in the spec."""
    for method, in_spec in (("GET", True), ("HEAD", False)):
        router.add_api_route(
            "/data_usage",
            data_usage,
            methods=[method],
            response_model=UsageResponse,
            responses=ERRORS,
            summary="Daily usage of a subscriber",
            dependencies=[Depends(user)],
            openapi_extra={"security": [{"HTTPBasic": []}]},
            include_in_schema=in_spec,
            route_class_override=CompiledRoute,
        )
        router.add_api_route(
            "/health",
            health,
            methods=[method],
            response_model=Health,
            responses={503: {"model": Health}},
            include_in_schema=in_spec,
            route_class_override=CompiledRoute,
        )
