"""The one decoder of each message kind the HVS consumer reads: CDR events and forex ticks.

A message that cannot be applied raises `BadEvent` with the reason; the consumer records it and
goes on. The hot path (`load_cdr`, `cdr_row`) works on plain tuples with few calls.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson

from common.poison import BadInput
from hvs import keys as K
from ingestion import tick_format
from ingestion.stream import Message
from ingestion.tick_format import TickWindow
from macros_py.currency import PAIRS


class BadEvent(BadInput):
    """A stream message that cannot be applied; the reason says why (bad data: recorded and
    skipped, see common.poison)."""


@dataclass(slots=True)
class TickEvent:
    pair: str
    hour: str
    slot: int  # FX_SLOT_MS slot within the hour
    price_sum: int  # bid + ask, 1e-10 units


CDR_TOPICS = {"cdr-data": "data", "cdr-voice": "call"}

JsonObject = dict[str, Any]
"""A decoded JSON object: its values are checked where they are read."""


def _text(obj: JsonObject, name: str) -> str:
    v = obj.get(name)
    if type(v) is not str or not v:
        raise BadEvent(f"{name} missing or not a string")
    return v


def _count(obj: JsonObject, name: str) -> int:
    v = obj.get(name)
    if type(v) is int and v >= 0:
        return v
    if type(v) is str and v.isascii() and v.isdigit():
        return int(v)
    raise BadEvent(f"{name} must be an integer >= 0, got {v!r}")


def _when(obj: JsonObject, name: str) -> datetime:
    v = _text(obj, name)
    try:
        ts = datetime.fromisoformat(v)
    except ValueError:
        raise BadEvent(f"{name} is not a timestamp: {v!r}") from None
    if ts.tzinfo is not None:
        raise BadEvent(f"{name} must be naive UTC, got {v!r}")
    return ts


@functools.lru_cache(maxsize=4096)
def _epoch(value: str) -> float | None:
    try:
        return float(value)
    except ValueError:
        pass
    try:
        ts = datetime.fromisoformat(value)
    except ValueError:
        return None
    return (ts if ts.tzinfo else ts.replace(tzinfo=UTC)).timestamp()


def landed_at(obj: JsonObject, headers: dict[str, bytes], position: str) -> float | None:
    """When the event's file landed: `loaded_at` in the value or a header, else `published_at`
    header, else the Redis stream entry id's publish time (ms)."""
    v = obj.get("loaded_at")
    if v is not None and type(v) is not bool and isinstance(v, str | int | float):
        return _epoch(str(v))
    if headers:
        for name in ("loaded_at", "published_at"):
            h = headers.get(name)
            if h:
                return _epoch(h.decode(errors="replace"))
    ms, sep, seq = position.partition("-")
    if sep and ms.isdigit() and seq.isdigit():
        return int(ms) / 1000.0
    return None


_TYPE_OK: set[str] = set()


def _usage_type(obj: JsonObject, name: str) -> str:
    v = _text(obj, name)
    if v in _TYPE_OK:
        return v
    if not (len(v) <= 32 and v.isascii() and v.replace("_", "").isalnum()):
        raise BadEvent(f"{name} must be a short word, got {v!r}")
    if len(_TYPE_OK) < 256:
        _TYPE_OK.add(v)
    return v


def _load_object(value: bytes) -> JsonObject:
    try:
        obj = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise BadEvent(f"value is not JSON: {exc}") from None
    if type(obj) is not dict:
        raise BadEvent("value is not a JSON object")
    return obj


CdrRow = tuple[str, str, str, str, int, int, int, str, str, int]
"""A checked CDR event: (msisdn, day, category, usage_type, up, down, seconds, hour,
source_file, line_no); `day` is YYYYmmdd, `hour` YYYYmmddHH."""

_fromisoformat = datetime.fromisoformat
_loads, _JSONDecodeError = orjson.loads, orjson.JSONDecodeError
_DAY_HOUR: dict[str, tuple[str, str]] = {}
"""`YYYY-mm-dd HH` of valid event times in the publisher's form -> (day, hour)."""


