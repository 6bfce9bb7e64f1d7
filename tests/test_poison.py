"""Poison is data (docs/failure-handling.md): each hostile input of issue 16 against the real
processes and servers. Each test proves three things: the process stays up (its loop returns
normally, or the real process exits 0), the bad input is recorded with its reason, and the good
input after it is processed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import uuid
from datetime import datetime

import orjson

from common.settings import PROJECT_ROOT
from hvs import keys as K
from hvs.runner import run as run_hvs
from hvs.settings import HvsSettings
from ingestion.cdr_loader import CdrLoader, Metrics
from ingestion.stream import open_consumer, open_producer
from ingestion.tick_sink import TickSink, TickSinkSettings
from tests.test_cdr_loader import DATA_HEADER, cdr_dir, generated, query, settings_for

__all__ = ["cdr_dir"]  # the fixture, shared with tests/test_cdr_loader.py


def tick(ts: str = "2024-01-01 00:00:01.000000", bid: object = 1.5, ask: object = 1.6) -> bytes:
    return json.dumps(
        {"timestamp": ts, "pair_name": "MRVZAR", "bid_price": bid, "ask_price": ask, "spread": 0.1}
    ).encode()


def raw_tick(bid: str, ask: str) -> bytes:
    """A tick whose prices are written as given (JSON numbers no float can hold)."""
    return (
        b'{"timestamp": "2024-01-01 00:00:02", "pair_name": "MRVZAR", "bid_price": '
        + bid.encode()
        + b', "ask_price": '
        + ask.encode()
        + b', "spread": 0.1}'
    )


POISON_TICKS = [
    ("year 999", tick("0999-01-01 00:00:00"), "before 2000-01-01"),
    ("far future", tick("2999-01-01 00:00:00"), "ahead of the clock"),
    ("deep nesting", b'{"x": ' + b"[" * 2000 + b"]" * 2000 + b"}", "nested deeper"),
    ("1e400", raw_tick("1e400", "1e400"), "bid_price out of range"),
    ("1e-400", raw_tick("1e-400", "1.6"), "bid_price out of range"),
    ("50 KB", tick() + b" " * 50_000, "too large"),
]
GOOD = tick("2024-01-01 00:00:03.000000", 1.5, 1.7)


def publish(url: str, topic: str, values: list[bytes]) -> None:
    with open_producer(url) as producer:
        producer.publish_many(topic, [(None, v, None) for v in values])
        producer.flush()


def test_poison_ticks_are_rejected_alike_by_the_sink_and_the_hvs(stack, analytics, redis_client):
    """Cases 1-3: a tick before the year 1000 or far ahead, a deeply nested one, prices of 1e400
    and 1e-400, and an oversized one: the tick sink and the HVS consumer (one decoder) reject
    each with the same reason and go on; the good tick after them lands in both."""
    topic = f"ticks-{uuid.uuid4().hex[:8]}"
    publish(stack.stream_url, topic, [v for _, v, _ in POISON_TICKS] + [GOOD])

    sink = TickSink(
        TickSinkSettings(
            analytics_dsn=stack.analytics_dsn,
            stream_url=stack.stream_url,
            topic=topic,
            group="sink",
            consumer_name="sink-1",
            poll_timeout=0.2,
            metrics_port=0,
        )
    )
    try:
        total = sink.run(once=True)
    finally:
        sink.close()
    assert (total.messages, total.landed, total.rejected) == (len(POISON_TICKS) + 1, 1, 6)
    sink_reasons = [
        r
        for (r,) in analytics.execute(
            "select reason from forex_data.rejected_messages order by source"
        ).fetchall()
    ]
    assert analytics.execute("select tick_ts from forex_data.ticks").fetchall() == [
        (datetime(2024, 1, 1, 0, 0, 3),)
    ]

    settings = HvsSettings(
        redis_url=stack.redis_url,
        stream_url=stack.stream_url,
        tick_topic=topic,
        group="hvs-poison",
        consumer_name="hvs-poison-1",
        metrics_port=0,
        poll_timeout=0.1,
    )
    run_hvs(settings, threading.Event(), drain=True)
    rejected = [orjson.loads(e) for e in redis_client.lrange(K.REJECTED_KEY, 0, -1)]
    hvs_reasons = [e["reason"] for e in sorted(rejected, key=lambda e: e["position"])]
    assert len(hvs_reasons) == len(POISON_TICKS)
    for (name, _, reason), in_sink, in_hvs in zip(
        POISON_TICKS, sink_reasons, hvs_reasons, strict=True
    ):
        assert reason in in_sink, name
        assert in_hvs == in_sink, name  # one decoder: the same reason, word for word
    # bid + ask of the good tick, in 1e-10 units
    assert redis_client.hgetall(K.FX_KEY) == {
        b"2024010100:MRVZAR:s": b"32000000000",
        b"2024010100:MRVZAR:n": b"1",
    }


def _hvs_env(stack, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HVS_", "WTC_"))}
    env.update(
        REDIS_URL=stack.redis_url,
        STREAM_URL=stack.stream_url,
        HVS_METRICS_PORT="0",
        HVS_POLL_TIMEOUT="0.1",
    )
    env.update(extra)
    return env


def test_malformed_redis_entries_written_by_another_process_are_quarantined(stack, redis_client):
    """Case 1 (the consumer's side) and the rule for every reader of what another process
    wrote: an `hvs:fx` field with a 9-digit hour, a non-numeric value, a pending hour that is no
    hour and a pending entry that is no usage field are moved to `hvs:rejected` with the reason;
    the real consumer starts, exits 0, and applies the good event after them."""
    redis_client.hset(
        K.FX_KEY,
        mapping={
            "999010100:MRVZAR:s": "30000000000",  # what a tick of the year 999 left on main
            "2024010101:MRVZAR:n": "many",
            "2024010100:MRVZAR:s": "30000000000",
            "2024010100:MRVZAR:n": "1",
            "2024010100:WAKMRV:s": "20000000000",
            "2024010100:WAKMRV:n": "1",
        },
    )
    redis_client.sadd(K.PENDING_INDEX, "99901010", "2024010100")
    redis_client.hset(K.pending_key("2024010100"), mapping={"nonsense": "12", "hvs:u:1|x": "1"})
    event = {
        "event_id": "cdr_voice_20240101_000000.csv:2",
        "msisdn": "2700000000001",
        "call_type": "voice",
        "call_duration_sec": 60,
        "start_time": "2024-01-01 00:10:00.000000",
    }
    publish(stack.stream_url, "cdr-voice", [orjson.dumps(event)])
    proc = subprocess.run(
        [sys.executable, "-m", "hvs", "--drain"],
        cwd=PROJECT_ROOT,
        env=_hvs_env(stack),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rejected = [orjson.loads(e) for e in redis_client.lrange(K.REJECTED_KEY, 0, -1)]
    got = {(e["topic"], e["position"]): e["reason"] for e in rejected}
    assert got[(K.FX_KEY, "999010100:MRVZAR:s")] == "hour is not YYYYmmddHH"
    assert got[(K.FX_KEY, "2024010101:MRVZAR:n")] == "value is not an integer >= 0"
    assert got[(K.PENDING_INDEX, "99901010")] == "not an hour (YYYYmmddHH)"
    pending = K.pending_key("2024010100")
    assert "field is not" in got[(pending, "nonsense")]
    assert "field is not" in got[(pending, "hvs:u:1|x")]
    assert set(redis_client.hkeys(K.FX_KEY)) == {
        f"2024010100:{pair}:{what}".encode() for pair in ("MRVZAR", "WAKMRV") for what in "sn"
    }
    usage = K.parse_usage(redis_client.hgetall(K.usage_key("2700000000001", "20240101")))
    assert usage[("call", "voice")][K.EVENTS] == 1 and usage[("call", "voice")][K.SECONDS] == 60


# -- the CDR loader: every file ends in one visible state -------------------------------------


def _usage_totals(client) -> dict[str, int]:
    """Events, bytes and call seconds summed over every usage hash of the HVS."""
    out = {"ev": 0, "by": 0, "s": 0}
    for key in client.scan_iter(match="hvs:u:*", count=1000):
        for metrics in K.parse_usage(client.hgetall(key)).values():
            out["ev"] += metrics.get(K.EVENTS, 0)
            out["by"] += metrics.get(K.UP, 0) + metrics.get(K.DOWN, 0)
            out["s"] += metrics.get(K.SECONDS, 0)
    return out


def _raw_totals(stack) -> dict[str, int]:
    (row,) = query(
        stack,
        "select (select count(*) from cdr_data.data_records)"
        " + (select count(*) from cdr_data.voice_records),"
        " (select coalesce(sum(up_bytes + down_bytes), 0) from cdr_data.data_records),"
        " (select coalesce(sum(call_duration_sec), 0) from cdr_data.voice_records)",
    )
    return {"ev": row[0], "by": row[1], "s": row[2]}


def _hvs_drain(stack) -> None:
    settings = HvsSettings(
        redis_url=stack.redis_url, stream_url=stack.stream_url, metrics_port=0, poll_timeout=0.1
    )
    run_hvs(settings, threading.Event(), drain=True)


def test_every_file_ends_in_a_recorded_state(stack, cdr_dir, redis_client):
    """Cases 4-6: a name ending in a newline, a 0-byte file, a dot file, a symlink, a directory,
    an unreadable file, a row with a 2 MB field and a row of a NUL and bad UTF-8. Each ends
    rejected or skipped with its reason in the loader's ledger and counted; the loader's run
    succeeds; the good files land and are published as JSON every reader parses, each message
    under 1 MB; the HVS then equals the raw sums."""
    name, path = cdr_dir
    (data_name, data), (voice_name, voice) = generated(datetime(2024, 1, 1), 1, 20)
    huge = DATA_HEADER + "\n" + "\n".join(data.decode().splitlines()[1:3]) + "\n"
    row = data.decode().splitlines()[3].split(",")
    row[6] = "https://example.org/" + "x" * 2_000_000  # website_url
    huge += ",".join(row) + "\n"
    (path / data_name).write_bytes(data)
    (path / voice_name).write_bytes(voice)
    (path / "cdr_data_20240101_001000.csv").write_bytes(huge.encode())
    (path / "cdr_data_20240101_000200.csv\n").write_bytes(data)
    (path / "cdr_data_20240101_000400.csv").write_bytes(b"")
    (path / ".cdr_data_20240101_000600.csv").write_bytes(data)
    (path / "cdr_voice_20240101_000800.csv").symlink_to("/etc/passwd")
    (path / "cdr_data_20240101_001200.csv").mkdir()
    unreadable = path / "cdr_voice_20240101_001400.csv"
    unreadable.write_bytes(voice)
    unreadable.chmod(0)  # owned by root: the SFTP login (cdr_data) cannot read it
    nul = "cdr_voice_20240101_001600.csv"  # a line of a NUL and a byte that is not UTF-8
    (path / nul).write_bytes(
        voice.splitlines(keepends=True)[0] + b"\x00\x80\n" + voice.splitlines(keepends=True)[1]
    )

    metrics = Metrics()
    settings = settings_for(stack, name, publish=True)
    with CdrLoader(settings, metrics, progress=False) as loader:
        assert loader.run_once()
        assert loader.run_once()  # a second run records nothing twice
    rejected = dict(
        query(stack, "select source_file, reason from cdr_data.rejected_rows where line_no = 0")
    )
    assert rejected == {
        "cdr_data_20240101_000200.csv\n": "not a CDR file: the name holds control characters",
        "cdr_data_20240101_000400.csv": "empty file (0 bytes)",
        "cdr_voice_20240101_001400.csv": "unreadable: Permission denied",
    }
    skipped = dict(query(stack, "select file_name, reason from cdr_data.skipped_files"))
    assert sorted(skipped) == [
        ".cdr_data_20240101_000600.csv",
        "cdr_data_20240101_001200.csv",
        "cdr_voice_20240101_000800.csv",
    ]
    assert skipped[".cdr_data_20240101_000600.csv"].startswith("dot file")
    assert skipped["cdr_data_20240101_001200.csv"].startswith("directory")
    assert skipped["cdr_voice_20240101_000800.csv"].startswith("symlink")
    ((reason,),) = query(
        stack,
        "select reason from cdr_data.rejected_rows where source_file = %s",
        "cdr_data_20240101_001000.csv",
    )
    assert reason.startswith("row too long: 2000")
    assert query(
        stack,
        "select line_no, raw_line, reason from cdr_data.rejected_rows where source_file = %s",
        nul,
    ) == [(2, "\\x00\\x80", "not valid UTF-8")]
    sample = metrics.registry.get_sample_value
    assert sample("cdr_loader_files_total", {"kind": "none", "outcome": "rejected"}) == 3
    assert sample("cdr_loader_files_total", {"kind": "none", "outcome": "skipped"}) == 3
    files = dict(query(stack, "select file_name, rows_landed from cdr_data.files"))
    assert files == {data_name: 20, voice_name: 20, "cdr_data_20240101_001000.csv": 2, nul: 1}

    with open_consumer(stack.stream_url, ["cdr-data", "cdr-voice"], "peek", start="earliest") as c:
        messages = c.poll(1000, 1.0)
    assert len(messages) == 43
    assert max(len(m.value) for m in messages) < 1_000_000
    for m in messages:
        assert orjson.loads(m.value)["source_file"] in files
    _hvs_drain(stack)
    assert redis_client.llen(K.REJECTED_KEY) == 0
    assert _usage_totals(redis_client) == _raw_totals(stack)


def test_a_file_replaced_under_its_name_is_quarantined_and_raw_equals_hvs(
    stack, cdr_dir, redis_client
):
    """Case 7: a landed file replaced by other content (found by --rescan, and by a plain run
    when the size changed) is quarantined whole in cdr_data.file_conflicts, counted, and not
    landed: the raw tables keep the published version, so raw sums equal the HVS totals."""
    name, path = cdr_dir
    (data_name, data), (voice_name, voice) = generated(datetime(2024, 1, 1), 1, 20)
    (path / data_name).write_bytes(data)
    (path / voice_name).write_bytes(voice)
    settings = settings_for(stack, name, publish=True)
    with CdrLoader(settings, progress=False) as loader:
        assert loader.run_once()
    _hvs_drain(stack)
    before = _raw_totals(stack)
    assert _usage_totals(redis_client) == before

    (_, other_data), (_, other_voice) = generated(datetime(2024, 1, 2), 1, 30)
    (path / data_name).write_bytes(other_data)  # another size: a plain run reads it
    (path / voice_name).write_bytes(other_voice)
    metrics = Metrics()
    with CdrLoader(
        settings_for(stack, name, publish=True, rescan=True), metrics, progress=False
    ) as loader:
        assert loader.run_once()
        assert loader.run_once()
    conflicts = query(stack, "select file_name, reason from cdr_data.file_conflicts order by 1")
    assert [c[0] for c in conflicts] == [data_name, voice_name]
    assert all("the landed version is kept" in c[1] for c in conflicts)
    assert (
        metrics.registry.get_sample_value(
            "cdr_loader_files_total", {"kind": "data", "outcome": "conflict"}
        )
        == 1
    )
    _hvs_drain(stack)
    assert _raw_totals(stack) == before
    assert _usage_totals(redis_client) == before


# -- the HVS consumer: keys of the wrong type ---------------------------------------------------


def test_keys_of_the_wrong_type_are_moved_aside_and_the_consumer_goes_on(stack, redis_client):
    """Someone SETs a string where the HVS keeps a hash (a usage key, `hvs:fx`), a hash where it
    keeps a bitmap, a list where it keeps a set: the real consumer, logged in as its own Redis
    user, stays up, moves each aside with its content and records it with the reason, counts
    it, and applies the events as if the keys had not been there."""
    import time
    import urllib.request

    from ops.stack import free_port

    day, msisdn, other = "20240101", "2700000000001", "2700000000002"
    usage, seen = K.usage_key(msisdn, day), K.seen_key("cdr_voice_20240101_000000.csv")
    redis_client.set(usage, "garbage")
    redis_client.set(K.FX_KEY, "not a hash")
    redis_client.hset(seen, "f", "not a bitmap")
    redis_client.rpush(K.PENDING_INDEX, "not a set")

    def event(line: int, who: str) -> bytes:
        return orjson.dumps(
            {
                "event_id": f"cdr_voice_20240101_000000.csv:{line}",
                "msisdn": who,
                "call_type": "voice",
                "call_duration_sec": 60,
                "start_time": "2024-01-01 00:10:00.000000",
            }
        )

    port = free_port()
    env = _hvs_env(
        stack,
        HVS_METRICS_PORT=str(port),
        REDIS_URL=stack.settings.redis_url_for("hvs", 0),
        STREAM_URL=stack.settings.redis_url_for("hvs", 1),
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "hvs"],
        cwd=PROJECT_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        publish(stack.stream_url, "cdr-voice", [event(2, msisdn)])
        deadline = time.monotonic() + 60
        while redis_client.type(usage) != b"hash":
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "the event on the wrong-type key was not applied"
            time.sleep(0.05)
        publish(stack.stream_url, "cdr-voice", [event(3, other)])  # the next good event
        while not redis_client.exists(K.usage_key(other, day)):
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "the next event was not applied"
            time.sleep(0.05)
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    voice = K.parse_usage(redis_client.hgetall(usage))[("call", "voice")]
    assert (voice["s"], voice["ev"]) == (60, 1)
    assert (
        K.parse_usage(redis_client.hgetall(K.usage_key(other, day)))[("call", "voice")]["ev"] == 1
    )
    assert redis_client.getbit(seen, 2) == 1 and redis_client.getbit(seen, 3) == 1
    rejected = [orjson.loads(e) for e in redis_client.lrange(K.REJECTED_KEY, 0, -1)]
    reasons = {e["topic"]: e["reason"] for e in rejected}
    assert reasons[usage].startswith("holds a string, not a hash: moved to hvs:quarantine:")
    assert reasons[K.FX_KEY].startswith("holds a string, not a hash: moved to ")
    assert reasons[seen].startswith("holds a hash, not a string: moved to ")
    assert reasons[K.PENDING_INDEX].startswith("holds a list, not a set: moved to ")
    # the content is kept where the reason says, and expires with the HVS' retention
    moved = reasons[usage].rsplit(" ", 1)[1]
    assert redis_client.get(moved) == b"garbage"
    assert redis_client.ttl(moved) > 0
    assert redis_client.hgetall(reasons[seen].rsplit(" ", 1)[1]) == {b"f": b"not a bitmap"}
    assert 'hvs_events_total{outcome="rejected",topic="redis"} 4.0' in body
