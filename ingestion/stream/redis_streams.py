"""The Redis Streams backend of the stream interface, the embedded default."""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from common.closing import Closing
from ingestion.stream.base import (
    DEFAULT_CLAIM_IDLE_MS,
    DEFAULT_GONE_AFTER_MS,
    DEFAULT_RETENTION_MS,
    REDIS_KEY_PREFIX,
    Item,
    Message,
    Start,
    StreamError,
    default_consumer_name,
)

log = logging.getLogger(__name__)

_pack_command: Any
try:
    from hiredis import pack_command as _pack_command
except ImportError:  # pragma: no cover - hiredis is a dependency (redis[hiredis])
    _pack_command = None


def _redis_client(url: str) -> Any:
    import redis

    return redis.Redis.from_url(url, decode_responses=False)


def stream_key(topic: str) -> str:
    """The Redis Streams key of `topic`."""
    return f"{REDIS_KEY_PREFIX}{topic}"


def _entry_fields(
    value: bytes, key: bytes | None, headers: dict[str, bytes] | None
) -> dict[bytes | str, bytes]:
    fields: dict[bytes | str, bytes] = {"v": value}
    if key is not None:
        fields["k"] = key
    if headers:
        for name, hval in headers.items():
            fields[f"h:{name}"] = hval
    return fields


def _id_tuple(entry_id: bytes | str) -> tuple[int, int]:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


