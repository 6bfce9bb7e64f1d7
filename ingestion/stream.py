"""The stream interface: publish and consume with consumer groups, at-least-once, two backends.

`open_producer(url)` and `open_consumer(url, topics, group)` pick the backend from the URL:

- `kafka://host:port[,host:port...][?librdkafka.key=value&...]`: Kafka protocol via
  confluent-kafka (Redpanda in the scale-out stack, librdkafka's mock cluster in tests).
- `redis://host:port/db` (or `rediss://`): Redis Streams, the embedded default. Topic `T` is the
  stream key `stream:T` (see `REDIS_KEY_PREFIX`); each entry has the fields `k` (key, absent when
  None), `v` (value) and `h:<name>` (one per header).

Delivery is at-least-once: a consumer sees a message again until `commit()` was called for it.
Per-topic order for a key is preserved. See docs/stream.md.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, Protocol, Self, runtime_checkable
from urllib.parse import parse_qsl, urlsplit

log = logging.getLogger(__name__)

REDIS_KEY_PREFIX = "stream:"
"""Redis Streams key layout: topic `T` lives in the stream key `stream:T`."""

DEFAULT_MAXLEN = 10_000_000
"""Redis Streams approximate retention per topic (entries), `XADD ... MAXLEN ~`."""

DEFAULT_CLAIM_IDLE_MS = 60_000
"""Redis Streams: pending entries idle this long are taken over from (presumed dead) consumers."""

Start = Literal["earliest", "latest"]
Item = tuple[bytes | None, bytes, dict[str, bytes] | None]


class StreamError(Exception):
    """A stream operation failed (connection, delivery, commit, bad URL or options)."""


@dataclass(frozen=True, slots=True)
class Message:
    """One consumed message. `position` is "partition:offset" (Kafka) or the entry id (Redis)."""

    topic: str
    key: bytes | None
    value: bytes
    position: str
    headers: dict[str, bytes]


@runtime_checkable
class Producer(Protocol):
    def publish(
        self,
        topic: str,
        value: bytes,
        key: bytes | None = None,
        headers: dict[str, bytes] | None = None,
    ) -> None: ...

    def publish_many(self, topic: str, items: Iterable[Item]) -> int: ...

    def flush(self, timeout: float = 30.0) -> None:
        """Wait until what this thread published is delivered; `StreamError` if any of it was
        not (a producer may be shared by threads: each one's flush answers for its own)."""
        ...

    def close(self) -> None: ...

    def __enter__(self) -> Self: ...

    def __exit__(self, *exc: object) -> None: ...


@runtime_checkable
class Consumer(Protocol):
    def poll(self, max_messages: int = 1000, timeout: float = 1.0) -> list[Message]: ...

    def commit(self, messages: Sequence[Message]) -> None: ...

    def lag(self) -> int | None: ...

    def close(self) -> None: ...

    def __enter__(self) -> Self: ...

    def __exit__(self, *exc: object) -> None: ...


class _Closing:
    """Context-manager support shared by all four classes."""

    def close(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self.close()
            return
        try:
            self.close()
        except Exception:
            log.exception("closing the stream client failed while handling another error")


def _scheme(url: str) -> str:
    scheme = urlsplit(url).scheme.lower()
    if scheme in ("kafka", "redis", "rediss"):
        return scheme
    raise StreamError(f"unsupported stream URL {url!r}: use kafka://host:port or redis://host/db")


def _default_consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def open_producer(url: str, **options: Any) -> Producer:
    """A producer for `url`.

    Kafka options: `config` (extra librdkafka settings). Redis options: `maxlen` (approximate
    entries kept per topic, None for no trimming; default 10 million), `batch_size` (entries per
    pipeline in `publish_many`).
    """
    if _scheme(url) == "kafka":
        return KafkaProducer(url, **options)
    return RedisProducer(url, **options)


def open_consumer(
    url: str,
    topics: Sequence[str],
    group: str,
    *,
    consumer_name: str | None = None,
    start: Start = "earliest",
    **options: Any,
) -> Consumer:
    """A consumer of `topics` in consumer group `group`; `start` applies when the group is new.

    Kafka options: `config` (extra librdkafka settings). Redis options: `claim_idle_ms` (take over
    other consumers' pending entries idle this long; default 60 s, None to never claim),
    `claim_interval` (seconds between claim scans, default 5).
    A stable `consumer_name` lets a restarted Redis consumer re-read its own uncommitted entries at
    once; without one, they come back via the idle claim.
    """
    if isinstance(topics, str):
        raise StreamError("topics must be a sequence of topic names, not a single string")
    if not topics:
        raise StreamError("at least one topic is required")
    if start not in ("earliest", "latest"):
        raise StreamError(f"start must be 'earliest' or 'latest', not {start!r}")
    if _scheme(url) == "kafka":
        return KafkaConsumer(
            url, topics, group, consumer_name=consumer_name, start=start, **options
        )
    return RedisConsumer(url, topics, group, consumer_name=consumer_name, start=start, **options)


# --------------------------------------------------------------------------------------- Kafka


# URL query settings that only one side understands; the other side skips them quietly, so one
# URL (for example `?group.protocol=consumer`) serves producers and consumers alike.
_CONSUMER_ONLY = (
    "group.",
    "auto.offset.reset",
    "enable.auto.",
    "auto.commit.",
    "session.timeout.ms",
    "heartbeat.interval.ms",
    "max.poll.interval.ms",
    "partition.assignment.strategy",
    "fetch.",
    "isolation.level",
)
_PRODUCER_ONLY = (
    "acks",
    "enable.idempotence",
    "linger.ms",
    "batch.",
    "compression.",
    "message.timeout.ms",
    "partitioner",
    "queue.buffering.",
    "delivery.timeout.ms",
)


def _kafka_config(
    url: str, config: Mapping[str, Any] | None, role: Literal["producer", "consumer"]
) -> dict[str, Any]:
    """librdkafka settings: bootstrap servers and query of the URL, then `config` (wins)."""
    parts = urlsplit(url)
    if not parts.netloc:
        raise StreamError(f"kafka URL {url!r} has no bootstrap servers (kafka://host:port,...)")
    conf: dict[str, Any] = {"bootstrap.servers": parts.netloc}
    other_side = _CONSUMER_ONLY if role == "producer" else _PRODUCER_ONLY
    conf.update((k, v) for k, v in parse_qsl(parts.query) if not k.startswith(other_side))
    conf.update(config or {})
    return conf


def _kafka_error_cb(err: Any) -> None:
    log.warning("kafka client error: %s", err)


class KafkaProducer(_Closing):
    """Idempotent (acks=all), keyed producer; Java-compatible murmur2 partitioning of keys."""

    def __init__(self, url: str, *, config: Mapping[str, Any] | None = None) -> None:
        from confluent_kafka import Producer as _Producer

        conf = {
            "enable.idempotence": True,
            "acks": "all",
            "partitioner": "murmur2_random",
            "linger.ms": 5,
            "error_cb": _kafka_error_cb,
            "logger": log,
        }
        conf.update(_kafka_config(url, config, "producer"))
        self._producer = _Producer(conf)
        self._lock = threading.Lock()
        self._local = threading.local()

    def _thread_failures(self) -> tuple[list[str], Any]:
        """The failed deliveries of the calling thread's messages since its last flush, and the
        delivery callback that records them. Delivery reports are served by whichever thread
        polls or flushes, so each message carries the callback of the thread that produced it:
        a flush never takes (and clears) another thread's failure."""
        local = self._local
        if not hasattr(local, "failed"):
            failed: list[str] = []

            def on_delivery(err: Any, msg: Any) -> None:
                if err is not None:
                    with self._lock:
                        failed.append(f"{msg.topic()}: {err}")

            local.failed, local.on_delivery = failed, on_delivery
        return local.failed, local.on_delivery

    def _produce(
        self,
        topic: str,
        value: bytes,
        key: bytes | None,
        headers: dict[str, bytes] | None,
        on_delivery: Any,
    ) -> None:
        from confluent_kafka import KafkaException

        hdrs = list(headers.items()) if headers else None
        while True:
            try:
                self._producer.produce(
                    topic, value=value, key=key, headers=hdrs, on_delivery=on_delivery
                )
                return
            except BufferError:
                self._producer.poll(0.1)  # local queue full: serve deliveries, then retry
            except KafkaException as exc:
                raise StreamError(f"kafka produce to {topic!r} failed: {exc}") from exc

    def publish(
        self,
        topic: str,
        value: bytes,
        key: bytes | None = None,
        headers: dict[str, bytes] | None = None,
    ) -> None:
        self._produce(topic, value, key, headers, self._thread_failures()[1])
        self._producer.poll(0)

    def publish_many(self, topic: str, items: Iterable[Item]) -> int:
        on_delivery = self._thread_failures()[1]
        n = 0
        for key, value, headers in items:
            self._produce(topic, value, key, headers, on_delivery)
            n += 1
            if n % 1000 == 0:
                self._producer.poll(0)
        self._producer.poll(0)
        return n

    def flush(self, timeout: float = 30.0) -> None:
        left = self._producer.flush(timeout)
        mine = self._thread_failures()[0]
        with self._lock:
            failed = mine[:]
            mine.clear()
        if left:
            raise StreamError(f"kafka flush: {left} messages not delivered within {timeout} s")
        if failed:
            raise StreamError(f"kafka delivery failed for {len(failed)} messages: {failed[0]}")

    def close(self) -> None:
        self.flush()


class KafkaConsumer(_Closing):
    """Subscribed group consumer; manual, synchronous commits of offset+1 per partition."""

    def __init__(
        self,
        url: str,
        topics: Sequence[str],
        group: str,
        *,
        consumer_name: str | None = None,
        start: Start = "earliest",
        config: Mapping[str, Any] | None = None,
    ) -> None:
        from confluent_kafka import Consumer as _Consumer

        conf = {
            "group.id": group,
            "client.id": consumer_name or _default_consumer_name(),
            "enable.auto.commit": False,
            "auto.offset.reset": start,
            "error_cb": _kafka_error_cb,
            "logger": log,
        }
        conf.update(_kafka_config(url, config, "consumer"))
        self._consumer = _Consumer(conf)
        self._consumer.subscribe(list(topics))
        self._closed = False

    def poll(self, max_messages: int = 1000, timeout: float = 1.0) -> list[Message]:
        from confluent_kafka import KafkaError

        out: list[Message] = []
        for m in self._consumer.consume(num_messages=max_messages, timeout=timeout):
            err = m.error()
            if err is not None:
                if err.fatal():
                    raise StreamError(f"kafka consumer fatal error: {err}")
                if err.code() != KafkaError._PARTITION_EOF:
                    log.warning("kafka consume: %s", err)
                continue
            hdrs = {k: (v if v is not None else b"") for k, v in (m.headers() or ())}
            out.append(
                Message(
                    topic=m.topic(),
                    key=m.key(),
                    value=m.value() or b"",
                    position=f"{m.partition()}:{m.offset()}",
                    headers=hdrs,
                )
            )
        return out

    def commit(self, messages: Sequence[Message]) -> None:
        """Commit offset+1 of the highest given message per partition (Kafka is cumulative)."""
        from confluent_kafka import KafkaException, TopicPartition

        if not messages:
            return
        upto: dict[tuple[str, int], int] = {}
        for m in messages:
            part, off = m.position.split(":")
            tp = (m.topic, int(part))
            upto[tp] = max(upto.get(tp, -1), int(off) + 1)
        offsets = [TopicPartition(t, p, o) for (t, p), o in upto.items()]
        try:
            result = self._consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            raise StreamError(f"kafka commit failed: {exc}") from exc
        bad = [tp for tp in result or () if tp.error is not None]
        if bad:
            raise StreamError(
                f"kafka commit failed for {bad[0].topic}[{bad[0].partition}]: {bad[0].error}"
            )

    def lag(self) -> int | None:
        """Uncommitted messages on this consumer's assigned partitions, as of the last fetch."""
        from confluent_kafka import KafkaException

        try:
            assigned = self._consumer.assignment()
            if not assigned:
                return None
            total = 0
            for tp in self._consumer.committed(assigned, timeout=5.0):
                # Cached from fetch responses (free); ask the broker only when not known yet.
                low, high = self._consumer.get_watermark_offsets(tp, cached=True)
                if high < 0:
                    low, high = self._consumer.get_watermark_offsets(tp, timeout=5.0)
                done = tp.offset if tp.offset >= 0 else low
                total += max(high - done, 0)
            return total
        except KafkaException as exc:
            log.warning("kafka lag unknown: %s", exc)
            return None

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._consumer.close()


# --------------------------------------------------------------------------------------- Redis


def _redis_client(url: str) -> Any:
    import redis

    return redis.Redis.from_url(url, decode_responses=False)


def stream_key(topic: str) -> str:
    """The Redis Streams key of `topic`."""
    return f"{REDIS_KEY_PREFIX}{topic}"


def _entry_fields(value: bytes, key: bytes | None, headers: dict[str, bytes] | None) -> dict:
    fields: dict[bytes | str, bytes] = {"v": value}
    if key is not None:
        fields["k"] = key
    if headers:
        for name, hval in headers.items():
            fields[f"h:{name}"] = hval
    return fields


class RedisProducer(_Closing):
    """XADD with approximate MAXLEN; `publish_many` pipelines batches of entries."""

    def __init__(
        self, url: str, *, maxlen: int | None = DEFAULT_MAXLEN, batch_size: int = 2000
    ) -> None:
        self._redis = _redis_client(url)
        self._maxlen = maxlen
        self._batch = max(1, batch_size)

    def publish(
        self,
        topic: str,
        value: bytes,
        key: bytes | None = None,
        headers: dict[str, bytes] | None = None,
    ) -> None:
        import redis

        try:
            self._redis.xadd(
                stream_key(topic),
                _entry_fields(value, key, headers),
                maxlen=self._maxlen,
                approximate=True,
            )
        except redis.RedisError as exc:
            raise StreamError(f"redis publish to {topic!r} failed: {exc}") from exc

    def publish_many(self, topic: str, items: Iterable[Item]) -> int:
        import redis

        skey = stream_key(topic)
        n = 0
        try:
            pipe = self._redis.pipeline(transaction=False)
            for key, value, headers in items:
                pipe.xadd(
                    skey,
                    _entry_fields(value, key, headers),
                    maxlen=self._maxlen,
                    approximate=True,
                )
                n += 1
                if n % self._batch == 0:
                    pipe.execute()
            pipe.execute()
        except redis.RedisError as exc:
            raise StreamError(f"redis publish_many to {topic!r} failed: {exc}") from exc
        return n

    def flush(self, timeout: float = 30.0) -> None:
        """Nothing to do: every publish call returns only after Redis stored the entries."""

    def close(self) -> None:
        self._redis.close()


def _raw_reply(response: Any, **options: Any) -> Any:
    return response


def _streams(reply: Any) -> Iterable[tuple[bytes, list]]:
    """(stream key, entries) of a raw XREADGROUP reply: a map (RESP3) or pairs (RESP2)."""
    if not reply:
        return ()
    return reply.items() if isinstance(reply, dict) else reply


_new_object = object.__new__
_set_attr = object.__setattr__


def _new_message(
    topic: str, key: bytes | None, value: bytes, entry_id: bytes, headers: dict | None = None
) -> Message:
    """`Message(...)` without the frozen dataclass's `__init__` (a third of the cost per entry)."""
    m = _new_object(Message)
    _set_attr(m, "topic", topic)
    _set_attr(m, "key", key)
    _set_attr(m, "value", value)
    _set_attr(m, "position", entry_id.decode())
    _set_attr(m, "headers", {} if headers is None else headers)
    return m


class RedisConsumer(_Closing):
    """XREADGROUP consumer: own pending entries first, idle entries of others claimed, then new."""

    def __init__(
        self,
        url: str,
        topics: Sequence[str],
        group: str,
        *,
        consumer_name: str | None = None,
        start: Start = "earliest",
        claim_idle_ms: int | None = DEFAULT_CLAIM_IDLE_MS,
        claim_interval: float = 5.0,
    ) -> None:
        self._redis = _redis_client(url)
        self._topics = list(dict.fromkeys(topics))
        self._by_key = {stream_key(t): t for t in self._topics}
        self._group = group
        self._name = consumer_name or _default_consumer_name()
        self._start_id = "0" if start == "earliest" else "$"
        self._claim_idle_ms = claim_idle_ms
        self._claim_interval = claim_interval
        self._next_claim = 0.0
        self._claim_cursor = dict.fromkeys(self._by_key, "0-0")
        # Own pending entries, read from id 0 onwards once at start (crash before commit).
        self._replay: dict[str, str] = dict.fromkeys(self._by_key, "0-0")
        self._buffer: deque[Message] = deque()
        # XREADGROUP replies are read as hiredis returns them (see `_take`): redis-py's parsing
        # into a dict per entry cost more than the rest of a poll
        self._redis.set_response_callback("XREADGROUP", _raw_reply)
        self._ensure_groups()

    def _ensure_groups(self) -> None:
        import redis

        for key in self._by_key:
            try:
                self._redis.xgroup_create(key, self._group, id=self._start_id, mkstream=True)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise StreamError(f"redis group create on {key!r} failed: {exc}") from exc
            except redis.RedisError as exc:
                raise StreamError(f"redis group create on {key!r} failed: {exc}") from exc

    def _take(self, key: bytes | str, entries: Iterable[Sequence[Any]], out: list) -> None:
        """Messages of `entries` into `out`: XREADGROUP's raw `[id, [field, value, ...]]` or
        XAUTOCLAIM's parsed `(id, {field: value})`; an entry without fields was trimmed."""
        skey = key.decode() if isinstance(key, bytes) else key
        topic = self._by_key[skey]
        gone = []
        append = out.append
        for entry_id, fields in entries:
            if not fields:  # pending entry trimmed away (MAXLEN) before it was processed
                gone.append(entry_id)
                continue
            # the producer's layouts [v, value] and [v, value, k, key], without a dict
            if (
                type(fields) is list
                and fields[0] == b"v"
                and ((n := len(fields)) == 2 or (n == 4 and fields[2] == b"k"))
            ):
                append(_new_message(topic, fields[3] if n == 4 else None, fields[1], entry_id))
                continue
            pairs = (
                fields.items()
                if isinstance(fields, Mapping)
                else zip(fields[::2], fields[1::2], strict=True)
            )
            value, msg_key, headers = b"", None, {}
            for name, val in pairs:
                if name == b"v":
                    value = val
                elif name == b"k":
                    msg_key = val
                elif name.startswith(b"h:"):
                    headers[name[2:].decode()] = val
            append(_new_message(topic, msg_key, value, entry_id, headers))
        if gone:
            log.warning(
                "redis stream entries trimmed before processing, acknowledged as lost",
                extra={"stream": skey, "count": len(gone)},
            )
            self._redis.xack(skey, self._group, *gone)

    def _read_own_pending(self, count: int, out: list[Message]) -> None:
        reply = self._redis.xreadgroup(self._group, self._name, dict(self._replay), count=count)
        more = set()
        for key, entries in _streams(reply):
            skey = key.decode()
            if entries:
                self._replay[skey] = entries[-1][0].decode()
                self._take(skey, entries, out)
                if len(entries) >= count:
                    more.add(skey)
        self._replay = {k: v for k, v in self._replay.items() if k in more}

    def _claim_idle(self, count: int, out: list[Message]) -> None:
        """Claim up to `count` idle entries of other consumers into `out` (empty on entry)."""
        for skey in self._by_key:
            if len(out) >= count:
                return
            reply = self._redis.xautoclaim(
                skey,
                self._group,
                self._name,
                min_idle_time=self._claim_idle_ms,
                start_id=self._claim_cursor[skey],
                count=count - len(out),
            )
            cursor, entries = reply[0], reply[1]
            if len(reply) > 2 and reply[2]:  # Redis 7 drops trimmed entries from the PEL itself
                log.warning(
                    "redis stream entries trimmed before processing, dropped as lost",
                    extra={"stream": skey, "count": len(reply[2])},
                )
            self._claim_cursor[skey] = cursor.decode() if isinstance(cursor, bytes) else cursor
            if entries:
                log.info(
                    "claimed idle pending entries",
                    extra={"stream": skey, "group": self._group, "count": len(entries)},
                )
                self._take(skey, entries, out)

    def _read_new(self, count: int, block_ms: int | None, out: list[Message]) -> None:
        streams = dict.fromkeys(self._by_key, ">")
        reply = self._redis.xreadgroup(
            self._group, self._name, streams, count=count, block=block_ms
        )
        for key, entries in _streams(reply):
            self._take(key, entries, out)

    def poll(self, max_messages: int = 1000, timeout: float = 1.0) -> list[Message]:
        import redis

        if max_messages < 1:
            return []
        out: list[Message] = []
        while self._buffer and len(out) < max_messages:
            out.append(self._buffer.popleft())
        got: list[Message] = []
        try:
            for attempt in (1, 2):
                try:
                    if self._replay and len(out) < max_messages:
                        self._read_own_pending(max_messages - len(out), got)
                    now = time.monotonic()
                    if (
                        self._claim_idle_ms is not None
                        and now >= self._next_claim
                        and len(out) + len(got) < max_messages
                    ):
                        self._next_claim = now + self._claim_interval
                        claimed: list[Message] = []
                        self._claim_idle(max_messages - len(out) - len(got), claimed)
                        got += claimed
                    if len(out) + len(got) < max_messages and not self._replay:
                        block = None if out or got or timeout <= 0 else max(1, int(timeout * 1000))
                        self._read_new(max_messages - len(out) - len(got), block, got)
                    break
                except redis.ResponseError as exc:
                    if "NOGROUP" in str(exc) and attempt == 1:
                        log.warning(
                            "redis stream or group vanished, recreating",
                            extra={"group": self._group},
                        )
                        self._ensure_groups()
                        continue
                    raise
        except redis.RedisError as exc:
            raise StreamError(f"redis poll failed: {exc}") from exc
        room = max_messages - len(out)
        out.extend(got[:room])
        self._buffer.extend(got[room:])
        return out

    def commit(self, messages: Sequence[Message]) -> None:
        """XACK exactly the given entries (pipelined)."""
        import redis

        if not messages:
            return
        ids: dict[str, list[str]] = {}
        for m in messages:
            topic_ids = ids.get(m.topic)
            if topic_ids is None:
                topic_ids = ids[m.topic] = []
            topic_ids.append(m.position)
        try:
            pipe = self._redis.pipeline(transaction=False)
            for topic, entry_ids in ids.items():
                for i in range(0, len(entry_ids), 10_000):
                    pipe.xack(stream_key(topic), self._group, *entry_ids[i : i + 10_000])
            pipe.execute()
        except redis.RedisError as exc:
            raise StreamError(f"redis commit failed: {exc}") from exc

    def lag(self) -> int | None:
        """Entries of the group not yet delivered plus delivered but not yet committed."""
        import redis

        total = 0
        try:
            for skey in self._by_key:
                info = next(
                    (
                        g
                        for g in self._redis.xinfo_groups(skey)
                        if g["name"] in (self._group, self._group.encode())
                    ),
                    None,
                )
                if info is None or info.get("lag") is None:
                    return None
                total += int(info["lag"]) + int(info["pending"])
        except redis.RedisError as exc:
            log.warning("redis lag unknown: %s", exc)
            return None
        return total

    def close(self) -> None:
        """Leave the group; a consumer name without pending entries is removed from the group."""
        import redis

        try:
            for skey in self._by_key:
                pending = self._redis.xpending_range(
                    skey, self._group, min="-", max="+", count=1, consumername=self._name
                )
                if not pending and not self._buffer:
                    self._redis.xgroup_delconsumer(skey, self._group, self._name)
        except redis.RedisError as exc:
            log.warning("redis consumer close: %s", exc)
        finally:
            self._redis.close()
