"""Benchmark: what an incremental `dbt build` costs right after a bulk load, and with history.

    python -m bench.dbt_incremental [--hours 6] [--factor 10] [--subscribers 2000]

Starts a throwaway Postgres (the local stack's code, free ports, a temporary folder) and builds
two databases from the same generators: a history of `hours` hours (1x) and one `factor` times
longer (more days, same subscribers and rate: what a warehouse accumulates), both ending at the
same hour of the day. In each, the history is bulk-loaded as it is in production (every row
stamped `now()` by its landing transaction, CDR files with the loader's code, ticks by COPY, a
CRM snapshot of one account per subscriber), then, timed with the whole project's `dbt build`
as production runs it (models and data tests; the unit tests run in `make test`, ops/dbt.py):

1. the first build;
2. a no-op build right after it (nothing new landed);
3. one more hour landed (CDR files, ticks, a few CRM changes) and a build.

Prints each figure, split into models and tests (dbt's run_results), the ratios no-op/first and
one hour at `factor`x / at 1x, and the load average. Never fails on a timing.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import psycopg

from bench.dbt_forex_crm import copy_ticks, tick_rows
from common.logs import setup_logging
from common.settings import CONTRACTS_DIR
from ingestion.cdr_landing import land_file, prepare_session
from ingestion.generators.cdr import CdrConfig, cdr_files
from ingestion.generators.forex import ForexConfig
from ops.dbt import DBT_BIN, DBT_DIR, PRODUCTION_BUILD_EXCLUDES, dbt_env
from ops.stack import throwaway

log = logging.getLogger("bench.dbt_incremental")

END_OF_HISTORY = datetime(2024, 1, 11, 12, 0, 0)  # the new hour is 12:00-13:00
NEW_HOUR = timedelta(hours=1)


@dataclass(frozen=True)
class Timing:
    wall_s: float
    models_s: float
    tests_s: float
    slowest: list[tuple[str, float]]


def build(env: dict[str, str], *args: str) -> Timing:
    """Run `dbt build`; its wall time, and its models' and tests' execution times."""
    started = time.perf_counter()
    done = subprocess.run(
        [str(DBT_BIN), "build", *PRODUCTION_BUILD_EXCLUDES, *args],
        cwd=DBT_DIR,
        env=env,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"dbt build failed:\n{done.stdout[-4000:]}{done.stderr}")
    results = json.loads((Path(env["DBT_TARGET_PATH"]) / "run_results.json").read_text())
    times = {r["unique_id"]: r["execution_time"] for r in results["results"]}
    models = sum(t for uid, t in times.items() if uid.startswith("model."))
    slowest = sorted(times.items(), key=lambda kv: -kv[1])[:5]
    return Timing(wall, models, sum(times.values()) - models, slowest)


def land_cdr(dsn: str, files: list[tuple[str, bytes]]) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        prepare_session(conn)
        return sum(land_file(conn, name, data).rows_landed for name, data in files)


def land_ticks(dsn: str, start: datetime, end: datetime) -> int:
    rows = list(tick_rows(ForexConfig(seed=0, start=start, duration=end - start)))
    copy_ticks(dsn, rows)
    return len(rows)


def land_crm(dsn: str, lsn: int, at: datetime, limit: int | None) -> None:
    """A CRM snapshot (`r`) of one account per msisdn (limit None), or `limit` updates at `at`."""
    op, rows = ("r", "") if limit is None else ("u", f"limit {limit}")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "insert into crm_data.accounts_changes (account_id, owner_name, phone_number,"
            " modified_ts, __op, __lsn, __source_ts_ms)"
            f" select row_number() over (order by msisdn), 'owner ' || msisdn, msisdn, %s, '{op}',"
            f" %s, 0 from (select distinct msisdn from cdr_data.data_records order by 1 {rows}) m",
            (at, lsn),
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.dbt_incremental", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--hours", type=int, default=6, help="1x history, hours (default 6)")
    parser.add_argument("--factor", type=int, default=10, help="large/small history (default 10)")
    parser.add_argument("--subscribers", type=int, default=2000, help="distinct subscribers")
    parser.add_argument("--rows-per-file", type=int, default=500, help="rows per CDR file")
    args = parser.parse_args(argv)
    setup_logging()

    sizes = {"1x": args.hours, f"{args.factor}x": args.hours * args.factor}
    timings: dict[str, dict[str, Timing]] = {}
    rows: dict[str, tuple[int, int]] = {}
    load = [os.getloadavg()[0]]
    with throwaway("wtc-bench-inc-") as stack:
        settings, state_dir = stack.s, stack.state
        ddl = (CONTRACTS_DIR / "wtc_analytics.sql").read_text()
        with psycopg.connect(settings.pg_dsn("postgres"), autocommit=True) as conn:
            for name in sizes:
                conn.execute(f"create database bench_{name}")
        for name, hours in sizes.items():
            dsn = settings.pg_dsn(f"bench_{name}")
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute(ddl)
            start = END_OF_HISTORY - timedelta(hours=hours)
            config = CdrConfig(
                profile="realistic",
                seed=7,
                subscribers=args.subscribers,
                start=start,
                duration=timedelta(hours=hours) + NEW_HOUR,
                rows_per_file=args.rows_per_file,
                window_seconds=300,
            )
            files = list(cdr_files(config))
            window = {n: datetime.strptime(n[-19:-4], "%Y%m%d_%H%M%S") for n, _ in files}
            log.info("bulk load", extra={"history": name})
            history = land_cdr(dsn, [f for f in files if window[f[0]] < END_OF_HISTORY])
            history += land_ticks(dsn, start, END_OF_HISTORY)
            land_crm(dsn, 1000, start, None)
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("vacuum analyze")
            env = dbt_env(settings, state_dir / name, f"bench_{name}")
            log.info("first build", extra={"history": name})
            first = build(env)
            log.info("no-op build", extra={"history": name})
            noop = build(env)
            new = land_cdr(dsn, [f for f in files if window[f[0]] >= END_OF_HISTORY])
            new += land_ticks(dsn, END_OF_HISTORY, END_OF_HISTORY + NEW_HOUR)
            land_crm(dsn, 2000, END_OF_HISTORY + timedelta(minutes=30), 20)
            log.info("one-hour build", extra={"history": name})
            hour = build(env)
            timings[name] = {"first build": first, "no-op build": noop, "one-hour build": hour}
            rows[name] = (history, new)
            load.append(os.getloadavg()[0])

    print(f"\nwhole project `dbt build`; {args.subscribers} subscribers, load average {load}")
    for name, by_step in timings.items():
        print(f"{name}: {rows[name][0]} rows of history, {rows[name][1]} new rows in the hour")
        for step, t in by_step.items():
            slow = ", ".join(f"{uid.split('.')[-1]} {s:.1f}" for uid, s in t.slowest[:3])
            print(
                f"  {step:15} wall {t.wall_s:6.1f} s  models {t.models_s:6.1f} s"
                f"  tests {t.tests_s:6.1f} s   slowest: {slow}"
            )
        noop, first = by_step["no-op build"], by_step["first build"]
        print(
            f"  no-op / first build: wall {noop.wall_s / first.wall_s:.3f},"
            f" models+tests {(noop.models_s + noop.tests_s) / (first.models_s + first.tests_s):.3f}"
            " (goal <= 0.10)"
        )
    small, large = (timings[name]["one-hour build"] for name in sizes)
    print(
        f"one-hour build {args.factor}x / 1x: wall {large.wall_s / small.wall_s:.2f},"
        f" models {large.models_s / small.models_s:.2f}, tests {large.tests_s / small.tests_s:.2f}"
        " (goal <= 1.5)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
