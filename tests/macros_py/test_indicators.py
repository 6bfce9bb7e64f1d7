"""OHLC bars, EMA and ATR based on open: seeds, recursion, resume, and the `ta` reference."""

from __future__ import annotations

import random
from datetime import datetime, timedelta
from decimal import Decimal as D
from fractions import Fraction
from itertools import pairwise

import pandas as pd
import pytest
from ta.trend import EMAIndicator
from ta.volatility import AverageTrueRange

from macros_py.indicators import (
    AtrState,
    Bar,
    IndicatorState,
    Tick,
    atr_series,
    ema_series,
    indicator_rows,
    indicators_all_pairs,
    ohlc_bars,
    roll_up_bars,
    true_range,
)
from macros_py.numeric import div10

T0 = datetime(2024, 1, 1)


def price(rng: random.Random) -> D:
    return D(rng.randint(10_000, 20_000)).scaleb(-4)


def random_bars(n: int, seed: int = 1, pair: str = "MRVZAR") -> list[Bar]:
    rng = random.Random(seed)
    bars = []
    for i in range(n):
        ps = [price(rng) for _ in range(rng.randint(1, 6))]
        bars.append(Bar(pair, T0 + timedelta(minutes=i), ps[0], max(ps), min(ps), ps[-1], len(ps)))
    return bars


def random_ticks(minutes: int, seed: int = 2) -> list[Tick]:
    """Two pairs every 500 ms +/- 100 ms (same timestamp for both), as the source emits."""
    rng = random.Random(seed)
    ticks, t = [], T0
    end = T0 + timedelta(minutes=minutes)
    while t < end:
        for pair in ("MRVZAR", "WAKMRV"):
            bid = price(rng)
            ticks.append(Tick(pair, t, bid, bid + D(rng.randint(100, 500)).scaleb(-4)))
        t += timedelta(milliseconds=rng.randint(400, 600), microseconds=rng.randint(0, 999))
    return ticks


# -- bars ----------------------------------------------------------------------------------------


def test_bars_take_open_and_close_by_tick_time_not_arrival_order() -> None:
    ticks = [
        Tick("MRVZAR", T0 + timedelta(seconds=30), D("1.5000"), D("1.51")),
        Tick("MRVZAR", T0 + timedelta(seconds=1), D("1.2000"), D("1.21")),
        Tick("MRVZAR", T0 + timedelta(seconds=59, microseconds=999999), D("1.3000"), D("1.31")),
        Tick("MRVZAR", T0 + timedelta(seconds=10), D("1.9000"), D("1.91")),
        Tick("MRVZAR", T0 + timedelta(minutes=1), D("1.1000"), D("1.11")),  # next bar
        Tick("MRVZAR", T0 + timedelta(minutes=5), D("1.7000"), D("1.71")),  # gap: bars 2-4 absent
        Tick("WAKMRV", T0 + timedelta(seconds=1), D("1.4000"), D("1.41")),
    ]
    bars = ohlc_bars(ticks, "m1")
    assert bars == [
        Bar("MRVZAR", T0, D("1.2"), D("1.9"), D("1.2"), D("1.3"), 4),
        Bar("MRVZAR", T0 + timedelta(minutes=1), D("1.1"), D("1.1"), D("1.1"), D("1.1"), 1),
        Bar("MRVZAR", T0 + timedelta(minutes=5), D("1.7"), D("1.7"), D("1.7"), D("1.7"), 1),
        Bar("WAKMRV", T0, D("1.4"), D("1.4"), D("1.4"), D("1.4"), 1),
    ]


def test_duplicate_tick_is_an_error() -> None:
    t = Tick("MRVZAR", T0, D("1.5"), D("1.51"))
    with pytest.raises(ValueError, match="duplicate"):
        ohlc_bars([t, t], "m1")


def test_m30_and_h1_roll_up_from_m1() -> None:
    ticks = random_ticks(150)
    m1 = ohlc_bars(ticks, "m1")
    assert roll_up_bars(m1, "m30") == ohlc_bars(ticks, "m30")
    assert roll_up_bars(m1, "h1") == ohlc_bars(ticks, "h1")
    assert sum(b.tick_count for b in m1) == len(ticks)
    assert len(ohlc_bars(ticks, "h1")) == 2 * 3


# -- EMA -----------------------------------------------------------------------------------------


