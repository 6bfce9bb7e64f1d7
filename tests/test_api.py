"""The usage API on real Redis: the contract's response format, ranges, auth, bad input, health,
and the end-to-end path: generated CDR files
land through the CDR loader (SFTP -> Postgres -> stream), the HVS consumer applies them, and
the API's daily totals equal the sums of the raw tables in Postgres."""

from __future__ import annotations

import base64
import threading
from collections import defaultdict
from collections.abc import Iterator
from datetime import datetime, timedelta

import orjson
import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.auth import Authenticator, hash_password, parse_users
from api.settings import ApiSettings
from hvs import keys as K
from hvs.runner import run
from hvs.settings import HvsSettings
from hvs.store import Hvs
from ingestion.cdr_loader import CdrLoader, LoaderSettings
from ingestion.cdr_publish import publish_file
from ingestion.generators.cdr import CdrConfig, write_cdr_files
from ingestion.generators.forex import ForexConfig, publish_ticks
from ingestion.stream import Message, open_producer
from macros_py.tariffs import call_cost_zar, data_cost_zar
from ops.stack import free_port

AUTH = ("wtc", "wtc-dev")
MSISDN = "0123456789012"


def hvs_settings(stack, **kw) -> HvsSettings:
    base = {
        "redis_url": stack.redis_url,
        "stream_url": stack.stream_url,
        "metrics_port": 0,
        "poll_timeout": 0.1,
    }
    base.update(kw)
    return HvsSettings(**base)


def _msg(topic: str, obj: dict, i: int) -> Message:
    return Message(topic, None, orjson.dumps(obj), f"1700000000000-{i}", {})


def apply(stack, events: list[tuple[str, dict]]) -> None:
    """Apply events straight through the consumer's batch logic (no stream needed here)."""
    Hvs(hvs_settings(stack)).process([_msg(t, e, i) for i, (t, e) in enumerate(events)])


def data(msisdn: str, ts: str, up: int, down: int, dtype: str, line: int) -> tuple[str, dict]:
    return (
        "cdr-data",
        {
            "event_id": f"cdr_data_x.csv:{line}",
            "msisdn": msisdn,
            "up_bytes": up,
            "down_bytes": down,
            "data_type": dtype,
            "event_datetime": ts,
        },
    )


def call(msisdn: str, ts: str, seconds: int, ctype: str, line: int) -> tuple[str, dict]:
    return (
        "cdr-voice",
        {
            "event_id": f"cdr_voice_x.csv:{line}",
            "msisdn": msisdn,
            "call_duration_sec": seconds,
            "call_type": ctype,
            "start_time": ts,
        },
    )


@pytest.fixture
def client(stack, redis_client) -> Iterator[TestClient]:
    app = create_app(ApiSettings(metrics_port=0, redis_url=stack.redis_url, retention_days=35))
    with TestClient(app) as c:
        yield c


def get(client: TestClient, auth=AUTH, **params):
    return client.get("/data_usage", params=params, auth=auth)


# ---------------------------------------------------------------------------------- contract


def test_response_format_daily_items(stack, client):
    apply(
        stack,
        [
            data(MSISDN, "2024-01-01 00:00:00", 100, 200, "video", 2),
            data(MSISDN, "2024-01-01 23:59:59.999999", 1, 2, "video", 3),
            data(MSISDN, "2024-01-02 00:00:00.000001", 10, 20, "video", 4),
            data(MSISDN, "2024-01-01 10:00:00", 5, 5, "audio", 5),
            call(MSISDN, "2024-01-01 12:00:00", 89, "voice", 2),
            call(MSISDN, "2024-01-02 12:00:00", 30, "video", 3),
        ],
    )
    r = get(client, msisdn=MSISDN, start_time="20240101000000", end_time="20240103000000")
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert list(body) == ["msisdn", "start_time", "end_time", "usage"]
    assert (body["msisdn"], body["start_time"], body["end_time"]) == (
        MSISDN,
        "20240101000000",
        "20240103000000",
    )
    short = [
        (u["start_time"], u["category"], u["usage_type"], u["total"], u["measure"], u["events"])
        for u in body["usage"]
    ]
    assert short == [
        ("2024-01-01 00:00:00", "data", "audio", 10, "bytes", 1),
        ("2024-01-01 00:00:00", "data", "video", 303, "bytes", 2),
        ("2024-01-01 00:00:00", "call", "voice", 89, "seconds", 1),
        ("2024-01-02 00:00:00", "data", "video", 30, "bytes", 1),
        ("2024-01-02 00:00:00", "call", "video", 30, "seconds", 1),
    ]
    first = body["usage"][0]
    assert list(first)[:5] == ["category", "usage_type", "total", "measure", "start_time"]
    assert (first["up_bytes"], first["down_bytes"]) == (5, 5)
    assert first["cost_zar"] == format(data_cost_zar(10), "f")  # exact decimal string
    call_item = body["usage"][2]
    assert call_item["cost_zar"] == format(call_cost_zar(89), "f")
    assert "up_bytes" not in call_item
    # no tick yet: the WAK cost is pending and says so
    assert call_item["cost_wak"] == "0.0000000000"
    assert call_item["cost_zar_unpriced"] == call_item["cost_zar"]