def cdr_row(obj: JsonObject, category: str) -> CdrRow:
    """The checked fields of a decoded CDR event object (`category` 'data' or 'call'); raises
    BadEvent with the reason. The consumer's per-event path: plain tuples, few calls."""
    msisdn = obj.get("msisdn")
    if not (
        type(msisdn) is str and 0 < len(msisdn) <= 15 and msisdn.isascii() and msisdn.isdigit()
    ):
        raise BadEvent(f"msisdn must be up to 15 digits, got {msisdn!r}")
    event_id = obj.get("event_id")
    if type(event_id) is not str or not event_id:
        event_id = _text(obj, "event_id")  # raises with the reason
    source_file, sep, line = event_id.rpartition(":")
    if not (sep and source_file and line.isascii() and line.isdigit()):
        raise BadEvent(f"event_id must be 'source_file:line_no', got {obj['event_id']!r}")
    seconds: object  # an int once checked, as `up` and `down`
    if category == "data":
        up = obj.get("up_bytes")
        if type(up) is not int or up < 0:
            up = _count(obj, "up_bytes")
        down = obj.get("down_bytes")
        if type(down) is not int or down < 0:
            down = _count(obj, "down_bytes")
        seconds = 0
        usage_type = obj.get("data_type")
        if type(usage_type) is not str or usage_type not in _TYPE_OK:
            usage_type = _usage_type(obj, "data_type")
        when = "event_datetime"
    else:
        up = down = 0
        seconds = obj.get("call_duration_sec")
        if type(seconds) is not int or seconds < 0:
            seconds = _count(obj, "call_duration_sec")
        usage_type = obj.get("call_type")
        if type(usage_type) is not str or usage_type not in _TYPE_OK:
            usage_type = _usage_type(obj, "call_type")
        when = "start_time"
    v: Any = obj.get(when)  # a str once `_fromisoformat` or `_when` has taken it
    try:
        ts = _fromisoformat(v)
    except (TypeError, ValueError):
        ts = None
    if ts is None or ts.tzinfo is not None:
        ts = _when(obj, when)  # raises with the reason
    day_hour = _DAY_HOUR.get(v[:13])
    if day_hour is not None:
        day, hour = day_hour
    elif len(v) >= 19 and v[4] == "-" and v[7] == "-" and v[13] == ":":
        day = v[0:4] + v[5:7] + v[8:10]  # the publisher's form: slicing is cheaper
        hour = day + v[11:13]
        if len(_DAY_HOUR) < 100_000:
            _DAY_HOUR[v[:13]] = (day, hour)
    else:
        day = f"{ts.year:04d}{ts.month:02d}{ts.day:02d}"
        hour = f"{day}{ts.hour:02d}"
    return (msisdn, day, category, usage_type, up, down, seconds, hour, source_file, int(line))


def load_cdr(value: bytes, category: str) -> tuple[CdrRow, JsonObject]:
    """The checked row and the decoded object of one CDR event's bytes (`category` 'data' or
    'call'); raises BadEvent with the reason. The consumer's hot path calls this per event.

    The CDR event encoding: a JSON object of the typed raw row (columns of
    cdr_data.data_records / voice_records) plus `event_id` = `source_file:line_no` and
    optionally `loaded_at` (read by `landed_at`)."""
    try:
        obj = _loads(value)
    except _JSONDecodeError:
        obj = None
    if type(obj) is not dict:
        obj = _load_object(value)  # raises with the reason
    return cdr_row(obj, category), obj


def cdr_category(topic: str, topics: dict[str, str] | None = None) -> str:
    """'data' or 'call' for a CDR topic (`topics`: configured names first); raises BadEvent."""
    category = (topics and topics.get(topic)) or CDR_TOPICS.get(topic)
    if category is None:
        raise BadEvent(f"not a CDR topic: {topic!r}")
    return category


def decode_tick(msg: Message, window: TickWindow | None = None) -> TickEvent:
    """A tick, read by the one tick decoder (`ingestion.tick_format`, the tick sink's too), as
    the HVS keeps it: hour, slot (FX_SLOT_MS) and bid + ask in 1e-10 units. Raises BadInput (a
    `BadTick`) with the reason."""
    t = tick_format.decode_tick(msg.value, PAIRS, window or _DEFAULT_WINDOW)
    return tick_event(t.pair_name, t.tick_ts, t.bid_price, t.ask_price)


def tick_event(pair: str, ts: datetime, bid: Decimal, ask: Decimal) -> TickEvent:
    """A decoded tick as the HVS keeps it (the stream's and the rebuild's, from the raw table)."""
    ms = (ts.minute * 60 + ts.second) * 1000 + ts.microsecond // 1000
    return TickEvent(
        pair,
        f"{ts.year:04d}{ts.month:02d}{ts.day:02d}{ts.hour:02d}",  # strftime's %Y%m%d%H
        ms // K.FX_SLOT_MS,
        K.to_units(bid + ask),  # exact: both have at most MONEY_SCALE decimals (the decoder's)
    )


_DEFAULT_WINDOW = tick_format.TickWindow()
