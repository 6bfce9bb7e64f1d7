"""The forex tick message, written once: the one decoder of a `tick-data` message.

The tick sink (raw landing) and the HVS consumer both decode ticks here, so they accept the same
ticks and read the same numbers from them. Pure: bytes in, a `Tick` or a `BadTick` with the
reason out (see common.poison).

A tick is one flat JSON object of the data contract:
`{"timestamp", "pair_name", "bid_price", "ask_price", "spread"}`. The checks, in order:

- size at most `MAX_BYTES` and nesting at most `MAX_DEPTH`, on the bytes before parsing;
- JSON (UTF-8), numbers read as exact decimals, `NaN`/`Infinity` refused;
- the fields present, the pair one of the configured pairs;
- the timestamp in the written form (`cdr_format.TIMESTAMP_PATTERN`, naive UTC) and within the
  plausible window (`TickWindow`: by default not before 2000, not more than a day ahead);
- prices: numbers (not strings), bid and ask positive, spread not negative, ask not below bid,
  each at most `PRICE_MAX` with at most `PRICE_DECIMALS` decimals (so `1e400` and `1e-400` are
  refused by every reader alike).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from common.poison import BadInput, check_json_shape
from common.settings import TickRules
from ingestion.cdr_format import TIMESTAMP_PATTERN

FIELDS = ("timestamp", "pair_name", "bid_price", "ask_price", "spread")
PRICE_FIELDS = ("bid_price", "ask_price", "spread")
MAX_BYTES = 4096
"""A contract tick is about 130 bytes; anything near this is not a tick."""
MAX_DEPTH = 2
"""A tick is one flat object; a little room for a nested extra field."""
PRICE_DECIMALS = 10
"""The HVS keeps money as integer 1e-10 units; a finer price would be read differently."""
PRICE_MAX = Decimal(1_000_000)
_QUANTUM = Decimal(1).scaleb(-PRICE_DECIMALS)
_TS_RE = re.compile(TIMESTAMP_PATTERN)


class BadTick(BadInput):
    """A message that is not a valid tick; the text is the reason stored with it."""


@dataclass(frozen=True, slots=True)
class Tick:
    pair_name: str
    tick_ts: datetime
    bid_price: Decimal
    ask_price: Decimal
    spread: Decimal


@dataclass(frozen=True, slots=True)
class TickWindow:
    """The plausible tick times: from `not_before`, up to `max_ahead` past the wall clock."""

    not_before: datetime = datetime(2000, 1, 1)
    max_ahead: timedelta = timedelta(days=1)

    @classmethod
    def of(cls, rules: TickRules) -> TickWindow:
        return cls(rules.tick_not_before, timedelta(seconds=rules.tick_max_ahead_seconds))

    def check(self, ts: datetime, now: datetime | None = None) -> None:
        if ts < self.not_before:
            raise BadTick(f"timestamp {ts} is before {self.not_before} (WTC_TICK_NOT_BEFORE)")
        now = now or datetime.now(UTC).replace(tzinfo=None)
        if ts > now + self.max_ahead:
            raise BadTick(
                f"timestamp {ts} is more than {self.max_ahead} ahead of the clock "
                "(WTC_TICK_MAX_AHEAD_SECONDS)"
            )


def _no_constants(name: str) -> Decimal:
    raise BadTick(f"not a finite number: {name}")


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _price(obj: dict[str, object], name: str) -> Decimal:
    v = obj[name]
    if isinstance(v, bool) or not isinstance(v, int | Decimal):
        raise BadTick(f"{name} is not a number: {_short(v)}")
    d = Decimal(v)
    if name == "spread":
        if d < 0:
            raise BadTick(f"negative spread: {d}")
    elif d <= 0:
        raise BadTick(f"non-positive price: {name}={d}")
    if d > PRICE_MAX or d.quantize(_QUANTUM) != d:  # quantize: d is small enough here
        raise BadTick(
            f"{name} out of range: a number up to {PRICE_MAX} with at most {PRICE_DECIMALS} "
            f"decimals, got {_short(d)}"
        )
    exponent = d.as_tuple().exponent
    # equal to itself at 10 decimals: written with at most 10 (0E-20000 is stored as 0E-10)
    return d.quantize(_QUANTUM) if isinstance(exponent, int) and exponent < -10 else d


_PRICE = rb"((?:0|[1-9][0-9]{0,5})(?:\.[0-9]{1,10})?)"
_CONTRACT_RE = re.compile(
    rb'\{"timestamp": "([0-9]{4}-[0-9]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]{1,6})?)", '
    rb'"pair_name": "([A-Za-z0-9_/-]{1,32})", "bid_price": ' + _PRICE + rb", "
    rb'"ask_price": ' + _PRICE + rb', "spread": ' + _PRICE + rb"\}"
)
"""A tick exactly as the contract's producers write it (`json.dumps` of the five fields, prices
of at most 6 integer and 10 decimal digits, no sign, no exponent): every such value is valid JSON
within the size and depth limits, and each of its prices passes the range and decimals checks."""

_LIMITS: dict[timedelta, tuple[float, datetime]] = {}
"""max_ahead -> (wall clock seconds, that clock as a naive UTC datetime + max_ahead)."""


def _latest_allowed(max_ahead: timedelta) -> datetime | None:
    """`now + max_ahead` of a wall clock read at most a second ago and not after now (so never
    later than the exact bound), or None when there is none to reuse."""
    t = time.time()
    got = _LIMITS.get(max_ahead)
    if got is not None and 0.0 <= t - got[0] < 1.0:
        return got[1]
    at = datetime.fromtimestamp(t, UTC).replace(tzinfo=None)
    _LIMITS[max_ahead] = (t, at + max_ahead)
    return None


def _decode_contract(
    value: bytes, pairs: Collection[str], window: TickWindow, now: datetime | None
) -> Tick | None:
    """The fast path: a tick in the contract's own form, which every check passes; None for
    anything else (the full decoder then decides, and gives the reason)."""
    m = _CONTRACT_RE.fullmatch(value)
    if m is None:
        return None
    ts_text, pair_b, bid_b, ask_b, spread_b = m.groups()
    pair = pair_b.decode()
    if pair not in pairs:
        return None
    try:
        tick_ts = datetime.fromisoformat(ts_text.decode())
    except ValueError:
        return None
    latest = now + window.max_ahead if now is not None else _latest_allowed(window.max_ahead)
    if latest is None or tick_ts < window.not_before or tick_ts > latest:
        return None
    bid, ask = Decimal(bid_b.decode()), Decimal(ask_b.decode())
    if not bid or ask < bid:  # a zero bid, or inverted prices
        return None
    return Tick(pair, tick_ts, bid, ask, Decimal(spread_b.decode()))


def decode_tick(
    value: bytes, pairs: Collection[str], window: TickWindow, now: datetime | None = None
) -> Tick:
    """The tick in one message value, or `BadTick` with the reason (see the module doc).

    A value in the contract's own form takes a fast path (a regular expression in place of the
    JSON parser and the checks it makes redundant); the result is the same (tested)."""
    return _decode_contract(value, pairs, window, now) or decode_tick_checked(
        value, pairs, window, now
    )


def decode_tick_checked(
    value: bytes, pairs: Collection[str], window: TickWindow, now: datetime | None = None
) -> Tick:
    """`decode_tick` by the JSON parser and every check, whatever the value's form."""
    check_json_shape(value, MAX_BYTES, MAX_DEPTH)
    try:
        obj = json.loads(value, parse_float=Decimal, parse_constant=_no_constants)
    except BadTick:
        raise
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadTick(f"not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise BadTick(f"not a JSON object but {type(obj).__name__}")
    missing = [f for f in FIELDS if obj.get(f) is None]
    if missing:
        raise BadTick(f"missing field(s): {', '.join(missing)}")
    pair = obj["pair_name"]
    if not isinstance(pair, str) or pair not in pairs:
        raise BadTick(f"unknown pair {_short(pair)} (expected one of {', '.join(pairs)})")
    ts = obj["timestamp"]
    if not isinstance(ts, str) or not _TS_RE.fullmatch(ts):
        raise BadTick(f"bad timestamp {_short(ts)}: expected 'YYYY-mm-dd HH:MM:SS[.ffffff]'")
    try:
        tick_ts = datetime.fromisoformat(ts)
    except ValueError as exc:
        raise BadTick(f"bad timestamp {_short(ts)}: {exc}") from None
    window.check(tick_ts, now)
    bid, ask, spread = (_price(obj, name) for name in PRICE_FIELDS)
    if ask < bid:
        raise BadTick(f"inverted prices: ask_price {ask} < bid_price {bid}")
    return Tick(pair, tick_ts, bid, ask, spread)