def test_range_covers_the_days_it_touches(stack, client):
    apply(stack, [data(MSISDN, f"2024-01-0{d} 12:00:00", 1, 1, "text", d) for d in (1, 2, 3)])

    def days(start: str, end: str) -> list[str]:
        r = get(client, msisdn=MSISDN, start_time=start, end_time=end)
        assert r.status_code == 200, r.text
        return [u["start_time"][:10] for u in r.json()["usage"]]

    assert days("20240101000000", "20240102000000") == ["2024-01-01"]  # end is exclusive
    assert days("20240101235959", "20240102000001") == ["2024-01-01", "2024-01-02"]
    assert days("20240102120000", "20240102120001") == ["2024-01-02"]
    assert days("20231201000000", "20240104000000") == ["2024-01-01", "2024-01-02", "2024-01-03"]


def test_unknown_msisdn_is_an_empty_list(client):
    r = get(client, msisdn="999999999999", start_time="20240101000000", end_time="20240102000000")
    assert r.status_code == 200
    assert r.json()["usage"] == []


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"msisdn": "27abc5678901"}, "msisdn must be 9 to 15 digits"),
        ({"msisdn": "12345"}, "msisdn must be 9 to 15 digits"),
        ({"msisdn": "1" * 16}, "msisdn must be 9 to 15 digits"),
        ({"start_time": "2024010100000"}, "start_time must be YYYYmmddHHMMSS"),
        ({"start_time": "2024-01-01 00:00"}, "start_time must be YYYYmmddHHMMSS"),
        ({"start_time": "20240230000000"}, "start_time '20240230000000' is not a valid time"),
        ({"end_time": "20240101250000"}, "end_time must be YYYYmmddHHMMSS"),
        ({"end_time": "20240231000000"}, "end_time '20240231000000' is not a valid time"),
        ({"msisdn": "012345678\n"}, "msisdn must be 9 to 15 digits"),
        ({"end_time": "20231231000000"}, "end_time must be after start_time"),
        ({"end_time": "20240101000000"}, "end_time must be after start_time"),
        ({"end_time": "20240301000000"}, "longer than the store's retention of 35 days"),
    ],
)
def test_bad_input_is_400_with_a_clear_message(client, params, message):
    q = {"msisdn": MSISDN, "start_time": "20240101000000", "end_time": "20240102000000"}
    q.update(params)
    r = get(client, **q)
    assert r.status_code == 400
    assert message in r.json()["detail"]


def test_missing_parameters_are_400(client):
    r = client.get("/data_usage", params={"msisdn": MSISDN}, auth=AUTH)
    assert r.status_code == 400
    assert "start_time" in r.json()["detail"] and "end_time" in r.json()["detail"]


# -------------------------------------------------------------------------------------- auth


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Basic " + base64.b64encode(b"wtc:wrong").decode()},
        {"Authorization": "Basic " + base64.b64encode(b"nobody:wtc-dev").decode()},
        {"Authorization": "Basic not-base64!"},
        {"Authorization": "Bearer abc"},
    ],
)
def test_missing_or_wrong_credentials_are_401(client, headers):
    r = client.get(
        "/data_usage",
        params={"msisdn": MSISDN, "start_time": "20240101000000", "end_time": "20240102000000"},
        headers=headers,
    )
    assert r.status_code == 401
    assert r.headers["www-authenticate"].startswith("Basic realm=")
    assert r.json() == {"detail": "missing or wrong credentials"}


def test_users_from_configuration(stack, redis_client):
    users = f"ops:{hash_password('s3cret', iterations=1000)}"
    app = create_app(ApiSettings(metrics_port=0, redis_url=stack.redis_url, api_users=users))
    q = {"msisdn": MSISDN, "start_time": "20240101000000", "end_time": "20240102000000"}
    with TestClient(app) as c:
        assert c.get("/data_usage", params=q, auth=("ops", "s3cret")).status_code == 200
        assert c.get("/data_usage", params=q, auth=("ops", "s3cret")).status_code == 200
        assert c.get("/data_usage", params=q, auth=("ops", "s3cre")).status_code == 401
        assert c.get("/data_usage", params=q, auth=AUTH).status_code == 401  # dev user gone


def test_authenticator_remembers_only_success():
    auth = Authenticator(parse_users(f"a:{hash_password('pw', iterations=1000)}"))
    assert auth.check_cached("a", "pw") is None
    assert auth.check("a", "pw") is True
    assert auth.check_cached("a", "pw") is True
    assert auth.check_cached("a", "pX") is None
    assert auth.check("a", "pX") is False
    assert auth.check("b", "pw") is False
    with pytest.raises(ValueError, match="user:hash"):
        parse_users("nocolon")
    with pytest.raises(ValueError, match="bad password hash"):
        parse_users("a:plaintext")


# ----------------------------------------------------------------------- health, metrics, docs


