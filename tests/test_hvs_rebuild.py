"""`python -m hvs rebuild`: the HVS rebuilt from the raw tables on real Postgres and Redis equals
the raw sums priced by macros_py, twice the same, never double counted by the consumer (which
sees the same events later, or runs while the rebuild writes), and the pause it holds."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from datetime import date, datetime
from decimal import Decimal
from typing import TypeVar

import orjson
import psycopg
import pytest
import redis

from common.settings import PROJECT_ROOT
from hvs import keys as K
from hvs.rebuild import RebuildError, rebuild
from hvs.runner import run
from hvs.settings import HvsSettings
from hvs.store import Built, Hvs, Paused
from ingestion.generators.forex import ForexConfig, publish_ticks, tick_messages
from ingestion.stream import open_consumer
from tests.fixtures.polling import wait_for
from tests.test_hvs import (
    drain,
    duplicates,
    expected_usage,
    forex,
    forex_oracle,
    make_events,
    msg,
    publish,
    settings_for,
    stored_usage,
)

DAYS = (date(2024, 1, 1), date(2024, 1, 2))
DATA_COLUMNS = (
    "source_file", "line_no", "msisdn", "tower_id", "up_bytes", "down_bytes", "data_type",
    "ip_address", "website_url", "event_datetime",
)  # fmt: skip
VOICE_COLUMNS = (
    "source_file", "line_no", "msisdn", "tower_id", "call_type", "dest_nr", "call_duration_sec",
    "start_time",
)  # fmt: skip


T = TypeVar("T")


def land_rows(conn: psycopg.Connection, events: dict[str, list[dict]]) -> None:
    """The events' rows in the raw tables (no ledger row)."""
    with conn.cursor() as cur:
        with cur.copy(f"copy cdr_data.data_records ({', '.join(DATA_COLUMNS)}) from stdin") as copy:
            for e in events.get("cdr-data", []):
                copy.write_row([e[c] for c in DATA_COLUMNS])
        with cur.copy(
            f"copy cdr_data.voice_records ({', '.join(VOICE_COLUMNS)}) from stdin"
        ) as copy:
            for e in events.get("cdr-voice", []):
                copy.write_row([e[c] for c in VOICE_COLUMNS])


def land_ledger(conn: psycopg.Connection, events: dict[str, list[dict]]) -> None:
    """One `cdr_data.files` row per file of the events."""
    files: dict[str, tuple[str, int]] = {}
    for topic, kind in (("cdr-data", "data"), ("cdr-voice", "voice")):
        for e in events.get(topic, []):
            files[e["source_file"]] = (kind, files.get(e["source_file"], ("", 0))[1] + 1)
    for name, (kind, rows) in files.items():
        conn.execute(
            "insert into cdr_data.files (file_name, kind, size_bytes, sha256, rows_landed,"
            " rows_rejected) values (%s, %s, 0, 'x', %s, 0)",
            (name, kind, rows),
        )


def land_events(conn: psycopg.Connection, events: dict[str, list[dict]]) -> None:
    """The events' rows and their files' ledger rows in one transaction, as the loader lands a
    file (`ingestion.cdr_landing.land_file`)."""
    with conn.transaction():
        land_rows(conn, events)
        land_ledger(conn, events)


def land_ticks(conn: psycopg.Connection, cfg: ForexConfig) -> None:
    with (
        conn.cursor() as cur,
        cur.copy(
            "copy forex_data.ticks (pair_name, tick_ts, bid_price, ask_price, spread, source)"
            " from stdin"
        ) as copy,
    ):
        for _, value in tick_messages(cfg):
            o = orjson.loads(value)
            bid, ask = Decimal(repr(o["bid_price"])), Decimal(repr(o["ask_price"]))
            copy.write_row([o["pair_name"], o["timestamp"], bid, ask, ask - bid, "test"])


def split(events: dict[str, list[dict]], files: set[str]) -> dict[str, list[dict]]:
    return {t: [e for e in evs if e["source_file"] in files] for t, evs in events.items()}


@contextlib.contextmanager
def following_consumer(settings: HvsSettings) -> Iterator[threading.Thread]:
    """The HVS consumer following the stream in a thread (as `python -m hvs` does), stopped and
    joined on the way out."""
    stop = threading.Event()
    consumer = threading.Thread(target=run, args=(settings, stop), daemon=True)
    consumer.start()
    try:
        yield consumer
    finally:
        stop.set()
        consumer.join(60)


def before_the_pause(monkeypatch: pytest.MonkeyPatch, action: Callable[[], T]) -> list[T]:
    """`action` run once, after the rebuild's snapshot and right before it takes its pause (the
    window of its races with the consumer); the returned list gets its result."""
    import hvs.rebuild as rb

    real_pause = rb._pause
    done: list[T] = []

    def hook(r: redis.Redis) -> str:
        if not done:
            done.append(action())
        return real_pause(r)

    monkeypatch.setattr(rb, "_pause", hook)
    return done


