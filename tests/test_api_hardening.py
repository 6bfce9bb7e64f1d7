"""The usage API hardened, through the real app under uvicorn against the stack's real Redis
(as the API's own ACL user): typed parameters in the spec, a 422 for a repeated parameter,
HEAD, failed-login limiting (429 with Retry-After), hash checks off the event loop with a
cache of successful ones, reconnecting after a Redis restart or a killed connection, and
/metrics on its own loopback port only."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import anyio
import httpx
import pytest
import redis

from api.auth import Authenticator, hash_password, parse_users
from api.deps import TIME_PATTERN, ApiError, Guard
from api.settings import ApiSettings
from common.settings import PROJECT_ROOT
from ops.stack import free_port
from tests.fixtures.polling import wait_for

AUTH = ("wtc", "wtc-dev")
MSISDN = "0123456789012"
QUERY = {"msisdn": MSISDN, "start_time": "20240101000000", "end_time": "20240102000000"}
LIMIT = 5


@dataclass
class Server:
    url: str
    metrics_url: str
    proc: subprocess.Popen

    def client(self, address: str = "127.0.0.1") -> httpx.Client:
        """A client whose connections come from `address` (any 127.x.y.z is this host)."""
        transport = httpx.HTTPTransport(local_address=address)
        return httpx.Client(base_url=self.url, transport=transport, timeout=10)


@pytest.fixture(scope="module")
def api_server(stack) -> Iterator[Server]:
    port, metrics_port = free_port(), free_port()
    env = {
        **os.environ,
        "REDIS_URL": stack.settings.redis_url_for("api"),
        "API_METRICS_PORT": str(metrics_port),
        "API_AUTH_FAILURES_PER_MINUTE": str(LIMIT),
        "WTC_LOG_FORMAT": "json",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "api.app:app", "--host", "127.0.0.1",
         "--port", str(port), "--no-access-log", "--log-level", "warning"],
        cwd=PROJECT_ROOT, env=env,
    )  # fmt: skip
    server = Server(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}", proc)
    try:
        wait_for(
            lambda: httpx.get(f"{server.url}/health").status_code == 200,
            "the API",
            20,
            ignore=(httpx.HTTPError,),
        )
        yield server
    finally:
        proc.terminate()
        proc.wait(10)


# ------------------------------------------------------------------------- spec and parameters


def test_spec_types_the_query_parameters(api_server):
    spec = httpx.get(f"{api_server.url}/openapi.json").json()
    op = spec["paths"]["/data_usage"]["get"]
    params = {p["name"]: p for p in op["parameters"]}
    assert params["msisdn"]["schema"]["pattern"] == "^[0-9]{9,15}$"
    assert params["start_time"]["schema"]["pattern"] == TIME_PATTERN
    assert params["end_time"]["schema"]["pattern"] == TIME_PATTERN
    assert all(params[n]["required"] for n in ("msisdn", "start_time", "end_time"))
    category = params["category"]["schema"]["anyOf"][0]
    assert spec["components"]["schemas"][category["$ref"].split("/")[-1]]["enum"] == [
        "data",
        "call",
    ]
    assert {"400", "401", "422", "429", "503"} <= set(op["responses"])
    assert op["security"] == [{"HTTPBasic": []}]
    assert spec["components"]["securitySchemes"]["HTTPBasic"]["scheme"] == "basic"
    assert "/metrics" not in spec["paths"]


def test_a_repeated_parameter_is_422_and_says_which(api_server):
    with api_server.client() as c:
        r = c.get(
            "/data_usage",
            params=[*QUERY.items(), ("msisdn", "0999999999")],
            auth=AUTH,
        )
    assert r.status_code == 422
    assert r.json() == {"detail": "query parameter 'msisdn' is given 2 times; give it once"}


def test_filters_by_category_and_usage_type(stack, api_server, redis_client):
    redis_client.hset(
        f"hvs:u:{MSISDN}:20240101",
        mapping={"data:video:ev": 1, "data:video:by": 10, "call:voice:ev": 2, "call:voice:s": 9},
    )
    with api_server.client() as c:

        def kinds(**extra: str) -> list[tuple[str, str]]:
            r = c.get("/data_usage", params={**QUERY, **extra}, auth=AUTH)
            assert r.status_code == 200, r.text
            return [(u["category"], u["usage_type"]) for u in r.json()["usage"]]

        assert kinds() == [("data", "video"), ("call", "voice")]
        assert kinds(category="call") == [("call", "voice")]
        assert kinds(usage_type="video") == [("data", "video")]
        assert c.get("/data_usage", params={**QUERY, "category": "sms"}, auth=AUTH).json() == {
            "detail": "category must be `data` or `call`, got 'sms'"
        }


def test_head_is_answered_like_get(api_server):
    with api_server.client() as c:
        got = c.get("/data_usage", params=QUERY, auth=AUTH)
        head = c.head("/data_usage", params=QUERY, auth=AUTH)
        assert head.status_code == got.status_code == 200
        assert head.headers["content-type"] == got.headers["content-type"]
        assert head.headers["content-length"] == got.headers["content-length"]
        assert head.content == b""
        assert c.head("/data_usage", params=QUERY).status_code == 401
        assert c.head("/health").status_code == 200


# ------------------------------------------------------------------------------ login limiting


def test_failed_logins_are_limited_per_client(api_server):
    with api_server.client("127.0.0.1") as good, api_server.client("127.0.0.3") as bad:
        assert good.get("/data_usage", params=QUERY, auth=AUTH).status_code == 200  # cached now
        for _ in range(LIMIT):
            r = bad.get("/data_usage", params=QUERY, auth=("wtc", "wrong"))
            assert r.status_code == 401
        r = bad.get("/data_usage", params=QUERY, auth=("wtc", "wrong"))
        assert r.status_code == 429
        assert 1 <= int(r.headers["retry-after"]) <= 60
        assert "too many failed logins" in r.json()["detail"]
        # the limited client is refused a login it has not proven before, without a check ...
        assert bad.get("/data_usage", params=QUERY, auth=("nobody", "x")).status_code == 429
        assert bad.get("/data_usage", params=QUERY).status_code == 429
        # ... other clients are not affected
        assert good.get("/data_usage", params=QUERY, auth=AUTH).status_code == 200
        r = good.get("/data_usage", params=QUERY, auth=("wtc", "wrong"))
        assert r.status_code == 401


def test_a_valid_login_does_not_wait_for_hash_checks():
    """With every hash-check thread busy (a flood of wrong passwords), a login verified before
    is answered at once; a new one waits for a thread; the event loop is never blocked."""
    settings = ApiSettings(
        api_users=f"a:{hash_password('pw', iterations=1000)}",
        auth_threads=1,
        auth_failures_per_minute=0,
        metrics_port=0,
    )
    guard = Guard(settings, Authenticator(parse_users(settings.api_users), 60))

    async def scenario() -> None:
        assert await guard.check("c", ("a", "pw")) == "a"  # verified once, in a thread
        flood = object()
        await guard.threads.acquire_on_behalf_of(flood)  # every hash-check thread is busy
        try:
            with anyio.fail_after(1):
                assert await guard.check("c", ("a", "pw")) == "a"
            with anyio.move_on_after(0.2) as waited:
                await guard.check("c", ("a", "other"))
            assert waited.cancelled_caught  # a wrong password had to queue for a thread
        finally:
            guard.threads.release_on_behalf_of(flood)
        with pytest.raises(ApiError) as err:
            await guard.check("c", ("a", "other"))
        assert err.value.status == 401

    anyio.run(scenario)


def test_the_login_cache_expires():
    auth = Authenticator(parse_users(f"a:{hash_password('pw', iterations=1000)}"), 0.05)
    assert auth.check("a", "pw") is True
    assert auth.check_cached("a", "pw") is True
    deadline = time.monotonic() + 5
    while auth.check_cached("a", "pw") is not None:
        assert time.monotonic() < deadline, "the cached login never expired"
        time.sleep(0.01)


# ----------------------------------------------------------------------------- Redis outages


def _burst(server: Server, n: int = 24) -> list[int]:
    """`n` concurrent requests (so the app's pool holds several connections)."""

    async def go() -> list[int]:
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as c:
            rs = await asyncio.gather(
                *(c.get("/data_usage", params=QUERY, auth=AUTH) for _ in range(n))
            )
        return [r.status_code for r in rs]

    return asyncio.run(go())


def test_no_5xx_after_the_api_connections_are_killed(api_server, redis_client):
    assert _burst(api_server) == [200] * 24
    killed = redis_client.client_kill_filter(user="api")
    assert killed >= 1
    assert _burst(api_server) == [200] * 24


def test_no_5xx_once_redis_answers_again_after_a_restart(stack, api_server, redis_client):
    assert _burst(api_server) == [200] * 24
    stack.stack.stop_redis()
    with api_server.client() as c:
        assert c.get("/data_usage", params=QUERY, auth=AUTH).status_code == 503
    stack.stack.start_redis()
    admin = redis.Redis.from_url(stack.redis_url)
    wait_for(lambda: admin.ping(), "redis to answer again", 20, ignore=(redis.RedisError,))
    admin.close()
    assert _burst(api_server) == [200] * 24
    with api_server.client() as c:
        assert c.get("/health").json() == {"status": "ok", "redis": "ok"}


# ---------------------------------------------------------------------------------- /metrics


def test_metrics_only_on_their_own_loopback_port(api_server):
    with api_server.client() as c:
        assert c.get("/data_usage", params=QUERY, auth=AUTH).status_code == 200
        assert c.get("/metrics").status_code == 404
        assert c.get("/metrics", auth=AUTH).status_code == 404
    text = httpx.get(f"{api_server.metrics_url}/metrics").text
    assert 'api_requests_total{path="/data_usage",status="200"}' in text
    assert "api_request_seconds_bucket" in text
    port = int(api_server.metrics_url.rsplit(":", 1)[1])
    with socket.socket() as s:  # bound to 127.0.0.1 alone, not to the host's other addresses
        s.settimeout(1)
        assert s.connect_ex(("127.0.0.2", port)) != 0
