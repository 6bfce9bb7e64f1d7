"""The usage API's dependencies: the Redis store (reconnect and retry once), the login (basic
auth, failed-login limiting, hash checks off the event loop) and the usage query's parameters.

The app builds one `Store` and one `Guard` from its settings and keeps them on `app.state`;
the dependencies below read them from there (FastAPI's way to share per-app objects).
"""

from __future__ import annotations

import asyncio
import base64
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from enum import StrEnum
from typing import Annotated

import anyio
import redis.asyncio as aioredis
from fastapi import Depends, Query, Request
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from api.auth import Authenticator, FailureLimiter
from api.settings import ApiSettings
from hvs import keys as K

MSISDN_PATTERN = r"^[0-9]{9,15}$"
# YYYYmmddHHMMSS with month, day, hour, minute and second in range (a day that a month lacks,
# such as 30 February, passes the pattern and gets a 400).
TIME_PATTERN = (
    r"^[0-9]{4}(0[1-9]|1[0-2])(0[1-9]|[12][0-9]|3[01])([01][0-9]|2[0-3])[0-5][0-9][0-5][0-9]$"
)
USAGE_TYPE_PATTERN = r"^[A-Za-z0-9_]{1,32}$"


# Every dependency is `async def`: FastAPI runs a plain `def` dependency in a worker thread,
# which costs more than the whole request.


class ApiError(Exception):
    """An answer other than 200: status, detail and headers (turned into JSON by the app)."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
        self.status = status
        self.detail = detail
        self.headers = headers


# ------------------------------------------------------------------------------------ the store


class Store:
    """The app's Redis client, made on first use in the running event loop (a client is bound
    to one loop, and test clients may run several loops).

    A command that fails because the connection broke (Redis restarted, the connection was
    killed) is sent once more: redis-py drops the broken connection and the retry opens a new
    one, so a request made after Redis answers again never sees the outage."""

    def __init__(self, settings: ApiSettings) -> None:
        self.settings = settings
        self._client: aioredis.Redis | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def client(self) -> aioredis.Redis:
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            self._client = aioredis.Redis.from_url(
                self.settings.redis_url,
                max_connections=self.settings.redis_max_connections,
                socket_timeout=2.0,
                socket_connect_timeout=2.0,
            )
            self._loop = loop
        return self._client

    async def hashes(self, keys: list[str]) -> list[K.UsageHash]:
        """HGETALL of each key, in one round trip; retried once on a broken connection."""
        try:
            return await self._hashes(keys)
        except (RedisConnectionError, RedisTimeoutError):
            return await self._hashes(keys)

    async def _hashes(self, keys: list[str]) -> list[K.UsageHash]:
        client = self.client()
        if len(keys) == 1:  # one command is one round trip; a pipeline object costs more
            return [await client.hgetall(keys[0])]
        pipe = client.pipeline(transaction=False)
        for key in keys:
            pipe.hgetall(key)
        return list(await pipe.execute())

    async def ping(self) -> None:
        try:
            await self.client().ping()
        except (RedisConnectionError, RedisTimeoutError):
            await self.client().ping()

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()


async def store(request: Request) -> Store:
    state_store: Store = request.app.state.store
    return state_store


# ------------------------------------------------------------------------------------ the login


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


class Guard:
    """Checks a login: a recently verified one at once; otherwise, unless the client has failed
    too often (429 with Retry-After), the PBKDF2 check in a worker thread, at most
    `auth_threads` at a time, so that a flood of wrong passwords neither blocks the event loop
    nor takes every core."""

    def __init__(self, settings: ApiSettings, authenticator: Authenticator) -> None:
        self.auth = authenticator
        self.limiter = FailureLimiter(settings.auth_failures_per_minute)
        self.threads = anyio.CapacityLimiter(settings.auth_threads)
        self.unauthorized = {"WWW-Authenticate": f'Basic realm="{settings.realm}", charset="UTF-8"'}

    async def check(self, client: str, credentials: tuple[str, str] | None) -> str:
        """The user's name, or ApiError 401 / 429."""
        if credentials is not None and self.auth.check_cached(*credentials):
            return credentials[0]
        wait = self.limiter.retry_after(client)
        if wait:
            raise ApiError(
                429,
                f"too many failed logins from this client; retry in {wait} s",
                {"Retry-After": str(wait)},
            )
        if credentials is not None:
            ok = await anyio.to_thread.run_sync(self.auth.check, *credentials, limiter=self.threads)
            if ok:
                return credentials[0]
        self.limiter.failed(client)
        raise ApiError(401, "missing or wrong credentials", self.unauthorized)