def test_health_and_docs_and_no_metrics_on_the_api_port(client):
    """/metrics has its own loopback port (test_api_hardening.py checks it there)."""
    assert client.get("/health").json() == {"status": "ok", "redis": "ok"}
    assert client.get("/metrics").status_code == 404
    spec = client.get("/openapi.json").json()
    assert spec["components"]["securitySchemes"]["HTTPBasic"]["scheme"] == "basic"
    assert set(spec["paths"]) == {"/data_usage", "/health"}
    assert client.get("/docs").status_code == 200


def test_health_is_503_without_redis():
    dead = f"redis://127.0.0.1:{free_port()}/0"
    with TestClient(create_app(ApiSettings(metrics_port=0, redis_url=dead))) as c:
        r = c.get("/health")
        assert r.status_code == 503 and r.json()["status"] == "unavailable"
        r = get(c, msisdn=MSISDN, start_time="20240101000000", end_time="20240102000000")
        assert r.status_code == 503 and "unavailable" in r.json()["detail"]


# ---------------------------------------------------------------------------------- end to end


def test_end_to_end_files_to_api_equal_postgres(stack, analytics, redis_client, monkeypatch):
    """Generated CDR files -> SFTP -> CDR loader -> Postgres + stream -> HVS -> API."""
    cfg = CdrConfig(
        seed=5,
        subscribers=40,
        start=datetime(2024, 1, 1, 18, 0, 0),
        duration=timedelta(hours=12),
        window_seconds=7200,
        rows_per_file=250,
    )
    publish_ticks(
        ForexConfig(start=datetime(2024, 1, 1), duration=timedelta(hours=32), step_ms=30_000),
        stack.stream_url,
    )
    write_cdr_files(cfg, stack.cdr_dir)
    loader_settings = LoaderSettings(
        analytics_dsn=stack.analytics_dsn,
        sftp_url=stack.sftp_url,
        stream_url=stack.stream_url,
        cdr_dir=".",
        settle_seconds=0,
        metrics_port=0,
    )
    try:
        with CdrLoader(loader_settings, progress=False) as loader:
            assert loader.run_once()
        hvs = hvs_settings(stack, batch_size=700)
        # a consumer that stops after two batches (a restart mid-stream), then a fresh one
        stop = threading.Event()
        seen = []
        real = Hvs.apply_prepared

        def two_batches(self, prep):
            res = real(self, prep)
            seen.append(res)
            if len(seen) == 2:
                stop.set()
            return res

        with monkeypatch.context() as m:
            m.setattr(Hvs, "apply_prepared", two_batches)
            run(hvs, stop)
        assert len(seen) >= 2  # the batch in flight when stop came is finished, then it stops
        run(hvs, threading.Event(), drain=True)
        # the loader publishes a file again (a retry after a stream outage): no change
        name, kind, sha = analytics.execute(
            "select file_name, kind, sha256 from cdr_data.files order by file_name limit 1"
        ).fetchone()
        with open_producer(stack.stream_url) as producer:
            assert publish_file(analytics, producer, name, kind, sha) == 250
        run(hvs, threading.Event(), drain=True)
    finally:
        for path in stack.cdr_dir.glob("cdr_*.csv"):
            path.unlink()

    want: dict[str, list[tuple]] = defaultdict(list)
    rows = analytics.execute(
        """
        select msisdn, event_datetime::date, 'data', data_type, count(*),
               sum(up_bytes + down_bytes)::bigint, array_agg(up_bytes + down_bytes)
        from cdr_data.data_records group by 1, 2, 3, 4
        union all
        select msisdn, start_time::date, 'call', call_type, count(*),
               sum(call_duration_sec)::bigint, array_agg(call_duration_sec::bigint)
        from cdr_data.voice_records group by 1, 2, 3, 4
        """
    ).fetchall()
    assert sum(r[4] for r in rows) == 3000
    for msisdn, day, category, usage_type, events, total, amounts in rows:
        cost = sum(
            (data_cost_zar(a) if category == "data" else call_cost_zar(a) for a in amounts),
            start=data_cost_zar(0),
        )
        want[msisdn].append(
            (f"{day} 00:00:00", category, usage_type, events, total, format(cost, "f"))
        )
    assert len(want) > 10
    app = create_app(ApiSettings(metrics_port=0, redis_url=stack.redis_url))
    with TestClient(app) as c:
        for msisdn in sorted(want)[::2]:  # a sample of half the subscribers
            r = get(c, msisdn=msisdn, start_time="20240101000000", end_time="20240103000000")
            assert r.status_code == 200
            got = [
                (
                    u["start_time"],
                    u["category"],
                    u["usage_type"],
                    u["events"],
                    u["total"],
                    u["cost_zar"],
                )
                for u in r.json()["usage"]
            ]
            assert sorted(got) == sorted(want[msisdn]), msisdn
            # ticks cover every event hour: all WAK is priced
            assert all("cost_zar_unpriced" not in u for u in r.json()["usage"])
            assert all(u["cost_wak"] != "0.0000000000" for u in r.json()["usage"])
    assert redis_client.scard(K.PENDING_INDEX) == 0
