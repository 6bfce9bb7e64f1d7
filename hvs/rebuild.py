"""Rebuild the HVS for a range of days from the raw tables, the source of truth, while the
consumer runs: `python -m hvs rebuild --from 2024-01-01 --to 2024-01-02`.

Per day, in three steps:

1. **Rates.** The day's ticks in `forex_data.ticks` (and, per pair, the last hour with ticks
   before the day: the as-of rate of the first hours) are applied through the consumer's own
   exactly-once path (`Hvs.apply_ticks`): a tick the HVS has already is a duplicate, a missing
   one is added. The rates are read back from `hvs:fx`, as the consumer reads them, under the
   pause (step 3): no tick is added then, so the day is priced at the rates the consumer
   resumes with, and no ZAR is left waiting for a rate the HVS holds.
2. **Snapshot.** The day's CDR events are read from `cdr_data` in one repeatable-read
   transaction, as the JSON messages the loader publishes (`ingestion.cdr_publish.range_sql`),
   and decoded by the consumer's decoder (`hvs.decode.load_cdr`).
3. **Write, under a pause.** `hvs:pause` is set: the consumer's apply script then changes nothing
   and the consumer waits (it applied every event of the files it saw before, and those files
   are in the snapshot, because a file is published only after it landed). The rows of files
   that landed since the snapshot are read (less any event the snapshot holds already: rows
   committed before their file's ledger row would otherwise count twice), the day's usage is
   built by the consumer's pricing (`Hvs.build`) and written in one MULTI/EXEC: the day's usage
   hashes and pending-WAK hours are replaced, and the applied-event bits of the day's events
   are set (OR-ed into each file's bitmap), so the consumer skips those events when it sees
   them later and applies the rest. The write WATCHes the pause: if it expired or changed hands
   (the rebuild stalled longer than it holds), nothing is written and the rebuild stops with an
   error (a consumer may have applied events the write would wipe). The pause is released (it
   expires by itself should the rebuild die).

Running it twice gives the same HVS. Ticks are only added, never removed (the tick sink and the
HVS read one stream independently, so the HVS may hold a tick the raw table does not have yet).
"""

from __future__ import annotations

import functools
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import date, datetime, timedelta
from typing import TypeVar, cast

import psycopg
import redis

from common.poison import reason_of
from hvs import keys as K
from hvs.decode import CdrRow, TickEvent, load_cdr, tick_event
from hvs.settings import HvsSettings
from hvs.store import Built, Hvs, Paused
from ingestion.cdr_publish import range_sql
from macros_py.currency import PAIRS

log = logging.getLogger("hvs.rebuild")

PAUSE_SECONDS = 60
"""How long the pause holds should the rebuild die while writing; renewed before each step."""
WAIT_SECONDS = 300.0
"""How long to wait for another rebuild's pause before giving up."""
TICK_CHUNK = 5000

_KIND_OF_CATEGORY = {"data": "data", "call": "voice"}

T = TypeVar("T")


@dataclass
class DayReport:
    day: str
    events: int = 0
    late_events: int = 0  # of files that landed between the snapshot and the write
    rejected: int = 0
    usage_keys: int = 0
    removed_keys: int = 0
    ticks_added: int = 0
    pending_hours: int = 0
    paused_ms: float = 0.0

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


class RebuildError(RuntimeError):
    """The rebuild cannot go on (another rebuild holds the HVS for too long)."""


def rebuild(
    settings: HvsSettings,
    first: date,
    last: date,
    *,
    client: redis.Redis | None = None,
) -> list[DayReport]:
    """Rebuild every day from `first` to `last` (both included); a report per day."""
    if last < first:
        raise ValueError(f"--to {last} is before --from {first}")
    hvs = Hvs(settings, client)
    reports = []
    with psycopg.connect(settings.analytics_dsn, autocommit=True) as conn:
        day = first
        while day <= last:
            report = rebuild_day(hvs, conn, day)
            log.info("rebuilt a day of the HVS", extra=report.as_dict())
            reports.append(report)
            day += timedelta(days=1)
    return reports