async def user(request: Request) -> str:
    """The logged-in user (HTTP basic auth); 401 or 429 otherwise. The header is read here
    rather than through a `Security(HTTPBasic())` sub-dependency (one dependency less on the
    hot path, measured); the scheme is declared in the spec by the route (`BASIC_AUTH`)."""
    guard: Guard = request.app.state.guard
    client = request.client.host if request.client else "unknown"
    return await guard.check(client, parse_basic(request.headers.get("authorization")))


# ------------------------------------------------------------------------------- the parameters


class Category(StrEnum):
    data = "data"
    call = "call"


async def single_values(request: Request) -> None:
    """422 when a query parameter is given more than once (which value was meant is unknown)."""
    query = request.query_params
    if len(query.multi_items()) != len(query):
        seen: set[str] = set()
        for name, _ in query.multi_items():
            if name in seen:
                raise ApiError(
                    422,
                    f"query parameter {name!r} is given {len(query.getlist(name))} times; give "
                    "it once",
                )
            seen.add(name)


@dataclass(frozen=True)
class UsageQuery:
    msisdn: str
    start_time: str
    end_time: str
    start: datetime
    end: datetime
    category: Category | None
    usage_type: str | None

    @property
    def days(self) -> list[date]:
        return K.days_between(self.start, self.end)


def parse_time(name: str, value: str) -> datetime:
    """A `YYYYmmddHHMMSS` value (its pattern already checked) as a datetime, else 400."""
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
        raise ApiError(400, f"{name} {value!r} is not a valid time: {exc}") from None


async def usage_query(
    request: Request,
    _single: Annotated[None, Depends(single_values)],
    msisdn: Annotated[
        str,
        Query(
            pattern=MSISDN_PATTERN,
            description="the subscriber: 9 to 15 digits (leading zeros kept)",
            examples=["0123456789012"],
        ),
    ],
    start_time: Annotated[
        str,
        Query(
            pattern=TIME_PATTERN,
            description="range start (inclusive), YYYYmmddHHMMSS, UTC",
            examples=["20240101000000"],
        ),
    ],
    end_time: Annotated[
        str,
        Query(
            pattern=TIME_PATTERN,
            description="range end (exclusive), YYYYmmddHHMMSS, UTC; after start_time and at "
            "most the retention after it",
            examples=["20240102000000"],
        ),
    ],
    category: Annotated[
        Category | None, Query(description="only this category (`data` or `call`)")
    ] = None,
    usage_type: Annotated[
        str | None,
        Query(
            pattern=USAGE_TYPE_PATTERN,
            description="only this usage type (data_type or call_type, e.g. `video`)",
            examples=["video"],
        ),
    ] = None,
) -> UsageQuery:
    """The usage query, checked: 400 for an impossible time, an empty or too long range."""
    settings: ApiSettings = request.app.state.settings
    start = parse_time("start_time", start_time)
    end = parse_time("end_time", end_time)
    if end <= start:
        raise ApiError(400, "end_time must be after start_time")
    if end - start > timedelta(days=settings.retention_days):
        raise ApiError(
            400, f"the range is longer than the store's retention of {settings.retention_days} days"
        )
    return UsageQuery(msisdn, start_time, end_time, start, end, category, usage_type)
