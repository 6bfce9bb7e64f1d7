"""What both stream backends share: the message, the protocols, the errors and defaults."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

from common.closing import Closing

REDIS_KEY_PREFIX = "stream:"
"""Redis Streams key layout: topic `T` lives in the stream key `stream:T`."""

DEFAULT_RETENTION_MS = 35 * 86_400_000
"""Redis Streams retention by time (`XADD ... MINID ~`): entries older than this are trimmed once
every group has acknowledged them. As long as the HVS keeps usage (35 days), so that the HVS can
be rebuilt from the stream."""

DEFAULT_CLAIM_IDLE_MS = 60_000
"""Redis Streams: pending entries idle this long are taken over from (presumed dead) consumers."""

DEFAULT_GONE_AFTER_MS = 600_000
"""Redis Streams: a consumer of the group not heard from this long is gone: its pending entries
are claimed, then it is removed from the group."""

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
class Producer(Closing, Protocol):
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


@runtime_checkable
class Consumer(Closing, Protocol):
    def poll(self, max_messages: int = 1000, timeout: float = 1.0) -> list[Message]: ...

    def commit(self, messages: Sequence[Message]) -> None: ...

    def lag(self) -> int | None: ...


def default_consumer_name() -> str:
    """A consumer name unique to this process (host, pid and a random suffix)."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
