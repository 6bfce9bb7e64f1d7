"""The stream interface against real brokers: Redis Streams (the stack's Redis) and Kafka
(librdkafka's mock cluster). Each test uses its own topics and groups."""

from __future__ import annotations

import threading
import uuid
from collections import Counter

import pytest
import redis

from ingestion.stream import (
    REDIS_KEY_PREFIX,
    Consumer,
    Message,
    Producer,
    StreamError,
    open_consumer,
    open_producer,
    stream_key,
)
from tests.fixtures.polling import wait_for

DEADLINE_S = 30.0


@pytest.fixture(params=["redis", "kafka"])
def url(request: pytest.FixtureRequest) -> str:
    if request.param == "redis":
        return request.getfixturevalue("stack").stream_url
    return request.getfixturevalue("kafka_url")


def fresh(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


def drain(consumer: Consumer, expected: int, *, settle: float = 0.3) -> list[Message]:
    """Poll until `expected` messages arrived (a failure after the deadline), then once more
    for extras."""
    got: list[Message] = []

    def enough() -> bool:
        got.extend(consumer.poll(max_messages=100, timeout=0.5))
        return len(got) >= expected

    wait_for(enough, f"{expected} messages", DEADLINE_S, interval=0)
    got += consumer.poll(max_messages=100, timeout=settle)
    return got


def drain_until(consumer: Consumer, value: bytes) -> list[Message]:
    """Poll until a message with `value` arrived (a failure after the deadline)."""
    got: list[Message] = []

    def arrived() -> bool:
        got.extend(consumer.poll(max_messages=100, timeout=0.5))
        return any(m.value == value for m in got)

    wait_for(arrived, f"a message {value!r}", DEADLINE_S, interval=0)
    return got


def publish_numbered(producer: Producer, topic: str, n: int, keys: int = 5) -> None:
    """Values `0..n-1`, keyed `k0..k{keys-1}` round robin, with a header naming the number."""
    producer.publish_many(
        topic,
        ((f"k{i % keys}".encode(), str(i).encode(), {"n": str(i).encode()}) for i in range(n)),
    )
    producer.flush()


def numbers(messages: list[Message]) -> list[int]:
    return [int(m.value) for m in messages]


def test_publish_consume_once_intact_and_ordered_per_key(url: str) -> None:
    topic, group = fresh("t"), fresh("g")
    with open_producer(url) as producer:
        producer.publish(topic, b"first", key=b"solo", headers={"a": b"\x00\xff", "b": b""})
        producer.publish(topic, b"nokey")
        assert (
            producer.publish_many(
                topic,
                (
                    (f"k{i % 7}".encode(), f"{i}".encode(), {"i": f"{i}".encode()})
                    for i in range(300)
                ),
            )
            == 300
        )
        producer.flush()

    with open_consumer(url, [topic], group) as consumer:
        got = drain(consumer, 302)
        consumer.commit(got)

    assert len(got) == 302
    assert len({m.position for m in got}) == 302
    assert all(m.topic == topic for m in got)
    by_value = {m.value: m for m in got}
    assert by_value[b"first"].key == b"solo"
    assert by_value[b"first"].headers == {"a": b"\x00\xff", "b": b""}
    assert by_value[b"nokey"].key is None
    assert by_value[b"nokey"].headers == {}
    keyed = [m for m in got if m.value not in (b"first", b"nokey")]
    assert sorted(numbers(keyed)) == list(range(300))
    for m in keyed:
        assert m.key == f"k{int(m.value) % 7}".encode()
        assert m.headers == {"i": m.value}
    for k in range(7):
        seq = [int(m.value) for m in keyed if m.key == f"k{k}".encode()]
        assert seq == sorted(seq), f"order of key k{k} not preserved"


def test_uncommitted_messages_are_redelivered_after_reopen(url: str) -> None:
    topic, group = fresh("t"), fresh("g")
    with open_producer(url) as producer:
        publish_numbered(producer, topic, 60)

    with open_consumer(url, [topic], group, consumer_name="worker-1") as consumer:
        first = drain(consumer, 60)
        # Per key (and so per partition) the first 20 numbers come first: a clean prefix to commit.
        consumer.commit([m for m in first if int(m.value) < 20])
    assert sorted(numbers(first)) == list(range(60))

    with open_consumer(url, [topic], group, consumer_name="worker-1") as consumer:
        again = drain(consumer, 40)
        consumer.commit(again)
    assert sorted(numbers(again)) == list(range(20, 60))
    # The same message keeps its position across redelivery.
    first_pos = {m.value: m.position for m in first}
    assert all(first_pos[m.value] == m.position for m in again)

    with open_producer(url) as producer:
        producer.publish(topic, b"sentinel", key=b"k0")
    with open_consumer(url, [topic], group, consumer_name="worker-1") as consumer:
        last = drain_until(consumer, b"sentinel")
        consumer.commit(last)
    assert [m.value for m in last] == [b"sentinel"]


def test_two_groups_each_see_everything(url: str) -> None:
    topic = fresh("t")
    with open_producer(url) as producer:
        publish_numbered(producer, topic, 100)
    with (
        open_consumer(url, [topic], fresh("a")) as one,
        open_consumer(url, [topic], fresh("b")) as two,
    ):
        got_one = drain(one, 100)
        got_two = drain(two, 100)
        one.commit(got_one)
        two.commit(got_two)
    assert sorted(numbers(got_one)) == list(range(100))
    assert sorted(numbers(got_two)) == list(range(100))


def test_consumer_reads_several_topics(url: str) -> None:
    data, voice, group = fresh("data"), fresh("voice"), fresh("g")
    with open_producer(url) as producer:
        publish_numbered(producer, data, 30)
        publish_numbered(producer, voice, 20)
    with open_consumer(url, [data, voice], group) as consumer:
        got = drain(consumer, 50)
        consumer.commit(got)
    assert Counter(m.topic for m in got) == {data: 30, voice: 20}


def test_latest_start_skips_earlier_messages(url: str) -> None:
    topic, group = fresh("t"), fresh("g")
    with open_producer(url) as producer:
        publish_numbered(producer, topic, 10)
        with open_consumer(url, [topic], group, start="latest") as consumer:
            # When "latest" takes effect is up to the broker: publish probes until one arrives.
            got: list[Message] = []

            def probe_arrived() -> bool:
                producer.publish(topic, b"probe", key=b"k0")
                producer.flush()
                got.extend(consumer.poll(timeout=0.3))
                return bool(got)

            wait_for(probe_arrived, "a probe published after the start", DEADLINE_S, interval=0)
            got += consumer.poll(timeout=0.3)
            consumer.commit(got)
    assert got
    assert {m.value for m in got} == {b"probe"}


def test_lag_counts_uncommitted_messages(url: str) -> None:
    topic, group = fresh("t"), fresh("g")
    with open_producer(url) as producer:
        publish_numbered(producer, topic, 25)
    with open_consumer(url, [topic], group) as consumer:
        got = drain(consumer, 25)
        assert consumer.lag() == 25  # delivered but not committed
        consumer.commit(got)
        assert consumer.lag() == 0


def test_kafka_classic_group_protocol_round_trip(kafka_bootstrap: str) -> None:
    """The classic group protocol (what Redpanda speaks) with the default settings."""
    url = f"kafka://{kafka_bootstrap}"
    topic, group = fresh("t"), fresh("g")
    with open_producer(url) as producer:
        publish_numbered(producer, topic, 40)
    with open_consumer(url, [topic], group) as consumer:
        got = drain(consumer, 40)
        consumer.commit(got)
        assert consumer.lag() == 0
    assert sorted(numbers(got)) == list(range(40))


def test_kafka_flush_raises_when_nothing_is_delivered() -> None:
    url = "kafka://127.0.0.1:1"  # nothing listens there
    producer = open_producer(url, config={"message.timeout.ms": 300, "log_level": 0})
    producer.publish("t", b"lost", key=b"k")
    with pytest.raises(StreamError, match=r"not delivered|delivery failed"):
        producer.flush(timeout=10)


def test_kafka_flush_answers_for_the_calling_threads_messages_only() -> None:
    """A producer shared by threads (the CDR loader's workers): one thread's flush must neither
    swallow another thread's failed delivery nor raise for it."""
    url = "kafka://127.0.0.1:1"  # nothing listens there: every delivery fails
    producer = open_producer(url, config={"message.timeout.ms": 300, "log_level": 0})
    results: dict[str, str] = {}

    def run(name: str, publish: bool, ready: threading.Barrier) -> None:
        if publish:
            producer.publish("t", name.encode(), key=b"k")
        ready.wait()
        if name != "first":
            ready.wait()  # flush after the first thread's flush has served every report
        try:
            producer.flush(timeout=10)
            results[name] = "delivered"
        except StreamError:
            results[name] = "raised"
        if name == "first":
            ready.wait()

    ready = threading.Barrier(3)
    threads = [
        threading.Thread(target=run, args=(name, publish, ready))
        for name, publish in (("first", True), ("second", True), ("idle", False))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert results == {"first": "raised", "second": "raised", "idle": "delivered"}


def test_redis_two_consumers_in_a_group_split_the_work(stack) -> None:
    url, topic, group = stack.stream_url, fresh("t"), fresh("g")
    with open_producer(url) as producer:
        publish_numbered(producer, topic, 200)
    with (
        open_consumer(url, [topic], group, consumer_name="c1") as c1,
        open_consumer(url, [topic], group, consumer_name="c2") as c2,
    ):
        got1: list[Message] = []
        got2: list[Message] = []

        def both_polled_all() -> bool:
            batch1 = c1.poll(max_messages=30, timeout=0.2)
            batch2 = c2.poll(max_messages=30, timeout=0.2)
            c1.commit(batch1)
            c2.commit(batch2)
            got1.extend(batch1)
            got2.extend(batch2)
            return len(got1) + len(got2) >= 200

        wait_for(both_polled_all, "200 messages between the two", DEADLINE_S, interval=0)
        assert c1.lag() == 0
    assert got1 and got2
    assert not {m.position for m in got1} & {m.position for m in got2}
    assert sorted(numbers(got1 + got2)) == list(range(200))


def test_redis_pending_entries_of_a_dead_consumer_are_claimed(stack) -> None:
    url, topic, group = stack.stream_url, fresh("t"), fresh("g")
    with open_producer(url) as producer:
        publish_numbered(producer, topic, 30)
    dead = open_consumer(url, [topic], group, consumer_name="dead")
    taken = drain(dead, 30)
    dead.close()  # never committed: the entries stay pending under "dead"
    assert len(taken) == 30

    with open_consumer(
        url, [topic], group, consumer_name="heir", claim_idle_ms=50, claim_interval=0.05
    ) as heir:
        claimed = drain(heir, 30)
        heir.commit(claimed)
        assert heir.lag() == 0
    assert sorted(m.position for m in claimed) == sorted(m.position for m in taken)
    # A consumer that closes with nothing pending leaves the group; "dead" stays until cleaned up.
    raw = redis.Redis.from_url(url)
    try:
        names = {c["name"] for c in raw.xinfo_consumers(stream_key(topic), group)}
    finally:
        raw.close()
    assert names == {b"dead"}


def test_redis_restart_takes_own_pending_and_claims_others_in_one_poll(stack) -> None:
    """A restarted consumer's first poll holds its own pending entries and, room permitting,
    every idle entry of a dead consumer (not fewer because its own entries came first)."""
    url, topic, group = stack.stream_url, fresh("t"), fresh("g")
    with open_producer(url) as producer:
        publish_numbered(producer, topic, 8)
    me = open_consumer(url, [topic], group, consumer_name="me", claim_idle_ms=None)
    mine = me.poll(max_messages=3, timeout=1.0)
    me.close()  # never committed: pending under "me"
    other = open_consumer(url, [topic], group, consumer_name="other", claim_idle_ms=None)
    theirs = drain(other, 5)
    other.close()  # never committed: pending under "other"
    assert (len(mine), len(theirs)) == (3, 5)
    raw = redis.Redis.from_url(url)

    def idle_ms() -> int:
        return min(
            e["time_since_delivered"]
            for e in raw.xpending_range(
                stream_key(topic), group, min="-", max="+", count=10, consumername="other"
            )
        )

    try:
        wait_for(lambda: idle_ms() >= 200, "the dead consumer's entries idle 200 ms", DEADLINE_S)
    finally:
        raw.close()

    with open_consumer(
        url, [topic], group, consumer_name="me", claim_idle_ms=100, claim_interval=60
    ) as me:
        first = me.poll(max_messages=10, timeout=0.2)
        me.commit(first)
    assert sorted(m.position for m in first) == sorted(m.position for m in mine + theirs)
    assert len(first) == 8


def test_redis_key_layout_and_retention(stack) -> None:
    url, topic = stack.stream_url, fresh("t")
    raw = redis.Redis.from_url(url)
    try:
        with open_producer(url) as producer:
            producer.publish(topic, b"v", key=b"k", headers={"event_id": b"f.csv:2"})
        assert stream_key(topic) == f"{REDIS_KEY_PREFIX}{topic}" == f"stream:{topic}"
        [(_, fields)] = raw.xrange(stream_key(topic))
        assert fields == {b"k": b"k", b"v": b"v", b"h:event_id": b"f.csv:2"}

        # retention by time (MINID ~, whole nodes of 100 entries): entries older than it go once
        # no group needs them (tests/test_stream_hygiene.py has the groups)
        small = fresh("t")
        for i in range(1, 101):
            raw.xadd(stream_key(small), {"v": b"old"}, id=f"{i}-0")
        with open_producer(url, retention_ms=60_000) as producer:
            producer.publish_many(small, ((None, b"x", None) for _ in range(2000)))
        assert raw.xlen(stream_key(small)) == 2000
    finally:
        raw.close()


def test_redis_publish_many_in_batches_and_an_error_reply(stack) -> None:
    """Batches of packed XADDs: every entry lands in order with its key; an error reply (the key
    is not a stream) is a StreamError, and the producer goes on publishing afterwards."""
    url, topic, bad = stack.stream_url, fresh("t"), fresh("t")
    raw = redis.Redis.from_url(url)
    try:
        raw.set(stream_key(bad), "not a stream")
        with open_producer(url) as producer:
            with pytest.raises(StreamError, match="WRONGTYPE"):
                producer.publish_many(bad, ((b"k", b"v", None) for _ in range(10)))
            n = producer.publish_many(
                topic, ((b"k%d" % (i % 3), b"%d" % i, None) for i in range(4500))
            )
            assert n == 4500
        entries = raw.xrange(stream_key(topic))
        assert [int(f[b"v"]) for _, f in entries] == list(range(4500))
        assert all(f == {b"v": f[b"v"], b"k": b"k%d" % (int(f[b"v"]) % 3)} for _, f in entries)
    finally:
        raw.delete(stream_key(bad))
        raw.close()


def test_bad_urls_and_arguments_are_clear_errors() -> None:
    with pytest.raises(StreamError, match="unsupported stream URL"):
        open_producer("amqp://localhost")
    with pytest.raises(StreamError, match="no bootstrap servers"):
        open_producer("kafka://")
    with pytest.raises(StreamError, match="sequence of topic names"):
        open_consumer("redis://127.0.0.1:1/1", "cdr-data", "g")
    with pytest.raises(TypeError):
        open_producer("redis://127.0.0.1:1/1", no_such_option=1)


def test_commit_from_another_thread_while_polling(url: str) -> None:
    """The HVS consumer's pattern: commit batch n in a worker while batch n+1 is polled."""
    from concurrent.futures import Future, ThreadPoolExecutor

    topic, group = fresh("t"), fresh("g")
    with open_producer(url) as producer:
        publish_numbered(producer, topic, 200)
    got: list[Message] = []
    with open_consumer(url, [topic], group) as consumer, ThreadPoolExecutor(1) as worker:
        pending: list[Future[None]] = []

        def polled_all() -> bool:
            batch = consumer.poll(max_messages=25, timeout=0.5)
            if pending:
                pending.pop().result()
            pending.append(worker.submit(consumer.commit, batch))
            got.extend(batch)
            return len(got) >= 200

        wait_for(polled_all, "200 messages", DEADLINE_S, interval=0)
        if pending:
            pending.pop().result()
        assert consumer.lag() == 0
    assert sorted(numbers(got)) == list(range(200))
