"""Forex OHLC bars (bid price) with EMA and ATR "based on open price".

EMA n: null before bar n; at bar n the mean of the first n opens; then
div10(2 * open + (n - 1) * ema_prev, n + 1)  (alpha = 2 / (n + 1), one rounding).
ATR n: TR_k = max(high_k, open_(k-1)) - min(low_k, open_(k-1)) from bar 2; null before the n-th
TR (bar n + 1); there the mean of the first n TRs; then div10(atr_prev * (n - 1) + TR, n).
Bars without ticks have no row and are skipped. The recursion resumes from an explicit state.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from decimal import Decimal

from macros_py.buckets import floor_function, floor_to, width_of
from macros_py.numeric import EXACT, div10

EMA_PERIODS = (8, 21)
ATR_PERIODS = (8, 21)


@dataclass(frozen=True, slots=True)
class Tick:
    pair_name: str
    tick_ts: datetime
    bid_price: Decimal
    ask_price: Decimal


@dataclass(frozen=True, slots=True)
class Bar:
    pair_name: str
    bar_start: datetime
    open: Decimal
    high: Decimal
    low: Decimal
    close: Decimal
    tick_count: int


def ohlc_bars(ticks: Iterable[Tick], width: str | timedelta) -> list[Bar]:
    """Bid-price bars per (pair_name, bar_start), sorted; one row per bar with ticks."""
    floor = floor_function(width)
    ordered = sorted(ticks, key=lambda t: (t.pair_name, t.tick_ts))
    bars: list[Bar] = []
    key: tuple[str, datetime] | None = None
    prices: list[Decimal] = []
    prev: tuple[str, datetime] | None = None
    for t in ordered:
        this = (t.pair_name, t.tick_ts)
        if this == prev:
            raise ValueError(f"duplicate tick {t.pair_name} {t.tick_ts}: (pair, tick_ts) is a key")
        prev = this
        k = (t.pair_name, floor(t.tick_ts))
        if k != key:
            if key is not None:
                bars.append(_bar(key, prices))
            key, prices = k, []
        prices.append(t.bid_price)
    if key is not None:
        bars.append(_bar(key, prices))
    return bars


def _bar(key: tuple[str, datetime], prices: list[Decimal]) -> Bar:
    return Bar(key[0], key[1], prices[0], max(prices), min(prices), prices[-1], len(prices))


def roll_up_bars(bars: Iterable[Bar], width: str | timedelta) -> list[Bar]:
    """Larger bars from smaller ones (first open, max high, min low, last close, sum of counts)."""
    w = width_of(width)
    out: list[Bar] = []
    for b in sorted(bars, key=lambda b: (b.pair_name, b.bar_start)):
        start = floor_to(b.bar_start, w)
        last = out[-1] if out else None
        if last is not None and last.pair_name == b.pair_name and last.bar_start == start:
            out[-1] = replace(
                last,
                high=max(last.high, b.high),
                low=min(last.low, b.low),
                close=b.close,
                tick_count=last.tick_count + b.tick_count,
            )
        else:
            out.append(replace(b, bar_start=start))
    return out


@dataclass(frozen=True, slots=True)
class EmaState:
    """EMA n after `count` bars: the sum of opens while seeding, then the last (stored) EMA."""

    n: int
    count: int = 0
    seed_sum: Decimal = Decimal(0)
    value: Decimal | None = None

    def step(self, open_: Decimal) -> EmaState:
        k = self.count + 1
        n = self.n
        if k < n:
            return EmaState(n, k, EXACT.add(self.seed_sum, open_), None)
        if k == n:
            return EmaState(n, k, Decimal(0), div10(EXACT.add(self.seed_sum, open_), n))
        assert self.value is not None  # noqa: S101 type narrowing: set once k reaches n
        num = EXACT.add(EXACT.multiply(2, open_), EXACT.multiply(n - 1, self.value))
        return EmaState(n, k, Decimal(0), div10(num, n + 1))


@dataclass(frozen=True, slots=True)
class AtrState:
    """ATR n: the previous open, the number of TRs so far, their sum while seeding, the last ATR."""

    n: int
    prev_open: Decimal | None = None
    tr_count: int = 0
    tr_sum: Decimal = Decimal(0)
    value: Decimal | None = None

    def step(self, high: Decimal, low: Decimal, open_: Decimal) -> AtrState:
        n = self.n
        if self.prev_open is None:
            return AtrState(n, open_, 0, Decimal(0), None)
        tr = true_range(high, low, self.prev_open)
        j = self.tr_count + 1
        if j < n:
            return AtrState(n, open_, j, EXACT.add(self.tr_sum, tr), None)
        if j == n:
            return AtrState(n, open_, j, Decimal(0), div10(EXACT.add(self.tr_sum, tr), n))
        assert self.value is not None  # noqa: S101 type narrowing: set once j reaches n
        num = EXACT.add(EXACT.multiply(self.value, n - 1), tr)
        return AtrState(n, open_, j, Decimal(0), div10(num, n))


def true_range(high: Decimal, low: Decimal, prev_open: Decimal) -> Decimal:
    """TR with the previous bar's open in the place of the previous close."""
    return EXACT.subtract(max(high, prev_open), min(low, prev_open))


