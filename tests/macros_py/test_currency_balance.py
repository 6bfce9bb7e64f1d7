"""Hourly rates with carry-forward, ZAR to WAK, and the CRM running balance."""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal as D

import pytest

from macros_py.balance import (
    AccountIndex,
    AccountVersion,
    BalanceRow,
    DeviceIndex,
    DeviceVersion,
    HourUsage,
    balance_rows,
    hour_cost_zar,
    hourly_usage,
)
from macros_py.currency import (
    RateHour,
    RateLookup,
    fx_rates_hourly,
    hourly_mids,
    zar_per_wak,
    zar_to_wak,
)
from macros_py.indicators import Tick
from macros_py.numeric import div10
from macros_py.records import DataRecord, VoiceRecord
from macros_py.tariffs import call_cost_zar, data_cost_zar

T0 = datetime(2024, 1, 1)
H = timedelta(hours=1)


def tick(pair: str, at: timedelta, bid: str, ask: str) -> Tick:
    return Tick(pair, T0 + at, D(bid), D(ask))


# -- conversion ----------------------------------------------------------------------------------


def test_one_wak_is_mrvzar_times_wakmrv_zar() -> None:
    rate = zar_per_wak(D("1.7383"), D("1.5"))
    assert rate == D("2.60745")
    assert zar_to_wak(rate, rate) == D(1)
    assert zar_to_wak(D("10"), D("2.5")) == D(4)
    assert zar_to_wak(D(1), D(3)) == D("0.3333333333")
    # the stored (rounded) product is the divisor
    m, w = D("1.2345678901"), D("1.9876543211")
    assert zar_per_wak(m, w) == D(
        "2.4538942014"
    )  # Postgres: round(1.2345678901 * 1.9876543211, 10)
    assert zar_to_wak(D(100), zar_per_wak(m, w)) == div10(D(100), D("2.4538942014"))


def test_hourly_mid_is_the_average_of_bid_ask_midpoints() -> None:
    ticks = [
        tick("MRVZAR", timedelta(minutes=1), "1.0000", "1.0100"),
        tick("MRVZAR", timedelta(minutes=59, seconds=59), "2.0000", "2.0300"),
        tick("MRVZAR", timedelta(minutes=30), "1.5000", "1.5200"),
        tick("MRVZAR", H, "1.1111", "1.1311"),  # next hour
    ]
    mids = hourly_mids(ticks)
    assert [(m.hour_start, m.mid, m.ticks) for m in mids] == [
        (T0, D("1.51"), 3),  # (1.005 + 2.015 + 1.51) / 3
        (T0 + H, D("1.1211"), 1),
    ]
    assert hourly_mids([tick("MRVZAR", timedelta(0), "1.0001", "1.0002")])[0].mid == D("1.00015")
    # mean of 3 midpoints that does not terminate: rounded once
    mids = hourly_mids(
        [
            tick("WAKMRV", timedelta(seconds=s), b, a)
            for s, b, a in [
                (1, "1.0000", "1.0100"),
                (2, "1.0000", "1.0100"),
                (3, "1.0001", "1.0100"),
            ]
        ]
    )
    assert mids[0].mid == div10(D("6.0301"), 6) == D("1.0050166667")


def test_rates_carry_forward_over_hours_without_ticks() -> None:
    ticks = [
        tick("MRVZAR", timedelta(minutes=5), "1.0000", "1.0200"),  # hour 0: WAKMRV unknown
        tick("WAKMRV", H + timedelta(minutes=5), "2.0000", "2.0200"),  # hour 1: MRVZAR carried
        tick("MRVZAR", 3 * H, "1.5000", "1.5200"),  # hour 2: nothing; hour 3: WAKMRV carried
        tick("WAKMRV", 4 * H + timedelta(seconds=1), "1.0000", "1.0000"),
        tick("MRVZAR", 4 * H + timedelta(seconds=1), "1.2000", "1.2000"),
    ]
    rates = fx_rates_hourly(ticks)
    assert rates == [
        RateHour(T0 + H, D("1.01"), D("2.01"), D("2.0301"), 0, 1, True),
        RateHour(T0 + 2 * H, D("1.01"), D("2.01"), D("2.0301"), 0, 0, True),
        RateHour(T0 + 3 * H, D("1.51"), D("2.01"), D("3.0351"), 1, 0, True),
        RateHour(T0 + 4 * H, D("1.2"), D("1"), D("1.2"), 1, 1, False),
    ]
    # incremental: continuing from a stored row gives the same rows
    assert fx_rates_hourly(ticks, carry=rates[1]) == rates[2:]
    assert fx_rates_hourly([]) == []
    with pytest.raises(ValueError, match="unknown pairs"):
        fx_rates_hourly([tick("EURUSD", H, "1", "1")])


def test_rate_lookup_is_as_of() -> None:
    rates = [
        RateHour(T0 + H, D(1), D(1), D(1), 1, 1, False),
        RateHour(T0 + 2 * H, D(2), D(1), D(2), 1, 1, False),
    ]
    lookup = RateLookup(rates)
    assert lookup.as_of(T0) is None
    assert lookup.as_of(T0 + H) is rates[0]
    assert lookup.as_of(T0 + 2 * H) is rates[1]
    assert lookup.as_of(T0 + 9 * H) is rates[1]  # after the last tick hour: last known


# -- attribution ---------------------------------------------------------------------------------