def test_flushed_hvs_rebuilt_equals_raw_sums_twice_and_the_consumer_adds_nothing(
    stack, analytics, redis_client
):
    settings = settings_for(stack, analytics_dsn=stack.analytics_dsn)
    cfg = forex()
    events = make_events(n_files=3, rows=300, seed=5, start=datetime(2024, 1, 1))
    land_ticks(analytics, cfg)
    land_events(analytics, events)
    want = expected_usage(events, forex_oracle(cfg))
    # a stale key of a rebuilt day (usage not in the raw tables) goes; another day's stays
    redis_client.hset(K.usage_key("1111111111111", "20240101"), "data:text:ev", 7)
    redis_client.hset(K.usage_key("1111111111111", "20240105"), "data:text:ev", 7)

    reports = rebuild(settings, *DAYS)
    assert [r.day for r in reports] == ["20240101", "20240102"]
    assert sum(r.events for r in reports) == 1800
    assert sum(r.rejected for r in reports) == 0
    assert reports[0].removed_keys == 1
    got = stored_usage(redis_client)
    assert got.pop(K.usage_key("1111111111111", "20240105")) == {"data:text:ev": 7}
    assert got == want
    assert redis_client.exists(K.PAUSE_KEY) == 0
    assert 0 < redis_client.ttl(K.seen_key("cdr_data_0000.csv")) <= settings.retention_seconds

    again = rebuild(settings, *DAYS)  # idempotent: the same HVS, no tick added twice
    assert sum(r.ticks_added for r in again) == 0
    got = stored_usage(redis_client)
    got.pop(K.usage_key("1111111111111", "20240105"))
    assert got == want

    # the consumer then sees the same events on the stream: every one is a duplicate
    for topic, evs in events.items():
        publish(stack.stream_url, topic, evs)
    dup0 = duplicates() or 0.0
    assert drain(settings) == 0
    assert duplicates() - dup0 == 1800
    got = stored_usage(redis_client)
    got.pop(K.usage_key("1111111111111", "20240105"))
    assert got == want


