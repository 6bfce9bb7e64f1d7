"""Rounding, time buckets, tariffs and usage windows."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from decimal import Decimal as D
from fractions import Fraction

import pytest

from macros_py import buckets, tariffs
from macros_py.numeric import div10, round10
from macros_py.records import DataRecord, VoiceRecord
from macros_py.usage import event_measure, roll_up, usage_windows

# -- numbers -------------------------------------------------------------------------------------


def _reference_div10(num: Fraction, den: Fraction) -> Fraction:
    q = num / den * 10**10
    whole = abs(q.numerator) // abs(q.denominator)
    if abs(q) - whole >= Fraction(1, 2):
        whole += 1
    return Fraction(-whole if q < 0 else whole, 10**10)


def test_div10_rounds_the_exact_quotient_half_away_from_zero() -> None:
    assert div10(1, 3) == D("0.3333333333")
    assert div10(2, 3) == D("0.6666666667")
    assert div10(-2, 3) == D("-0.6666666667")
    # exact ties at the 11th decimal go away from zero (not to even)
    assert div10(1, 2 * 10**10) == D("0.0000000001")
    assert div10(3, 2 * 10**10) == D("0.0000000002")
    assert div10(-1, 2 * 10**10) == D("-0.0000000001")
    assert div10(D("1.2345678"), D("3.1234567891")) == D("0.3952568847")
    with pytest.raises(ZeroDivisionError):
        div10(1, 0)
    with pytest.raises(TypeError):
        div10(1.5, 2)  # type: ignore[arg-type]


def test_div10_matches_fraction_reference_on_random_operands() -> None:
    rng = random.Random(5)
    for _ in range(2000):
        num = D(rng.randint(-(10**14), 10**14)).scaleb(-rng.randint(0, 10))
        den = D(rng.randint(1, 10**12)).scaleb(-rng.randint(0, 10))
        got = div10(num, den)
        assert Fraction(got) == _reference_div10(Fraction(num), Fraction(den))
        assert got.as_tuple().exponent == -10


def test_round10_is_half_away_from_zero() -> None:
    assert round10(D("0.00000000005")) == D("0.0000000001")
    assert round10(D("0.00000000015")) == D("0.0000000002")  # half-even would give ...2 too
    assert round10(D("0.00000000025")) == D("0.0000000003")  # half-even would give ...2
    assert round10(D("-0.00000000025")) == D("-0.0000000003")
    assert round10(D("0.000000000049999")) == D("0")


# -- buckets -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ts", "width", "expected"),
    [
        ("2024-01-01 00:15:00", "15min", "2024-01-01 00:15:00"),
        ("2024-01-01 00:14:59.999999", "15min", "2024-01-01 00:00:00"),
        ("2024-01-01 00:29:59.999999", "15min", "2024-01-01 00:15:00"),
        ("2024-01-01 00:30:00", "30min", "2024-01-01 00:30:00"),
        ("2024-01-01 00:59:59.999999", "30min", "2024-01-01 00:30:00"),
        ("2024-01-01 01:00:00", "1h", "2024-01-01 01:00:00"),
        ("2024-01-01 00:59:59.999999", "1h", "2024-01-01 00:00:00"),
        ("2024-01-01 23:59:59.999999", "1d", "2024-01-01 00:00:00"),
        ("2024-01-02 00:00:00", "1d", "2024-01-02 00:00:00"),
        ("2024-01-01 00:00:59.999999", "m1", "2024-01-01 00:00:00"),
        ("2024-01-01 00:01:00", "m1", "2024-01-01 00:01:00"),
        ("2024-01-01 13:47:12.5", "h1", "2024-01-01 13:00:00"),
        ("2024-01-01 13:47:12.5", "m30", "2024-01-01 13:30:00"),
    ],
)
def test_window_edges(ts: str, width: str, expected: str) -> None:
    assert buckets.floor_to(datetime.fromisoformat(ts), width) == datetime.fromisoformat(expected)


def test_buckets_refuse_aware_timestamps_and_unknown_widths() -> None:
    with pytest.raises(ValueError, match="naive"):
        buckets.floor_hour(datetime(2024, 1, 1, tzinfo=UTC))
    with pytest.raises(ValueError, match="unknown width"):
        buckets.floor_to(datetime(2024, 1, 1), "7min")
    with pytest.raises(ValueError, match="unsupported width"):
        buckets.floor_to(datetime(2024, 1, 1), timedelta(minutes=7))


def test_bucket_is_the_unique_window_containing_the_event() -> None:
    rng = random.Random(1)
    base = datetime(2024, 1, 1)
    for _ in range(500):
        ts = base + timedelta(microseconds=rng.randrange(2 * 86_400 * 10**6))
        for name, width in buckets.WIDTHS.items():
            start = buckets.floor_to(ts, name)
            assert start <= ts < start + width
            assert (start - base) % width == timedelta(0)


# -- tariffs -------------------------------------------------------------------------------------


def test_gb_is_si_and_data_costs_are_exact() -> None:
    assert tariffs.GB_BYTES == 10**9
    assert tariffs.data_cost_zar(10**9) == D(49)
    assert tariffs.data_cost_zar(1) == D("0.000000049")
    assert tariffs.data_cost_zar(123_456_789) == D("6.049382661")
    assert tariffs.data_cost_zar(0) == D(0)
    # per byte exactly: the cost of a sum is the sum of the costs
    assert tariffs.data_cost_zar(300_000 + 1_700_001) == tariffs.data_cost_zar(
        300_000
    ) + tariffs.data_cost_zar(1_700_001)
    # the setting is one number
    assert tariffs.data_cost_zar(2**30, gb_bytes=2**30) == D(49)


def test_call_costs_per_second() -> None:
    assert tariffs.call_cost_zar(60) == D(1)
    assert tariffs.call_cost_zar(1) == D("0.0166666667")
    assert tariffs.call_cost_zar(61) == D("1.0166666667")
    assert tariffs.call_cost_zar(1800) == D(30)
    assert tariffs.call_cost_zar(2) == D("0.0333333333")
    # rounded per call, so a sum of per-call costs is not the cost of the summed seconds
    assert tariffs.call_cost_zar(1) * 3 != tariffs.call_cost_zar(3)
    assert tariffs.call_cost_zar(3) == D("0.05")


def test_tariffs_refuse_bad_input() -> None:
    with pytest.raises(ValueError):
        tariffs.call_cost_zar(-1)
    with pytest.raises(TypeError):
        tariffs.data_cost_zar(1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="category"):
        tariffs.cost_zar("sms", 0, 0)


# -- usage windows -------------------------------------------------------------------------------

T0 = datetime(2024, 1, 1)


def _data(msisdn: str, at: timedelta, up: int, down: int, kind: str = "video") -> DataRecord:
    return DataRecord(msisdn, 1, up, down, kind, T0 + at)


def _call(msisdn: str, at: timedelta, seconds: int, kind: str = "voice") -> VoiceRecord:
    return VoiceRecord(msisdn, 1, kind, seconds, T0 + at)


def test_usage_windows_sum_and_bill_per_row() -> None:
    m = "0123456789012"
    records = [
        _data(m, timedelta(minutes=1), 100, 200),
        _data(m, timedelta(minutes=14, seconds=59), 1, 2),
        _data(m, timedelta(minutes=15), 1000, 0),  # next window
        _data(m, timedelta(minutes=2), 5, 5, "audio"),
        _call(m, timedelta(minutes=14, seconds=50), 1800),  # counted wholly at its start
        _call(m, timedelta(minutes=3), 1),
        _call(m, timedelta(minutes=4), 2, "video"),
    ]
    rows = usage_windows(records, "15min")
    by_key = {r.key: r for r in rows}
    video = by_key[(T0, m, "data", "video")]
    assert (video.events, video.up_bytes, video.down_bytes, video.total_bytes, video.seconds) == (
        2,
        101,
        202,
        303,
        0,
    )
    assert video.cost_zar == tariffs.data_cost_zar(303)
    voice = by_key[(T0, m, "call", "voice")]
    assert (voice.events, voice.seconds, voice.total_bytes) == (2, 1801, 0)
    assert voice.cost_zar == D("30.0166666667")
    assert by_key[(T0 + timedelta(minutes=15), m, "data", "video")].total_bytes == 1000
    assert [r.key for r in rows] == sorted(r.key for r in rows)
    assert len(rows) == 5  # data video, data audio, call voice, call video, next window


def test_roll_up_equals_direct_windows_and_rebills_sums() -> None:
    rng = random.Random(7)
    records: list[DataRecord | VoiceRecord] = []
    for _ in range(3000):
        m = f"27{rng.randint(0, 20):011d}"
        at = timedelta(seconds=rng.randrange(3 * 3600), microseconds=rng.choice([0, 123456]))
        if rng.random() < 0.5:
            kind = rng.choice(["video", "audio", "text"])
            up, down = rng.randint(100_000, 1_000_000), rng.randint(100_000, 1_000_000)
            records.append(_data(m, at, up, down, kind))
        else:
            records.append(_call(m, at, rng.randint(1, 1800), rng.choice(["voice", "video"])))
    m15 = usage_windows(records, "15min")
    assert roll_up(m15, "30min") == usage_windows(records, "30min")
    assert roll_up(m15, "1h") == usage_windows(records, "1h")
    # totals reconcile with the raw records
    assert sum(r.total_bytes for r in m15) == sum(
        r.total_bytes for r in records if isinstance(r, DataRecord)
    )
    assert sum(r.seconds for r in m15) == sum(
        r.call_duration_sec for r in records if isinstance(r, VoiceRecord)
    )
    assert sum(r.events for r in m15) == len(records)
    # data cost reconciles exactly; call cost within half a unit of the 10th decimal per row
    data_rows = [r for r in m15 if r.category == "data"]
    assert sum(r.cost_zar for r in data_rows) == tariffs.data_cost_zar(
        sum(r.total_bytes for r in data_rows)
    )
    call_rows = [r for r in m15 if r.category == "call"]
    drift = abs(
        sum(r.cost_zar for r in call_rows)
        - tariffs.call_cost_zar(sum(r.seconds for r in call_rows))
    )
    assert drift <= D("0.5e-10") * len(call_rows)


def test_event_measure_for_the_usage_api() -> None:
    m = event_measure(_data("1", timedelta(0), 10, 32))
    assert (m.category, m.usage_type, m.total, m.measure) == ("data", "video", 42, "bytes")
    c = event_measure(_call("1", timedelta(0), 89))
    assert (c.category, c.usage_type, c.total, c.measure) == ("call", "voice", 89, "seconds")