def rebuild_day(hvs: Hvs, conn: psycopg.Connection, day: date) -> DayReport:
    start = datetime(day.year, day.month, day.day)
    end = start + timedelta(days=1)
    report = DayReport(day=K.day_of(day))
    report.ticks_added = _add_raw_ticks(hvs, conn, start, end)
    with conn.transaction():
        conn.execute("set transaction isolation level repeatable read")
        landed = [r[0] for r in conn.execute("select file_name from cdr_data.files")]
        rows = _read_events(hvs, conn, start, end, [], report)
    report.events = len(rows)
    token = _pause(hvs.redis)
    t0 = time.monotonic()
    try:
        with conn.transaction():
            late = _read_events(hvs, conn, start, end, landed, report)
        late = _not_in_snapshot(late, rows, set(landed))
        report.late_events = len(late)
        rows += late
        _renew(hvs.redis, token)
        # the rates as the consumer will resume with them: no tick is added under the pause
        hvs.refresh()
        built = hvs.build(rows)
        report.pending_hours = len(built.hours)
        report.usage_keys, report.removed_keys = _write_day(hvs, report.day, built, token)
    finally:
        _release(hvs.redis, token)
        report.paused_ms = round((time.monotonic() - t0) * 1000, 1)
    report.events += report.late_events
    return report


def _read_events(
    hvs: Hvs,
    conn: psycopg.Connection,
    start: datetime,
    end: datetime,
    skip: list[str],
    report: DayReport,
) -> list[CdrRow]:
    """The decoded CDR events with an event time in [start, end) of files not in `skip` (in a
    transaction: the rows are read in chunks)."""
    rows = []
    params = {"start": start, "end": end, "skip": skip}
    for category, kind in _KIND_OF_CATEGORY.items():
        with conn.cursor(name=f"rebuild_{kind}") as cur:  # server side: read in chunks
            cur.execute(range_sql(kind), params)
            for (value,) in cur:
                try:
                    row, _obj = load_cdr(value.encode(), category)
                except Exception as exc:  # bad data, as the consumer would reject it
                    report.rejected += 1
                    log.warning("raw row not applicable", extra={"reason": reason_of(exc)})
                    continue
                rows.append(row)
    return rows


def _not_in_snapshot(late: list[CdrRow], snapshot: list[CdrRow], landed: set[str]) -> list[CdrRow]:
    """The events of `late` that the snapshot does not hold. Rows whose file is not in the
    ledger's snapshot (`landed`) are read again under the pause; some of them may be in the
    snapshot already: rows committed before their file's ledger row (not the loader's way: it
    lands a file and its ledger row in one transaction) or rows without a ledger row at all.
    An event is identified by its file and line, as by the consumer."""
    seen = {(row[8], row[9]) for row in snapshot if row[8] not in landed}
    if not seen:
        return late
    return [row for row in late if (row[8], row[9]) not in seen]


def _add_raw_ticks(hvs: Hvs, conn: psycopg.Connection, start: datetime, end: datetime) -> int:
    """Apply the raw ticks of [start, end), and of each pair's last hour with ticks before
    `start`, exactly once; the number the HVS did not have."""
    pairs = list(PAIRS)
    windows = [(None, start, end)]
    for pair, latest in conn.execute(
        "select pair_name, max(tick_ts) from forex_data.ticks"
        " where tick_ts < %s and pair_name = any(%s) group by pair_name",
        (start, pairs),
    ):
        hour = latest.replace(minute=0, second=0, microsecond=0)
        windows.append((pair, hour, hour + timedelta(hours=1)))
    added = 0
    for pair, lo, hi in windows:
        ticks: dict[tuple[str, str, int], TickEvent] = {}
        for name, ts, bid, ask in conn.execute(
            "select pair_name, tick_ts, bid_price, ask_price from forex_data.ticks"
            " where tick_ts >= %s and tick_ts < %s and pair_name = any(%s) order by tick_ts",
            (lo, hi, [pair] if pair else pairs),
        ):
            try:
                t = tick_event(name, ts, bid, ask)
            except Exception as exc:  # bad data: the consumer would have refused it too
                log.warning("raw tick not applicable", extra={"reason": reason_of(exc)})
                continue
            ticks.setdefault((t.pair, t.hour, t.slot), t)  # the first of a slot, as the consumer
        todo = list(ticks.values())
        for i in range(0, len(todo), TICK_CHUNK):
            chunk = todo[i : i + TICK_CHUNK]
            applied, _dups = _unless_paused(functools.partial(hvs.apply_ticks, chunk))
            added += applied
    return added


