"""Tick sink: parsing and checks, exactly-once landing across a crash and a redelivery, rejects,
the command line (crash point, follow mode, SIGTERM, metrics), on Redis Streams and Kafka."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from datetime import datetime, timedelta
from decimal import Decimal

import httpx
import pytest

from common.service import CRASH_EXIT_CODE
from ingestion.generators.forex import PAIRS, tick_key, tick_value
from ingestion.stream import open_producer
from ingestion.tick_format import BadTick
from ingestion.tick_sink import (
    Metrics,
    TickSink,
    TickSinkSettings,
    parse_tick,
)
from ops.stack import free_port
from tests.fixtures.polling import wait_for
from tests.fixtures.processes import tick_sink_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_ticks(n_steps: int, start: datetime = datetime(2024, 1, 1)) -> list[tuple[bytes, bytes]]:
    out = []
    for i in range(n_steps):
        ts = start + timedelta(milliseconds=500 * i + (i * 37) % 200)
        for j, pair in enumerate(PAIRS):
            out.append((tick_key(pair, ts), tick_value(pair, ts, 1 + (i * 7 + j) % 97 / 97, 0.01)))
    return out


def expected_rows(messages: list[tuple[bytes, bytes]]) -> set[tuple]:
    """What the table must hold: the JSON's decimal text exactly, not a float."""
    rows = set()
    for _, value in messages:
        obj = json.loads(value, parse_float=Decimal)
        rows.add(
            (
                obj["pair_name"],
                datetime.fromisoformat(obj["timestamp"]),
                obj["bid_price"],
                obj["ask_price"],
                obj["spread"],
            )
        )
    return rows


BAD = [
    (b"not json at all", "not JSON"),
    (b'{"timestamp": "2024-01-01 00:00:01.0", "pair_name": "MRVZAR"', "not JSON"),
    (b"[1, 2]", "not a JSON object"),
    (b'{"timestamp": "2024-01-01 00:00:01", "pair_name": "MRVZAR", "ask_price": 1.2, '
     b'"spread": 0.1}', "missing field(s): bid_price"),
    (b'{"timestamp": "2024-01-01 00:00:01", "pair_name": "EURUSD", "bid_price": 1.1, '
     b'"ask_price": 1.2, "spread": 0.1}', "unknown pair 'EURUSD'"),
    (b'{"timestamp": "2024-01-01 00:00:01", "pair_name": "MRVZAR", "bid_price": -1.1, '
     b'"ask_price": 1.2, "spread": 0.1}', "non-positive price"),
    (b'{"timestamp": "2024-01-01 00:00:01", "pair_name": "MRVZAR", "bid_price": 1.3, '
     b'"ask_price": 1.2, "spread": 0.1}', "inverted prices"),
    (b'{"timestamp": "2024-01-01 00:00:01", "pair_name": "MRVZAR", "bid_price": 1.1, '
     b'"ask_price": 1.2, "spread": -0.1}', "negative spread"),
    (b'{"timestamp": "2024-13-45 25:61:00.000000", "pair_name": "MRVZAR", "bid_price": 1.1, '
     b'"ask_price": 1.2, "spread": 0.1}', "bad timestamp"),
    (b'{"timestamp": "yesterday", "pair_name": "MRVZAR", "bid_price": 1.1, '
     b'"ask_price": 1.2, "spread": 0.1}', "bad timestamp"),
    (b'{"timestamp": "2024-01-01 00:00:01", "pair_name": "MRVZAR", "bid_price": "1.1", '
     b'"ask_price": 1.2, "spread": 0.1}', "bid_price is not a number"),
    (b'{"timestamp": "2024-01-01 00:00:01", "pair_name": "MRVZAR", "bid_price": NaN, '
     b'"ask_price": 1.2, "spread": 0.1}', "not a finite number"),
    (b"\xff\xfe\x00garbage", "not JSON"),
    # Beyond what a numeric column stores (the COPY of the whole batch would fail).
    (b'{"timestamp": "2024-01-01 00:00:01", "pair_name": "MRVZAR", "bid_price": 1e-20000, '
     b'"ask_price": 1.2, "spread": 0.1}', "bid_price out of range"),
    (b'{"timestamp": "2024-01-01 00:00:01", "pair_name": "MRVZAR", "bid_price": 1.1, '
     b'"ask_price": 1.2, "spread": 1E-16384}', "spread out of range"),
    (b'{"timestamp": "2024-01-01 00:00:01", "pair_name": "MRVZAR", "bid_price": 1.1, '
     b'"ask_price": 1e131072, "spread": 0.1}', "ask_price out of range"),
]  # fmt: skip


def test_parse_tick_is_exact_and_accepts_both_timestamp_forms() -> None:
    ts = datetime(2024, 1, 1, 0, 0, 0, 570000)
    t = parse_tick(tick_value("MRVZAR", ts, 1.7168, 0.043), PAIRS)
    assert (t.bid_price, t.ask_price, t.spread) == (
        Decimal("1.7168"),
        Decimal("1.7598"),
        Decimal("0.043"),
    )
    assert t.tick_ts == ts
    whole = b'{"timestamp": "2024-01-01 00:00:01", "pair_name": "WAKMRV", "bid_price": 1, '
    whole += b'"ask_price": 2, "spread": 1}'
    t = parse_tick(whole, PAIRS)
    assert t.tick_ts == datetime(2024, 1, 1, 0, 0, 1)
    assert t.bid_price == Decimal(1)


