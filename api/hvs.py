"""The HVS consumer: CDR events and forex ticks from the stream into daily usage in Redis.

    python -m api.hvs              # follow the stream until SIGTERM / Ctrl-C
    python -m api.hvs --drain      # apply what is on the stream, then exit

Per msisdn, day, category and usage type it keeps events, bytes (up, down, total), call seconds
and the cost in ZAR and WAK (api/keys.py has the layout, docs/usage-api.md the rules).

Exactly-once effect: every event has an id (CDR: `source_file:line_no`, a bit in a per-file
bitmap; tick: pair, hour and 10 ms slot). One Lua script checks the batch's bits, and only if none
is set yet sets them all and applies all the batch's increments, atomically; if some are set
(a redelivery or a republish), it changes nothing and returns them, and the batch is rebuilt
without them. The stream is committed only after Redis answered, so a crash anywhere re-delivers
at most what then turns out to be already applied.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import logging
import queue
import signal
import threading
import time
from bisect import bisect_right
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

import orjson
import redis

try:
    from hiredis import pack_command as _pack_command
except ImportError:  # pragma: no cover - hiredis is a dependency
    _pack_command = None
from prometheus_client import Counter, Gauge, Histogram, start_http_server

from api import keys as K
from api.settings import HvsSettings
from ingestion.stream import Consumer, Message, StreamError, open_consumer
from macros_py.currency import MRVZAR, PAIRS, WAKMRV, zar_per_wak, zar_to_wak
from macros_py.numeric import div10
from macros_py.tariffs import call_cost_zar, data_cost_zar

log = logging.getLogger("api.hvs")

# ------------------------------------------------------------------------------------- metrics

EVENTS = Counter("hvs_events_total", "Stream messages handled", ["topic", "outcome"])
BATCHES = Counter("hvs_batches_total", "Batches applied to Redis")
ERRORS = Counter("hvs_errors_total", "Failed batch attempts (retried)", ["kind"])
LAG = Gauge("hvs_lag_messages", "Stream entries not yet applied and committed by the group")
RATE = Gauge("hvs_events_per_second", "Events applied per second over the last interval")
LATENCY = Histogram(
    "hvs_landing_to_applied_seconds",
    "Time from a CDR file landing (loaded_at, else publish time) to its events applied",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 900),
)
LAST_LATENCY = Gauge(
    "hvs_landing_to_applied_last_seconds", "Landing-to-applied time of the latest batch (max)"
)
BATCH_SECONDS = Histogram(
    "hvs_batch_seconds",
    "Time to apply one batch",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
PENDING_HOURS = Gauge("hvs_wak_pending_hours", "Usage hours whose WAK cost waits for a rate")

# --------------------------------------------------------------------------------- Lua script

# One flat ARGV list, no JSON (decoding JSON in Lua cost as much as the increments):
#   ttl,
#   nfiles, then per bitmap: key, nruns, first, last, ... (runs of consecutive offsets),
#   nhashes, then per hash: key, nnew, nincr, then nnew + nincr times field, n,
#   nsets, then per member: set key, member.
# A run is checked with one BITCOUNT and set with SETRANGE (whole bytes) and SETBIT (its ends);
# single offsets are checked and set with one BITFIELD per bitmap. A hash's first `nnew` fields
# are a usage group's event count and the fields always written with it: if HINCRBY of the count
# created it, the others do not exist either and one HSET writes them (a new group: one call
# instead of up to five). The other `nincr` fields are HINCRBY'd. Returns, for the bits that
# were set already, `bitmap number, offset` pairs (1-based bitmap number, in ARGV order); if
# there is any, nothing was changed. Keys travel in ARGV (one Redis instance, not Redis Cluster).
APPLY_LUA = """
local ttl = ARGV[1]
local nfiles = tonumber(ARGV[2])
local dups, files = {}, {}
local i = 3
local function getbits(key, f, offs)
  local n = #offs
  for s = 1, n, 1000 do
    local args = {}
    for j = s, math.min(s + 999, n) do
      args[#args + 1] = 'GET'; args[#args + 1] = 'u1'; args[#args + 1] = offs[j]
    end
    local got = redis.call('BITFIELD', key, unpack(args))
    for k = 1, #got do
      if got[k] == 1 then dups[#dups + 1] = f; dups[#dups + 1] = offs[s + k - 1] end
    end
  end
end
for f = 1, nfiles do
  local key, nruns = ARGV[i], tonumber(ARGV[i + 1])
  local singles, runs = {}, {}
  i = i + 2
  for _ = 1, nruns do
    local a, b = tonumber(ARGV[i]), tonumber(ARGV[i + 1])
    i = i + 2
    if a == b then
      singles[#singles + 1] = a
    else
      runs[#runs + 1] = a; runs[#runs + 1] = b
      if redis.call('BITCOUNT', key, a, b, 'BIT') > 0 then
        local offs = {}
        for o = a, b do offs[#offs + 1] = o end
        getbits(key, f, offs)
      end
    end
  end
  getbits(key, f, singles)
  files[f] = {key, singles, runs}
end
if #dups > 0 then return dups end
for _, file in ipairs(files) do
  local key, singles, runs = file[1], file[2], file[3]
  local n = #singles
  for s = 1, n, 1000 do
    local args = {}
    for j = s, math.min(s + 999, n) do
      args[#args + 1] = 'SET'; args[#args + 1] = 'u1'; args[#args + 1] = singles[j]
      args[#args + 1] = 1
    end
    redis.call('BITFIELD', key, unpack(args))
  end
  for r = 1, #runs, 2 do
    local a, b = runs[r], runs[r + 1]
    local first, last = math.floor((a + 7) / 8), math.floor((b + 1) / 8) - 1
    if first > last then
      for o = a, b do redis.call('SETBIT', key, o, 1) end
    else
      for o = a, first * 8 - 1 do redis.call('SETBIT', key, o, 1) end
      redis.call('SETRANGE', key, first, string.rep('\\255', last - first + 1))
      for o = (last + 1) * 8, b do redis.call('SETBIT', key, o, 1) end
    end
  end
  redis.call('EXPIRE', key, ttl)
end
local nhashes = tonumber(ARGV[i])
i = i + 1
for _ = 1, nhashes do
  local key, nnew, nincr = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  i = i + 3
  if nnew > 0 then
    local n = ARGV[i + 1]
    if redis.call('HINCRBY', key, ARGV[i], n) == tonumber(n) and nnew > 1 then
      redis.call('HSET', key, unpack(ARGV, i + 2, i + 2 * nnew - 1))
    else
      for j = i + 2, i + 2 * nnew - 1, 2 do
        redis.call('HINCRBY', key, ARGV[j], ARGV[j + 1])
      end
    end
    i = i + 2 * nnew
  end
  for _ = 1, nincr do
    redis.call('HINCRBY', key, ARGV[i], ARGV[i + 1])
    i = i + 2
  end
  redis.call('EXPIRE', key, ttl)
end
local nsets = tonumber(ARGV[i])
i = i + 1
for _ = 1, nsets do
  redis.call('SADD', ARGV[i], ARGV[i + 1])
  redis.call('EXPIRE', ARGV[i], ttl)
  i = i + 2
end
return dups
"""


# ------------------------------------------------------------------------------------ decoding


class BadEvent(ValueError):
    """A stream message that cannot be applied; the reason says why."""


@dataclass(slots=True)
class CdrEvent:
    msisdn: str
    category: str  # 'data' | 'call'
    usage_type: str
    up: int
    down: int
    seconds: int
    day: str  # YYYYmmdd
    hour: str  # YYYYmmddHH
    source_file: str
    line_no: int
    landed_at: float | None  # epoch seconds of the file landing / publish


@dataclass(slots=True)
class TickEvent:
    pair: str
    hour: str
    slot: int  # 10 ms slot within the hour
    price_sum: int  # bid + ask, 1e-10 units


_DATA_TOPICS = {"cdr-data": "data", "cdr-voice": "call"}


def _text(obj: dict, name: str) -> str:
    v = obj.get(name)
    if type(v) is not str or not v:
        raise BadEvent(f"{name} missing or not a string")
    return v


def _count(obj: dict, name: str) -> int:
    v = obj.get(name)
    if type(v) is int and v >= 0:
        return v
    if type(v) is str and v.isascii() and v.isdigit():
        return int(v)
    raise BadEvent(f"{name} must be an integer >= 0, got {v!r}")


def _when(obj: dict, name: str) -> datetime:
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


def landed_at(obj: dict, headers: dict[str, bytes], position: str) -> float | None:
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


def _usage_type(obj: dict, name: str) -> str:
    v = _text(obj, name)
    if v in _TYPE_OK:
        return v
    if not (len(v) <= 32 and v.isascii() and v.replace("_", "").isalnum()):
        raise BadEvent(f"{name} must be a short word, got {v!r}")
    if len(_TYPE_OK) < 256:
        _TYPE_OK.add(v)
    return v


def _load_object(value: bytes) -> dict:
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
_DAY_HOUR: dict[str, tuple[str, str]] = {}
"""`YYYY-mm-dd HH` of valid event times in the publisher's form -> (day, hour)."""


def cdr_row(obj: dict, category: str) -> CdrRow:
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
    v = obj.get(when)
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


def decode_cdr(msg: Message, category: str | None = None) -> CdrEvent:
    """The one place that knows the CDR event encoding: a JSON object of the typed raw row
    (columns of cdr_data.data_records / voice_records) plus `event_id` = `source_file:line_no`
    and optionally `loaded_at` (see `cdr_row`, `landed_at`)."""
    category = category or _DATA_TOPICS.get(msg.topic)
    if category is None:
        raise BadEvent(f"not a CDR topic: {msg.topic!r}")
    obj = _load_object(msg.value)
    msisdn, day, category, usage_type, up, down, seconds, hour, source_file, line_no = cdr_row(
        obj, category
    )
    return CdrEvent(
        msisdn,
        category,
        usage_type,
        up,
        down,
        seconds,
        day,
        hour,
        source_file,
        line_no,
        landed_at(obj, msg.headers, msg.position),
    )


def _price_units(obj: dict, name: str) -> int:
    v = obj.get(name)
    if isinstance(v, bool) or not isinstance(v, int | float | str):
        raise BadEvent(f"{name} missing or not a number")
    try:
        d = Decimal(repr(v)) if isinstance(v, float) else Decimal(str(v))
        units = K.to_units(d)
    except (InvalidOperation, ValueError):
        raise BadEvent(f"{name} is not a price with at most 10 decimals: {v!r}") from None
    if units <= 0:
        raise BadEvent(f"{name} must be positive, got {v!r}")
    return units


def decode_tick(msg: Message) -> TickEvent:
    """A tick of the data contract: {"timestamp", "pair_name", "bid_price", "ask_price", ...}."""
    try:
        obj = orjson.loads(msg.value)
    except orjson.JSONDecodeError as exc:
        raise BadEvent(f"value is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise BadEvent("value is not a JSON object")
    pair = _text(obj, "pair_name")
    if pair not in PAIRS:
        raise BadEvent(f"unknown pair {pair!r}")
    ts = _when(obj, "timestamp")
    ms = (ts.minute * 60 + ts.second) * 1000 + ts.microsecond // 1000
    return TickEvent(
        pair=pair,
        hour=ts.strftime("%Y%m%d%H"),
        slot=ms // K.FX_SLOT_MS,
        price_sum=_price_units(obj, "bid_price") + _price_units(obj, "ask_price"),
    )


# --------------------------------------------------------------------------------------- costs


@functools.lru_cache(maxsize=8192)
def call_zar_units(seconds: int) -> int:
    """ZAR cost of one call (macros_py.tariffs), in 1e-10 units."""
    return K.to_units(call_cost_zar(seconds))


def _linear_data_units() -> int | None:
    """1e-10 ZAR units per byte if the data tariff is exactly linear at 10 decimals (SI GB)."""
    try:
        unit = K.to_units(data_cost_zar(1))
    except ValueError:
        return None
    probes = (999_999_937, 10**9, 123_456_789_012, 1_999_999)
    if unit and all(K.to_units(data_cost_zar(b)) == b * unit for b in probes):
        return unit
    return None


_DATA_UNITS_PER_BYTE = _linear_data_units()


def data_zar_units(total_bytes: int) -> int:
    """ZAR cost of one data event (macros_py.tariffs), in 1e-10 units.

    With the SI GB the tariff is an exact per-byte price (0.000000049 ZAR), so this is
    `bytes * units per byte`, derived from the tariff function itself and checked at import
    (and in tests) to equal `data_cost_zar(bytes)`; otherwise the function is called per event.
    """
    if _DATA_UNITS_PER_BYTE is not None and total_bytes >= 0:
        return total_bytes * _DATA_UNITS_PER_BYTE
    return K.to_units(data_cost_zar(total_bytes))


def wak_units(zar_units: int, rate_units: int) -> int:
    """WAK cost (1e-10 units) of a ZAR cost (1e-10 units) at a ZAR-per-WAK rate (1e-10 units).

    This is `macros_py.currency.zar_to_wak` (`div10(zar, rate)`: the exact quotient rounded once
    to 10 decimals, half away from zero) on integer units; tests hold the two equal.
    """
    q, r = divmod(zar_units * 10**K.MONEY_SCALE, rate_units)
    return q + 1 if 2 * r >= rate_units else q


def wak_units_oracle(zar_units: int, rate_units: int) -> int:
    """`wak_units` through macros_py.currency.zar_to_wak (slow; used by tests and pricing)."""
    return K.to_units(zar_to_wak(K.money(zar_units), K.money(rate_units)))


def _hour_number(hour: str) -> int:
    return int((datetime.strptime(hour, "%Y%m%d%H") - _EPOCH).total_seconds()) // 3600


_EPOCH = datetime(1970, 1, 1)


class Rates:
    """Hourly tick sums per pair and the as-of ZAR-per-WAK rate of an hour (business rules 6).

    The rate of hour h uses, per pair, the average mid of the latest hour <= h with ticks of that
    pair, as far as the ticks are known when asked (the current hour's average moves as ticks
    arrive). No tick of a pair at or before h: no rate.
    """

    def __init__(self) -> None:
        self._sums: dict[str, dict[str, list[int]]] = {p: {} for p in PAIRS}
        self._hours: dict[str, list[str]] = {p: [] for p in PAIRS}
        self._cache: dict[str, int | None] = {}

    def add(self, pair: str, hour: str, price_sum: int, count: int = 1) -> None:
        sums = self._sums[pair]
        acc = sums.get(hour)
        if acc is None:
            sums[hour] = [price_sum, count]
            hours = self._hours[pair]
            hours.insert(bisect_right(hours, hour), hour)
        else:
            acc[0] += price_sum
            acc[1] += count
        self._cache.clear()

    def mid(self, pair: str, hour: str) -> Decimal | None:
        hours = self._hours[pair]
        i = bisect_right(hours, hour)
        if not i:
            return None
        total, count = self._sums[pair][hours[i - 1]]
        return div10(K.money(total), 2 * count)

    def rate(self, hour: str) -> int | None:
        """ZAR per WAK (1e-10 units) for usage in `hour` (`YYYYmmddHH`), or None."""
        try:
            return self._cache[hour]
        except KeyError:
            pass
        mrv, wak = self.mid(MRVZAR, hour), self.mid(WAKMRV, hour)
        r = K.to_units(zar_per_wak(mrv, wak)) if mrv is not None and wak is not None else None
        self._cache[hour] = r
        return r

    def load(self, raw: dict[bytes, bytes]) -> None:
        """Replace what is known with the `hvs:fx` hash (shared by all consumers)."""
        self._sums = {p: {} for p in PAIRS}
        self._hours = {p: [] for p in PAIRS}
        self._cache.clear()
        got: dict[tuple[str, str], list[int]] = {}
        for f, v in raw.items():
            hour, pair, what = f.decode().split(":")
            acc = got.setdefault((pair, hour), [0, 0])
            acc[0 if what == "s" else 1] = int(v)
        for (pair, hour), (s, n) in got.items():
            if pair in self._sums and n > 0:
                self.add(pair, hour, s, n)

    def prune(self, keep_hours: int) -> list[str]:
        """Forget hours more than `keep_hours` before the newest; the `hvs:fx` fields to delete."""
        newest = max((h[-1] for h in self._hours.values() if h), default=None)
        if newest is None:
            return []
        cutoff = _hour_number(newest) - keep_hours
        gone = []
        for pair, hours in self._hours.items():
            while hours and _hour_number(hours[0]) < cutoff:
                h = hours.pop(0)
                del self._sums[pair][h]
                gone += [K.fx_field(h, pair, "s"), K.fx_field(h, pair, "n")]
        if gone:
            self._cache.clear()
        return gone


# ------------------------------------------------------------------------------------ consumer


@dataclass
class BatchResult:
    applied: int = 0
    duplicates: int = 0
    rejected: int = 0
    ticks: int = 0


@dataclass(slots=True)
class Built:
    """A batch's Redis work, in the script's terms (see APPLY_LUA)."""

    bits: dict[str, dict[int, int]]  # bitmap key -> {offset: item number}
    incr: list[str | int]  # per hash: key, nnew, nincr, field, n, field, n, ... (APPLY_LUA)
    hashes: int
    sadd: list[tuple[str, str]]
    hours: set[str]  # hours with WAK pending


@dataclass
class Prepared:
    rows: list[CdrRow]
    built: Built | None
    result: BatchResult
    landed: dict[str, float]  # source file -> when it landed (its first event in the batch)


_NO_RATE_YET = -1
_FIELDS: dict[tuple[str, str], tuple[str, ...]] = {}


def _fields(category: str, usage_type: str) -> tuple[str, ...]:
    """The usage fields (ev, up, dn, by, s, zar, wak, zp) of one category and usage type."""
    names = _FIELDS.get((category, usage_type))
    if names is None:
        metrics = (K.EVENTS, K.UP, K.DOWN, K.BYTES, K.SECONDS, K.ZAR, K.WAK, K.ZAR_PENDING)
        names = tuple(K.usage_field(category, usage_type, m) for m in metrics)
        if len(_FIELDS) < 1024:
            _FIELDS[(category, usage_type)] = names
    return names


def _runs(offsets: list[int]) -> list[int]:
    """[first, last, first, last, ...] of the runs of consecutive values in sorted `offsets`."""
    if offsets[-1] - offsets[0] == len(offsets) - 1:  # one run (a file's lines in order)
        return [offsets[0], offsets[-1]]
    out = []
    start = prev = offsets[0]
    for o in offsets:
        if o > prev + 1:
            out += (start, prev)
            start = o
        prev = o
    out += (start, prev)
    return out


class Hvs:
    """Applies batches of stream messages to Redis (no stream I/O here; see `run`)."""

    def __init__(self, settings: HvsSettings, client: redis.Redis | None = None) -> None:
        self.settings = settings
        self.redis = client or redis.Redis.from_url(settings.redis_url)
        self._apply = self.redis.register_script(APPLY_LUA)
        self.rates = Rates()
        self.pending_hours: set[str] = set()
        self._next_refresh = 0.0
        self.refresh()
        self._ttl = settings.retention_seconds
        self._topics = {settings.data_topic: "data", settings.voice_topic: "call"}

    # -- applying ---------------------------------------------------------------------------

    def refresh(self) -> None:
        """Reload the rates and the pending-WAK hours from Redis: several consumers of one group
        share the work, and each sees only part of the ticks."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(K.FX_KEY)
        pipe.smembers(K.PENDING_INDEX)
        fx, pending = pipe.execute()
        self.rates.load(fx)
        self.pending_hours = {h.decode() for h in pending}

    def _run_script(
        self,
        bits: dict[str, dict[int, int]],
        hashes: int,
        incr: list[str | int],
        sadd: Sequence[tuple[str, str]] = (),
    ) -> set[int]:
        """Apply atomically unless a bit is set already; the item numbers whose bits were set.

        `bits`: bitmap key -> {offset: item number}; `incr`: `hashes` times key, nnew, nincr,
        field, n, ... (see APPLY_LUA)
        """
        args: list[str | int] = [self._ttl, len(bits)]
        for key, offsets in bits.items():
            runs = _runs(sorted(offsets))
            args += (key, len(runs) // 2, *runs)
        args.append(hashes)
        args += incr
        args.append(len(sadd))
        for member in sadd:
            args += member
        got = self._call_script(args)
        if not got:
            return set()
        maps = list(bits.values())
        return {maps[int(got[j]) - 1][int(got[j + 1])] for j in range(0, len(got), 2)}

    def _call_script(self, args: list[str | int]) -> Any:
        """EVALSHA of APPLY_LUA, packed by hiredis in one call: redis-py's packing inspects every
        argument in Python (tens of thousands per batch). Falls back to redis-py without
        hiredis, or to load the script (NOSCRIPT)."""
        if _pack_command is None:
            return self._apply(args=args)
        packed = _pack_command((b"EVALSHA", self._apply.sha, 0, *args))
        pool = self.redis.connection_pool
        conn = pool.get_connection()
        try:
            conn.send_packed_command((packed,))
            return conn.read_response()
        except redis.exceptions.NoScriptError:
            self._apply.sha = self.redis.script_load(APPLY_LUA)
            return self._apply(args=args)
        except BaseException:
            conn.disconnect()  # a reply may still be on its way: never reuse the connection
            raise
        finally:
            pool.release(conn)

    def apply_ticks(self, ticks: list[TickEvent]) -> tuple[int, int]:
        """Apply ticks exactly once; (applied, duplicates)."""
        dups = 0
        while ticks:
            bits: dict[str, dict[int, int]] = {}
            sums: dict[str, int] = {}
            for i, t in enumerate(ticks):
                bits.setdefault(K.fx_seen_key(t.pair, t.hour), {})[t.slot] = i
                fs, fn = K.fx_field(t.hour, t.pair, "s"), K.fx_field(t.hour, t.pair, "n")
                sums[fs] = sums.get(fs, 0) + t.price_sum
                sums[fn] = sums.get(fn, 0) + 1
            fx: list[str | int] = [K.FX_KEY, 0, len(sums)]
            for f, v in sums.items():
                fx += (f, v)
            seen = self._run_script(bits, 1, fx)
            if not seen:
                break
            dups += len(seen)
            ticks = [t for i, t in enumerate(ticks) if i not in seen]
        for t in ticks:
            self.rates.add(t.pair, t.hour, t.price_sum)
        gone = self.rates.prune(self.settings.retention_days * 24)
        if gone:
            self.redis.hdel(K.FX_KEY, *gone)
        return len(ticks), dups

    def build(self, rows: list[CdrRow], lines: dict[str, dict[int, int]] | None = None) -> Built:
        """The Redis work of a batch of distinct events: one HINCRBY per usage field touched.

        `lines`: source file -> {line_no: index in `rows`}, if the caller has it already.
        """
        groups: dict[tuple[str, str, str, str], list[int]] = {}
        pending: dict[tuple[str, str, str, str, str], int] = {}
        rate_of: dict[str, int | None] = {}
        rates = self.rates
        per_byte, call_units = _DATA_UNITS_PER_BYTE, call_zar_units
        scale = 10**K.MONEY_SCALE
        if lines is None:
            lines = {}
            for i, row in enumerate(rows):
                seen = lines.get(row[8])
                if seen is None:
                    seen = lines[row[8]] = {}
                seen[row[9]] = i
        for msisdn, day, category, usage_type, up, down, seconds, hour, _f, _n in rows:
            if category == "data":
                total = up + down
                zar = total * per_byte if per_byte is not None else data_zar_units(total)
            else:
                zar = call_units(seconds)
            gk = (msisdn, day, category, usage_type)
            acc = groups.get(gk)
            if acc is None:
                acc = groups[gk] = [1, up, down, seconds, zar, 0, 0]
            else:
                acc[0] += 1
                acc[1] += up
                acc[2] += down
                acc[3] += seconds
                acc[4] += zar
            rate = rate_of.get(hour, _NO_RATE_YET)
            if rate == _NO_RATE_YET:
                rate = rate_of[hour] = rates.rate(hour)
            if rate is None:
                acc[6] += zar
                pk = (hour, msisdn, day, category, usage_type)
                pending[pk] = pending.get(pk, 0) + zar
            else:  # wak_units(zar, rate), inlined: rounded once per event
                q, r = divmod(zar * scale, rate)
                acc[5] += q + 1 if 2 * r >= rate else q
        incr: list[str | int] = []
        add = incr.extend
        for (msisdn, day, category, usage_type), (ev, up, dn, s, zar, wk, zp) in groups.items():
            f = _fields(category, usage_type)
            key = K.usage_key(msisdn, day)
            n = (wk != 0) + (zp != 0)  # wak and zp are also written by price_pending
            if category == "data":
                add((key, 5, n, f[0], ev, f[1], up, f[2], dn, f[3], up + dn, f[5], zar))
            else:
                add((key, 3, n, f[0], ev, f[4], s, f[5], zar))
            if wk:
                add((f[6], wk))
            if zp:
                add((f[7], zp))
        hashes = len(groups)
        sadd: list[tuple[str, str]] = []
        hours: set[str] = set()
        if pending:
            by_hour: dict[str, list[str | int]] = {}
            for (hour, msisdn, day, category, usage_type), zar in pending.items():
                field = K.pending_field(K.usage_key(msisdn, day), category, usage_type)
                by_hour.setdefault(hour, []).extend((field, zar))
            for hour, fv in by_hour.items():
                add((K.pending_key(hour), 0, len(fv) // 2, *fv))
                hours.add(hour)
                sadd.append((K.PENDING_INDEX, hour))
            hashes += len(by_hour)
        bits = {K.seen_key(source_file): offsets for source_file, offsets in lines.items()}
        return Built(bits, incr, hashes, sadd, hours)

    def apply_events(self, rows: list[CdrRow], built: Built | None = None) -> tuple[int, int]:
        """Apply CDR events (distinct) exactly once; (applied, duplicates). `built`:
        `build(rows)`."""
        dups = 0
        while rows:
            built = built or self.build(rows)
            seen = self._run_script(built.bits, built.hashes, built.incr, built.sadd)
            if not seen:
                break
            dups += len(seen)
            rows = [row for i, row in enumerate(rows) if i not in seen]
            built = None
        return len(rows), dups

    def price_pending(self) -> int:
        """Convert waiting ZAR to WAK for hours that have a rate now; the hours converted."""
        done = 0
        for hour in sorted(self.pending_hours):
            rate = self.rates.rate(hour)
            if rate is None:
                continue
            pkey = K.pending_key(hour)
            with self.redis.pipeline() as pipe:
                while True:
                    try:
                        pipe.watch(pkey)
                        entries = pipe.hgetall(pkey)
                        pipe.multi()
                        for f, v in entries.items():
                            key, category, usage_type = K.split_pending_field(f.decode())
                            zar = int(v)
                            p = f"{category}:{usage_type}:"
                            pipe.hincrby(key, p + K.WAK, wak_units_oracle(zar, rate))
                            pipe.hincrby(key, p + K.ZAR_PENDING, -zar)
                            pipe.expire(key, self._ttl)
                        pipe.delete(pkey)
                        pipe.srem(K.PENDING_INDEX, hour)
                        pipe.execute()
                        break
                    except redis.WatchError:
                        continue
            self.pending_hours.discard(hour)
            done += 1
            log.info("priced pending WAK", extra={"hour": hour, "entries": len(entries)})
        return done

    def reject(self, msg: Message, reason: str) -> None:
        entry = orjson.dumps(
            {
                "topic": msg.topic,
                "position": msg.position,
                "reason": reason,
                "value": msg.value.decode(errors="replace")[:2000],
                "rejected_at": time.time(),
            }
        )
        pipe = self.redis.pipeline(transaction=False)
        pipe.lpush(K.REJECTED_KEY, entry)
        pipe.ltrim(K.REJECTED_KEY, 0, K.REJECTED_MAX - 1)
        pipe.execute()
        log.warning(
            "rejected stream message",
            extra={"topic": msg.topic, "position": msg.position, "reason": reason},
        )

    def prepare(self, messages: Sequence[Message]) -> Prepared:
        """Decode and de-duplicate a batch, apply its ticks (so that its events see them), price
        pending WAK that has a rate now, and build the events' increments."""
        res = BatchResult()
        ticks: dict[tuple[str, str, int], TickEvent] = {}
        rows: list[CdrRow] = []
        lines: dict[str, dict[int, int]] = {}  # source file -> {line_no: index in rows}
        landed: dict[str, float] = {}
        tick_topic = self.settings.tick_topic
        topics = self._topics
        loads, decode_error, row_of = orjson.loads, orjson.JSONDecodeError, cdr_row
        for m in messages:
            topic = m.topic
            try:
                if topic == tick_topic:
                    t = decode_tick(m)
                    if ticks.setdefault((t.pair, t.hour, t.slot), t) is not t:
                        res.duplicates += 1
                    continue
                category = topics.get(topic) or _DATA_TOPICS.get(topic)
                if category is None:
                    raise BadEvent(f"not a CDR topic: {topic!r}")
                try:
                    obj = loads(m.value)
                except decode_error:
                    obj = None
                if type(obj) is not dict:
                    obj = _load_object(m.value)  # raises with the reason
                row = row_of(obj, category)
            except BadEvent as exc:
                self.reject(m, str(exc))
                res.rejected += 1
                EVENTS.labels(topic, "rejected").inc()
                continue
            seen = lines.get(row[8])
            if seen is None:
                seen = lines[row[8]] = {}
                # a file's first event in the batch: its landing time (the same for all its
                # events, or the earliest publish time on a stream read in order)
                when = landed_at(obj, m.headers, m.position)
                if when is not None:
                    landed[row[8]] = when
            elif row[9] in seen:
                res.duplicates += 1
                continue
            seen[row[9]] = len(rows)
            rows.append(row)
        if ticks:
            applied, dups = self.apply_ticks(list(ticks.values()))
            res.ticks = applied
            res.duplicates += dups
            EVENTS.labels(tick_topic, "applied").inc(applied)
        now = time.monotonic()
        if now >= self._next_refresh:
            self.refresh()
            self._next_refresh = now + self.settings.refresh_seconds
        if any(self.rates.rate(h) is not None for h in self.pending_hours):
            self.price_pending()
        built = None
        if rows:
            built = self.build(rows, lines)
            self.pending_hours |= built.hours
        PENDING_HOURS.set(len(self.pending_hours))
        return Prepared(rows, built, res, landed)

    def apply_prepared(self, prep: Prepared) -> BatchResult:
        """Apply a prepared batch's events (exactly once) and record the metrics."""
        res = prep.result
        if prep.rows:
            applied, dups = self.apply_events(prep.rows, prep.built)
            res.applied = applied
            res.duplicates += dups
            if prep.landed:
                now = time.time()
                worst = 0.0
                for t in prep.landed.values():
                    LATENCY.observe(now - t)
                    worst = max(worst, now - t)
                LAST_LATENCY.set(worst)
            EVENTS.labels("cdr", "applied").inc(applied)
        EVENTS.labels("all", "duplicate").inc(res.duplicates)
        BATCHES.inc()
        return res

    def process(self, messages: Sequence[Message]) -> BatchResult:
        """Prepare and apply one batch."""
        return self.apply_prepared(self.prepare(messages))


# ---------------------------------------------------------------------------------- follow loop


DRAIN_GRACE = 10.0
"""--drain: with the lag unknown (Kafka before its assignment), stop after this long idle."""


class _Stopped(Exception):
    """Stop was requested while a failing step was being retried."""


def _retry(stop: threading.Event, what: str, fn: Callable[[], Any]) -> Any:
    delay = 0.5
    while True:
        try:
            return fn()
        except (redis.RedisError, StreamError) as exc:
            ERRORS.labels(what).inc()
            log.error(f"{what} failed, retrying", extra={"error": str(exc)})
            if stop.wait(delay):
                raise _Stopped from exc
            delay = min(delay * 2, 10.0)


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
    )
    total = 0
    window_start, window_events = time.monotonic(), 0
    inflight: Future | None = None

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
            prep = _retry(stop, "prepare", lambda b=batch: hvs.prepare(b))
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


_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def _block_stop_signals() -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)


def _supervise(settings: HvsSettings, processes: int, drain: bool) -> int:
    """Start `processes` consumers of the group, pass SIGTERM/SIGINT on, wait for all."""
    import os
    import socket
    import subprocess
    import sys

    base = settings.consumer_name or f"{socket.gethostname()}-{os.getpid()}"
    children = []
    for i in range(processes):
        env = dict(os.environ, HVS_CONSUMER_NAME=f"{base}-{i}")
        env["HVS_METRICS_PORT"] = str(settings.metrics_port + i if settings.metrics_port else 0)
        if settings.batch_size:
            env["HVS_BATCH_SIZE"] = str(settings.batch_size)
        cmd = [sys.executable, "-m", "api.hvs", *(["--drain"] if drain else [])]
        # a stop signal that arrives while a child is still importing waits (blocked) until
        # the child's handler is in place: it then stops cleanly instead of dying silently
        children.append(subprocess.Popen(cmd, env=env, preexec_fn=_block_stop_signals))

    def _forward(signum: int, _frame: object) -> None:
        log.info("stopping the consumers", extra={"signal": signum})
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, _forward)
    signal.signal(signal.SIGINT, _forward)
    log.info("hvs consumers started", extra={"processes": processes, "names": f"{base}-N"})
    codes = [child.wait() for child in children]
    return max(128 - code if code < 0 else code for code in codes)  # killed by a signal: 128+N


def main(argv: list[str] | None = None) -> int:
    from common.logs import setup_logging

    parser = argparse.ArgumentParser(
        prog="python -m api.hvs",
        description="HVS consumer: CDR events and ticks from the stream into daily usage in Redis "
        "(REDIS_URL, STREAM_URL, HVS_* settings).",
    )
    parser.add_argument("--drain", action="store_true", help="exit once the stream is empty")
    parser.add_argument("--batch-size", type=int, help="messages per batch (HVS_BATCH_SIZE)")
    parser.add_argument(
        "--metrics-port", type=int, help="Prometheus port, 0 = none (HVS_METRICS_PORT)"
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        help="run N consumer processes in the group (names <name>-<i>, metrics on port + i)",
    )
    args = parser.parse_args(argv)
    setup_logging()
    overrides: dict[str, Any] = {}
    if args.batch_size:
        overrides["batch_size"] = args.batch_size
    if args.metrics_port is not None:
        overrides["metrics_port"] = args.metrics_port
    settings = HvsSettings(**overrides)
    if args.processes > 1:
        return _supervise(settings, args.processes, args.drain)
    tune_gc()
    if settings.metrics_port:
        start_http_server(settings.metrics_port, addr=settings.metrics_host)
    stop = threading.Event()

    def _stop(signum: int, _frame: object) -> None:
        log.info("stopping after the current batch", extra={"signal": signum})
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)  # blocked by `_supervise`
    log.info(
        "hvs consumer starting",
        extra={"stream": settings.stream_url, "group": settings.group, "drain": args.drain},
    )
    t0 = time.monotonic()
    total = run(settings, stop, drain=args.drain)
    log.info(
        "hvs consumer stopped",
        extra={"events_applied": total, "seconds": round(time.monotonic() - t0, 3)},
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
