"""Benchmark: the forex and CRM marts, full build and one-hour incremental.

    python -m bench.dbt_forex_crm [--hours 48] [--delete-rate 0.05]

Starts a throwaway stack (the local stack's code, free ports, a temporary folder), lands
`hours - 1` hours of the starter's ticks and CDR files (the balance needs usage) and the CRM
transactions of that span (realistic deletes at `--delete-rate`) captured by the change-capture
reader, and spreads that history's `loaded_at` / `landed_at` over the day before (a history
landed as it happened, so that only the last hour is new to the incremental run, beyond the
landing lookback). Times a full build of the forex marts and of the CRM marts, lands the last
hour of every source, times the incremental runs, then a full refresh on the same data, and
checks that the incremental results equal the full refresh (the figures mean nothing otherwise).
Prints per-model times and the incremental/full ratios. Never fails on a timing.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime, timedelta
from decimal import Decimal

import psycopg

from bench.dbt_cdr import Timing, dbt
from common.logs import setup_logging
from common.settings import PROJECT_ROOT
from ingestion.cdr_landing import land_file, prepare_session
from ingestion.generators.cdr import CdrConfig, cdr_files
from ingestion.generators.crm import CrmConfig, run_crm
from ingestion.generators.forex import ForexConfig, tick_messages
from ops.dbt import dbt_env
from ops.stack import throwaway

log = logging.getLogger("bench.dbt_forex_crm")

START = datetime(2024, 1, 1)
UPSTREAM = ["--select", "path:models/staging", "path:models/intermediate/cdr"]
FOREX = ["--select", "path:models/marts/forex"]
CRM = ["--select", "path:models/intermediate/crm", "path:models/marts/crm"]
SECONDS_PER_CRM_TRANSACTION = 3.45  # three statements, 1.0..1.3 s of simulated clock each
RAW_LANDED = {
    "cdr_data.data_records": "loaded_at",
    "cdr_data.voice_records": "loaded_at",
    "forex_data.ticks": "landed_at",
    "crm_data.accounts_changes": "landed_at",
    "crm_data.addresses_changes": "landed_at",
    "crm_data.devices_changes": "landed_at",
}
# What an incremental run must reproduce exactly (the watermark columns record what a run saw).
CONTENTS = {
    "forex_ohlc_m1": "pair_name, bar_start, open, high, low, close, tick_count, bar_no, "
    "ema_8, ema_21, atr_8, atr_21",
    "forex_ohlc_h1": "pair_name, bar_start, open, high, low, close, tick_count, bar_no, "
    "ema_8, ema_21, atr_8, atr_21",
    "fx_rates_hourly": "hour_start, mrvzar_mid, wakmrv_mid, zar_per_wak, is_carried_forward",
    "crm_balance_hourly": "account_id, hour_start, call_seconds, data_bytes, cost_zar, cost_wak, "
    "balance_wak",
    "crm_accounts_history": "account_id, version_lsn, valid_from, valid_to",
    "crm_devices_history": "device_id, version_lsn, valid_from, valid_to",
}


def tick_rows(config: ForexConfig) -> Iterator[tuple]:
    """The generator's ticks as forex_data.ticks rows (source `bench`), in its order."""
    for _key, value in tick_messages(config):
        t = json.loads(value, parse_float=Decimal)
        yield (t["pair_name"], t["timestamp"], t["bid_price"], t["ask_price"], t["spread"], "bench")


def land_ticks(dsn: str, hours: float, split: datetime) -> tuple[list[tuple], int]:
    """COPY the ticks before `split` into forex_data.ticks; return the rest and the count landed."""
    before, later = [], []
    for row in tick_rows(ForexConfig(seed=0, start=START, duration=timedelta(hours=hours))):
        (before if datetime.fromisoformat(row[1]) < split else later).append(row)
    copy_ticks(dsn, before)
    return later, len(before)


def copy_ticks(dsn: str, rows: list[tuple]) -> None:
    with (
        psycopg.connect(dsn) as conn,
        conn.cursor().copy(
            "copy forex_data.ticks (pair_name, tick_ts, bid_price, ask_price, spread, source) "
            "from stdin"
        ) as copy,
    ):
        for row in rows:
            copy.write_row(row)


def land_cdr(dsn: str, files: list[tuple[str, bytes]]) -> None:
    with psycopg.connect(dsn) as conn:
        prepare_session(conn)
        for name, data in files:
            land_file(conn, name, data)


def capture_crm(env: dict[str, str]) -> None:
    subprocess.run(
        [sys.executable, "-m", "ingestion.crm_cdc", "--once"],
        cwd=PROJECT_ROOT,
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
    )