def _write_day(hvs: Hvs, day: str, built: Built, token: str) -> tuple[int, int]:
    """Replace the day's usage hashes and pending-WAK hours by `built`, and set its events' bits,
    in one transaction. Returns (usage keys written, stale usage keys removed)."""
    r, ttl = hvs.redis, hvs.settings.retention_seconds
    hashes: dict[str, dict[str, int]] = {}
    incr, i = built.incr, 0
    while i < len(incr):
        key, n = str(incr[i]), int(incr[i + 1]) + int(incr[i + 2])
        fields = hashes.setdefault(key, {})
        for j in range(i + 3, i + 3 + 2 * n, 2):
            f = str(incr[j])
            fields[f] = fields.get(f, 0) + int(incr[j + 1])
        i += 3 + 2 * n
    usage = {k for k in hashes if k.startswith(f"{K.PREFIX}u:")}
    hours = [f"{day}{h:02d}" for h in range(24)]
    tmp = f"{K.PREFIX}rebuild:{token}"
    lost = RebuildError(
        f"{K.PAUSE_KEY} expired or changed hands before the day {day} was written (the rebuild"
        " stalled for longer than it holds): nothing of the day written; run it again"
    )
    with r.pipeline(transaction=True) as pipe:
        # The write replaces the day whole, so it must hold the pause to its end: a consumer
        # that applied events meanwhile (of files landed after the read) would lose them, their
        # bits set. WATCH makes EXEC fail if the pause expires or is taken from here on.
        pipe.watch(K.PAUSE_KEY)
        if _owner(pipe.hget(K.PAUSE_KEY, "owner")) != token:
            raise lost
        existing = {k.decode() for k in r.scan_iter(match=K.usage_pattern(day), count=5000)}
        pipe.multi()
        stale = sorted(existing | usage)
        for s in range(0, len(stale), 1000):
            pipe.delete(*stale[s : s + 1000])
        pipe.delete(*(K.pending_key(h) for h in hours))
        pipe.srem(K.PENDING_INDEX, *hours)
        for key, fields in hashes.items():
            if any(fields.values()):
                pipe.hset(key, mapping={f: v for f, v in fields.items() if v})
                pipe.expire(key, ttl)
        for set_key, member in built.sadd:
            pipe.sadd(set_key, member)
            pipe.expire(set_key, ttl)
        for key, offsets in built.bits.items():
            mask = bytearray(max(offsets) // 8 + 1)
            for o in offsets:
                mask[o >> 3] |= 0x80 >> (o & 7)
            pipe.delete(tmp)
            pipe.setrange(tmp, 0, bytes(mask))
            pipe.bitop("OR", key, key, tmp)
            pipe.delete(tmp)
            pipe.expire(key, ttl)
        try:
            pipe.execute()
        except redis.WatchError:
            raise lost from None
    return len(usage), len(existing - usage)


def _owner(value: object) -> str | None:
    return value.decode() if isinstance(value, bytes) else cast("str | None", value)


# -- the pause -------------------------------------------------------------------------------

# The pause is a hash (field `owner`): hash commands and EXPIRE are what the HVS' Redis user may
# run on its keys.
_ACQUIRE = (
    "if redis.call('HSETNX', KEYS[1], 'owner', ARGV[1]) == 1 then"
    " redis.call('EXPIRE', KEYS[1], ARGV[2]) return 1 end return 0"
)
_RELEASE = (
    "if redis.call('HGET', KEYS[1], 'owner') == ARGV[1] then"
    " return redis.call('DEL', KEYS[1]) end return 0"
)
_RENEW = (
    "if redis.call('HGET', KEYS[1], 'owner') == ARGV[1] then"
    " return redis.call('EXPIRE', KEYS[1], ARGV[2]) end return 0"
)


def _pause(r: redis.Redis) -> str:
    """Hold the HVS (`hvs:pause`): wait while another rebuild holds it. Returns the token."""
    token = uuid.uuid4().hex
    deadline = time.monotonic() + WAIT_SECONDS
    while not r.eval(_ACQUIRE, 1, K.PAUSE_KEY, token, PAUSE_SECONDS):
        if time.monotonic() > deadline:
            raise RebuildError(f"{K.PAUSE_KEY} held by another rebuild for {WAIT_SECONDS:.0f} s")
        time.sleep(0.1)
    return token


def _renew(r: redis.Redis, token: str) -> None:
    if not r.eval(_RENEW, 1, K.PAUSE_KEY, token, PAUSE_SECONDS):
        raise RebuildError(f"{K.PAUSE_KEY} expired while the rebuild read; run it again")


def _release(r: redis.Redis, token: str) -> None:
    r.eval(_RELEASE, 1, K.PAUSE_KEY, token)


def _unless_paused(fn: Callable[[], T]) -> T:
    """`fn()`, waited for while another rebuild holds the HVS."""
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        try:
            return fn()
        except Paused:
            if time.monotonic() > deadline:
                raise RebuildError(f"{K.PAUSE_KEY} held for {WAIT_SECONDS:.0f} s") from None
            time.sleep(0.1)