def test_ema_seed_is_the_mean_of_the_first_n_opens_then_the_recursion() -> None:
    opens = [D(x) for x in ("1", "2", "3", "4", "5")]
    values, state = ema_series(opens, 3)
    assert values[:2] == [None, None]
    assert values[2] == D(2)  # (1 + 2 + 3) / 3
    assert values[3] == div10(2 * D(4) + 2 * D(2), 4) == D(3)  # alpha 1/2
    assert values[4] == D(4)
    assert state.count == 5 and state.value == D(4)
    values, _ = ema_series([D("1.0001"), D("1.0002")], 8)
    assert values == [None, None]


def test_ema_is_the_alpha_form_within_rounding() -> None:
    """Straightforward exact computation of alpha*open + (1-alpha)*prev, no rounding."""
    bars = random_bars(300)
    for n in (8, 21):
        values, _ = ema_series([b.open for b in bars], n)
        alpha = Fraction(2, n + 1)
        exact: Fraction | None = None
        for k, b in enumerate(bars, start=1):
            if k == n:
                exact = sum((Fraction(x.open) for x in bars[:n]), Fraction(0)) / n
            elif k > n:
                assert exact is not None
                exact = alpha * Fraction(b.open) + (1 - alpha) * exact
            got = values[k - 1]
            if exact is None:
                assert got is None
            else:
                assert got is not None
                # one rounding per step, contracted by (1 - alpha): at most 0.5e-10 / alpha
                assert abs(Fraction(got) - exact) <= Fraction(1, 2 * 10**10) / alpha


def test_ema_matches_ta_when_seeded_alike_and_converges_to_it_otherwise() -> None:
    """`ta` seeds its EMA with the first value (pandas ewm, adjust=False); ours with the SMA.

    Fed [SMA] * n + opens[n:], `ta` runs the same recursion from the same seed, so the two agree
    from bar n on (to float precision). On the raw opens the seeds differ and the difference
    decays as (1 - alpha)^k: after 250 bars it is far below 1e-9.
    """
    bars = random_bars(400, seed=9)
    opens = [b.open for b in bars]
    for n in (8, 21):
        ours, _ = ema_series(opens, n)
        seed = float(ours[n - 1])  # type: ignore[arg-type]
        fed = pd.Series([seed] * n + [float(o) for o in opens[n:]])
        ta_seeded = EMAIndicator(fed, window=n).ema_indicator()
        for k in range(n - 1, len(opens)):
            assert ta_seeded.iloc[k] == pytest.approx(float(ours[k]), abs=1e-9)  # type: ignore[arg-type]
        assert ta_seeded.iloc[: n - 1].isna().all()
        ta_raw = EMAIndicator(pd.Series([float(o) for o in opens]), window=n).ema_indicator()
        for k in range(250, len(opens)):
            assert ta_raw.iloc[k] == pytest.approx(float(ours[k]), abs=1e-9)  # type: ignore[arg-type]


# -- ATR -----------------------------------------------------------------------------------------


def test_true_range_uses_the_previous_open() -> None:
    assert true_range(D("1.5"), D("1.4"), D("1.2")) == D("0.3")  # gap down from prev open
    assert true_range(D("1.5"), D("1.4"), D("1.9")) == D("0.5")  # gap up
    assert true_range(D("1.5"), D("1.4"), D("1.45")) == D("0.1")  # inside


def test_atr_seed_at_the_nth_true_range_then_wilder() -> None:
    bars = random_bars(40, seed=4)
    for n in (3, 8, 21):
        values, state = atr_series(bars, n)
        trs = [true_range(b.high, b.low, p.open) for p, b in pairwise(bars)]
        assert values[:n] == [None] * n  # bar 1 has no TR; bars 2..n have fewer than n TRs
        first = div10(sum(trs[:n]), n)
        assert values[n] == first
        prev = first
        for k in range(n + 1, len(bars)):
            prev = div10(prev * (n - 1) + trs[k - 1], n)
            assert values[k] == prev
        assert state.tr_count == len(bars) - 1


