"""Benchmark: the CDR models' incremental run grows with the new data, not with the history.

    python -m bench.dbt_cdr [--hours 6] [--factor 10] [--rows-per-file 500]

Starts a throwaway Postgres (the local stack's code, on free ports in a temporary folder),
builds two databases from the same realistic generator: a small history of `hours` hours and a
history `factor` times longer, both ending at the same hour of the day. Each is built in full
(timed: the full-refresh figure), then one more hour of CDR files is landed in each and the CDR
models run incrementally (timed). Prints the ratio large/small of the incremental run, for the
models' own execution time (dbt's run_results) and for the whole dbt invocation (which includes
dbt's fixed start-up). Goal: ratio < 1.5. Never fails on a timing.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg

from common.logs import setup_logging
from common.settings import CONTRACTS_DIR
from ingestion.cdr_landing import land_file, prepare_session
from ingestion.generators.cdr import CdrConfig, cdr_files
from ops.dbt import DBT_BIN, DBT_DIR, dbt_env
from ops.stack import throwaway

log = logging.getLogger("bench.dbt_cdr")

SELECT = ["--select", "path:models/staging/cdr", "path:models/intermediate/cdr"]
SELECT += ["path:models/marts/cdr"]
END_OF_HISTORY = datetime(2024, 1, 6, 12, 0, 0)  # the new hour is 12:00-13:00, busy but not peak


@dataclass(frozen=True)
class Timing:
    wall_s: float
    models_s: float
    per_model: dict[str, float]


def dbt(env: dict[str, str], *args: str) -> Timing:
    """Run dbt; return its wall time and the sum of its nodes' execution times."""
    started = time.perf_counter()
    done = subprocess.run(
        [str(DBT_BIN), *args], cwd=DBT_DIR, env=env, capture_output=True, text=True
    )
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"dbt {' '.join(args)} failed:\n{done.stdout[-4000:]}{done.stderr}")
    results = json.loads((Path(env["DBT_TARGET_PATH"]) / "run_results.json").read_text())
    per_model = {r["unique_id"].split(".")[-1]: r["execution_time"] for r in results["results"]}
    return Timing(wall, sum(per_model.values()), per_model)


def land(dsn: str, files: list[tuple[str, bytes]], landed_until: datetime | None) -> int:
    """Land files with the CDR loader's code.

    With `landed_until`, date the rows' `loaded_at` back as if each file had been landed at the
    end of its 5-minute window, the last one at `landed_until` (a history landed over time).
    """
    with psycopg.connect(dsn, autocommit=True) as conn:
        prepare_session(conn)
        rows = sum(land_file(conn, name, data).rows_landed for name, data in files)
        if landed_until is not None:
            windows = [datetime.strptime(n[-19:-4], "%Y%m%d_%H%M%S") for n, _ in files]
            last = max(windows)
            stamps = [landed_until - (last - w) for w in windows]
            names = [n for n, _ in files]
            for table in ("cdr_data.data_records", "cdr_data.voice_records"):
                conn.execute(
                    f"update {table} as t set loaded_at = v.loaded_at"
                    " from unnest(%s::text[], %s::timestamptz[]) as v(name, loaded_at)"
                    " where t.source_file = v.name",
                    (names, stamps),
                )
                conn.execute(f"vacuum analyze {table}")
    return rows


def generated(hours: int, rows_per_file: int, subscribers: int) -> list[tuple[str, bytes]]:
    config = CdrConfig(
        profile="realistic",
        seed=7,
        subscribers=subscribers,
        start=END_OF_HISTORY - timedelta(hours=hours),
        duration=timedelta(hours=hours + 1),
        rows_per_file=rows_per_file,
        window_seconds=300,
    )
    return list(cdr_files(config))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.dbt_cdr", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--hours", type=int, default=6, help="small history, hours (default 6)")
    parser.add_argument("--factor", type=int, default=10, help="large/small history (default 10)")
    parser.add_argument("--rows-per-file", type=int, default=500, help="rows per CDR file")
    parser.add_argument("--subscribers", type=int, default=5000, help="distinct subscribers")
    args = parser.parse_args(argv)
    setup_logging()

    hour_files = 24  # 12 windows of 5 minutes, a data and a voice file each
    sizes = {"small": args.hours, "large": args.hours * args.factor}
    with throwaway("wtc-bench-") as stack:
        settings, state_dir = stack.s, stack.state
        ddl = (CONTRACTS_DIR / "wtc_analytics.sql").read_text()
        with psycopg.connect(settings.pg_dsn("postgres"), autocommit=True) as conn:
            for name in sizes:
                conn.execute(f"create database bench_{name}")
        full: dict[str, Timing] = {}
        incremental: dict[str, Timing] = {}
        rows: dict[str, tuple[int, int]] = {}
        for name, hours in sizes.items():
            dsn = settings.pg_dsn(f"bench_{name}")
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute(ddl)
            files = generated(hours, args.rows_per_file, args.subscribers)
            history = land(dsn, files[:-hour_files], datetime.now(UTC) - timedelta(hours=1))
            env = dbt_env(settings, state_dir / name, f"bench_{name}")
            log.info("full build", extra={"history": name, "rows": history})
            full[name] = dbt(env, "run", "--full-refresh", *SELECT)
            new = land(dsn, files[-hour_files:], None)
            rows[name] = (history, new)
        for name in sizes:
            env = dbt_env(settings, state_dir / name, f"bench_{name}")
            log.info("incremental run", extra={"history": name})
            incremental[name] = dbt(env, "run", *SELECT)

    print(f"CDR models, realistic profile, {args.subscribers} subscribers")
    for name, hours in sizes.items():
        print(
            f"  {name:5} history {hours:4d} h {rows[name][0]:9d} rows:"
            f" full refresh {full[name].wall_s:6.1f} s (models {full[name].models_s:6.1f} s);"
            f" +1 h ({rows[name][1]} rows) incremental {incremental[name].wall_s:5.1f} s"
            f" (models {incremental[name].models_s:5.2f} s)"
        )
    print("  incremental run per model, small -> large (s):")
    for model, small_s in incremental["small"].per_model.items():
        large_s = incremental["large"].per_model.get(model, float("nan"))
        print(f"    {model:28} {small_s:6.2f} -> {large_s:6.2f}")
    ratio_models = incremental["large"].models_s / incremental["small"].models_s
    ratio_wall = incremental["large"].wall_s / incremental["small"].wall_s
    print(
        f"  incremental large/small ({args.factor}x history): models {ratio_models:.2f},"
        f" wall {ratio_wall:.2f} (goal < 1.5)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
