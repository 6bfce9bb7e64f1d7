"""The HVS in Redis: batches of decoded events applied exactly once, and the WAK pricing of
usage that waited for a rate.

Every event has an id (CDR: `source_file:line_no`, a bit in a per-file bitmap; tick: pair, hour
and 100 ms slot). One Lua script (`store.lua`) checks a batch's bits, and only if none is set yet
sets them all and applies all the batch's increments, atomically; if some are set (a redelivery
or a republish), it changes nothing and returns them, and the batch is rebuilt without them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.resources import files
from typing import Any, cast

import orjson
import redis

from common.poison import reason_of
from hvs import keys as K
from hvs.decode import CdrRow, TickEvent, cdr_category, decode_tick, landed_at, load_cdr
from hvs.metrics import BATCHES, EVENTS, LAST_LATENCY, LATENCY, PENDING_HOURS
from hvs.pricing import (
    _DATA_UNITS_PER_BYTE,
    Rates,
    call_zar_units,
    data_zar_units,
    wak_units_oracle,
)
from hvs.settings import HvsSettings
from ingestion.stream import Message
from ingestion.tick_format import TickWindow

_pack_command: Callable[[tuple[bytes | str | int, ...]], bytes] | None
try:
    # hiredis's stub types the command as a 1-tuple; it packs a tuple of any length
    from hiredis import pack_command as _pack_command  # type: ignore[assignment]
except ImportError:  # pragma: no cover - hiredis is a dependency
    _pack_command = None

log = logging.getLogger("hvs.store")

APPLY_LUA = files("hvs").joinpath("store.lua").read_text()
"""The apply script; its header comment describes its ARGV layout."""


class Paused(redis.RedisError):
    """A rebuild from the raw tables holds the HVS (`hvs:pause`): nothing was changed; apply the
    same work again shortly (the runner waits without counting an error)."""


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
    out: list[int] = []
    start = prev = offsets[0]
    for o in offsets:
        if o > prev + 1:
            out += (start, prev)
            start = o
        prev = o
    out += (start, prev)
    return out


def _wrong_type(reply: object) -> bool:
    return isinstance(reply, redis.ResponseError) and str(reply).startswith("WRONGTYPE")


def _rejected_entry(topic: str, position: str, reason: str, value: bytes) -> bytes:
    """An `hvs:rejected` entry (JSON): where the bad input was (a stream topic and position, or
    a Redis key and field), why, and its first 2000 characters."""
    return orjson.dumps(
        {
            "topic": topic,
            "position": position,
            "reason": reason,
            "value": value.decode(errors="replace")[:2000],
            "rejected_at": time.time(),
        }
    )


class Hvs:
    """Applies batches of stream messages to Redis (no stream I/O here; see `run`)."""

    def __init__(self, settings: HvsSettings, client: redis.Redis | None = None) -> None:
        self.settings = settings
        self.redis = client or redis.Redis.from_url(settings.redis_url)
        self._apply = self.redis.register_script(APPLY_LUA)
        self.rates = Rates()
        self.pending_hours: set[str] = set()
        self._next_refresh = 0.0
        self._ttl = settings.retention_seconds
        self._topics = {settings.data_topic: "data", settings.voice_topic: "call"}
        self._window = TickWindow.of(settings)
        self.refresh()

    # -- applying ---------------------------------------------------------------------------

    def refresh(self) -> None:
        """Reload the rates and the pending-WAK hours from Redis: several consumers of one group
        share the work, and each sees only part of the ticks."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(K.FX_KEY)
        pipe.smembers(K.PENDING_INDEX)
        fx, pending = pipe.execute(raise_on_error=False)
        if _wrong_type(fx) or _wrong_type(pending):
            for key, got, wanted in ((K.FX_KEY, fx, "hash"), (K.PENDING_INDEX, pending, "set")):
                if _wrong_type(got):
                    self._move_aside(key, self._type_of(key), wanted)
            return self.refresh()
        if isinstance(fx, Exception) or isinstance(pending, Exception):
            raise fx if isinstance(fx, Exception) else pending
        bad_fx = self.rates.load(fx)
        for field, reason in bad_fx:
            self._quarantine(K.FX_KEY, field, fx[field], reason)
        hours = set()
        for member in pending:
            hour = member.decode(errors="replace")
            if K.is_hour(hour):
                hours.add(hour)
            else:
                self._quarantine(K.PENDING_INDEX, member, b"", "not an hour (YYYYmmddHH)")
        self.pending_hours = hours

    def _quarantine(self, key: str, field: bytes, value: bytes, reason: str) -> None:
        """Move a malformed entry that another process wrote out of `key` (a hash field or a
        set member) into the rejected list, with its bytes and the reason; never fatal."""
        pipe = self.redis.pipeline(transaction=True)
        if key == K.PENDING_INDEX:
            pipe.srem(key, field)
        else:
            pipe.hdel(key, field)
        where = field.decode(errors="replace")
        pipe.lpush(K.REJECTED_KEY, _rejected_entry(key, where, reason, value))
        pipe.ltrim(K.REJECTED_KEY, 0, K.REJECTED_MAX - 1)
        pipe.execute()
        EVENTS.labels(key, "rejected").inc()
        log.warning(
            "malformed Redis entry quarantined",
            extra={"key": key, "field": field.decode(errors="replace")[:200], "reason": reason},
        )

    def _type_of(self, key: str) -> str:
        found = self.redis.type(key)
        return found.decode() if isinstance(found, bytes) else str(found)

    def _move_aside(self, key: str, found: str, wanted: str) -> None:
        """Move a key of the layout that holds another type than it should (someone wrote
        there by hand) to `hvs:quarantine:...`, with its content, and record it in the rejected
        list with the reason; the key is then written afresh. Never fatal."""
        dest = f"{K.QUARANTINE_PREFIX}{int(time.time() * 1000)}:{key}"
        try:
            self.redis.rename(key, dest)
        except redis.ResponseError as exc:
            if "no such key" in str(exc).lower():
                return  # gone meanwhile: nothing to move
            raise
        reason = f"holds a {found}, not a {wanted}: moved to {dest}"
        pipe = self.redis.pipeline(transaction=True)
        pipe.expire(dest, self._ttl)
        pipe.lpush(K.REJECTED_KEY, _rejected_entry(key, "", reason, b""))
        pipe.ltrim(K.REJECTED_KEY, 0, K.REJECTED_MAX - 1)
        pipe.execute()
        EVENTS.labels("redis", "rejected").inc()
        log.warning(
            "a key of the wrong type moved aside",
            extra={"key": key[:200], "reason": reason[:300]},
        )

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
        args: list[str | int] = [K.PAUSE_KEY, self._ttl, len(bits)]
        for key, offsets in bits.items():
            runs = _runs(sorted(offsets))
            args += (key, len(runs) // 2, *runs)
        args.append(len(sadd))
        for member in sadd:
            args += member
        args.append(hashes)
        args += incr
        got = self._call_script(args)
        while got and got[0] in (b"WRONGTYPE", "WRONGTYPE"):  # nothing was changed
            for j in range(1, len(got), 3):
                key, found, wanted = (
                    x.decode() if isinstance(x, bytes) else x for x in got[j : j + 3]
                )
                self._move_aside(key, found, wanted)
            got = self._call_script(args)
        if got in (b"PAUSED", "PAUSED"):
            raise Paused("a rebuild of the HVS is writing")
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
            if category == "data":  # the total (up + dn) is not stored: readers add them
                add((key, 4, n, f[0], ev, f[1], up, f[2], dn, f[5], zar))
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
                        # this client does not decode responses: the fields are bytes
                        entries = cast("dict[bytes, bytes]", pipe.hgetall(pkey))
                        pipe.multi()
                        bad = []
                        for f, v in entries.items():
                            parsed = K.parse_pending_entry(f, v)
                            if isinstance(parsed, str):
                                bad.append((f, v, parsed))
                                continue
                            key, category, usage_type, zar = parsed
                            wak = K.usage_field(category, usage_type, K.WAK)
                            zp = K.usage_field(category, usage_type, K.ZAR_PENDING)
                            pipe.hincrby(key, wak, wak_units_oracle(zar, rate))
                            pipe.hincrby(key, zp, -zar)
                            pipe.expire(key, self._ttl)
                        pipe.delete(pkey)
                        pipe.srem(K.PENDING_INDEX, hour)
                        for f, v, reason in bad:
                            entry = _rejected_entry(pkey, f.decode(errors="replace"), reason, v)
                            pipe.lpush(K.REJECTED_KEY, entry)
                        pipe.execute()
                        break
                    except redis.WatchError:
                        continue
                    except redis.ResponseError as exc:
                        if not _wrong_type(exc):
                            raise
                        pipe.reset()
                        self._move_aside(pkey, self._type_of(pkey), "hash")
            for f, _v, reason in bad:
                EVENTS.labels(pkey, "rejected").inc()
                log.warning(
                    "malformed pending entry recorded and dropped",
                    extra={"key": pkey, "field": f.decode(errors="replace")[:200], "why": reason},
                )
            self.pending_hours.discard(hour)
            done += 1
            log.info("priced pending WAK", extra={"hour": hour, "entries": len(entries)})
        return done

    def reject(self, msg: Message, reason: str) -> None:
        entry = _rejected_entry(msg.topic, msg.position, reason, msg.value)
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
        topics, window = self._topics, self._window
        load, category_of = load_cdr, cdr_category
        for m in messages:
            topic = m.topic
            try:
                if topic == tick_topic:
                    t = decode_tick(m, window)
                    if ticks.setdefault((t.pair, t.hour, t.slot), t) is not t:
                        res.duplicates += 1
                    continue
                row, obj = load(m.value, category_of(topic, topics))
            except Exception as exc:  # bad data, whatever the decoder raised (common.poison)
                self.reject(m, reason_of(exc))
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