class RedisProducer(Closing):
    """XADD with retention by time (`MINID ~`), never below what a group has not acknowledged;
    `publish_many` pipelines batches of entries."""

    def __init__(
        self,
        url: str,
        *,
        retention_ms: int | None = DEFAULT_RETENTION_MS,
        trim_interval: float = 10.0,
        batch_size: int = 2000,
    ) -> None:
        self._redis = _redis_client(url)
        self._retention_ms = retention_ms
        self._trim_interval = trim_interval
        self._batch = max(1, batch_size)
        # stream key -> (the MINID to trim to, when to look again)
        self._minid: dict[str, tuple[str | None, float]] = {}

    def trim_floor(self, topic: str) -> str | None:
        """The id below which `topic`'s entries may go: older than the retention, and
        acknowledged by every group (not below any group's oldest pending entry or its last
        delivered one). None when there is nothing to trim or the groups cannot be read."""
        import redis

        if self._retention_ms is None:
            return None
        skey = stream_key(topic)
        floor = (int(time.time() * 1000) - self._retention_ms, 0)
        if floor[0] <= 0:
            return None
        try:
            groups = self._redis.xinfo_groups(skey)
            for group in groups:
                floor = min(floor, _id_tuple(group["last-delivered-id"]))
                if group["pending"]:
                    oldest = self._redis.xpending(skey, group["name"])["min"]
                    if oldest is not None:
                        floor = min(floor, _id_tuple(oldest))
        except redis.ResponseError as exc:
            if "no such key" not in str(exc).lower():
                log.warning(
                    "stream groups unknown, not trimming", extra={"stream": skey, "error": str(exc)}
                )
                return None
        return f"{floor[0]}-{floor[1]}"

    def _trim_to(self, topic: str) -> str | None:
        """The cached `trim_floor` of `topic`, looked up again every `trim_interval` seconds. A
        floor from earlier is never above today's: groups only move forward."""
        if self._retention_ms is None:
            return None
        cached = self._minid.get(topic)
        now = time.monotonic()
        if cached is not None and now < cached[1]:
            return cached[0]
        floor = self.trim_floor(topic)
        self._minid[topic] = (floor, now + self._trim_interval)
        return floor

    def publish(
        self,
        topic: str,
        value: bytes,
        key: bytes | None = None,
        headers: dict[str, bytes] | None = None,
    ) -> None:
        import redis

        try:
            minid = self._trim_to(topic)
            self._redis.xadd(
                stream_key(topic),
                _entry_fields(value, key, headers),
                minid=minid,
                approximate=minid is not None,
            )
        except redis.RedisError as exc:
            raise StreamError(f"redis publish to {topic!r} failed: {exc}") from exc

    def publish_many(self, topic: str, items: Iterable[Item]) -> int:
        """XADD every item, `batch_size` commands a round trip: each batch packed by hiredis in
        one call and sent in one write, its replies read back before the next (redis-py's
        pipeline packed and parsed every command in Python: most of the loader's publish)."""
        import redis

        skey = stream_key(topic)
        n = 0
        batch: list[tuple[bytes | str | int, ...]] = []
        try:
            minid = self._trim_to(topic)
            # trimmed once per round trip: the first entry of each batch carries the MINID
            plain: tuple[bytes | str, ...] = (b"XADD", skey, b"*")
            trimmed = (b"XADD", skey, b"MINID", b"~", minid, b"*") if minid else None
            for key, value, headers in items:
                head = trimmed if trimmed is not None and not batch else plain
                if headers:
                    fields: tuple[bytes | str, ...] = tuple(
                        x for kv in _entry_fields(value, key, headers).items() for x in kv
                    )
                    batch.append((*head, *fields))
                elif key is None:
                    batch.append((*head, b"v", value))
                else:
                    batch.append((*head, b"v", value, b"k", key))
                if len(batch) >= self._batch:
                    n += self._send(batch)
                    batch = []
            if batch:
                n += self._send(batch)
        except redis.RedisError as exc:
            raise StreamError(f"redis publish_many to {topic!r} failed: {exc}") from exc
        return n

    def _send(self, commands: list[tuple[bytes | str | int, ...]]) -> int:
        """Send packed commands in one write and read every reply; the first error reply is
        raised after all are read (the connection stays in step)."""
        import redis

        if _pack_command is None:  # pragma: no cover - hiredis is a dependency
            pipe = self._redis.pipeline(transaction=False)
            for command in commands:
                pipe.execute_command(*command)
            pipe.execute()
            return len(commands)
        pool = self._redis.connection_pool
        conn = pool.get_connection()
        try:
            conn.send_packed_command([_pack_command(c) for c in commands])
            failed = None
            for _ in commands:
                try:
                    conn.read_response()
                except redis.ResponseError as exc:
                    failed = failed or exc
            if failed is not None:
                raise failed
        except BaseException:
            conn.disconnect()  # replies may still be on their way: never reuse the connection
            raise
        finally:
            pool.release(conn)
        return len(commands)

    def flush(self, timeout: float = 30.0) -> None:
        """Nothing to do: every publish call returns only after Redis stored the entries."""

    def close(self) -> None:
        self._redis.close()


def _raw_reply(response: Any, **options: Any) -> Any:
    return response


def _streams(reply: Any) -> Iterable[tuple[bytes, list[Any]]]:
    """(stream key, entries) of a raw XREADGROUP reply: a map (RESP3) or pairs (RESP2)."""
    if not reply:
        return ()
    return reply.items() if isinstance(reply, dict) else reply


_new_object = object.__new__
_set_attr = object.__setattr__


def _new_message(
    topic: str,
    key: bytes | None,
    value: bytes,
    entry_id: bytes,
    headers: dict[str, bytes] | None = None,
) -> Message:
    """`Message(...)` without the frozen dataclass's `__init__` (a third of the cost per entry)."""
    m = _new_object(Message)
    _set_attr(m, "topic", topic)
    _set_attr(m, "key", key)
    _set_attr(m, "value", value)
    _set_attr(m, "position", entry_id.decode())
    _set_attr(m, "headers", {} if headers is None else headers)
    return m


