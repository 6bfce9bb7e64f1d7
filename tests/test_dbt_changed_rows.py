"""Data tests that read what the build changed (dbt/macros/changed_rows.sql), on real Postgres.

A first build tests every row; a build with nothing new tests no row of the incremental marts;
an hour's build tests the rows that hold the hour's raw rows and no other. A bad row among those
fails the build's own test query; a bad older row is left to `dbt test`, which reads everything.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import psycopg
import pytest

from ingestion.generators.cdr import CdrConfig, cdr_files
from tests.fixtures.dbt import DbtProject, land_cdr_files, truncate_cdr
from tests.test_dbt_cdr import SELECT

CONFIG = CdrConfig(
    profile="realistic",
    seed=17,
    subscribers=300,
    start=datetime(2024, 1, 1, 0, 0, 0),
    duration=timedelta(hours=2),
    rows_per_file=60,
    window_seconds=300,
)
MART = "prepared_layers.cdr_usage_15min"
TEST = "in_range_cdr_usage_15min_events__1"  # events >= 1, row by row
RECONCILE = "reconciles_with_raw_cdr_usage_15min_*"  # the mart's totals against the raw rows'


def compiled_test(project: DbtProject, name: str) -> str:
    """The SQL the last invocation compiled for the data test `name` (a glob pattern): the
    failing rows' query."""
    (path,) = (project.work_dir / "target" / "compiled").rglob(f"{name}.sql")
    return Path(path).read_text()


def rows_read(conn: psycopg.Connection, test_sql: str) -> int:
    """How many mart rows the test's filtered model holds (its `dbt_subquery`, else the mart)."""
    start = test_sql.find("(select * from")
    if start < 0:
        return conn.execute(f"select count(*) from {MART}").fetchone()[0]
    end = test_sql.index(") dbt_subquery", start)
    return conn.execute(f"select count(*) from {test_sql[start : end + 1]} as s").fetchone()[0]


@pytest.fixture(scope="module")
def builds(stack, dbt_project: DbtProject) -> Iterator[dict[str, object]]:
    files = list(cdr_files(CONFIG))
    out: dict[str, object] = {}
    with psycopg.connect(stack.analytics_dsn, autocommit=True) as conn:
        truncate_cdr(conn)
        land_cdr_files(conn, files[:12])  # the first hour
        dbt_project.run("build", "--full-refresh", *SELECT)
        out["first"] = rows_read(conn, compiled_test(dbt_project, TEST))
        out["first_reconcile"] = compiled_test(dbt_project, RECONCILE)
        out["all_first"] = conn.execute(f"select count(*) from {MART}").fetchone()[0]
        out["mark_first"] = conn.execute(f"select max(max_loaded_at) from {MART}").fetchone()[0]
        # column statistics (ANALYZE after a whole build): the plans that follow use the index
        out["without_stats"] = [
            table
            for (table,) in conn.execute(
                "select t.schemaname || '.' || t.tablename from pg_tables as t"
                " where t.tablename in ('cdr_usage_15min', 'int_cdr__interactions',"
                " 'int_cdr__tower_runs', 'tower_sessions')"
                " and not exists (select from pg_stats as s where s.schemaname = t.schemaname"
                " and s.tablename = t.tablename)"
            )
        ]

        dbt_project.run("build", *SELECT)
        out["noop"] = rows_read(conn, compiled_test(dbt_project, TEST))
        out["noop_others"] = {
            name: compiled_test(dbt_project, name)
            for name in (
                "not_null_int_cdr__interactions_tower_id",
                "not_null_int_cdr__tower_runs_tower_id",
                "in_range_tower_sessions_interactions__3",
            )
        }
        noop_reconcile = compiled_test(dbt_project, RECONCILE)
        out["noop_windows"] = conn.execute(
            noop_reconcile[: noop_reconcile.index("mart as (")].rstrip().rstrip(",")
            + " select count(*) from windows"
        ).fetchone()[0]

        land_cdr_files(conn, files[12:])  # the second hour
        dbt_project.run("build", *SELECT)
        hour_sql = compiled_test(dbt_project, TEST)
        hour_reconcile = compiled_test(dbt_project, RECONCILE)
        out["hour"] = rows_read(conn, hour_sql)
        # the mart rows that hold a raw row of the second landing
        out["hour_groups"] = conn.execute(
            "select count(*) from (select distinct date_bin('15 minutes', event_ts,"
            " timestamp '2000-01-01'), msisdn, category, usage_type"
            " from intermediate.int_cdr__events where loaded_at > %s) as g",
            (out["mark_first"],),
        ).fetchone()[0]
        out["all_hour"] = conn.execute(f"select count(*) from {MART}").fetchone()[0]

        # one bad row among those the hour's build wrote, one among the first build's
        (new, new_category), (old, _) = (
            conn.execute(
                f"select ctid, category from {MART} where max_loaded_at {op} %s limit 1",
                (out["mark_first"],),
            ).fetchone()
            for op in (">", "<=")
        )
        conn.execute(f"update {MART} set events = 0 where ctid in (%s, %s)", (new, old))
        out["hour_test_fails"] = conn.execute(f"select count(*) from ({hour_sql}) as t").fetchone()[
            0
        ]
        out["new_category"] = new_category
        out["hour_reconcile_fails"] = [
            row[0] for row in conn.execute(f"select category from ({hour_reconcile}) as t")
        ]
        failed = dbt_project.run("test", "--select", "cdr_usage_15min", check=False)
        out["dbt_test"] = failed.returncode, failed.stdout
        out["dbt_test_sql"] = compiled_test(dbt_project, TEST)
    yield out


def test_a_first_build_tests_every_row(builds):
    assert builds["first"] == builds["all_first"] > 0
    assert builds["without_stats"] == []
    assert "windows as (" not in builds["first_reconcile"]  # every window


def test_a_build_with_nothing_new_tests_no_row(builds):
    assert builds["noop"] == 0
    for name, sql in builds["noop_others"].items():
        assert "dbt_subquery" in sql, (name, sql)
    assert builds["noop_windows"] == 0  # no window reconciled


def test_an_hours_build_tests_the_rows_that_hold_the_hours_rows(builds):
    assert 0 < builds["hour"] == builds["hour_groups"] < builds["all_hour"]


def test_a_bad_row_the_build_wrote_fails_its_test_and_dbt_test_reads_all(builds):
    assert builds["hour_test_fails"] == 1  # the new bad row; the old one is not read
    assert builds["hour_reconcile_fails"] == [builds["new_category"]]
    code, out = builds["dbt_test"]
    assert code != 0 and "Got 2 results" in out, out[-2000:]
    assert "Failure in test reconciles_with_raw_cdr_usage_15min" in out, out[-2000:]
    assert "max_loaded_at >" not in builds["dbt_test_sql"]