def ema_series(
    opens: Iterable[Decimal], n: int, state: EmaState | None = None
) -> tuple[list[Decimal | None], EmaState]:
    """EMA n of a series of opens (one pair, bar order), resuming from `state`."""
    s = state if state is not None else EmaState(_period(n))
    if s.n != n:
        raise ValueError(f"state is for EMA {s.n}, not {n}")
    out: list[Decimal | None] = []
    for o in opens:
        s = s.step(o)
        out.append(s.value)
    return out, s


def atr_series(
    bars: Iterable[Bar], n: int, state: AtrState | None = None
) -> tuple[list[Decimal | None], AtrState]:
    """ATR n (based on open) of a bar series (one pair, bar order), resuming from `state`."""
    s = state if state is not None else AtrState(_period(n))
    if s.n != n:
        raise ValueError(f"state is for ATR {s.n}, not {n}")
    out: list[Decimal | None] = []
    for b in bars:
        s = s.step(b.high, b.low, b.open)
        out.append(s.value)
    return out, s


def _period(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"an indicator period is a positive int, got {n!r}")
    return n


@dataclass(frozen=True, slots=True)
class IndicatorRow:
    """A row of forex_ohlc_m1 / _m30 / _h1."""

    pair_name: str
    bar_start: datetime
    open: Decimal
    high: Decimal
    low: Decimal
    close: Decimal
    tick_count: int
    bar_no: int
    ema_8: Decimal | None
    ema_21: Decimal | None
    atr_8: Decimal | None
    atr_21: Decimal | None


@dataclass(frozen=True)
class IndicatorState:
    """What the recursion of one pair and timeframe carries from one run to the next."""

    pair_name: str
    bar_no: int = 0
    last_bar_start: datetime | None = None
    ema: tuple[EmaState, ...] = field(
        default_factory=lambda: tuple(EmaState(n) for n in EMA_PERIODS)
    )
    atr: tuple[AtrState, ...] = field(
        default_factory=lambda: tuple(AtrState(n) for n in ATR_PERIODS)
    )

    @classmethod
    def from_row(cls, row: IndicatorRow) -> IndicatorState:
        """The state after a stored row, as an incremental SQL run would read it back.

        Only possible once every seed is complete (bar_no >= 21 for EMA 21, >= 22 for ATR 21);
        before that the short series must be recomputed from its first bar.
        """
        ema_values = {8: row.ema_8, 21: row.ema_21}
        atr_values = {8: row.atr_8, 21: row.atr_21}
        if row.bar_no < max(EMA_PERIODS) or row.bar_no < max(ATR_PERIODS) + 1:
            raise ValueError(
                f"bar_no {row.bar_no}: seeds incomplete, recompute the series from its first bar"
            )
        ema = tuple(EmaState(n, row.bar_no, Decimal(0), ema_values[n]) for n in EMA_PERIODS)
        atr = tuple(
            AtrState(n, row.open, row.bar_no - 1, Decimal(0), atr_values[n]) for n in ATR_PERIODS
        )
        return cls(row.pair_name, row.bar_no, row.bar_start, ema, atr)


def indicator_rows(
    bars: Sequence[Bar], state: IndicatorState | None = None
) -> tuple[list[IndicatorRow], IndicatorState]:
    """EMA 8/21 and ATR 8/21 for the bars of ONE pair in bar_start order, resuming from `state`."""
    if not bars:
        if state is None:
            raise ValueError("no bars and no state")
        return [], state
    s = state if state is not None else IndicatorState(bars[0].pair_name)
    rows: list[IndicatorRow] = []
    ema, atr, bar_no, last = list(s.ema), list(s.atr), s.bar_no, s.last_bar_start
    for b in bars:
        if b.pair_name != s.pair_name:
            raise ValueError(f"bars of {b.pair_name} in a series of {s.pair_name}")
        if last is not None and b.bar_start <= last:
            raise ValueError(f"bars out of order: {b.bar_start} after {last}")
        last = b.bar_start
        bar_no += 1
        ema = [e.step(b.open) for e in ema]
        atr = [a.step(b.high, b.low, b.open) for a in atr]
        e = {x.n: x.value for x in ema}
        a = {x.n: x.value for x in atr}
        rows.append(
            IndicatorRow(
                b.pair_name,
                b.bar_start,
                b.open,
                b.high,
                b.low,
                b.close,
                b.tick_count,
                bar_no,
                e[8],
                e[21],
                a[8],
                a[21],
            )
        )
    return rows, IndicatorState(s.pair_name, bar_no, last, tuple(ema), tuple(atr))


def indicators_all_pairs(bars: Iterable[Bar]) -> list[IndicatorRow]:
    """Indicator rows for every pair from its first bar, sorted by (pair_name, bar_start)."""
    by_pair: dict[str, list[Bar]] = {}
    for b in sorted(bars, key=lambda b: (b.pair_name, b.bar_start)):
        by_pair.setdefault(b.pair_name, []).append(b)
    rows: list[IndicatorRow] = []
    for pair in sorted(by_pair):
        rows.extend(indicator_rows(by_pair[pair])[0])
    return rows