P = "0821234567890"


def test_attribution_follows_the_number_and_the_latest_claim() -> None:
    versions = [
        AccountVersion(10, P, T0, T0 + 2 * H),  # holds P, then changes number
        AccountVersion(10, "other", T0 + 2 * H, None),
        AccountVersion(20, P, T0 + H, T0 + 3 * H),  # second holder from hour 1; deleted at 3
        AccountVersion(5, P, T0 + H, None),  # same claim time as 20: smallest id wins
    ]
    idx = AccountIndex(versions)
    assert idx.account_at(P, T0 - timedelta(seconds=1)) is None
    assert idx.account_at(P, T0 + timedelta(minutes=30)) == 10
    assert idx.account_at(P, T0 + H) == 5  # 5 and 20 claim at hour 1, later than 10
    idx2 = AccountIndex([v for v in versions if v.account_id != 5])
    assert idx2.account_at(P, T0 + H) == 20
    assert idx2.account_at(P, T0 + 3 * H) is None  # 20 deleted, 10 moved to another number
    assert idx2.account_at(P, T0 + 3 * H - timedelta(microseconds=1)) == 20
    assert idx2.account_at("other", T0 + 5 * H) == 10
    with pytest.raises(ValueError, match="ends before"):
        AccountIndex([AccountVersion(1, P, T0 + H, T0)])


def test_hourly_usage_attributes_each_event_at_its_own_time() -> None:
    idx = AccountIndex([AccountVersion(10, P, T0, T0 + H), AccountVersion(20, P, T0 + H, None)])
    records = [
        DataRecord(P, 1, 100, 200, "video", T0 + timedelta(minutes=59, seconds=59)),
        VoiceRecord(P, 1, "voice", 90, T0 + timedelta(minutes=59, seconds=30)),  # ends in hour 1
        DataRecord(P, 1, 1, 2, "text", T0 + H),
        DataRecord("nobody", 1, 1, 2, "text", T0 + H),
    ]
    assert hourly_usage(records, idx) == [
        HourUsage(10, T0, 90, 300, T0 + timedelta(minutes=59, seconds=59)),
        HourUsage(20, T0 + H, 0, 3, T0 + H),
    ]


def test_device_shown_is_the_latest_valid_one_pointing_at_the_account() -> None:
    devices = DeviceIndex(
        [
            DeviceVersion(1, 10, T0, T0 + 2 * H),  # deleted at hour 2
            DeviceVersion(2, 10, T0 + H, None),
            DeviceVersion(3, 10, T0 + H, None),  # same valid_from as 2: highest id shown
            DeviceVersion(4, 11, T0, None),
            DeviceVersion(5, None, T0, None),
        ]
    )
    assert devices.device_at(10, T0).device_id == 1  # type: ignore[union-attr]
    assert [d.device_id for d in devices.devices_at(10, T0 + H)] == [3, 2, 1]
    assert [d.device_id for d in devices.devices_at(10, T0 + 2 * H)] == [3, 2]
    assert devices.device_at(12, T0) is None


# -- balance -------------------------------------------------------------------------------------


def test_hour_cost_is_each_tariff_on_the_hours_sums() -> None:
    assert hour_cost_zar(61, 123_456_789) == call_cost_zar(61) + data_cost_zar(123_456_789)
    assert hour_cost_zar(61, 123_456_789) == D("7.0660493277")


def test_balance_is_the_running_total_and_resumes_exactly() -> None:
    rates = [
        RateHour(T0, D(1), D(2), D(2), 1, 1, False),
        RateHour(T0 + H, D(1), D(3), D(3), 0, 0, True),
    ]
    usage = [
        HourUsage(1, T0, 60, 0),  # 1 ZAR at 2 ZAR/WAK
        HourUsage(1, T0 + H, 120, 0),  # 2 ZAR at 3 -> 0.6666666667
        HourUsage(1, T0 + 5 * H, 0, 10**9),  # 49 ZAR, as-of rate 3 -> 16.3333333333
        HourUsage(2, T0 + H, 1, 0),
    ]
    rows = balance_rows(usage, rates)
    assert rows == [
        BalanceRow(1, T0, 60, 0, D(1), D("0.5"), D("0.5")),
        BalanceRow(1, T0 + H, 120, 0, D(2), D("0.6666666667"), D("1.1666666667")),
        BalanceRow(1, T0 + 5 * H, 0, 10**9, D(49), D("16.3333333333"), D("17.5")),
        BalanceRow(2, T0 + H, 1, 0, D("0.0166666667"), D("0.0055555556"), D("0.0055555556")),
    ]
    # resume after the first two hours of account 1 (what an incremental run carries over)
    rest = balance_rows(usage[2:], rates, carried={1: rows[1].balance_wak})
    assert rest == rows[2:]


def test_usage_before_any_rate_has_no_wak_cost_and_adds_nothing() -> None:
    rates = [RateHour(T0 + H, D(1), D(2), D(2), 1, 1, False)]
    usage = [HourUsage(1, T0, 60, 0), HourUsage(1, T0 + H, 60, 0)]
    rows = balance_rows(usage, rates)
    assert [(r.cost_zar, r.cost_wak, r.balance_wak) for r in rows] == [
        (D(1), None, None),
        (D(1), D("0.5"), D("0.5")),
    ]
    with pytest.raises(ValueError, match="two usage rows"):
        balance_rows([usage[0], usage[0]], rates)
