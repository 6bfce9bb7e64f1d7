"""The Kafka backend of the stream interface (confluent-kafka / librdkafka)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal
from urllib.parse import parse_qsl, urlsplit

from common.closing import Closing
from ingestion.stream.base import (
    Item,
    Message,
    Start,
    StreamError,
    default_consumer_name,
)

log = logging.getLogger(__name__)


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


class KafkaProducer(Closing):
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

        hdrs: list[tuple[str, str | bytes | None]] | None
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


class KafkaConsumer(Closing):
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
            "client.id": consumer_name or default_consumer_name(),
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
            # The stub types both accessors for any message: a consumed one (no error) has its
            # topic, and its headers are a list of (name, bytes or None), never the dict form.
            topic: str = m.topic()  # type: ignore[assignment]
            raw: list[tuple[str, bytes | None]] | None = m.headers()  # type: ignore[assignment]
            hdrs = {k: (v if v is not None else b"") for k, v in (raw or ())}
            out.append(
                Message(
                    topic=topic,
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
