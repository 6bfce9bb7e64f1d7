"""Benchmark: the forex and CRM marts on the starter's full two days.

    python -m bench.dbt_forex_crm [--hours 48]

Starts a throwaway stack (the local stack's code, free ports, a temporary folder) and lands the
starter's data for all but the last hour: forex ticks, CDR files (the balance needs usage) and
CRM transactions captured by the change-capture reader. Times a full build of the forex marts
and of the CRM marts, then lands the last hour of each source and times the incremental runs.
The incremental/full ratio is the figure that matters: an incremental run should cost what its
new hour costs, not what the history costs. Never fails on a timing.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path

import psycopg

from bench.dbt_cdr import Timing, dbt
from ingestion.cdr_landing import land_file, prepare_session
from ingestion.generators.cdr import CdrConfig, cdr_files
from ingestion.generators.crm import CrmConfig, run_crm
from ingestion.generators.forex import ForexConfig, tick_messages
from ops.logs import setup_logging
from ops.settings import PROJECT_ROOT, StackSettings
from ops.stack import free_port, running

log = logging.getLogger("bench.dbt_forex_crm")

START = datetime(2024, 1, 1)
FOREX = ["--select", "path:models/marts/forex"]
CRM = ["--select", "path:models/intermediate/crm", "path:models/marts/crm"]
SECONDS_PER_CRM_TRANSACTION = 3.45  # three statements, 1.0..1.3 s of simulated clock each


def land_ticks(dsn: str, hours: float, split: datetime) -> tuple[list[tuple], int]:
    """COPY the ticks before `split` into forex_data.ticks; return the rest and the count landed."""
    later, landed = [], 0
    config = ForexConfig(seed=0, start=START, duration=timedelta(hours=hours))
    with (
        psycopg.connect(dsn) as conn,
        conn.cursor().copy(
            "copy forex_data.ticks (pair_name, tick_ts, bid_price, ask_price, spread, source) "
            "from stdin"
        ) as copy,
    ):
        for _key, value in tick_messages(config):
            t = json.loads(value, parse_float=Decimal)
            row = (
                t["pair_name"],
                t["timestamp"],
                t["bid_price"],
                t["ask_price"],
                t["spread"],
                "bench",
            )
            if datetime.fromisoformat(t["timestamp"]) < split:
                copy.write_row(row)
                landed += 1
            else:
                later.append(row)
    return later, landed


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.dbt_forex_crm", description=__doc__)
    parser.add_argument("--hours", type=int, default=48, help="simulated span (default 48)")
    args = parser.parse_args(argv)
    setup_logging()
    split = START + timedelta(hours=args.hours - 1)

    state_dir = Path(tempfile.mkdtemp(prefix="wtc-bench-fx-"))
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
            later_ticks, ticks = land_ticks(dsn, args.hours, split)
            cdr = list(cdr_files(CdrConfig(seed=0, duration=timedelta(hours=args.hours))))
            window_of = {name: datetime.strptime(name[-19:-4], "%Y%m%d_%H%M%S") for name, _ in cdr}
            land_cdr(dsn, [f for f in cdr if window_of[f[0]] < split])
            capture_crm(env)  # the slot and its (empty) snapshot
            history_txns = int((args.hours - 1) * 3600 / SECONDS_PER_CRM_TRANSACTION)
            run_crm(CrmConfig(seed=0, transactions=history_txns), settings.prod_dsn)
            capture_crm(env)

            dbt(
                env,
                "run",
                "--select",
                "path:models/staging",
                "path:models/intermediate/cdr",
                "path:models/marts/cdr",
            )
            forex_full = dbt(env, "run", "--full-refresh", *FOREX)
            crm_full = dbt(env, "run", "--full-refresh", *CRM)

            log.info("landing the last hour")
            copy_ticks(dsn, later_ticks)
            land_cdr(dsn, [f for f in cdr if window_of[f[0]] >= split])
            hour_txns = int(3600 / SECONDS_PER_CRM_TRANSACTION)
            run_crm(CrmConfig(seed=1, transactions=hour_txns, start=split), settings.prod_dsn)
            capture_crm(env)
            dbt(env, "run", "--select", "path:models/marts/cdr")
            forex_inc = dbt(env, "run", *FOREX)
            crm_inc = dbt(env, "run", *CRM)
            with psycopg.connect(dsn) as conn:
                changes = conn.execute(
                    "select (select count(*) from crm_data.accounts_changes)"
                    " + (select count(*) from crm_data.addresses_changes)"
                    " + (select count(*) from crm_data.devices_changes)"
                ).fetchone()[0]
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)

    def line(name: str, full: Timing, inc: Timing) -> str:
        return (
            f"{name:<6} full {full.models_s:7.2f} s (dbt {full.wall_s:6.2f} s)   "
            f"one-hour incremental {inc.models_s:6.2f} s (dbt {inc.wall_s:6.2f} s)   "
            f"incremental/full {inc.models_s / full.models_s:5.2f}"
        )

    print(
        f"\nforex and CRM marts on {args.hours} h: {ticks + len(later_ticks)} ticks, "
        f"{changes} CRM changes, {sum(len(d) for _, d in cdr) // 1_000_000} MB of CDR files"
    )
    print("(model execution time from dbt's run_results; dbt's own start-up in brackets)")
    print(line("forex", forex_full, forex_inc))
    print(line("crm", crm_full, crm_inc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
