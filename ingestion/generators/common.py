"""Pieces shared by the three source generators: profiles, the subscriber pool, the clock, pacing.

Every generator draws from its own seeded generator object (`random.Random` or numpy's
`Generator`), never from global random state: the same seed and knobs give the same output.
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta
from enum import StrEnum

import numpy as np

STARTER_START = datetime(2024, 1, 1, 0, 0, 0)
"""The starter's simulated clock origin (CRM and forex); CDR windows start one window later."""

MSISDN_DIGITS = 13
LEADING_ZERO_SHARE = 0.10


class Profile(StrEnum):
    """`starter`: the starter's distributions; `realistic`: locality, daily rhythm, late rows."""

    STARTER = "starter"
    REALISTIC = "realistic"


class Pace(StrEnum):
    """`fast`: as fast as possible; `realtime`: sleep so output follows the simulated clock."""

    FAST = "fast"
    REALTIME = "realtime"


def numpy_rng(seed: int, stream: str) -> np.random.Generator:
    """A numpy generator for one named stream of one seed (independent of other streams)."""
    return np.random.default_rng([seed, *stream.encode()])


def random_numbers(rng: np.random.Generator, n: int) -> np.ndarray:
    """`n` random 13-digit numbers as int64; about 10 % have a (single) leading zero."""
    lead0 = rng.random(n) < LEADING_ZERO_SHARE
    low = np.where(lead0, 10 ** (MSISDN_DIGITS - 2), 10 ** (MSISDN_DIGITS - 1))
    high = np.where(lead0, 10 ** (MSISDN_DIGITS - 1), 10**MSISDN_DIGITS)
    return rng.integers(low, high, dtype=np.int64)


def format_numbers(values: np.ndarray) -> list[str]:
    """13-digit text with leading zeros kept."""
    return [str(v).zfill(MSISDN_DIGITS) for v in values.tolist()]


_POOL_CACHE: dict[tuple[int, int], list[str]] = {}


def subscriber_pool(seed: int, subscribers: int) -> list[str]:
    """The subscribers' msisdns: a function of seed and count only, shared by CDR and CRM.

    13-digit distinct strings, about 10 % with a leading zero, in a fixed order.
    """
    if subscribers < 1:
        raise ValueError("subscribers must be at least 1")
    key = (seed, subscribers)
    if key not in _POOL_CACHE:
        rng = numpy_rng(seed, "subscriber-pool")
        seen: set[int] = set()
        ordered: list[int] = []
        while len(ordered) < subscribers:
            for value in random_numbers(rng, subscribers - len(ordered)).tolist():
                if value not in seen:
                    seen.add(value)
                    ordered.append(value)
        _POOL_CACHE[key] = [str(v).zfill(MSISDN_DIGITS) for v in ordered]
    return list(_POOL_CACHE[key])


def format_timestamps(epoch_us: np.ndarray) -> list[str]:
    """`YYYY-mm-dd HH:MM:SS.ffffff` (as `str(datetime)`: without the fraction when it is 0) of
    microseconds since 1970-01-01 (naive UTC)."""
    text = np.datetime_as_string(epoch_us.astype("datetime64[us]"), unit="us")
    return [
        s[:-7].replace("T", " ") if s.endswith(".000000") else s.replace("T", " ") for s in text
    ]


def to_epoch_us(ts: datetime) -> int:
    return int((ts - datetime(1970, 1, 1)) // timedelta(microseconds=1))


class Pacer:
    """Sleeps so that simulated time advances with wall time (`realtime`), or not at all (`fast`).

    `speed` > 1 runs the simulated clock faster than the wall clock in realtime pace.
    """

    def __init__(self, pace: Pace | str, sim_start: datetime, speed: float = 1.0) -> None:
        if speed <= 0:
            raise ValueError("speed must be positive")
        self.pace = Pace(pace)
        self.sim_start = sim_start
        self.speed = speed
        self._wall_start: float | None = None

    def wait_until(self, sim_time: datetime) -> None:
        """Block until the wall clock reaches `sim_time` (realtime pace only)."""
        if self.pace is Pace.FAST:
            return
        now = time.monotonic()
        if self._wall_start is None:
            self._wall_start = now
        due = self._wall_start + (sim_time - self.sim_start).total_seconds() / self.speed
        if due > now:
            time.sleep(due - now)
