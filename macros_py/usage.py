"""CDR usage per window, msisdn, category and usage type (cdr_usage_15min / _30min / _1h).

Also the per-event measure the streaming consumer adds to the daily usage in the HVS.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal

from macros_py.buckets import floor_function, floor_to, width_of
from macros_py.records import DataRecord, Record, VoiceRecord
from macros_py.tariffs import cost_zar


@dataclass(frozen=True, slots=True)
class UsageRow:
    window_start: datetime
    msisdn: str
    category: str
    usage_type: str
    events: int
    up_bytes: int
    down_bytes: int
    total_bytes: int
    seconds: int
    cost_zar: Decimal

    @property
    def key(self) -> tuple[datetime, str, str, str]:
        return (self.window_start, self.msisdn, self.category, self.usage_type)


@dataclass(frozen=True, slots=True)
class Measure:
    """What one event adds to the usage API: `total` in `measure` ('bytes' or 'seconds')."""

    category: str
    usage_type: str
    total: int
    measure: str


def event_measure(record: Record) -> Measure:
    """Data: up + down bytes; call: call_duration_sec seconds."""
    if isinstance(record, DataRecord):
        return Measure("data", record.data_type, record.total_bytes, "bytes")
    if isinstance(record, VoiceRecord):
        return Measure("call", record.call_type, record.call_duration_sec, "seconds")
    raise TypeError(f"expected a DataRecord or VoiceRecord, got {type(record).__name__}")


def _finish(acc: dict[tuple[datetime, str, str, str], list[int]]) -> list[UsageRow]:
    rows = []
    for key in sorted(acc):
        events, up, down, seconds = acc[key]
        window_start, msisdn, category, usage_type = key
        total = up + down
        rows.append(
            UsageRow(
                window_start=window_start,
                msisdn=msisdn,
                category=category,
                usage_type=usage_type,
                events=events,
                up_bytes=up,
                down_bytes=down,
                total_bytes=total,
                seconds=seconds,
                cost_zar=cost_zar(category, total, seconds),
            )
        )
    return rows


def usage_windows(records: Iterable[Record], width: str | timedelta) -> list[UsageRow]:
    """One row per (window_start, msisdn, category, usage_type), sorted by that key.

    Calls count wholly in the window of their start; bytes are 0 for calls, seconds 0 for data;
    the cost is the tariff of the row's summed bytes or seconds.
    """
    floor = floor_function(width)
    acc: dict[tuple[datetime, str, str, str], list[int]] = {}
    for r in records:
        if isinstance(r, DataRecord):
            key = (floor(r.event_datetime), r.msisdn, "data", r.data_type)
            up, down, seconds = r.up_bytes, r.down_bytes, 0
        elif isinstance(r, VoiceRecord):
            key = (floor(r.start_time), r.msisdn, "call", r.call_type)
            up, down, seconds = 0, 0, r.call_duration_sec
        else:
            raise TypeError(f"expected a DataRecord or VoiceRecord, got {type(r).__name__}")
        a = acc.get(key)
        if a is None:
            acc[key] = [1, up, down, seconds]
        else:
            a[0] += 1
            a[1] += up
            a[2] += down
            a[3] += seconds
    return _finish(acc)


def roll_up(rows: Iterable[UsageRow], width: str | timedelta) -> list[UsageRow]:
    """Larger windows from smaller ones: sums re-billed (the cost is never summed)."""
    w = width_of(width)
    acc: dict[tuple[datetime, str, str, str], list[int]] = {}
    for r in rows:
        start = floor_to(r.window_start, w)
        key = (start, r.msisdn, r.category, r.usage_type)
        a = acc.setdefault(key, [0, 0, 0, 0])
        a[0] += r.events
        a[1] += r.up_bytes
        a[2] += r.down_bytes
        a[3] += r.seconds
    return _finish(acc)