def test_atr_is_the_wilder_formula_within_rounding() -> None:
    """Straightforward exact computation (fractions, no rounding) of the issue's formula."""
    bars = random_bars(300, seed=5)
    for n in (8, 21):
        values, _ = atr_series(bars, n)
        trs = [None] + [
            Fraction(max(b.high, p.open)) - Fraction(min(b.low, p.open)) for p, b in pairwise(bars)
        ]
        exact: Fraction | None = None
        for k in range(1, len(bars) + 1):
            if k == n + 1:
                exact = sum(trs[1 : n + 1], Fraction(0)) / n  # type: ignore[arg-type]
            elif k > n + 1:
                assert exact is not None
                exact = (exact * (n - 1) + trs[k - 1]) / n  # type: ignore[operator]
            got = values[k - 1]
            assert (got is None) == (exact is None)
            if exact is not None:
                assert abs(Fraction(got) - exact) <= Fraction(n, 2 * 10**10)  # type: ignore[arg-type]


def test_atr_matches_ta_with_open_in_the_place_of_close() -> None:
    """`ta`'s ATR with close := open is ours, shifted by one bar.

    `ta` counts a TR (high - low) at its first row; ours starts at bar 2. Feeding `ta` bars 2..N
    with close = open, and choosing bar 1's open inside bar 2's range (so TR_2 = high_2 - low_2),
    the two series are the same recursion from the same seed.
    """
    bars = random_bars(200, seed=6)
    b2 = bars[1]
    bars[0] = Bar("MRVZAR", T0, (b2.high + b2.low) / 2, D(2), D(1), D("1.5"), 1)
    for n in (8, 21):
        ours, _ = atr_series(bars, n)
        tail = bars[1:]
        ref = AverageTrueRange(
            pd.Series([float(b.high) for b in tail]),
            pd.Series([float(b.low) for b in tail]),
            pd.Series([float(b.open) for b in tail]),
            window=n,
        ).average_true_range()
        for i in range(n - 1, len(tail)):
            assert ref.iloc[i] == pytest.approx(float(ours[i + 1]), abs=1e-9)  # type: ignore[arg-type]


# -- resume --------------------------------------------------------------------------------------


def test_resume_from_any_state_equals_one_shot() -> None:
    bars = random_bars(60, seed=8)
    one_shot, final = indicator_rows(bars)
    for cut in range(len(bars) + 1):
        first, state = indicator_rows(bars[:cut]) if cut else ([], None)
        rest, final2 = indicator_rows(bars[cut:], state)
        assert first + rest == one_shot
        assert final2 == final
    assert [r.bar_no for r in one_shot] == list(range(1, 61))
    assert one_shot[6].ema_8 is None and one_shot[7].ema_8 is not None
    assert one_shot[7].atr_8 is None and one_shot[8].atr_8 is not None
    assert one_shot[19].ema_21 is None and one_shot[20].ema_21 is not None
    assert one_shot[20].atr_21 is None and one_shot[21].atr_21 is not None


def test_resume_from_a_stored_row_equals_one_shot() -> None:
    """What an incremental SQL run does: read bar_no, open, ema_n, atr_n of the last row."""
    bars = random_bars(80, seed=10)
    one_shot, _ = indicator_rows(bars)
    for cut in (22, 23, 50, 79):
        state = IndicatorState.from_row(one_shot[cut - 1])
        rest, _ = indicator_rows(bars[cut:], state)
        assert one_shot[:cut] + rest == one_shot
    with pytest.raises(ValueError, match="seeds incomplete"):
        IndicatorState.from_row(one_shot[20])


def test_series_checks_order_pair_and_state() -> None:
    bars = random_bars(5)
    with pytest.raises(ValueError, match="out of order"):
        indicator_rows([bars[1], bars[0]])
    _, state = indicator_rows(bars)
    with pytest.raises(ValueError, match="out of order"):
        indicator_rows(bars[4:], state)
    with pytest.raises(ValueError, match="bars of WAKMRV"):
        indicator_rows(random_bars(2, pair="WAKMRV"), state)
    with pytest.raises(ValueError, match="ATR 8"):
        atr_series(bars, 21, AtrState(8))


def test_gaps_are_skipped_and_pairs_are_independent() -> None:
    a = random_bars(30, seed=12)
    gapped = [a[i] for i in range(30) if i % 3]  # bars without ticks have no row
    rows, _ = indicator_rows(gapped)
    assert [r.bar_no for r in rows] == list(range(1, len(gapped) + 1))
    assert rows[7].ema_8 == div10(sum(b.open for b in gapped[:8]), 8)
    w = random_bars(25, seed=13, pair="WAKMRV")
    both = indicators_all_pairs(w + a)
    assert both == indicator_rows(a)[0] + indicator_rows(w)[0]
