"""Tick sink: forex ticks from the `tick-data` stream into `forex_data.ticks`, exactly once.

Each batch from the stream (ingestion.stream, Redis Streams or Kafka) is parsed and checked in
Python (prices as exact decimals), written with COPY into a temporary table and landed with one
`insert ... select ... on conflict do nothing` on the natural key (`pair_name`, `tick_ts`) in
one transaction together with the batch's rejected messages. The stream position is committed
only after that database commit, so a crash in between redelivers a batch that lands nothing
new. See docs/raw-layer.md (forex ticks).

One batch is landed while the next is read and decoded: the stream is read and committed on the
calling thread, in order, and each batch is landed on a thread of its own with its own
connection; a batch's stream commit waits for its database commit.
"""

from __future__ import annotations

import argparse
import functools
import logging
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import psycopg
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from common.logs import setup_logging
from common.poison import BadInput, Poison, decode, skip
from common.service import (
    cli_overrides,
    crash_point,
    metrics_port,
    serve_metrics,
    stop_on_signals,
    wait_to_retry,
)
from common.settings import ServiceSettings, TickRules
from ingestion.stream import Consumer, Message, StreamError, open_consumer
from ingestion.tick_format import Tick, TickWindow, decode_tick

log = logging.getLogger("ingestion.tick_sink")


class TickSinkSettings(ServiceSettings, TickRules):
    """Settings of the tick sink: the shared `WTC_ANALYTICS_DSN` and `STREAM_URL`, the tick
    window `WTC_TICK_*` (shared with the HVS consumer), the rest `TICK_SINK_*`."""

    model_config = SettingsConfigDict(
        env_prefix="TICK_SINK_", extra="ignore", populate_by_name=True
    )

    REDIS_ROLE = "tick_sink"
    SECRET_FIELDS = ("analytics_dsn", "stream_url")

    topic: str = "tick-data"
    group: str = "wtc-tick-sink"
    consumer_name: str = Field(
        default_factory=lambda: f"tick-sink-{socket.gethostname()}",
        description="stable name: a restarted sink re-reads its own unacknowledged messages",
    )
    pairs: tuple[str, ...] = ("MRVZAR", "WAKMRV")
    batch_size: int = Field(default=5000, ge=1)
    poll_timeout: float = Field(default=1.0, gt=0, description="seconds one poll may wait")
    idle_timeout: float = Field(
        default=10.0,
        gt=0,
        description="--once: give up waiting when the stream reports no lag figure for this long",
    )
    retry_seconds: float = Field(default=2.0, gt=0, description="wait before retrying a batch")
    metrics_port: int = Field(default=19102, description="Prometheus metrics port; 0 = off")


def parse_tick(value: bytes, pairs: Sequence[str], window: TickWindow | None = None) -> Tick:
    """Decode one message value with the one tick decoder (`ingestion.tick_format`); raises
    `ingestion.tick_format.BadTick` with the reason."""
    return decode_tick(value, pairs, window or TickWindow())


PAYLOAD_KEPT = 65_536
"""Bytes of a rejected message's value kept in `forex_data.rejected_messages.payload` (its
position points to the whole of it while the stream keeps it)."""


def _keep_reject(rejects: list[tuple[Any, ...]], key: bytes | None, poison: Poison) -> None:
    rejects.append(_reject_row(poison, key))


def _reject_row(poison: Poison, key: bytes | None) -> tuple[str, str | None, str | None, str]:
    """A `tick_reject_stage` row: source (topic@position), key, payload (bounded), reason."""
    raw = poison.raw or b""
    payload = _text(raw[:PAYLOAD_KEPT])
    if len(raw) > PAYLOAD_KEPT:
        payload = f"{payload}... ({len(raw)} bytes, first {PAYLOAD_KEPT} kept)"
    return (f"{poison.source}@{poison.position}", _text(key), payload, poison.reason)


def _text(raw: bytes | None) -> str | None:
    """Bytes as storable text: invalid UTF-8 and NUL bytes escaped, nothing dropped."""
    if raw is None:
        return None
    return raw.decode("utf-8", errors="backslashreplace").replace("\x00", "\\x00")