def date_back(dsn: str, hours: float) -> None:
    """Spread the landed history over the day before (as if landed as it happened): each row's
    landing time follows its event time (CDR, ticks) or its log position (CRM), the last one a
    day ago."""
    events = {
        "cdr_data.data_records": ("loaded_at", "event_datetime"),
        "cdr_data.voice_records": ("loaded_at", "start_time"),
        "forex_data.ticks": ("landed_at", "tick_ts"),
    }
    with psycopg.connect(dsn, autocommit=True) as conn:
        for table, (landed, at) in events.items():
            conn.execute(
                f"update {table} set {landed} = now() - interval '1 day'"
                f" - ((select max({at}) from {table}) - {at})"
            )
        crm = [t for t in RAW_LANDED if t.startswith("crm_data.")]
        union = " union all ".join(f"select __lsn from {t}" for t in crm)
        low, high = conn.execute(f"select min(__lsn), max(__lsn) from ({union}) as log").fetchone()
        for table in crm:
            conn.execute(
                f"update {table} set landed_at = now() - interval '1 day'"
                f" - (%s - __lsn)::float8 / greatest(%s - %s, 1) * %s * interval '1 hour'",
                (high, high, low, hours),
            )
        for table in RAW_LANDED:
            conn.execute(f"vacuum analyze {table}")


def contents(dsn: str) -> dict[str, list[tuple]]:
    with psycopg.connect(dsn) as conn:
        return {
            mart: conn.execute(
                f"select {columns} from prepared_layers.{mart} order by 1, 2"
            ).fetchall()
            for mart, columns in CONTENTS.items()
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.dbt_forex_crm", description=__doc__)
    parser.add_argument("--hours", type=int, default=48, help="simulated span (default 48)")
    parser.add_argument("--delete-rate", type=float, default=0.05, help="CRM delete share")
    args = parser.parse_args(argv)
    setup_logging()
    split = START + timedelta(hours=args.hours - 1)

    timings: dict[str, Timing] = {}
    with throwaway("wtc-bench-fx-") as stack:
        settings, state_dir = stack.s, stack.state
        dsn = settings.analytics_dsn
        env = {
            **dbt_env(settings, state_dir / "dbt"),
            "WTC_ANALYTICS_DSN": dsn,
            "WTC_PROD_DSN": settings.prod_dsn,
        }
        log.info("landing %d hours of ticks, CDR files and CRM changes", args.hours - 1)
        later_ticks, ticks = land_ticks(dsn, args.hours, split)
        cdr = list(cdr_files(CdrConfig(seed=0, duration=timedelta(hours=args.hours))))
        window_of = {name: datetime.strptime(name[-19:-4], "%Y%m%d_%H%M%S") for name, _ in cdr}
        land_cdr(dsn, [f for f in cdr if window_of[f[0]] < split])
        capture_crm(env)  # the slot and its (empty) snapshot
        history_txns = int((args.hours - 1) * 3600 / SECONDS_PER_CRM_TRANSACTION)
        crm = CrmConfig(seed=0, transactions=history_txns, delete_rate=args.delete_rate)
        run_crm(crm, settings.prod_dsn)
        capture_crm(env)
        date_back(dsn, args.hours - 1)
        dbt(env, "run", *UPSTREAM)
        timings["forex full build"] = dbt(env, "run", "--full-refresh", *FOREX)
        timings["crm full build"] = dbt(env, "run", "--full-refresh", *CRM)

        log.info("landing the last hour")
        copy_ticks(dsn, later_ticks)
        land_cdr(dsn, [f for f in cdr if window_of[f[0]] >= split])
        hour_txns = int(3600 / SECONDS_PER_CRM_TRANSACTION)
        run_crm(
            CrmConfig(seed=1, transactions=hour_txns, start=split, delete_rate=args.delete_rate),
            settings.prod_dsn,
        )
        capture_crm(env)
        dbt(env, "run", *UPSTREAM)
        timings["forex one-hour incremental"] = dbt(env, "run", *FOREX)
        timings["crm one-hour incremental"] = dbt(env, "run", *CRM)
        incremental = contents(dsn)
        timings["forex full refresh after"] = dbt(env, "run", "--full-refresh", *FOREX)
        timings["crm full refresh after"] = dbt(env, "run", "--full-refresh", *CRM)
        refreshed = contents(dsn)
        with psycopg.connect(dsn) as conn:
            changes, rows = conn.execute(
                "select (select count(*) from crm_data.accounts_changes)"
                " + (select count(*) from crm_data.addresses_changes)"
                " + (select count(*) from crm_data.devices_changes),"
                " (select count(*) from prepared_layers.crm_balance_hourly)"
            ).fetchone()

    print(
        f"\nforex and CRM marts on {args.hours} h: {ticks + len(later_ticks)} ticks, "
        f"{changes} CRM changes, {rows} balance rows"
    )
    print("(model execution time from dbt's run_results; dbt's own start-up in brackets)")
    for name, t in timings.items():
        slow = sorted(t.per_model.items(), key=lambda kv: -kv[1])[:4]
        print(f"{name:<28} {t.models_s:7.2f} s (dbt {t.wall_s:6.2f} s)   slowest: " +
              ", ".join(f"{m} {s:.2f}" for m, s in slow))  # fmt: skip
    for part in ("forex", "crm"):
        inc = timings[f"{part} one-hour incremental"].models_s
        full = timings[f"{part} full refresh after"].models_s
        print(f"{part}: incremental/full {inc / full:.2f}")
    same = {mart: incremental[mart] == refreshed[mart] for mart in CONTENTS}
    print(f"incremental equals full refresh: {same}")
    return 0 if all(same.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
