"""Forex source stand-in: ticks for MRVZAR and WAKMRV in the starter's JSON, for topic `tick-data`.

Key: a JSON-encoded string `"MRVZAR-2024-01-01 00:00"` (pair and minute). Value:
`{"timestamp": "2024-01-01 00:00:00.570000", "pair_name": "MRVZAR", "bid_price": 1.7168,
"ask_price": 1.7598, "spread": 0.043}`. A step every 500 ms +/- 100 ms emits both pairs with the
same timestamp. `starter`: independent draws (bid uniform 1.0..2.0, spread 0.01..0.05); `realistic`:
a bounded random walk of the bid within the same range.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta

from ingestion.generators.common import STARTER_START, Pace, Pacer, Profile

log = logging.getLogger(__name__)

PAIRS = ("MRVZAR", "WAKMRV")
TOPIC = "tick-data"
MIN_BID, MAX_BID = 1.0, 2.0
MIN_SPREAD, MAX_SPREAD = 0.01, 0.05
MALFORMED_KINDS = ("not_json", "missing_field", "bad_timestamp", "negative_price", "unknown_pair")


@dataclass(frozen=True)
class ForexConfig:
    """Knobs of the tick generator; the defaults are the starter's run (691 200 messages, 48 h)."""

    profile: Profile = Profile.STARTER
    seed: int = 0
    start: datetime = STARTER_START
    duration: timedelta = timedelta(hours=48)
    step_ms: int = 500
    jitter_ms: int = 100
    pace: Pace = Pace.FAST
    speed: float = 1.0
    malformed_rate: float = 0.0
    walk_step: float = 0.002

    def __post_init__(self) -> None:
        object.__setattr__(self, "profile", Profile(self.profile))
        object.__setattr__(self, "pace", Pace(self.pace))
        if self.seed < 0:
            raise ValueError("seed must be >= 0")
        if not 0 <= self.jitter_ms < self.step_ms:
            raise ValueError("need 0 <= jitter_ms < step_ms")
        if not 0.0 <= self.malformed_rate <= 1.0:
            raise ValueError("malformed_rate must be within 0..1")


def tick_key(pair: str, ts: datetime) -> bytes:
    """The message key: the JSON-encoded string `"<pair>-YYYY-mm-dd HH:MM"`."""
    return json.dumps(f"{pair}-{ts:%Y-%m-%d %H:%M}").encode()


def tick_value(pair: str, ts: datetime, bid: float, spread: float) -> bytes:
    """The message value in the contract's JSON (4-decimal floats, 6-digit fraction)."""
    bid, spread = round(bid, 4), round(spread, 4)
    return json.dumps(
        {
            "timestamp": ts.strftime("%Y-%m-%d %H:%M:%S.%f"),
            "pair_name": pair,
            "bid_price": bid,
            "ask_price": round(bid + spread, 4),
            "spread": spread,
        }
    ).encode()


def _malform(rng: random.Random, value: bytes) -> bytes:
    kind = MALFORMED_KINDS[rng.randrange(len(MALFORMED_KINDS))]
    if kind == "not_json":
        return value[: len(value) // 2]
    record = json.loads(value)
    if kind == "missing_field":
        del record["bid_price"]
    elif kind == "bad_timestamp":
        record["timestamp"] = "2024-13-45 25:61:00.000000"
    elif kind == "negative_price":
        record["bid_price"] = -record["bid_price"]
    else:
        record["pair_name"] = "XXXYYY"
    return json.dumps(record).encode()


def tick_steps(config: ForexConfig) -> Iterator[tuple[datetime, list[tuple[bytes, bytes]]]]:
    """Yield `(timestamp, [(key, value) per pair])` per step, paced to the simulated clock."""
    rng = random.Random(f"forex-{config.seed}-{config.profile}")
    faults = random.Random(f"forex-malformed-{config.seed}")
    pacer = Pacer(config.pace, config.start, config.speed)
    end = config.start + config.duration
    walk = {pair: rng.uniform(MIN_BID, MAX_BID) for pair in PAIRS}
    ts = config.start
    while True:
        step = rng.randint(config.step_ms - config.jitter_ms, config.step_ms + config.jitter_ms)
        ts = ts + timedelta(milliseconds=step)
        if ts >= end:
            return
        messages = []
        for pair in PAIRS:
            if config.profile is Profile.REALISTIC:
                bid = walk[pair] + rng.gauss(0.0, config.walk_step)
                bid = min(MAX_BID, max(MIN_BID, bid))
                walk[pair] = bid
            else:
                bid = rng.uniform(MIN_BID, MAX_BID)
            spread = rng.uniform(MIN_SPREAD, MAX_SPREAD)
            value = tick_value(pair, ts, bid, spread)
            if config.malformed_rate and faults.random() < config.malformed_rate:
                value = _malform(faults, value)
            messages.append((tick_key(pair, ts), value))
        pacer.wait_until(ts)
        yield ts, messages


def tick_messages(config: ForexConfig) -> Iterator[tuple[bytes, bytes]]:
    """Yield `(key, value)` for every tick, both pairs per step, in time order."""
    for _, messages in tick_steps(config):
        yield from messages


def publish_ticks(
    config: ForexConfig,
    stream_url: str,
    topic: str = TOPIC,
    progress: Callable[[int], None] | None = None,
    batch: int = 5000,
) -> int:
    """Publish the ticks to `topic` through `ingestion.stream` (`redis://` or `kafka://` URL).

    Fast pace publishes in batches of `batch` messages; realtime pace publishes every step as its
    time comes. Returns the number of messages published.
    """
    from ingestion.stream import open_producer

    total = 0
    chunk: list[tuple[bytes | None, bytes, dict[str, bytes] | None]] = []
    limit = 1 if config.pace is Pace.REALTIME else batch
    with open_producer(stream_url) as producer:
        for _, messages in tick_steps(config):
            chunk.extend((key, value, None) for key, value in messages)
            if len(chunk) >= limit:
                total += producer.publish_many(topic, chunk)
                if progress:
                    progress(len(chunk))
                chunk = []
        if chunk:
            total += producer.publish_many(topic, chunk)
            if progress:
                progress(len(chunk))
        producer.flush()
    log.info("ticks published", extra={"messages": total, "topic": topic})
    return total
