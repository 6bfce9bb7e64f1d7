"""api/compiled_route.py: a route served by a plan of its declared dependencies answers exactly
as FastAPI's own handler does (the same dependencies, the same exception handlers of the real
app), the API's routes are all served by a plan, and what a plan does not cover falls back to
FastAPI's handler."""

from __future__ import annotations

import base64
from dataclasses import asdict
from typing import Annotated

import orjson
import pytest
from fastapi import APIRouter, Depends, FastAPI, Header, HTTPException, Query
from fastapi.responses import Response
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from api.app import create_app
from api.auth import hash_password
from api.compiled_route import CompiledRoute
from api.deps import UsageQuery, usage_query, user
from api.settings import ApiSettings
from ops.stack import free_port

GOOD = "Basic " + base64.b64encode(b"wtc:pw").decode()


async def echo(login: Annotated[str, Depends(user)],
               query: Annotated[UsageQuery, Depends(usage_query)]) -> Response:  # fmt: skip
    body = {**asdict(query), "login": login, "start": str(query.start), "end": str(query.end)}
    return Response(orjson.dumps(body), media_type="application/json")


@pytest.fixture(scope="module")
def client() -> TestClient:
    """The real app (its exception handlers and state; no Redis needed here) with the same
    endpoint served twice: by a plan and by FastAPI's own handler."""
    app = create_app(
        ApiSettings(
            api_users=f"wtc:{hash_password('pw', iterations=1000)}",
            auth_failures_per_minute=0,
            metrics_port=0,
            redis_url=f"redis://127.0.0.1:{free_port()}/0",
        )
    )
    compiled, plain = APIRouter(route_class=CompiledRoute), APIRouter(route_class=APIRoute)
    compiled.add_api_route("/compiled", echo)
    plain.add_api_route("/fastapi", echo)
    app.include_router(compiled)
    app.include_router(plain)
    assert app.router.routes  # built
    return TestClient(app)


Q = "msisdn=0123456789012&start_time=20240101000000&end_time=20240102000000"
QUERIES = [
    Q,
    Q + "&category=call&usage_type=video",
    Q + "&unknown=1",
    "",
    "msisdn=0123456789012",
    "msisdn=12&start_time=2024&end_time=x",
    "msisdn=0123456789012&start_time=20240230000000&end_time=20240301000000",
    "msisdn=0123456789012&start_time=20240102000000&end_time=20240101000000",
    "msisdn=0123456789012&start_time=20240101000000&end_time=20240501000000",
    "msisdn=012345678%0A&start_time=20240101000000&end_time=20240102000000",
    "msisdn=%EF%BC%90123456789&start_time=20240101000000&end_time=20240102000000",
    Q + "&category=sms",
    Q + "&category=",
    Q + "&usage_type=",
    Q + "&usage_type=a-b",
    Q + "&msisdn=0999999999",
    Q + "&category=x&category=y",
    "msisdn=&start_time=&end_time=",
]


@pytest.mark.parametrize("query", QUERIES)
@pytest.mark.parametrize("auth", [GOOD, None, "Basic " + base64.b64encode(b"wtc:no").decode()])
def test_a_plan_answers_as_fastapis_own_handler(client, query, auth):
    headers = {"Authorization": auth} if auth else {}
    got = client.get(f"/compiled?{query}", headers=headers)
    want = client.get(f"/fastapi?{query}", headers=headers)
    assert (got.status_code, got.content) == (want.status_code, want.content)
    assert got.headers.get("www-authenticate") == want.headers.get("www-authenticate")


def test_the_api_routes_are_served_by_a_plan():
    app = create_app(ApiSettings(metrics_port=0))
    routes = [r for r in app.routes if isinstance(r, CompiledRoute)]
    assert len(routes) == 4  # GET and HEAD of /data_usage and /health
    assert {(r.path, m) for r in routes for m in r.methods} == {
        (p, m) for p in ("/data_usage", "/health") for m in ("GET", "HEAD")
    }
    assert all(r.compiled for r in routes), [r.not_compiled_because for r in routes]


def test_what_a_plan_does_not_cover_is_served_by_fastapi():
    async def with_header(x_tag: Annotated[str, Header()],
                          n: Annotated[int | None, Query()] = None) -> Response:  # fmt: skip
        return Response(orjson.dumps({"tag": x_tag, "n": n}), media_type="application/json")

    app = FastAPI()
    r = APIRouter(route_class=CompiledRoute)
    r.add_api_route("/h", with_header)
    app.include_router(r)
    route = r.routes[0]
    assert isinstance(route, CompiledRoute)
    assert not route.compiled and "header parameters" in route.not_compiled_because
    with TestClient(app) as c:
        assert c.get("/h?n=3", headers={"x-tag": "a"}).json() == {"tag": "a", "n": 3}
        assert c.get("/h").status_code == 422


async def base() -> str:
    return "real"


async def deny() -> None:
    raise HTTPException(403, "denied")


async def uses_base(v: Annotated[str, Depends(base)]) -> Response:
    return Response(v.encode())


def test_overrides_and_an_including_routers_dependencies_are_honoured():
    app = FastAPI()
    r = APIRouter(route_class=CompiledRoute)
    r.add_api_route("/v", uses_base)
    app.include_router(r)
    app.include_router(r, prefix="/guarded", dependencies=[Depends(deny)])
    with TestClient(app) as c:
        assert c.get("/v").text == "real"
        assert c.get("/guarded/v").status_code == 403

        async def fake() -> str:
            return "override"

        app.dependency_overrides[base] = fake
        try:
            assert c.get("/v").text == "override"
        finally:
            app.dependency_overrides.clear()
        assert c.get("/v").text == "real"