class Metrics:
    """Prometheus metrics of one sink (own registry, so tests can run several)."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.messages = Counter(
            "wtc_tick_sink_messages",
            "Messages handled: landed, duplicate (already landed, e.g. redelivered), rejected",
            ["outcome"],
            registry=r,
        )
        self.batches = Counter("wtc_tick_sink_batches", "Batches landed", registry=r)
        self.batch_seconds = Histogram(
            "wtc_tick_sink_batch_seconds", "Time to land and commit one batch", registry=r
        )
        self.lag = Gauge(
            "wtc_tick_sink_lag_messages", "Messages in the stream not yet committed", registry=r
        )
        self.last_tick = Gauge(
            "wtc_tick_sink_last_tick_timestamp_seconds",
            "Newest tick time landed (naive UTC read as UTC)",
            registry=r,
        )
        self.errors = Counter(
            "wtc_tick_sink_errors", "Batches that failed and were retried", registry=r
        )


@dataclass
class BatchResult:
    messages: int = 0
    landed: int = 0
    duplicates: int = 0
    rejected: int = 0


@dataclass
class Batch:
    """One batch decoded: its messages, its good ticks as the body of a COPY into `tick_stage`
    (one line per tick, its index in `messages` first), its rejects as `tick_reject_stage`
    rows, its newest tick time."""

    messages: Sequence[Message]
    body: bytes = b""
    ticks: int = 0
    rejects: list[tuple[Any, ...]] = field(default_factory=list)
    newest: datetime | None = None


# Only what lands and what a conflict's reason quotes: a good tick's source, key and payload are
# read from its message by `seq` in the rare case of a conflicting duplicate.
_STAGE_SQL = (
    "create temp table if not exists tick_stage (seq integer, pair_name text, "
    "tick_ts timestamp, bid_price numeric, ask_price numeric, spread numeric) "
    "on commit delete rows",
    "create temp table if not exists tick_reject_stage (source text, message_key text, "
    "payload text, reason text) on commit delete rows",
)

# The first of each key in the batch. Tried first as a plain insert (in a savepoint): nearly
# every batch is new ticks, and `on conflict` (a speculative insertion per row) costs about half
# again as much; a batch that meets a landed key (a redelivery, a repeat) rolls back to the
# savepoint and lands with `on conflict do nothing`.
_INSERT_TICKS = """
insert into forex_data.ticks (pair_name, tick_ts, bid_price, ask_price, spread, source)
select distinct on (pair_name, tick_ts) pair_name, tick_ts, bid_price, ask_price, spread, %s
from tick_stage
order by pair_name, tick_ts, seq
"""
_LAND_TICKS = _INSERT_TICKS + "on conflict (pair_name, tick_ts) do nothing\n"

# Rejects of this batch, then ticks whose key already holds other prices; a message already
# recorded (same topic and position, i.e. redelivered) is not recorded twice.
_LAND_REJECTS = """
insert into forex_data.rejected_messages (source, message_key, payload, reason)
select x.source, x.message_key, x.payload, x.reason
from tick_reject_stage x
where not exists (select 1 from forex_data.rejected_messages r where r.source = x.source)
"""

# The staged ticks whose key already holds other prices, with the reason recorded for each.
_CONFLICTS = """
select s.seq,
    'conflicting duplicate: (' || s.pair_name || ', ' || s.tick_ts
    || ') already landed with bid/ask/spread ' || t.bid_price || '/' || t.ask_price
    || '/' || t.spread
from tick_stage s
join forex_data.ticks t on t.pair_name = s.pair_name and t.tick_ts = s.tick_ts
where (t.bid_price, t.ask_price, t.spread) is distinct from (s.bid_price, s.ask_price, s.spread)
order by s.seq
"""

_LINE = "%d\t%s\t%s\t%s\t%s\t%s\n"
_COPY_TICKS = "copy tick_stage (seq, pair_name, tick_ts, bid_price, ask_price, spread) from stdin"


def _copy_text(text: str) -> str:
    """`text` as a field of COPY's text format."""
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


