"""Benchmark: the CRM marts (history, current state, crm_balance_hourly), full and incremental.

    python -m bench.dbt_crm [--hours 12] [--delete-rate 0.05]

Starts a throwaway stack (the local stack's code, free ports, a temporary folder), lands
`hours - 1` hours of the starter's CDR files and ticks and the CRM transactions of that span
(realistic deletes at `--delete-rate`) captured by the change-capture reader, and spreads that
history's `loaded_at` / `landed_at` over the day before (a history landed as it happened, so
that the last hour is what is new to the incremental run, beyond the landing lookback). Times a
full build of the CRM models, then lands the last hour of every source and times the incremental
run, and a full refresh on the same data. Prints per-model times and the incremental/full
ratio; checks that the incremental result equals the full refresh (the figures mean nothing
otherwise). Never fails on a timing.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
from datetime import datetime, timedelta
from pathlib import Path

import psycopg

from bench.dbt_cdr import Timing, dbt
from bench.dbt_forex_crm import START, capture_crm, copy_ticks, land_cdr, land_ticks
from ingestion.generators.cdr import CdrConfig, cdr_files
from ingestion.generators.crm import CrmConfig, run_crm
from ops.logs import setup_logging
from ops.settings import PROJECT_ROOT, StackSettings
from ops.stack import free_port, running

log = logging.getLogger("bench.dbt_crm")

UPSTREAM = ["--select", "path:models/staging", "path:models/intermediate/cdr", "fx_rates_hourly"]
CRM = ["--select", "path:models/intermediate/crm", "path:models/marts/crm"]
SECONDS_PER_CRM_TRANSACTION = 3.45  # three statements, 1.0..1.3 s of simulated clock each
BALANCE_COLUMNS = (
    "account_id, hour_start, call_seconds, data_bytes, cost_zar, cost_wak, balance_wak"
)
RAW_LANDED = {
    "cdr_data.data_records": "loaded_at",
    "cdr_data.voice_records": "loaded_at",
    "forex_data.ticks": "landed_at",
    "crm_data.accounts_changes": "landed_at",
    "crm_data.addresses_changes": "landed_at",
    "crm_data.devices_changes": "landed_at",
}


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
        out = {
            "crm_balance_hourly": conn.execute(
                f"select {BALANCE_COLUMNS} from prepared_layers.crm_balance_hourly order by 1, 2"
            ).fetchall()
        }
        for table, key in (("accounts", "account_id"), ("devices", "device_id")):
            out[table] = conn.execute(
                f"select {key}, version_lsn, valid_from, valid_to from "
                f"prepared_layers.crm_{table}_history order by 1, 2"
            ).fetchall()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.dbt_crm", description=__doc__)
    parser.add_argument("--hours", type=int, default=12, help="simulated span (default 12)")
    parser.add_argument("--delete-rate", type=float, default=0.05, help="CRM delete share")
    args = parser.parse_args(argv)
    setup_logging()
    split = START + timedelta(hours=args.hours - 1)

    state_dir = Path(tempfile.mkdtemp(prefix="wtc-bench-crm-"))
    state_dir.chmod(0o755)
    settings = StackSettings(
        state_dir=state_dir, pg_port=free_port(), redis_port=free_port(), sftp_port=free_port()
    )
    try:
        with running(settings):
            dsn = settings.analytics_dsn
            env = {
                **{k: v for k, v in os.environ.items() if not k.startswith(("WTC_", "DBT_"))},
                "WTC_ANALYTICS_DSN": dsn,
                "WTC_PROD_DSN": settings.prod_dsn,
                "WTC_PG_HOST": settings.host,
                "WTC_PG_PORT": str(settings.pg_port),
                "WTC_PG_USER": settings.pg_user,
                "WTC_PG_PASSWORD": settings.pg_password,
                "DBT_PROFILES_DIR": str(PROJECT_ROOT / "dbt"),
                "DBT_TARGET_PATH": str(state_dir / "dbt-target"),
                "DBT_LOG_PATH": str(state_dir / "dbt-logs"),
            }
            log.info("landing %d hours of ticks, CDR files and CRM changes", args.hours - 1)
            later_ticks, _ = land_ticks(dsn, args.hours, split)
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
            full = dbt(env, "run", "--full-refresh", *CRM)

            log.info("landing the last hour")
            copy_ticks(dsn, later_ticks)
            land_cdr(dsn, [f for f in cdr if window_of[f[0]] >= split])
            hour_txns = int(3600 / SECONDS_PER_CRM_TRANSACTION)
            run_crm(
                CrmConfig(
                    seed=1, transactions=hour_txns, start=split, delete_rate=args.delete_rate
                ),
                settings.prod_dsn,
            )
            capture_crm(env)
            dbt(env, "run", *UPSTREAM)
            inc = dbt(env, "run", *CRM)
            incremental = contents(dsn)
            refresh = dbt(env, "run", "--full-refresh", *CRM)
            refreshed = contents(dsn)
            with psycopg.connect(dsn) as conn:
                changes, rows = conn.execute(
                    "select (select count(*) from crm_data.accounts_changes)"
                    " + (select count(*) from crm_data.addresses_changes)"
                    " + (select count(*) from crm_data.devices_changes),"
                    " (select count(*) from prepared_layers.crm_balance_hourly)"
                ).fetchone()
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)

    def show(name: str, t: Timing) -> None:
        slow = sorted(t.per_model.items(), key=lambda kv: -kv[1])[:5]
        print(f"{name:<22} {t.models_s:7.2f} s (dbt {t.wall_s:6.2f} s)   slowest: " +
              ", ".join(f"{m} {s:.2f}" for m, s in slow))  # fmt: skip

    print(f"\nCRM marts on {args.hours} h: {changes} CRM changes, {rows} balance rows")
    print("(model execution time from dbt's run_results; dbt's own start-up in brackets)")
    show("full build", full)
    show("one-hour incremental", inc)
    show("full refresh after", refresh)
    print(f"incremental/full {inc.models_s / refresh.models_s:.2f}")
    same = incremental == refreshed
    print(f"incremental equals full refresh: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