@pytest.mark.parametrize(("value", "reason"), BAD)
def test_parse_tick_rejects_with_reason(value: bytes, reason: str) -> None:
    with pytest.raises(BadTick, match=None) as info:
        parse_tick(value, PAIRS)
    assert reason in str(info.value)


@pytest.fixture(params=["redis", "kafka"])
def stream_url(request: pytest.FixtureRequest, stack) -> str:
    if request.param == "redis":
        return stack.stream_url
    return request.getfixturevalue("kafka_url")


def sink_settings(stack, stream_url: str, topic: str, **kw) -> TickSinkSettings:
    return TickSinkSettings(
        analytics_dsn=stack.analytics_dsn,
        stream_url=stream_url,
        topic=topic,
        group=f"g-{topic}",
        consumer_name=f"c-{topic}",
        batch_size=kw.pop("batch_size", 100),
        poll_timeout=0.5,
        metrics_port=0,
        **kw,
    )


def publish(url: str, topic: str, messages: list[tuple[bytes | None, bytes]]) -> None:
    with open_producer(url) as producer:
        producer.publish_many(topic, [(k, v, None) for k, v in messages])
        producer.flush()


def landed(analytics) -> set[tuple]:
    return set(
        analytics.execute(
            "select pair_name, tick_ts, bid_price, ask_price, spread from forex_data.ticks"
        ).fetchall()
    )


class Crash(Exception):
    pass


def test_exactly_once_across_crash_and_redelivery(stack, analytics, stream_url) -> None:
    topic = f"ticks-{uuid.uuid4().hex[:8]}"
    good = make_ticks(150)  # 300 messages
    bad = [(b'"k"', value) for value, _ in BAD]
    messages = good[:100] + bad + good[100:]
    publish(stream_url, topic, messages)
    settings = sink_settings(stack, stream_url, topic, batch_size=100)

    # First run: the first batch commits in Postgres, then the process "dies" before the stream
    # commit.
    def crash(_batch) -> None:
        raise Crash

    sink = TickSink(settings, Metrics())
    with pytest.raises(Crash):
        sink.run(once=True, after_db_commit=crash)
    sink.close()
    first = landed(analytics)
    assert 0 < len(first) <= 100

    # Restart: the uncommitted batch comes again and changes nothing; the rest lands.
    sink = TickSink(settings, Metrics())
    total = sink.run(once=True)
    sink.close()
    assert total.messages == len(messages)  # the redelivered batch included
    assert total.landed == len(good) - len(first)
    assert total.duplicates >= len(first)  # the redelivered batch, rejects in it included
    assert landed(analytics) == expected_rows(good)
    (n,) = analytics.execute("select count(*) from forex_data.ticks").fetchone()
    assert n == len(good)
    rejected = analytics.execute(
        "select message_key, payload, reason from forex_data.rejected_messages order by id"
    ).fetchall()
    assert len(rejected) == len(BAD)
    for (key, payload, reason), (value, expected_reason) in zip(rejected, BAD, strict=True):
        assert key == '"k"'
        assert expected_reason in reason
        assert payload == value.decode("utf-8", "backslashreplace").replace("\x00", "\\x00")
    (sources,) = analytics.execute(
        "select count(distinct source) from forex_data.rejected_messages"
    ).fetchone()
    assert sources == len(BAD)

    # Everything is committed now: a third run sees nothing.
    sink = TickSink(settings, Metrics())
    assert sink.run(once=True).messages == 0
    sink.close()


def test_repeats_and_conflicting_duplicates(stack, analytics) -> None:
    topic = f"ticks-{uuid.uuid4().hex[:8]}"
    ts = datetime(2024, 1, 1, 0, 0, 1)
    original = tick_value("MRVZAR", ts, 1.5, 0.02)
    repeat = original  # a producer retry: same tick again
    conflicting = tick_value("MRVZAR", ts, 1.6, 0.02)
    publish(stack.stream_url, topic, [(None, original), (None, repeat), (None, conflicting)])
    sink = TickSink(sink_settings(stack, stack.stream_url, topic), Metrics())
    total = sink.run(once=True)
    sink.close()
    assert (total.landed, total.duplicates, total.rejected) == (1, 1, 1)
    assert landed(analytics) == expected_rows([(None, original)])
    (reason,) = analytics.execute("select reason from forex_data.rejected_messages").fetchone()
    assert reason.startswith("conflicting duplicate: (MRVZAR, 2024-01-01 00:00:01)")