class TickSink:
    """Lands batches of tick messages; owns one `wtc_analytics` connection."""

    def __init__(self, settings: TickSinkSettings, metrics: Metrics | None = None) -> None:
        self.s = settings
        self.metrics = metrics or Metrics()
        self._conn: psycopg.Connection | None = None
        self._window = TickWindow.of(settings)
        # a tick's pair is one of these (the decoder checks), written as COPY text once
        self._pair_text = {pair: _copy_text(pair) for pair in settings.pairs}

    @property
    def conn(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(
                self.s.analytics_dsn, autocommit=True, application_name="wtc_tick_sink"
            )
            for stmt in _STAGE_SQL:
                self._conn.execute(stmt)
        return self._conn

    def close(self) -> None:
        if self._conn is not None and not self._conn.closed:
            self._conn.close()

    def decode(self, messages: Sequence[Message]) -> Batch:
        """Decode one batch with the one tick decoder: good ticks into the COPY body, each bad
        message into the batch's rejects with its reason (logged here, counted once landed)."""
        batch = Batch(messages)
        lines: list[str] = []
        rejects = batch.rejects
        newest: datetime | None = None
        window, pairs, pair_text = self._window, self.s.pairs, self._pair_text
        for seq, m in enumerate(messages):
            t = decode(decode_tick, m.value, pairs, window)
            if isinstance(t, BadInput):
                # recorded in the batch's transaction, counted after its commit
                poison = Poison(m.topic, m.position, str(t), m.value)
                skip(log, poison, functools.partial(_keep_reject, rejects, m.key))
                continue
            # COPY text: the pair as written above; a datetime, a finite Decimal need no escape
            # (`%` formats them a fifth faster than an f-string, and than psycopg's write_row)
            lines.append(
                _LINE % (seq, pair_text[t.pair_name], t.tick_ts, t.bid_price, t.ask_price, t.spread)
            )
            if newest is None or t.tick_ts > newest:
                newest = t.tick_ts
        batch.body = "".join(lines).encode()
        batch.ticks = len(lines)
        batch.newest = newest
        return batch

    def land(self, messages: Sequence[Message]) -> BatchResult:
        """Land one batch in one transaction; idempotent (a redelivered batch lands nothing)."""
        return self.land_decoded(self.decode(messages))

    def land_decoded(self, batch: Batch) -> BatchResult:
        """Land a decoded batch in one transaction (`batch` is left as it is, for a retry)."""
        messages = batch.messages
        result = BatchResult(messages=len(messages))
        conn = self.conn
        with conn.transaction():
            cur = conn.cursor()
            rejects = batch.rejects
            if batch.ticks:
                with cur.copy(_COPY_TICKS) as copy:
                    copy.write(batch.body)
                try:
                    with conn.transaction():  # a savepoint
                        cur.execute(_INSERT_TICKS, (self.s.topic,))
                except psycopg.errors.UniqueViolation:
                    cur.execute(_LAND_TICKS, (self.s.topic,))
                result.landed = cur.rowcount
                if result.landed < batch.ticks:
                    # the ticks whose key already holds other prices, recorded with their message
                    conflicts = [
                        (f"{m.topic}@{m.position}", _text(m.key), _text(m.value), reason)
                        for seq, reason in cur.execute(_CONFLICTS).fetchall()
                        for m in (messages[seq],)
                    ]
                    rejects = conflicts + rejects
            if rejects:
                with cur.copy(
                    "copy tick_reject_stage (source, message_key, payload, reason) from stdin"
                ) as copy:
                    for row in rejects:
                        copy.write_row(row)
                cur.execute(_LAND_REJECTS)
                result.rejected = cur.rowcount
        # Everything else was here before: a redelivered message or an identical repeat.
        result.duplicates = result.messages - result.landed - result.rejected
        metrics = self.metrics
        metrics.messages.labels("landed").inc(result.landed)
        metrics.messages.labels("duplicate").inc(result.duplicates)
        metrics.messages.labels("rejected").inc(result.rejected)
        metrics.batches.inc()
        if batch.newest is not None and result.landed:
            metrics.last_tick.set(batch.newest.replace(tzinfo=UTC).timestamp())
        return result

    def run(
        self,
        once: bool = False,
        stop: threading.Event | None = None,
        after_db_commit: Callable[[Sequence[Message]], None] | None = None,
    ) -> BatchResult:
        """Consume until drained (`once`) or `stop` is set; returns the totals.

        While one batch lands (on the lander thread), the next is read and decoded; the stream
        is read and committed here, a batch only after its database commit, in order.
        `after_db_commit` runs between the database commit and the stream commit (tests use it
        to simulate a crash there).
        """
        stop = stop or threading.Event()
        total = BatchResult()
        idle_since = time.monotonic()
        # --once: after a poll that drained the stream, look once more without waiting
        drained = False
        landing: _Landing | None = None
        with (
            open_consumer(
                self.s.stream_url,
                [self.s.topic],
                self.s.group,
                consumer_name=self.s.consumer_name,
                start="earliest",
            ) as consumer,
            ThreadPoolExecutor(1, thread_name_prefix="tick-lander") as lander,
        ):
            while not stop.is_set():
                try:
                    timeout = 0.0 if drained else self.s.poll_timeout
                    messages = consumer.poll(self.s.batch_size, timeout)
                except StreamError as exc:
                    if once:
                        raise
                    self._stream_trouble(exc, stop)
                    continue
                if not messages:
                    drained = False
                    if landing is not None:
                        if not self._finish(consumer, landing, total, once, stop, after_db_commit):
                            break
                        landing = None
                    lag = consumer.lag()
                    if lag is not None:
                        self.metrics.lag.set(lag)
                    if once and (lag == 0 or time.monotonic() - idle_since > self.s.idle_timeout):
                        break
                    continue
                drained = once and len(messages) < self.s.batch_size
                idle_since = time.monotonic()
                batch = self.decode(messages)
                if landing is not None and not self._finish(
                    consumer, landing, total, once, stop, after_db_commit
                ):
                    landing = None
                    break
                landing = _Landing(
                    batch,
                    lander.submit(self._land_with_retry, batch, stop, not once),
                    time.monotonic(),
                )
            if landing is not None:  # stopped: the batch in flight lands, then is committed
                self._finish(consumer, landing, total, once, stop, after_db_commit)
        return total

    def _finish(
        self,
        consumer: Consumer,
        landing: _Landing,
        total: BatchResult,
        once: bool,
        stop: threading.Event,
        after_db_commit: Callable[[Sequence[Message]], None] | None,
    ) -> bool:
        """Wait for a batch's database commit, then commit it on the stream; False when the
        lander was stopped while retrying (nothing committed)."""
        result = landing.future.result()
        if result is None:
            return False
        messages = landing.batch.messages
        crash_point("tick_sink.after_db_commit")
        if after_db_commit is not None:
            after_db_commit(messages)
        try:
            consumer.commit(messages)
        except StreamError as exc:
            # Landed but not acknowledged: the batch comes again and lands nothing new.
            if once:
                raise
            self._stream_trouble(exc, stop)
        self.metrics.batch_seconds.observe(time.monotonic() - landing.started)
        lag = consumer.lag()
        if lag is not None:
            self.metrics.lag.set(lag)
        for name in ("messages", "landed", "duplicates", "rejected"):
            setattr(total, name, getattr(total, name) + getattr(result, name))
        log.info(
            "batch landed",
            extra={
                "messages": result.messages,
                "landed": result.landed,
                "duplicates": result.duplicates,
                "rejected": result.rejected,
            },
        )
        return True

    def _stream_trouble(self, exc: Exception, stop: threading.Event) -> None:
        self.metrics.errors.inc()
        wait_to_retry(stop, self.s.retry_seconds, "stream unavailable, retrying", exc)

    def _land_with_retry(
        self, batch: Batch, stop: threading.Event, retry: bool
    ) -> BatchResult | None:
        while True:
            try:
                return self.land_decoded(batch)
            except psycopg.OperationalError as exc:
                self.metrics.errors.inc()
                self.close()
                if not retry:
                    raise
                what = "database unavailable, retrying the batch"
                if wait_to_retry(stop, self.s.retry_seconds, what, exc):
                    return None


@dataclass
class _Landing:
    """A batch handed to the lander thread, and when."""

    batch: Batch
    future: Future[BatchResult | None]
    started: float


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ingestion.tick_sink",
        description=(
            "Land forex ticks from the tick-data stream into forex_data.ticks, exactly once; "
            "bad messages go to forex_data.rejected_messages with a reason. Follows the stream "
            "until SIGTERM/SIGINT, or drains it with --once. Settings come from the "
            "environment: WTC_ANALYTICS_DSN, STREAM_URL (redis://host:port/db or "
            "kafka://host:port,...) and TICK_SINK_* (e.g. TICK_SINK_TOPIC, TICK_SINK_GROUP, "
            "TICK_SINK_BATCH_SIZE)."
        ),
    )
    parser.add_argument("--once", action="store_true", help="drain the stream, then exit")
    parser.add_argument("--topic", help="topic to consume (default tick-data)")
    parser.add_argument("--group", help="consumer group (default wtc-tick-sink)")
    parser.add_argument("--batch-size", type=int, help="messages per batch (default 5000)")
    parser.add_argument("--metrics-port", type=int, help="Prometheus port (default 19102, 0 off)")
    args = parser.parse_args(argv)
    setup_logging()
    settings = TickSinkSettings(
        **cli_overrides(
            topic=args.topic,
            group=args.group,
            batch_size=args.batch_size,
            metrics_port=args.metrics_port,
        )
    )
    stop = stop_on_signals()
    sink = TickSink(settings)
    serve_metrics(
        sink.metrics.registry,
        settings.metrics_host,
        metrics_port(settings.metrics_port, args.once, args.metrics_port),
    )
    try:
        total = sink.run(once=args.once, stop=stop)
    except (StreamError, psycopg.OperationalError) as exc:
        log.error("tick sink failed", extra={"error": str(exc).strip()})
        return 1
    finally:
        sink.close()
    log.info(
        "tick sink finished",
        extra={
            "messages": total.messages,
            "landed": total.landed,
            "duplicates": total.duplicates,
            "rejected": total.rejected,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
