"""Costs of usage in ZAR and WAK, in integer 1e-10 units, and the as-of ZAR-per-WAK rates.

The rules are `macros_py`'s (tariffs, currency); these are their integer forms on the hot path,
held equal to them by tests.
"""

from __future__ import annotations

import functools
from bisect import bisect_right
from datetime import datetime
from decimal import Decimal

from hvs import keys as K
from macros_py.currency import MRVZAR, PAIRS, WAKMRV, zar_per_wak, zar_to_wak
from macros_py.numeric import div10
from macros_py.tariffs import call_cost_zar, data_cost_zar


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

    def load(self, raw: dict[bytes, bytes]) -> list[tuple[bytes, str]]:
        """Replace what is known with the `hvs:fx` hash (shared by all consumers). Returns the
        malformed fields with the reason, left out (another process may have written them)."""
        self._sums = {p: {} for p in PAIRS}
        self._hours = {p: [] for p in PAIRS}
        self._cache.clear()
        got: dict[tuple[str, str], list[int]] = {}
        bad: list[tuple[bytes, str]] = []
        for f, v in raw.items():
            parsed = K.parse_fx_entry(f, v)
            if isinstance(parsed, str):
                bad.append((f, parsed))
                continue
            hour, pair, what, number = parsed
            acc = got.setdefault((pair, hour), [0, 0])
            acc[0 if what == "s" else 1] = number
        for (pair, hour), (s, n) in got.items():
            if n > 0:
                self.add(pair, hour, s, n)
        return bad

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
