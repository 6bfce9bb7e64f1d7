"""Currency: hourly average mid prices, ZAR per WAK, and ZAR to WAK conversion.

MRVZAR is ZAR per MRV and WAKMRV is MRV per WAK, so 1 WAK = MRVZAR x WAKMRV ZAR.
Hourly mid = div10(sum(bid + ask), 2 * count); zar_per_wak = round10(mrvzar_mid * wakmrv_mid);
an hour without ticks for a pair carries that pair's last mid forward (flagged).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from macros_py.buckets import HOUR, floor_hour
from macros_py.indicators import Tick
from macros_py.numeric import EXACT, div10, round10

MRVZAR = "MRVZAR"
WAKMRV = "WAKMRV"
PAIRS = (MRVZAR, WAKMRV)


def zar_per_wak(mrvzar: Decimal, wakmrv: Decimal) -> Decimal:
    """ZAR per 1 WAK = MRVZAR x WAKMRV, 10 decimals."""
    return round10(EXACT.multiply(mrvzar, wakmrv))


def zar_to_wak(zar: Decimal, rate_zar_per_wak: Decimal) -> Decimal:
    """An amount in ZAR in WAK at a (stored, rounded) ZAR-per-WAK rate, 10 decimals."""
    return div10(zar, rate_zar_per_wak)


@dataclass(frozen=True, slots=True)
class PairHour:
    pair_name: str
    hour_start: datetime
    mid: Decimal
    ticks: int


def hourly_mids(ticks: Iterable[Tick]) -> list[PairHour]:
    """Average mid price per (pair_name, hour) with ticks, sorted by that key."""
    acc: dict[tuple[str, datetime], list] = {}
    for t in ticks:
        key = (t.pair_name, floor_hour(t.tick_ts))
        a = acc.get(key)
        pair_sum = EXACT.add(t.bid_price, t.ask_price)
        if a is None:
            acc[key] = [pair_sum, 1]
        else:
            a[0] = EXACT.add(a[0], pair_sum)
            a[1] += 1
    return [
        PairHour(pair, hour, div10(total, 2 * count), count)
        for (pair, hour), (total, count) in sorted(acc.items())
    ]


@dataclass(frozen=True, slots=True)
class RateHour:
    """A row of fx_rates_hourly."""

    hour_start: datetime
    mrvzar_mid: Decimal
    wakmrv_mid: Decimal
    zar_per_wak: Decimal
    mrvzar_ticks: int
    wakmrv_ticks: int
    is_carried_forward: bool


def fx_rates_hourly(ticks: Iterable[Tick], carry: RateHour | None = None) -> list[RateHour]:
    """Contiguous hourly rates from the first hour both pairs are known to the last tick hour.

    `carry` is the last row already built (incremental runs): its mids are the last known ones
    and the grid continues after its hour; ticks at or before it are ignored.
    """
    mids = hourly_mids(ticks)
    if carry is not None:
        mids = [m for m in mids if m.hour_start > carry.hour_start]
    unknown = [m.pair_name for m in mids if m.pair_name not in PAIRS]
    if unknown:
        raise ValueError(f"unknown pairs {sorted(set(unknown))}; expected {PAIRS}")
    if not mids:
        return []
    by_hour: dict[datetime, dict[str, PairHour]] = {}
    for m in mids:
        by_hour.setdefault(m.hour_start, {})[m.pair_name] = m
    last_mid: dict[str, Decimal] = {}
    if carry is not None:
        last_mid = {MRVZAR: carry.mrvzar_mid, WAKMRV: carry.wakmrv_mid}
        hour = carry.hour_start + HOUR
    else:
        hour = min(by_hour)
    end = max(by_hour)
    rows: list[RateHour] = []
    while hour <= end:
        here = by_hour.get(hour, {})
        for pair, m in here.items():
            last_mid[pair] = m.mid
        if len(last_mid) == len(PAIRS):
            m_ticks = here[MRVZAR].ticks if MRVZAR in here else 0
            w_ticks = here[WAKMRV].ticks if WAKMRV in here else 0
            rows.append(
                RateHour(
                    hour_start=hour,
                    mrvzar_mid=last_mid[MRVZAR],
                    wakmrv_mid=last_mid[WAKMRV],
                    zar_per_wak=zar_per_wak(last_mid[MRVZAR], last_mid[WAKMRV]),
                    mrvzar_ticks=m_ticks,
                    wakmrv_ticks=w_ticks,
                    is_carried_forward=m_ticks == 0 or w_ticks == 0,
                )
            )
        hour += HOUR
    return rows


class RateLookup:
    """As-of lookup: the rate row with the greatest hour_start <= an hour."""

    def __init__(self, rates: Sequence[RateHour]) -> None:
        self._rates = sorted(rates, key=lambda r: r.hour_start)
        self._hours = [r.hour_start for r in self._rates]

    def as_of(self, hour: datetime) -> RateHour | None:
        i = bisect.bisect_right(self._hours, hour)
        return self._rates[i - 1] if i else None
