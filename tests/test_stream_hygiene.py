"""Stream hygiene on the real Redis (issue 16, item 6): consumers that are gone give up their
pending entries and leave the group, a live one stays; `--drain` claims a dead consumer's entries
without waiting for the idle claim; retention by time never trims what a group has not
acknowledged, and keeps what is newer than the retention."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime

import pytest
import redis

from hvs.runner import run
from ingestion.stream import open_consumer, open_producer, stream_key
from tests.fixtures.polling import wait_for
from tests.test_hvs import expected_usage, make_events, publish, settings_for, stored_usage

DEADLINE_S = 30.0
DAY_MS = 86_400_000


def fresh(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True)
class Stream:
    """A topic of its own on the stack's stream Redis, and a plain client of that Redis."""

    url: str
    topic: str
    key: str
    raw: redis.Redis

    def add(self, first_ms: int, n: int, value: bytes) -> None:
        """`n` entries `{v: value}` at ids `first_ms`-0, `first_ms + 1`-0, ..."""
        for i in range(n):
            self.raw.xadd(self.key, {"v": value}, id=f"{first_ms + i}-0")


@pytest.fixture
def stream(stack) -> Iterator[Stream]:
    topic = fresh("t")
    raw = redis.Redis.from_url(stack.stream_url)
    try:
        yield Stream(stack.stream_url, topic, stream_key(topic), raw)
    finally:
        raw.close()


def consumers(raw: redis.Redis, key: str, group: str) -> dict[str, dict]:
    return {c["name"].decode(): c for c in raw.xinfo_consumers(key, group)}


def test_a_gone_consumer_gives_up_its_entries_and_leaves_a_live_one_stays(stream: Stream) -> None:
    url, topic, key, raw, group = stream.url, stream.topic, stream.key, stream.raw, fresh("g")
    with open_producer(url) as producer:
        producer.publish_many(topic, ((None, str(i).encode(), None) for i in range(15)))
    raw.xgroup_create(key, group, id="0")
    # "dead" took 10 entries and died (SIGKILL: no commit, no goodbye); "empty" never took any
    dead_took = raw.xreadgroup(group, "dead", {key: ">"}, count=10)[0][1]
    raw.xgroup_createconsumer(key, group, "empty")
    wait_for(
        lambda: min(consumers(raw, key, group)[n]["idle"] for n in ("dead", "empty")) >= 2000,
        "dead and empty to be idle 2 s",
    )
    # "live" has just taken 5 entries and works on them (Redis 7.0 counts a consumer's idle
    # time from the last entries it got; 7.2 from its last read, so a live consumer polling
    # an empty stream looks live there too)
    live = open_consumer(url, [topic], group, consumer_name="live", claim_idle_ms=None)
    live_took = live.poll(max_messages=5, timeout=1.0)
    assert len(live_took) == 5

    claimed = []
    with open_consumer(
        url,
        [topic],
        group,
        consumer_name="heir",
        claim_idle_ms=None,  # no idle claim: only the gone consumers' entries may move
        gone_after_ms=2000,
        claim_interval=0.05,
    ) as heir:
        end = time.monotonic() + DEADLINE_S
        while set(consumers(raw, key, group)) != {"live", "heir"}:
            assert time.monotonic() < end, consumers(raw, key, group)
            batch = heir.poll(max_messages=4, timeout=0.05)  # fewer than dead holds
            claimed += batch
            heir.commit(batch)
    assert sorted(m.position for m in claimed) == sorted(e[0].decode() for e in dead_took)
    # the live consumer kept its entries; nothing was lost
    pending = raw.xpending_range(key, group, min="-", max="+", count=100)
    assert sorted(p["message_id"].decode() for p in pending) == sorted(
        m.position for m in live_took
    )
    assert {p["consumer"] for p in pending} == {b"live"}
    live.commit(live_took)
    live.close()
    assert raw.xinfo_groups(key)[0]["pending"] == 0
    assert raw.xinfo_groups(key)[0]["lag"] == 0


