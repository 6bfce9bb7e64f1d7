"""The HVS consumer's loop: poll the stream, apply batches to Redis, commit, until stopped.

A batch is committed to the stream only after Redis applied it, so a crash anywhere re-delivers
at most what then turns out to be already applied (see `hvs.store`).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import redis

from common.service import backoff
from hvs.metrics import BATCH_SECONDS, ERRORS, LAG, RATE
from hvs.settings import HvsSettings
from hvs.store import BatchResult, Hvs, Paused, Prepared
from ingestion.stream import Consumer, Message, StreamError, backend, open_consumer

log = logging.getLogger("hvs.runner")


DRAIN_GRACE = 10.0
"""--drain: with the lag unknown (Kafka before its assignment), stop after this long idle."""


PAUSE_POLL = 0.05
"""Seconds between attempts while a rebuild holds the HVS (`hvs:pause`)."""

T = TypeVar("T")


class _Stopped(Exception):
    """Stop was requested while a failing step was being retried."""


def _retry(stop: threading.Event, what: str, fn: Callable[[], T]) -> T:
    """`fn()` until it succeeds; Redis or the stream unreachable is retried with backoff, never
    skipped. Raises `_Stopped` when `stop` is set while waiting."""
    attempt = 0
    paused = False
    while True:
        try:
            return fn()
        except Paused:  # a rebuild writes a day (seconds): wait for it, no error
            if not paused:
                log.info(f"{what}: the HVS is paused by a rebuild, waiting")
                paused = True
            if stop.wait(PAUSE_POLL):
                raise _Stopped from None
        except (redis.RedisError, StreamError) as exc:
            attempt += 1
            ERRORS.labels(what).inc()
            log.error(f"{what} failed, retrying", extra={"error": str(exc)})
            if stop.wait(backoff(attempt, first=0.5, longest=10.0)):
                raise _Stopped from exc


def stream_options(settings: HvsSettings, drain: bool) -> dict[str, Any]:
    """The consumer's options for the stream backend. Redis Streams: consumers gone for
    `gone_after_ms` give up their pending entries and leave the group; with `drain`, a consumer
    idle `drain_gone_after_ms` counts as gone, looked for every half second, so that a drain
    takes a dead consumer's entries at once. (Kafka: the broker removes a member after its
    session timeout and hands its partitions on; nothing to set.)"""
    if backend(settings.stream_url) == "kafka":
        return {}
    if drain:
        return {"gone_after_ms": settings.drain_gone_after_ms, "claim_interval": 0.5}
    return {"gone_after_ms": settings.gone_after_ms}


def run(
    settings: HvsSettings,
    stop: threading.Event,
    *,
    drain: bool = False,
    consumer: Consumer | None = None,
    hvs: Hvs | None = None,
) -> int:
    """Poll, apply, commit until `stop` is set (or, with `drain`, until the stream is empty).

    Three stages overlap: a reader thread polls ahead (at most two batches), the calling thread
    decodes and builds a batch, and a worker thread applies the previous one to Redis and
    commits it. A batch is committed to the stream only after Redis
    applied it; a failing step is retried with backoff until it succeeds or `stop` is set
    (then it stays uncommitted and comes back after a restart). On stop, the batch in flight is
    finished first. Returns the number of CDR events applied.
    """
    hvs = hvs or Hvs(settings)
    consumer = consumer or open_consumer(
        settings.stream_url,
        [settings.data_topic, settings.voice_topic, settings.tick_topic],
        settings.group,
        consumer_name=settings.consumer_name,
        **stream_options(settings, drain),
    )
    total = 0
    window_start, window_events = time.monotonic(), 0
    inflight: Future[BatchResult] | None = None

    def apply_commit(prep: Prepared, batch: list[Message]) -> BatchResult:
        t0 = time.perf_counter()
        res = _retry(stop, "apply", lambda: hvs.apply_prepared(prep))
        _retry(stop, "commit", lambda: consumer.commit(batch))
        BATCH_SECONDS.observe(time.perf_counter() - t0)
        return res

    def finish() -> None:
        nonlocal inflight, total, window_start, window_events
        if inflight is None:
            return
        fut, inflight = inflight, None
        res = fut.result()
        total += res.applied
        window_events += res.applied + res.ticks
        elapsed = time.monotonic() - window_start
        if elapsed >= 1.0:
            RATE.set(window_events / elapsed)
            window_start, window_events = time.monotonic(), 0

    batches: queue.Queue[list[Message] | None] = queue.Queue(maxsize=2)

    def poller() -> None:
        """Stage 1: read batches ahead (bounded: two), so the stream's round trip overlaps."""
        next_lag = 0.0
        last_message = time.monotonic()
        try:
            while not stop.is_set():
                batch = _retry(
                    stop, "poll", lambda: consumer.poll(settings.batch_size, settings.poll_timeout)
                )
                now = time.monotonic()
                lag = None
                if now >= next_lag or not batch:
                    lag = consumer.lag()
                    if lag is not None:
                        LAG.set(lag)
                    next_lag = now + 2.0
                batches.put(batch)
                if batch:
                    last_message = now
                elif drain and (lag == 0 or (lag is None and now - last_message > DRAIN_GRACE)):
                    break  # the group has nothing left (Kafka: no assignment/lag known yet)
        except _Stopped:
            pass
        except BaseException:
            log.exception("polling the stream failed")
            raise
        finally:
            batches.put(None)

    pool = ThreadPoolExecutor(1, thread_name_prefix="hvs-apply")
    reader = threading.Thread(target=poller, name="hvs-poll", daemon=True)
    reader.start()
    try:
        while True:
            batch = batches.get()
            if batch is None:
                break
            if not batch:
                finish()
                RATE.set(0)
                continue
            if hvs.pending_hours and any(m.topic == settings.tick_topic for m in batch):
                finish()  # pricing pending WAK must see the batch in flight
            prep = _retry(stop, "prepare", functools.partial(hvs.prepare, batch))
            finish()
            inflight = pool.submit(apply_commit, prep, batch)
        finish()
    except _Stopped:
        log.warning("stopped while retrying; the uncommitted batch will be re-delivered")
    finally:
        if reader.is_alive():  # left early: let the reader finish its poll, drop what it read
            stop.set()
            while reader.is_alive():
                with contextlib.suppress(queue.Empty):
                    batches.get(timeout=0.1)
        pool.shutdown(wait=True)
        consumer.close()
    return total


def tune_gc() -> None:
    """Fewer cyclic-GC passes: a batch allocates many short-lived containers and no cycles, and
    the default gen-0 threshold (700) makes the collector run every few events."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