_REMOVE_GONE_LUA = """
-- KEYS[1] a stream; ARGV group, this consumer's name, idle ms. Removes the group's other
-- consumers idle at least that long that hold no pending entry; returns their names. One
-- script, so that no consumer can take an entry between the check and the removal
-- (XGROUP DELCONSUMER drops the pending entries of the consumer it removes).
local gone = {}
for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local info = {}
  for j = 1, #c, 2 do info[c[j]] = c[j + 1] end
  if info['name'] ~= ARGV[2] and info['pending'] == 0
      and info['idle'] >= tonumber(ARGV[3]) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], info['name'])
    gone[#gone + 1] = info['name']
  end
end
return gone
"""


class RedisConsumer(Closing):
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
        gone_after_ms: int | None = DEFAULT_GONE_AFTER_MS,
    ) -> None:
        self._redis = _redis_client(url)
        self._topics = list(dict.fromkeys(topics))
        self._by_key = {stream_key(t): t for t in self._topics}
        self._group = group
        self._name = consumer_name or default_consumer_name()
        self._start_id = "0" if start == "earliest" else "$"
        self._claim_idle_ms = claim_idle_ms
        self._claim_interval = claim_interval
        self._gone_after_ms = gone_after_ms
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

    def _take(self, key: bytes | str, entries: Iterable[Sequence[Any]], out: list[Message]) -> None:
        """Messages of `entries` into `out`: XREADGROUP's raw `[id, [field, value, ...]]` or
        XAUTOCLAIM's parsed `(id, {field: value})`; an entry without fields was trimmed."""
        skey = key.decode() if isinstance(key, bytes) else key
        topic = self._by_key[skey]
        gone = []
        append = out.append
        for entry_id, fields in entries:
            if not fields:  # pending entry deleted (XDEL, a trim by hand) before it was processed
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

    def _claim_from_gone(self, count: int, out: list[Message]) -> bool:
        """Claim up to `count` pending entries of consumers not heard from for `gone_after_ms`
        into `out`, then remove from the group every such consumer that holds nothing pending
        any more. True when there may be more to claim."""
        gone_after = self._gone_after_ms or 0
        more = False
        for skey in self._by_key:
            for info in self._redis.xinfo_consumers(skey, self._group):
                name = info["name"].decode() if isinstance(info["name"], bytes) else info["name"]
                if name == self._name or info["idle"] < gone_after or not info["pending"]:
                    continue
                room = count - len(out)
                if room <= 0:
                    return True
                ids: list[bytes] = [
                    p["message_id"]
                    for p in self._redis.xpending_range(
                        skey, self._group, min="-", max="+", count=room, consumername=name
                    )
                ]
                more = more or len(ids) >= room
                if not ids:
                    continue
                # min_idle_time: an entry the consumer touched since (it came back) stays its own
                claimed = self._redis.xclaim(
                    skey,
                    self._group,
                    self._name,
                    min_idle_time=gone_after,
                    message_ids=ids,
                )
                entries = [e for e in claimed if e[0] is not None]
                if entries:
                    log.info(
                        "claimed the pending entries of a consumer that is gone",
                        extra={
                            "stream": skey,
                            "group": self._group,
                            "consumer": name,
                            "count": len(entries),
                        },
                    )
                    self._take(skey, entries, out)
            # EVAL, not EVALSHA: every few seconds, and one command fewer in the ACL
            removed = self._redis.eval(
                _REMOVE_GONE_LUA, 1, skey, self._group, self._name, gone_after
            )
            if removed:
                log.info(
                    "removed consumers that are gone from the group",
                    extra={
                        "stream": skey,
                        "group": self._group,
                        "consumers": [n.decode() for n in removed],
                    },
                )
        return more

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
                    if now >= self._next_claim and len(out) + len(got) < max_messages:
                        self._next_claim = now + self._claim_interval
                        claimed: list[Message] = []
                        room = max_messages - len(out) - len(got)
                        if self._gone_after_ms is not None and self._claim_from_gone(room, claimed):
                            self._next_claim = now  # more to take: again at the next poll
                        if self._claim_idle_ms is not None and len(claimed) < room:
                            self._claim_idle(room, claimed)
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
