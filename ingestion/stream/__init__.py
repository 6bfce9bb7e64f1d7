"""The stream interface: publish and consume with consumer groups, at-least-once, two backends
(one module each: `kafka`, `redis_streams`; `base` holds what they share).

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

from collections.abc import Sequence
from typing import Any, Literal
from urllib.parse import urlsplit

from ingestion.stream.base import (
    DEFAULT_CLAIM_IDLE_MS,
    DEFAULT_GONE_AFTER_MS,
    DEFAULT_RETENTION_MS,
    REDIS_KEY_PREFIX,
    Consumer,
    Item,
    Message,
    Producer,
    Start,
    StreamError,
)
from ingestion.stream.kafka import KafkaConsumer, KafkaProducer
from ingestion.stream.redis_streams import RedisConsumer, RedisProducer, stream_key

__all__ = [
    "DEFAULT_CLAIM_IDLE_MS",
    "DEFAULT_GONE_AFTER_MS",
    "DEFAULT_RETENTION_MS",
    "REDIS_KEY_PREFIX",
    "Consumer",
    "Item",
    "KafkaConsumer",
    "KafkaProducer",
    "Message",
    "Producer",
    "RedisConsumer",
    "RedisProducer",
    "Start",
    "StreamError",
    "backend",
    "open_consumer",
    "open_producer",
    "stream_key",
]


def _scheme(url: str) -> str:
    scheme = urlsplit(url).scheme.lower()
    if scheme in ("kafka", "redis", "rediss"):
        return scheme
    raise StreamError(f"unsupported stream URL {url!r}: use kafka://host:port or redis://host/db")


def backend(url: str) -> Literal["kafka", "redis"]:
    """The backend a stream URL names (for options only one backend takes)."""
    return "kafka" if _scheme(url) == "kafka" else "redis"


def open_producer(url: str, **options: Any) -> Producer:
    """A producer for `url`.

    Kafka options: `config` (extra librdkafka settings). Redis options: `retention_ms` (entries
    older than this are trimmed once every group acknowledged them, `XADD ... MINID ~`; default
    35 days, None for no trimming), `trim_interval` (seconds between looks at the groups'
    positions, default 10), `batch_size` (entries per pipeline in `publish_many`).
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
    `gone_after_ms` (a consumer of the group not heard from this long is gone: its pending entries
    are claimed at once and it is removed from the group; default 10 min, None to keep every
    consumer), `claim_interval` (seconds between claim scans, default 5).
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