def test_drain_claims_a_dead_consumers_entries_without_waiting_for_the_idle_claim(
    stack, redis_client
) -> None:
    """A consumer died holding a batch; `--drain` takes it over as soon as the consumer counts
    as gone (`drain_gone_after_ms`), not after `claim_idle_ms` (60 s)."""
    events = make_events(n_files=1, rows=200, seed=23, start=datetime(2024, 1, 1))
    for topic, evs in events.items():
        publish(stack.stream_url, topic, evs)
    raw = redis.Redis.from_url(stack.stream_url)
    try:
        keys = {stream_key(t): "0" for t in ("cdr-data", "cdr-voice", "tick-data")}
        for k in keys:
            raw.xgroup_create(k, "hvs", id="0", mkstream=True)
        took = raw.xreadgroup("hvs", "dead-1", dict.fromkeys(keys, ">"), count=150)
        assert sum(len(entries) for _, entries in took) == 300
        settings = settings_for(stack, drain_gone_after_ms=300)
        wait_for(
            lambda: consumers(raw, stream_key("cdr-data"), "hvs")["dead-1"]["idle"] >= 300,
            "the dead consumer to be idle",
        )
        done: list[int] = []
        worker = threading.Thread(
            target=lambda: done.append(run(settings, threading.Event(), drain=True)),
            daemon=True,
        )
        worker.start()
        worker.join(timeout=20)  # far below the idle claim's 60 s
        assert done == [400], "the drain did not take the dead consumer's entries in time"
        assert stored_usage(redis_client) == expected_usage(events, None)
        for k in keys:
            assert "dead-1" not in consumers(raw, k, "hvs")
            assert raw.xinfo_groups(k)[0]["pending"] == 0
    finally:
        raw.close()


def test_retention_by_time_never_trims_unacknowledged_entries(stream: Stream) -> None:
    topic, key, raw = stream.topic, stream.key, stream.raw
    now_ms = int(time.time() * 1000)
    old = now_ms - 10 * DAY_MS  # older than the one-day retention below
    recent = now_ms - 3_600_000  # newer than it
    stream.add(old, 1000, b"old")
    stream.add(recent, 100, b"recent")
    # g1 read everything and acknowledged all but one old entry; g2 has read up to old+700
    raw.xgroup_create(key, "g1", id="0")
    entries = raw.xreadgroup("g1", "c", {key: ">"})[0][1]
    raw.xack(key, "g1", *[e[0] for e in entries if e[0] != f"{old + 500}-0".encode()])
    raw.xgroup_create(key, "g2", id=f"{old + 700}-0")

    with open_producer(stream.url, retention_ms=DAY_MS, trim_interval=0) as producer:
        assert producer.trim_floor(topic) == f"{old + 500}-0"
        producer.publish(topic, b"new")
        ids = [int(e[0].split(b"-")[0]) for e in raw.xrange(key)]
        # nothing at or after the oldest unacknowledged entry went; older ones did
        assert set(range(old + 500, old + 1000)) <= set(ids)
        assert set(range(recent, recent + 100)) <= set(ids)
        assert min(ids) > old + 300  # whole nodes (100 entries) below the floor are gone

        # every group catches up: the old entries may go now, the recent ones stay
        raw.xack(key, "g1", f"{old + 500}-0")
        g2 = raw.xreadgroup("g2", "c", {key: ">"})[0][1]
        raw.xack(key, "g2", *[e[0] for e in g2])
        raw.xack(key, "g1", *[e[0] for e in raw.xreadgroup("g1", "c", {key: ">"})[0][1]])
        producer.publish(topic, b"newer")
        values = [e[1][b"v"] for e in raw.xrange(key)]
        assert values == [b"recent"] * 100 + [b"new", b"newer"]


def test_retention_keeps_everything_while_a_group_has_read_nothing(stream: Stream) -> None:
    old = int(time.time() * 1000) - 10 * DAY_MS
    stream.add(old, 500, b"old")
    stream.raw.xgroup_create(stream.key, "slow", id="0")
    with open_producer(stream.url, retention_ms=1000, trim_interval=0) as producer:
        producer.publish_many(stream.topic, ((None, b"x", None) for _ in range(3000)))
    assert stream.raw.xlen(stream.key) == 3500
