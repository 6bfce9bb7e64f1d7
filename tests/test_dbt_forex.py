"""The forex marts equal their macros_py oracle row for row, after a full build and after
incremental runs with new, gapped and late ticks; an incremental run equals a full refresh."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from decimal import Decimal

import psycopg
import pytest

from ingestion.generators.forex import ForexConfig, tick_messages
from macros_py.currency import fx_rates_hourly
from macros_py.indicators import Tick, indicators_all_pairs, ohlc_bars

OHLC = {"m1": "forex_ohlc_m1", "m30": "forex_ohlc_m30", "h1": "forex_ohlc_h1"}
MARTS = [*OHLC.values(), "fx_rates_hourly"]
SELECT = ["--select", "stg_forex__ticks", *MARTS]
OHLC_COLUMNS = (
    "pair_name, bar_start, open, high, low, close, tick_count, bar_no, ema_8, ema_21, atr_8, atr_21"
)
RATE_COLUMNS = (
    "hour_start, mrvzar_mid, wakmrv_mid, zar_per_wak, mrvzar_ticks, wakmrv_ticks, "
    "is_carried_forward"
)


def land_ticks(conn: psycopg.Connection, rows: list[tuple[str, str, Decimal, Decimal, Decimal]]):
    with conn.cursor().copy(
        "copy forex_data.ticks (pair_name, tick_ts, bid_price, ask_price, spread, source) "
        "from stdin"
    ) as copy:
        for row in rows:
            copy.write_row((*row, "test"))


def generated(start: datetime, hours: float, seed: int) -> list[tuple]:
    config = ForexConfig(seed=seed, start=start, duration=timedelta(hours=hours))
    rows = []
    for _key, value in tick_messages(config):
        tick = json.loads(value, parse_float=Decimal)
        rows.append(
            (
                tick["pair_name"],
                tick["timestamp"],
                tick["bid_price"],
                tick["ask_price"],
                tick["spread"],
            )
        )
    return rows


def assert_marts_equal_oracle(conn: psycopg.Connection) -> None:
    ticks = [
        Tick(*row)
        for row in conn.execute(
            "select pair_name, tick_ts, bid_price, ask_price from forex_data.ticks"
        )
    ]
    for width, mart in OHLC.items():
        expected = [
            (
                r.pair_name,
                r.bar_start,
                r.open,
                r.high,
                r.low,
                r.close,
                r.tick_count,
                r.bar_no,
                r.ema_8,
                r.ema_21,
                r.atr_8,
                r.atr_21,
            )
            for r in indicators_all_pairs(ohlc_bars(ticks, width))
        ]
        got = conn.execute(
            f"select {OHLC_COLUMNS} from prepared_layers.{mart} order by pair_name, bar_start"
        ).fetchall()
        assert len(got) == len(expected), mart
        assert got == expected, mart
    expected_rates = [
        (
            r.hour_start,
            r.mrvzar_mid,
            r.wakmrv_mid,
            r.zar_per_wak,
            r.mrvzar_ticks,
            r.wakmrv_ticks,
            r.is_carried_forward,
        )
        for r in fx_rates_hourly(ticks)
    ]
    got_rates = conn.execute(
        f"select {RATE_COLUMNS} from prepared_layers.fx_rates_hourly order by hour_start"
    ).fetchall()
    assert got_rates == expected_rates


def snapshot(conn: psycopg.Connection) -> dict[str, list[tuple]]:
    return {
        mart: conn.execute(f"select * from prepared_layers.{mart} order by 1, 2").fetchall()
        for mart in MARTS
    }


@pytest.fixture
def forex_conn(stack):
    with psycopg.connect(stack.analytics_dsn, autocommit=True) as conn:
        conn.execute("truncate forex_data.ticks, forex_data.rejected_messages")
        yield conn


def test_forex_marts_match_the_oracle_incrementally_and_after_a_full_refresh(
    dbt_project, forex_conn
):
    conn = forex_conn
    land_ticks(conn, generated(datetime(2024, 1, 1), hours=2.5, seed=1))
    dbt_project.run("build", "--full-refresh", *SELECT)
    assert_marts_equal_oracle(conn)
    built = snapshot(conn)
    assert all(built[m] for m in MARTS)

    # A later batch after a gap of hours without ticks, plus late ticks into old bars: one
    # long after its bar's seeds (rebuilds that tail), one in the first minutes of the series
    # (rebuilds the pair from its first bar).
    land_ticks(conn, generated(datetime(2024, 1, 1, 5, 30), hours=1.5, seed=2))
    land_ticks(
        conn,
        [
            (
                "MRVZAR",
                "2024-01-01 01:10:00.123456",
                Decimal("1.9999"),
                Decimal("2.0299"),
                Decimal("0.0300"),
            ),
            (
                "WAKMRV",
                "2024-01-01 00:00:00.000001",
                Decimal("1.0001"),
                Decimal("1.0301"),
                Decimal("0.0300"),
            ),
        ],
    )
    dbt_project.run("run", *SELECT)
    assert_marts_equal_oracle(conn)
    rates = conn.execute(
        "select count(*) filter (where is_carried_forward), count(*) "
        "from prepared_layers.fx_rates_hourly"
    ).fetchone()
    assert rates[0] >= 2  # the hours of the gap carry the rates forward
    incremental = snapshot(conn)

    dbt_project.run("run", "--full-refresh", *SELECT)
    assert snapshot(conn) == incremental

    # A run with nothing new changes nothing.
    dbt_project.run("run", *SELECT)
    assert snapshot(conn) == incremental
