"""The HVS Redis key layout, written once: the consumer writes it, the API reads it.

All keys live in the HVS database (REDIS_URL, db 0) under the prefix `hvs:`.

- `hvs:u:{msisdn}:{YYYYmmdd}` (hash): the usage of one subscriber-day, one field per category,
  usage type and metric (`usage_field`): two letters for the contract's usage types (`ve` =
  data video events; `USAGE_CODES`, `METRIC_CODES`), `{category}:{usage_type}:{metric}` for any
  other type. Short names keep a subscriber-day's hash small (a listpack of a few hundred
  bytes); readers go through `parse_usage`, which reads the long form too.
- `hvs:seen:{source_file}` (bitmap): bit `line_no` is set once the CDR event
  `{source_file}:{line_no}` is applied.
- `hvs:fx` (hash): tick sums per hour and pair, `{YYYYmmddHH}:{pair}:s` (sum of bid + ask in
  1e-10 units) and `{YYYYmmddHH}:{pair}:n` (tick count).
- `hvs:fxs:{pair}:{YYYYmmddHH}` (bitmap): bit `100 ms slot of the hour` is set once a tick of
  that pair and slot is applied (4.5 kB a pair-hour; `FX_SLOT_MS`).
- `hvs:wakpend` (set): hours (`YYYYmmddHH`) with usage whose WAK cost waits for a rate;
  `hvs:wakpend:{YYYYmmddHH}` (hash): field `{usage key}|{category}:{usage_type}` -> ZAR units
  waiting for that hour's rate.
- `hvs:rejected` (list): rejected stream messages (JSON: topic, position, reason, value), newest
  first, capped at `REJECTED_MAX`.
- `hvs:quarantine:{ms}:{key}` (any type, expires): a key of the layout that held another type
  than the layout says (written there by hand), moved aside by the consumer with its content,
  recorded in `hvs:rejected`; `{ms}` is when.
- `hvs:pause` (hash, field `owner`, expires): set while a rebuild from the raw tables writes a
  day; the consumer's apply script changes nothing while it exists (hvs/rebuild.py).

Metrics of a usage field: `ev` events, `up` / `dn` up and down bytes (data only; their total is
their sum, not stored), `s` call seconds (calls only), `zar` cost in ZAR and `wak` cost in WAK,
both integers in units of 1e-10 (`MONEY_SCALE`), and `zp` the ZAR cost (1e-10 units) of events
whose WAK cost is still pending (no rate known yet). Every key expires `retention` after its
last write.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Final

from macros_py.currency import PAIRS as FX_PAIRS

PREFIX = "hvs:"
MONEY_SCALE: Final = 10
"""Money in Redis is an integer count of 10^-MONEY_SCALE units (ZAR or WAK): exact, HINCRBY."""

FX_KEY = f"{PREFIX}fx"
PENDING_INDEX = f"{PREFIX}wakpend"
REJECTED_KEY = f"{PREFIX}rejected"
REJECTED_MAX = 10_000
PAUSE_KEY = f"{PREFIX}pause"
QUARANTINE_PREFIX = f"{PREFIX}quarantine:"
FX_SLOT_MS = 100
"""Tick de-duplication resolution: ticks of one pair are >= 400 ms apart by the data contract.
(It was 10 ms, under the key `hvs:fxseen:`: a bitmap of 45 kB a pair-hour, 63 B per
subscriber-day at the starter. The key changed with it, so no bit is read at another
resolution; a redelivery across the change can count its ticks again, as a rebuild repairs.)"""

EVENTS = "ev"
UP = "up"
DOWN = "dn"
BYTES = "by"
SECONDS = "s"
ZAR = "zar"
WAK = "wak"
ZAR_PENDING = "zp"


def usage_key(msisdn: str, day: str) -> str:
    """The usage hash of `msisdn` on `day` (`YYYYmmdd`)."""
    return f"{PREFIX}u:{msisdn}:{day}"


USAGE_CODES: Final = {
    ("data", "video"): "v",
    ("data", "audio"): "a",
    ("data", "image"): "i",
    ("data", "text"): "t",
    ("data", "application"): "p",
    ("call", "voice"): "V",
    ("call", "video"): "W",
}
"""One letter for each (category, usage type) of the CDR contract (`ingestion.cdr_format`)."""
METRIC_CODES: Final = {
    EVENTS: "e",
    UP: "u",
    DOWN: "d",
    BYTES: "b",
    SECONDS: "s",
    ZAR: "z",
    WAK: "w",
    ZAR_PENDING: "p",
}
_GROUP_OF_CODE = {code: group for group, code in USAGE_CODES.items()}
_METRIC_OF_CODE = {code: metric for metric, code in METRIC_CODES.items()}


def usage_field(category: str, usage_type: str, metric: str) -> str:
    """The usage hash field of a metric: two letters for a contract usage type, else the long
    form `{category}:{usage_type}:{metric}`."""
    group, code = USAGE_CODES.get((category, usage_type)), METRIC_CODES.get(metric)
    if group is None or code is None:
        return f"{category}:{usage_type}:{metric}"
    return group + code


def split_usage_field(name: str) -> tuple[str, str, str]:
    """(category, usage_type, metric) of a usage hash field, short or long form; ValueError if
    it is neither."""
    if len(name) == 2 and name[0] in _GROUP_OF_CODE and name[1] in _METRIC_OF_CODE:
        return (*_GROUP_OF_CODE[name[0]], _METRIC_OF_CODE[name[1]])
    category, usage_type, metric = name.split(":", 2)
    return category, usage_type, metric


def seen_key(source_file: str) -> str:
    """The bitmap of applied line numbers of one CDR file."""
    return f"{PREFIX}seen:{source_file}"


def fx_field(hour: str, pair: str, what: str) -> str:
    """`what` is `s` (sum of bid + ask, 1e-10 units) or `n` (tick count)."""
    return f"{hour}:{pair}:{what}"


def is_hour(hour: str) -> bool:
    """`YYYYmmddHH` of a real hour (what every hour field and key holds)."""
    if not (len(hour) == 10 and hour.isascii() and hour.isdigit()):
        return False
    try:
        datetime.strptime(hour, "%Y%m%d%H")
    except ValueError:
        return False
    return True


def _small_int(value: bytes, signed: bool = False) -> int | None:
    text = value.decode("ascii", errors="replace")
    digits = text[1:] if signed and text.startswith("-") else text
    if not (0 < len(digits) <= 30 and digits.isdigit()):
        return None
    return int(text)


def parse_fx_entry(field: bytes, value: bytes) -> tuple[str, str, str, int] | str:
    """(hour, pair, `s` or `n`, number) of an `hvs:fx` field and value, or the reason it is
    malformed: a reader of what another process wrote never fails on it."""
    hour, _, rest = field.decode(errors="replace").partition(":")
    pair, _, what = rest.partition(":")
    if not is_hour(hour):
        return "hour is not YYYYmmddHH"
    if pair not in FX_PAIRS:
        return "unknown pair"
    if what not in ("s", "n"):
        return "field is not {hour}:{pair}:s or :n"
    number = _small_int(value)
    if number is None:
        return "value is not an integer >= 0"
    return hour, pair, what, number


def parse_pending_entry(field: bytes, value: bytes) -> tuple[str, str, str, int] | str:
    """(usage key, category, usage_type, ZAR units) of an `hvs:wakpend:{hour}` entry, or the
    reason it is malformed."""
    key, category, usage_type = split_pending_field(field.decode(errors="replace"))
    if not key.startswith(f"{PREFIX}u:") or category not in ("data", "call") or not usage_type:
        return "field is not {usage key}|{category}:{usage_type}"
    zar = _small_int(value, signed=True)
    if zar is None:
        return "value is not an integer"
    return key, category, usage_type, zar


def usage_pattern(day: str) -> str:
    """SCAN pattern of every usage hash of `day` (`YYYYmmdd`): used by the rebuild only."""
    return f"{PREFIX}u:*:{day}"


def fx_seen_key(pair: str, hour: str) -> str:
    return f"{PREFIX}fxs:{pair}:{hour}"


def pending_key(hour: str) -> str:
    return f"{PREFIX}wakpend:{hour}"


def pending_field(key: str, category: str, usage_type: str) -> str:
    return f"{key}|{category}:{usage_type}"


def split_pending_field(field: str) -> tuple[str, str, str]:
    """(usage key, category, usage_type) of a pending-index field."""
    key, _, group = field.rpartition("|")
    category, _, usage_type = group.partition(":")
    return key, category, usage_type


def day_of(ts: datetime | date) -> str:
    return ts.strftime("%Y%m%d")


def days_between(start: datetime, end: datetime) -> list[date]:
    """The days that the half-open range [start, end) touches (end > start)."""
    first = start.date()
    last = (end - timedelta(microseconds=1)).date()
    return [first + timedelta(days=i) for i in range((last - first).days + 1)]


def usage_keys(msisdn: str, days: Iterable[date]) -> list[str]:
    """Day keys computed from the range: the API never scans keys."""
    return [usage_key(msisdn, day_of(d)) for d in days]


def money(units: int) -> Decimal:
    """Decimal amount of an integer count of 1e-10 units."""
    return Decimal(units).scaleb(-MONEY_SCALE)


def to_units(amount: Decimal) -> int:
    """Integer 1e-10 units of an amount with at most 10 decimals (raises if inexact)."""
    scaled = amount.scaleb(MONEY_SCALE)
    units = int(scaled)
    if scaled != units:
        raise ValueError(f"{amount} has more than {MONEY_SCALE} decimals")
    return units


UsageHash = dict[bytes | str, bytes | str]
"""A usage hash as redis-py returns it: bytes, or str with `decode_responses`."""


def parse_usage(raw: UsageHash) -> dict[tuple[str, str], dict[str, int]]:
    """{(category, usage_type): {metric: value}} of one usage hash; a metric written in both
    field forms (a hash begun before the short names) is their sum."""
    out: dict[tuple[str, str], dict[str, int]] = {}
    for f, v in raw.items():
        category, usage_type, metric = split_usage_field(f.decode() if isinstance(f, bytes) else f)
        metrics = out.setdefault((category, usage_type), {})
        metrics[metric] = metrics.get(metric, 0) + int(v)
    return out
