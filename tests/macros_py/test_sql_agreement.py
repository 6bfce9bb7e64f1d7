"""The SQL forms that docs/business-rules.md prescribes give exactly what the Python twins give.

Runs on the real Postgres of the `stack` fixture, in temporary tables and `pg_temp` functions only
(nothing outside this session's connection is touched).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from datetime import datetime, timedelta
from decimal import Decimal as D
from pathlib import Path

import psycopg
import pytest

from macros_py import buckets
from macros_py.currency import hourly_mids
from macros_py.indicators import Bar, IndicatorState, indicator_rows
from macros_py.numeric import div10
from macros_py.records import DataRecord, VoiceRecord
from macros_py.sessions import tower_sessions

ROOT = Path(__file__).resolve().parents[2]
INDICATOR_MACRO = ROOT / "dbt" / "macros" / "forex" / "indicator_functions.sql"
DIV10 = "round(round(({num})::numeric, 40) / ({den}), 10)"  # the doc's div10 macro
ORDER = 'event_ts, category collate "C", source_file collate "C", line_no'
T0 = datetime(2024, 1, 1)


@pytest.fixture(scope="module")
def pg(stack) -> Iterator[psycopg.Connection]:  # type: ignore[no-untyped-def]
    with psycopg.connect(stack.analytics_dsn, autocommit=True) as conn:
        yield conn


def test_div10_macro_equals_python_on_random_and_near_tie_operands(pg: psycopg.Connection) -> None:
    rng = random.Random(20)
    nums: list[D] = []
    dens: list[D] = []
    for _ in range(3000):  # random operands of the shapes the rules divide
        nums.append(D(rng.randint(0, 10**15)).scaleb(-rng.randint(0, 10)))
        dens.append(D(rng.randint(1, 10**11)).scaleb(-rng.randint(0, 10)))
    while len(nums) < 5000:  # quotients within ~1e-18 of a 10-decimal tie, but not on it
        # den = B / 1e10 (a zar_per_wak-like rate), num = A / 1e10 with 2e10 * A - m * B = r,
        # r small and odd (so m is odd): num / den = m / 2e10 + r / (2e10 * B), a near tie.
        big_b = rng.randint(10**10, 4 * 10**10)
        if math.gcd(big_b, 2 * 10**10) != 1:
            continue
        r = rng.choice([1, -1]) * (2 * rng.randint(0, 500) + 1)
        big_a = r * pow(2 * 10**10, -1, big_b) % big_b
        nums.append(D(big_a).scaleb(-10))
        dens.append(D(big_b).scaleb(-10))
    for k in range(1, 200):  # exact ties
        nums.append(D(2 * k + 1))
        dens.append(D(2 * 10**10))
    sql = f"select {DIV10.format(num='a', den='b')} from unnest(%s::numeric[], %s::numeric[]) with ordinality as t(a, b, i) order by i"  # noqa: E501
    got = [r[0] for r in pg.execute(sql, (nums, dens)).fetchall()]
    expected = [div10(n, d) for n, d in zip(nums, dens, strict=True)]
    assert got == expected


def test_round_and_tariffs_match(pg: psycopg.Connection) -> None:
    row = pg.execute(
        "select round(0.00000000025::numeric, 10), round(-0.00000000025::numeric, 10),"
        f" {DIV10.format(num='123456789::bigint * 49', den='1000000000')},"
        f" {DIV10.format(num='61::bigint', den='60')}"
    ).fetchone()
    assert row == (D("0.0000000003"), D("-0.0000000003"), D("6.049382661"), D("1.0166666667"))


def test_bucket_sql_matches_python_at_the_edges(pg: psycopg.Connection) -> None:
    rng = random.Random(21)
    stamps = [T0 + timedelta(minutes=15 * k) for k in range(8)]
    stamps += [s - timedelta(microseconds=1) for s in stamps[1:]]
    stamps += [T0 + timedelta(microseconds=rng.randrange(2 * 86_400 * 10**6)) for _ in range(500)]
    rows = pg.execute(
        "select date_trunc('minute', ts), date_bin('15 minutes', ts, timestamp '2000-01-01'),"
        " date_bin('30 minutes', ts, timestamp '2000-01-01'), date_trunc('hour', ts),"
        " date_trunc('day', ts)"
        " from unnest(%s::timestamp[]) with ordinality as t(ts, i) order by i",
        (stamps,),
    ).fetchall()
    for ts, row in zip(stamps, rows, strict=True):
        assert row == tuple(buckets.floor_to(ts, w) for w in ("1min", "15min", "30min", "1h", "1d"))


def test_gaps_and_islands_sql_equals_python_sessions(pg: psycopg.Connection) -> None:
    rng = random.Random(22)
    records: list[DataRecord | VoiceRecord] = []
    files = ["cdr_data_b.csv", "cdr-data_a.csv", "CDR_data_c.csv", "cdr_voice_a.csv"]
    for i in range(5000):
        m = f"0{rng.randint(0, 40):012d}"
        tower = rng.choice([7, 7, 7, 8, 8, 9])
        at = T0 + timedelta(seconds=rng.randrange(0, 10_800, 5))  # many ties in time
        if rng.random() < 0.3:
            records.append(VoiceRecord(m, tower, "voice", rng.randint(1, 1800), at, files[3], i))
        else:
            records.append(DataRecord(m, tower, 1, 1, "text", at, rng.choice(files[:3]), i % 50))
    pg.execute(
        "create temp table ev (msisdn text, tower_id int, category text, source_file text,"
        " line_no int, event_ts timestamp, event_end timestamp) on commit preserve rows"
    )
    with pg.cursor().copy("copy ev from stdin") as copy:
        for r in records:
            copy.write_row(
                (
                    r.msisdn,
                    r.tower_id,
                    r.category,
                    r.source_file,
                    r.line_no,
                    r.event_ts,
                    r.event_end,
                )
            )
    rows = pg.execute(
        f"""
        with numbered as (
            select *,
                row_number() over (partition by msisdn order by {ORDER})
                - row_number() over (partition by msisdn, tower_id order by {ORDER}) as island
            from ev
        )
        select msisdn, tower_id, min(event_ts), max(event_end), count(*)
        from numbered
        group by msisdn, tower_id, island
        having count(*) >= 3
        order by 1, 3, 2
        """
    ).fetchall()
    expected = [
        (s.msisdn, s.tower_id, s.session_start, s.session_end, s.interactions)
        for s in tower_sessions(records)
    ]
    assert len(expected) > 50
    assert rows == expected


def test_hourly_mid_sql_equals_python(pg: psycopg.Connection) -> None:
    from macros_py.indicators import Tick

    rng = random.Random(23)
    ticks = []
    t = T0
    while t < T0 + timedelta(hours=3):
        for pair in ("MRVZAR", "WAKMRV"):
            bid = D(rng.randint(10_000, 20_000)).scaleb(-4)
            ticks.append(Tick(pair, t, bid, bid + D(rng.randint(100, 500)).scaleb(-4)))
        t += timedelta(milliseconds=rng.randint(400, 600))
    pg.execute(
        "create temp table tk (pair_name text, tick_ts timestamp, bid_price numeric,"
        " ask_price numeric) on commit preserve rows"
    )
    with pg.cursor().copy("copy tk from stdin") as copy:
        for k in ticks:
            copy.write_row((k.pair_name, k.tick_ts, k.bid_price, k.ask_price))
    mid = DIV10.format(num="sum(bid_price + ask_price)", den="2 * count(*)")
    rows = pg.execute(
        f"select pair_name, date_trunc('hour', tick_ts), {mid}, count(*) from tk"
        " group by 1, 2 order by 1, 2"
    ).fetchall()
    assert rows == [(m.pair_name, m.hour_start, m.mid, m.ticks) for m in hourly_mids(ticks)]


def _reference_sql() -> str:
    """The indicator aggregates exactly as the dbt project creates them, in pg_temp."""
    text = INDICATOR_MACRO.read_text()
    body = text[text.index("{% macro indicator_functions(schema) %}") :]
    body = body[body.index("\n") + 1 : body.index("{% endmacro %}")]
    return body.replace("{{ schema }}", "pg_temp")


def _random_bars(n: int, seed: int) -> list[Bar]:
    rng = random.Random(seed)
    bars = []
    for i in range(n):
        ps = [D(rng.randint(10_000, 20_000)).scaleb(-4) for _ in range(rng.randint(1, 5))]
        start = T0 + timedelta(minutes=i + (i // 7) * 3)  # some bars missing
        bars.append(Bar("MRVZAR", start, ps[0], max(ps), min(ps), ps[-1], len(ps)))
    return bars


def test_reference_indicator_aggregates_equal_python_one_shot_and_resumed(
    pg: psycopg.Connection,
) -> None:
    pg.execute(_reference_sql())
    bars = _random_bars(200, seed=24)
    pg.execute(
        "create temp table bars (pair_name text, bar_start timestamp, open numeric,"
        " high numeric, low numeric) on commit preserve rows"
    )
    with pg.cursor().copy("copy bars from stdin") as copy:
        for b in bars:
            copy.write_row((b.pair_name, b.bar_start, b.open, b.high, b.low))
    w = "over (partition by pair_name order by bar_start rows between unbounded preceding and current row)"  # noqa: E501
    one_shot = pg.execute(
        f"""select row_number() over (partition by pair_name order by bar_start),
            pg_temp.wtc_ema(open, 8, null, null) {w}, pg_temp.wtc_ema(open, 21, null, null) {w},
            pg_temp.wtc_atr(high, low, open, 8, null, null, null) {w},
            pg_temp.wtc_atr(high, low, open, 21, null, null, null) {w}
        from bars order by bar_start"""
    ).fetchall()
    rows, _ = indicator_rows(bars)
    assert one_shot == [(r.bar_no, r.ema_8, r.ema_21, r.atr_8, r.atr_21) for r in rows]

    cut = 120  # an incremental run: only the bars after the last stored row, state carried over
    last = rows[cut - 1]
    resumed = pg.execute(
        f"""select pg_temp.wtc_ema(open, 8, %(k)s, %(e8)s) {w},
            pg_temp.wtc_ema(open, 21, %(k)s, %(e21)s) {w},
            pg_temp.wtc_atr(high, low, open, 8, %(k)s - 1, %(a8)s, %(o)s) {w},
            pg_temp.wtc_atr(high, low, open, 21, %(k)s - 1, %(a21)s, %(o)s) {w}
        from bars where bar_start > %(t)s order by bar_start""",
        {
            "k": last.bar_no,
            "e8": last.ema_8,
            "e21": last.ema_21,
            "a8": last.atr_8,
            "a21": last.atr_21,
            "o": last.open,
            "t": last.bar_start,
        },
    ).fetchall()
    rest, _ = indicator_rows(bars[cut:], IndicatorState.from_row(last))
    assert rest == rows[cut:]
    assert resumed == [(r.ema_8, r.ema_21, r.atr_8, r.atr_21) for r in rows[cut:]]
