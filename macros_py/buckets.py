"""Time buckets: floor a naive UTC timestamp to a window start (windows are [start, start + width)).

SQL twin: `date_trunc('minute'|'hour'|'day', ts)` and
`date_bin(interval '15 minutes' | '30 minutes', ts, timestamp '2000-01-01')`.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta

MINUTE = timedelta(minutes=1)
MIN15 = timedelta(minutes=15)
MIN30 = timedelta(minutes=30)
HOUR = timedelta(hours=1)
DAY = timedelta(days=1)

# Names used by the marts (cdr_usage_15min, forex_ohlc_m1, ...).
WIDTHS: dict[str, timedelta] = {
    "1min": MINUTE,
    "m1": MINUTE,
    "15min": MIN15,
    "30min": MIN30,
    "m30": MIN30,
    "1h": HOUR,
    "h1": HOUR,
    "1d": DAY,
}


def _naive(ts: datetime) -> datetime:
    if not isinstance(ts, datetime):
        raise TypeError(f"expected a datetime, got {type(ts).__name__} {ts!r}")
    if ts.tzinfo is not None:
        raise ValueError(f"timestamps are naive UTC; got an aware datetime {ts!r}")
    return ts


def floor_minute(ts: datetime) -> datetime:
    return _naive(ts).replace(second=0, microsecond=0)


def floor_15min(ts: datetime) -> datetime:
    ts = _naive(ts)
    return ts.replace(minute=ts.minute - ts.minute % 15, second=0, microsecond=0)


def floor_30min(ts: datetime) -> datetime:
    ts = _naive(ts)
    return ts.replace(minute=ts.minute - ts.minute % 30, second=0, microsecond=0)


def floor_hour(ts: datetime) -> datetime:
    return _naive(ts).replace(minute=0, second=0, microsecond=0)


def floor_day(ts: datetime) -> datetime:
    return _naive(ts).replace(hour=0, minute=0, second=0, microsecond=0)


_FLOORS = {MINUTE: floor_minute, MIN15: floor_15min, MIN30: floor_30min, HOUR: floor_hour}
_FLOORS[DAY] = floor_day


def width_of(width: str | timedelta) -> timedelta:
    """The timedelta of a width given by name ('15min', 'h1', ...) or as a timedelta."""
    if isinstance(width, str):
        try:
            return WIDTHS[width.lower()]
        except KeyError:
            raise ValueError(f"unknown width {width!r}; known: {sorted(WIDTHS)}") from None
    if width not in _FLOORS:
        raise ValueError(f"unsupported width {width!r}; supported: 1 min, 15 min, 30 min, 1 h, 1 d")
    return width


def floor_function(width: str | timedelta) -> Callable[[datetime], datetime]:
    """The floor function of a width, for loops that bucket many timestamps."""
    return _FLOORS[width_of(width)]


def floor_to(ts: datetime, width: str | timedelta) -> datetime:
    """The start of the window of `width` that contains `ts`."""
    return _FLOORS[width_of(width)](ts)