def test_a_batch_meeting_landed_keys_lands_the_rest_and_records_conflicts(stack, analytics):
    """A later batch that meets keys already landed (its plain insert fails, the batch lands
    again with `on conflict`): its new ticks land, a repeat is a duplicate, and a conflicting
    tick is recorded with its own position, key, payload and the landed prices; batches of 2
    while the next is read."""
    topic = f"ticks-{uuid.uuid4().hex[:8]}"
    first = make_ticks(3)  # 6 ticks
    conflicting = tick_value("MRVZAR", datetime(2024, 1, 1), 1.9, 0.02)  # the first tick's key
    later = [first[2], (b'"c"', conflicting), *make_ticks(2, datetime(2024, 1, 2))]
    publish(stack.stream_url, topic, first)
    settings = sink_settings(stack, stack.stream_url, topic, batch_size=2)
    sink = TickSink(settings, Metrics())
    assert sink.run(once=True).landed == 6
    publish(stack.stream_url, topic, later)
    total = sink.run(once=True)
    sink.close()
    assert (total.messages, total.landed, total.duplicates, total.rejected) == (6, 4, 1, 1)
    assert landed(analytics) == expected_rows(first + later[2:])
    rows = analytics.execute(
        "select source, message_key, payload, reason from forex_data.rejected_messages"
    ).fetchall()
    assert len(rows) == 1
    source, key, payload, reason = rows[0]
    assert source.startswith(f"{topic}@") and key == '"c"' and payload == conflicting.decode()
    bid = json.loads(first[0][1], parse_float=Decimal)["bid_price"]
    assert reason.startswith(
        f"conflicting duplicate: (MRVZAR, 2024-01-01 00:00:00) already landed with bid/ask/spread "
        f"{bid}/"
    )


def test_forex_generator_output_lands_and_its_faults_are_rejected(stack, analytics) -> None:
    """The forex generator's ticks (and its deliberately broken messages) through the sink."""
    from ingestion.generators.forex import ForexConfig, publish_ticks

    topic = f"ticks-{uuid.uuid4().hex[:8]}"
    config = ForexConfig(seed=3, duration=timedelta(minutes=10), malformed_rate=0.05)
    published = publish_ticks(config, stack.stream_url, topic=topic)
    sink = TickSink(sink_settings(stack, stack.stream_url, topic, batch_size=500), Metrics())
    total = sink.run(once=True)
    sink.close()
    assert total.messages == published
    assert total.landed + total.rejected == published and total.duplicates == 0
    reasons = [r for (r,) in analytics.execute("select reason from forex_data.rejected_messages")]
    assert len(reasons) == total.rejected > 0
    kinds = {
        "not JSON": "not_json",
        "missing field(s)": "missing_field",
        "bad timestamp": "bad_timestamp",
        "non-positive price": "negative_price",
        "unknown pair": "unknown_pair",
    }
    seen = {kind for r in reasons for prefix, kind in kinds.items() if r.startswith(prefix)}
    assert all(any(r.startswith(p) for p in kinds) for r in reasons), reasons
    assert seen == set(kinds.values())
    (n,) = analytics.execute("select count(*) from forex_data.ticks").fetchone()
    assert n == total.landed


def test_cli_crash_point_then_follow_and_sigterm(stack, analytics) -> None:
    """A real process killed between the database and the stream commit; a follower after it."""
    topic = f"ticks-{uuid.uuid4().hex[:8]}"
    good = make_ticks(100)
    publish(stack.stream_url, topic, good)
    cmd = [sys.executable, "-m", "ingestion.tick_sink"]

    crashed = subprocess.run(
        [*cmd, "--once"],
        env=tick_sink_env(stack, topic, WTC_CRASH_POINT="tick_sink.after_db_commit"),
        cwd=ROOT,
        capture_output=True,
        timeout=60,
    )
    assert crashed.returncode == CRASH_EXIT_CODE, crashed.stderr.decode()[-2000:]
    assert len(landed(analytics)) == 50

    port = free_port()
    follower = subprocess.Popen(
        [*cmd, "--metrics-port", str(port)],
        env=tick_sink_env(stack, topic),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for(lambda: len(landed(analytics)) == len(good), "the first ticks")
        # The server drops the sink's connection: it reconnects and carries on.
        (killed,) = analytics.execute(
            "select count(pg_terminate_backend(pid)) from pg_stat_activity "
            "where application_name = 'wtc_tick_sink'"
        ).fetchone()
        assert killed == 1
        more = make_ticks(20, start=datetime(2024, 1, 2))
        publish(stack.stream_url, topic, more)
        wait_for(lambda: len(landed(analytics)) == len(good) + len(more), "ticks while following")

        def metrics() -> str:
            return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text

        wait_for(lambda: 'wtc_tick_sink_messages_total{outcome="landed"}' in metrics(), "metrics")
        text = metrics()
        assert (
            f'wtc_tick_sink_messages_total{{outcome="landed"}} {len(good) + len(more) - 50}.0'
            in text
        )
        assert 'wtc_tick_sink_messages_total{outcome="duplicate"} 50.0' in text
        follower.send_signal(signal.SIGTERM)
        _, err = follower.communicate(timeout=30)
        assert follower.returncode == 0, err.decode()[-2000:]
        assert b"database unavailable, retrying the batch" in err
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()
    assert landed(analytics) == expected_rows(good + more)


def test_cli_help() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "ingestion.tick_sink", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0
    assert "--once" in out.stdout and "forex_data.ticks" in out.stdout