def test_rebuild_of_one_day_keeps_the_others_and_the_command_line(stack, analytics, redis_client):
    settings = settings_for(stack, analytics_dsn=stack.analytics_dsn)
    events = make_events(n_files=2, rows=200, seed=9, start=datetime(2024, 1, 1))
    land_events(analytics, events)
    for topic, evs in events.items():
        publish(stack.stream_url, topic, evs)
    assert drain(settings) == 800  # no ticks: every WAK cost is pending
    want = stored_usage(redis_client)
    day1 = {k for k in want if k.endswith(":20240101")}
    redis_client.delete(*day1)  # a day lost
    env = {
        "WTC_ANALYTICS_DSN": stack.analytics_dsn,
        "REDIS_URL": stack.redis_url,
        "PATH": "/usr/bin:/bin",
    }
    out = subprocess.run(
        [sys.executable, "-m", "hvs", "rebuild", "--from", "2024-01-01", "--to", "2024-01-01"],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    report = orjson.loads(out.stdout.splitlines()[0])
    assert report["day"] == "20240101" and report["usage_keys"] == len(day1)
    assert stored_usage(redis_client) == want
    # the pending WAK of the rebuilt day is indexed again, so a rate prices it later
    hours = {m.decode() for m in redis_client.smembers(K.PENDING_INDEX)}
    assert any(h.startswith("20240101") for h in hours)
    assert any(h.startswith("20240102") for h in hours)
    bad = subprocess.run(
        [sys.executable, "-m", "hvs", "rebuild", "--from", "2024-01-02", "--to", "2024-01-01"],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "--to is before --from" in bad.stderr


def test_the_consumer_changes_nothing_while_paused(stack, redis_client):
    settings = settings_for(stack)
    hvs = Hvs(settings)
    e = {
        "event_id": "f.csv:2",
        "msisdn": "0123456789012",
        "up_bytes": 100_000,
        "down_bytes": 200_000,
        "data_type": "text",
        "event_datetime": "2024-01-01 05:00:00.000000",
    }
    batch = [msg("cdr-data", orjson.dumps(e))]
    redis_client.hset(K.PAUSE_KEY, "owner", "someone")
    with pytest.raises(Paused):
        hvs.process(batch)
    assert redis_client.keys("hvs:u:*") == [] and redis_client.keys("hvs:seen:*") == []
    redis_client.delete(K.PAUSE_KEY)
    assert hvs.process(batch).applied == 1


def test_rebuild_while_the_consumer_follows_and_files_land(stack, analytics, redis_client):
    """Files land (raw, then the stream) while the consumer follows and the rebuild runs
    repeatedly: at the end the HVS equals the raw sums, whatever the interleaving."""
    settings = settings_for(stack, analytics_dsn=stack.analytics_dsn, consumer_name="live")
    events = make_events(n_files=8, rows=150, seed=21, start=datetime(2024, 1, 1))
    names = sorted({e["source_file"] for evs in events.values() for e in evs})
    rebuilds: list[list] = []
    failed: list[BaseException] = []
    landing_done = threading.Event()

    def rebuild_loop() -> None:
        try:
            while not landing_done.is_set():
                rebuilds.append(rebuild(settings, *DAYS))
        except BaseException as exc:
            failed.append(exc)
            raise

    def rebuilt_twice() -> bool:
        if failed:
            raise AssertionError("a rebuild failed") from failed[0]
        return len(rebuilds) >= 2

    with following_consumer(settings) as consumer:
        rebuilder = threading.Thread(target=rebuild_loop, daemon=True)
        rebuilder.start()
        try:
            for name in names:  # land, then publish: the loader's order
                part = split(events, {name})
                land_events(analytics, part)
                for topic, evs in part.items():
                    if evs:
                        publish(stack.stream_url, topic, evs)
            wait_for(rebuilt_twice, "two rebuilds while the files landed", 60)
        finally:
            landing_done.set()
            rebuilder.join(120)
        assert not rebuilder.is_alive() and not failed
        # the consumer catches up: the group's lag reaches 0
        probe = open_consumer(stack.stream_url, ["cdr-data", "cdr-voice"], "hvs", consumer_name="p")
        try:
            wait_for(lambda: probe.lag() == 0, "the consumer to catch up", 60)
        finally:
            probe.close()
    assert not consumer.is_alive()
    assert stored_usage(redis_client) == expected_usage(events, None)
    assert redis_client.exists(K.PAUSE_KEY) == 0
    rebuild(settings, *DAYS)  # and a last rebuild changes nothing
    assert stored_usage(redis_client) == expected_usage(events, None)


@pytest.fixture(autouse=True)
def _no_pause_left(redis_client: redis.Redis):
    yield
    redis_client.delete(K.PAUSE_KEY)


def test_a_file_applied_between_the_snapshot_and_the_pause_is_counted(
    stack, analytics, redis_client, monkeypatch
):
    """The narrow race made certain: after the rebuild's snapshot a file lands and the following
    consumer applies it before the pause; the rebuild must read it under the pause (or it would
    wipe its usage while its bits stay set)."""
    settings = settings_for(stack, analytics_dsn=stack.analytics_dsn, consumer_name="live")
    events = make_events(n_files=2, rows=100, seed=3, start=datetime(2024, 1, 1))
    early, late = split(events, {"cdr_data_0000.csv"}), split(events, {"cdr_voice_0001.csv"})
    land_events(analytics, early)

    def land_late() -> int:
        land_events(analytics, late)
        publish(stack.stream_url, "cdr-voice", late["cdr-voice"])
        key = K.seen_key("cdr_voice_0001.csv")
        wait_for(lambda: redis_client.bitcount(key) >= 100, "the consumer applied the file")
        return redis_client.bitcount(key)

    with following_consumer(settings):
        landed_late = before_the_pause(monkeypatch, land_late)
        reports = rebuild(settings, *DAYS)
    assert landed_late == [100]
    on_day1 = sum(e["start_time"].startswith("2024-01-01") for e in late["cdr-voice"])
    assert 0 < on_day1 < 100  # (day 2 then finds the file in its snapshot)
    assert [r.late_events for r in reports] == [on_day1, 0]
    assert stored_usage(redis_client) == expected_usage(
        split(events, {"cdr_data_0000.csv", "cdr_voice_0001.csv"}), None
    )


def test_rows_the_snapshot_sees_before_their_ledger_row_count_once(
    stack, analytics, redis_client, monkeypatch
):
    """The race behind a failure of the follow test, made certain: a file's rows are committed
    before its ledger row (the follow test's helper landed them in two transactions), so the
    rebuild's snapshot holds the rows but not the file; the ledger row follows, the file is
    published and the following consumer applies it before the pause. The rebuild must count
    the file's events once: it read them in the snapshot, and again under the pause as a file
    that landed after it (usage doubled, while the consumer took the events for duplicates)."""
    settings = settings_for(stack, analytics_dsn=stack.analytics_dsn, consumer_name="live")
    events = make_events(n_files=2, rows=100, seed=3, start=datetime(2024, 1, 1))
    early, late = split(events, {"cdr_data_0000.csv"}), split(events, {"cdr_voice_0001.csv"})
    both = expected_usage(split(events, {"cdr_data_0000.csv", "cdr_voice_0001.csv"}), None)
    land_events(analytics, early)
    land_rows(analytics, late)  # committed; its ledger row not yet

    def ledger_late() -> bool:
        land_ledger(analytics, late)
        publish(stack.stream_url, "cdr-voice", late["cdr-voice"])
        key = K.seen_key("cdr_voice_0001.csv")
        return wait_for(lambda: redis_client.bitcount(key) == 100, "late applied")

    with following_consumer(settings):
        ledgered = before_the_pause(monkeypatch, ledger_late)
        reports = rebuild(settings, *DAYS)
    assert ledgered == [True]
    assert sum(r.events for r in reports) == 200  # each event once
    assert stored_usage(redis_client) == both


@pytest.mark.parametrize("when", ["before the write", "while the write is queued"])
def test_a_rebuild_that_lost_its_pause_writes_nothing(
    stack, analytics, redis_client, monkeypatch, when
):
    """The pause expires after the rebuild read the raw tables (it stalled for PAUSE_SECONDS); a
    file lands meanwhile and the consumer, no longer held, applies it. Writing the day then would
    replace its usage by what the rebuild read, without that file, while the file's bits stay
    set: its usage lost for good. The rebuild writes nothing and says so, whether the pause was
    gone when the write began or went while it was queued (WATCH); run again, it is exact."""
    import hvs.rebuild as rb

    settings = settings_for(stack, analytics_dsn=stack.analytics_dsn, consumer_name="live")
    events = make_events(n_files=2, rows=100, seed=4, start=datetime(2024, 1, 1))
    early, late = split(events, {"cdr_data_0000.csv"}), split(events, {"cdr_voice_0001.csv"})
    both = expected_usage(split(events, {"cdr_data_0000.csv", "cdr_voice_0001.csv"}), None)
    land_events(analytics, early)
    publish(stack.stream_url, "cdr-data", early["cdr-data"])
    expired: list[bool] = []

    def expire_and_land() -> None:
        if expired:
            return
        redis_client.pexpire(K.PAUSE_KEY, 1)
        wait_for(lambda: not redis_client.exists(K.PAUSE_KEY), "the pause to expire")
        land_events(analytics, late)
        publish(stack.stream_url, "cdr-voice", late["cdr-voice"])
        key = K.seen_key("cdr_voice_0001.csv")
        expired.append(wait_for(lambda: redis_client.bitcount(key) == 100, "late applied"))

    if when == "before the write":
        real_write = rb._write_day

        def hook(hvs: Hvs, day: str, built: Built, token: str) -> tuple[int, int]:
            expire_and_land()
            return real_write(hvs, day, built, token)

        monkeypatch.setattr(rb, "_write_day", hook)
    else:  # the day's keys are looked for after the WATCH, before MULTI
        real_pattern = K.usage_pattern

        def pattern(day: str) -> str:
            expire_and_land()
            return real_pattern(day)

        monkeypatch.setattr(K, "usage_pattern", pattern)
    with following_consumer(settings):
        wait_for(
            lambda: redis_client.bitcount(K.seen_key("cdr_data_0000.csv")) == 100, "early applied"
        )
        with pytest.raises(
            RebuildError, match=r"before the day 20240101 was written.*nothing of the day written"
        ):
            rebuild(settings, *DAYS)
        assert expired == [True]
        assert stored_usage(redis_client) == both  # nothing lost
        monkeypatch.undo()
        rebuild(settings, *DAYS)
        assert stored_usage(redis_client) == both


def test_the_rebuild_prices_at_the_rates_the_hvs_holds_when_it_writes(
    stack, analytics, redis_client, monkeypatch
):
    """Ticks arrive between the rebuild's snapshot and its pause, and the consumer applies them.
    Under the pause no tick can be added, so the rates in `hvs:fx` then are the ones the
    consumer resumes with: the rebuild prices the day at them, and leaves no ZAR waiting for a
    rate the HVS holds (the consumer would price it only at a later batch, if any came)."""
    settings = settings_for(stack, analytics_dsn=stack.analytics_dsn, consumer_name="live")
    cfg = forex()
    events = make_events(n_files=1, rows=100, seed=6, start=datetime(2024, 1, 1))
    land_events(analytics, events)

    def ticks_applied() -> bool:
        publish_ticks(cfg, stack.stream_url)
        probe = open_consumer(stack.stream_url, ["tick-data"], "hvs", consumer_name="p")
        try:
            return wait_for(lambda: probe.lag() == 0, "the ticks applied", 60)
        finally:
            probe.close()

    with following_consumer(settings):
        ticked = before_the_pause(monkeypatch, ticks_applied)
        rebuild(settings, *DAYS)
    assert ticked == [True]
    assert redis_client.scard(K.PENDING_INDEX) == 0
    assert stored_usage(redis_client) == expected_usage(events, forex_oracle(cfg))
