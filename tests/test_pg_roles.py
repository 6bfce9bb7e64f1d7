"""Postgres roles through the real server: each job's role does its job and nothing beyond it,
and the server takes only SCRAM passwords on loopback."""

from __future__ import annotations

import os
import subprocess

import httpx
import psycopg
import pytest
import yaml
from psycopg import errors

from ops.stack import free_port, wait_until
from ops.stack.monitoring import POSTGRES_EXPORTER, POSTGRES_QUERIES
from ops.stack.pg_roles import ROLES


def connect(stack, role: str, database: str = "wtc_analytics") -> psycopg.Connection:
    return psycopg.connect(stack.settings.pg_dsn(database, role), autocommit=True)


@pytest.fixture(scope="module")
def prepared_table(stack):
    """A table in prepared_layers, made by dbt's role as a dbt run makes them."""
    with connect(stack, "dbt") as conn:
        conn.execute("create table if not exists prepared_layers.t_roles (id int primary key)")
        conn.execute("insert into prepared_layers.t_roles values (1) on conflict do nothing")
    yield "prepared_layers.t_roles"
    with connect(stack, "dbt") as conn:
        conn.execute("drop table prepared_layers.t_roles")


DENIED = (errors.InsufficientPrivilege, errors.UndefinedTable)


def test_the_loaders_role_writes_raw_and_cannot_touch_a_prepared_table(
    stack, analytics, prepared_table
) -> None:
    with connect(stack, "loader") as conn:
        conn.execute(
            "insert into cdr_data.rejected_rows (source_file, line_no, reason, raw_line) "
            "values ('f.csv', 1, 'probe', 'x')"
        )
        conn.execute("delete from cdr_data.rejected_rows where source_file = 'f.csv'")
        conn.execute("create temp table stage (x int)")  # its staging tables
        for statement in (
            f"drop table {prepared_table}",
            f"alter table {prepared_table} add column y int",
            f"truncate {prepared_table}",
            f"insert into {prepared_table} values (2)",
            f"select * from {prepared_table}",
            "create table prepared_layers.planted (x int)",
            "create table cdr_data.planted (x int)",
            "drop table cdr_data.data_records",
            "alter table cdr_data.data_records add column y int",
            "insert into crm_data.accounts_changes (account_id) values (1)",
            "create schema planted",
        ):
            with pytest.raises(DENIED):
                conn.execute(statement)
    with pytest.raises(psycopg.OperationalError):
        connect(stack, "loader", "wtc_prod")


def test_the_analysts_role_reads_the_marts_and_writes_nothing(stack, prepared_table) -> None:
    with connect(stack, "analyst") as conn:
        assert conn.execute(f"select id from {prepared_table}").fetchall() == [(1,)]
        for statement in (
            f"insert into {prepared_table} values (2)",
            f"update {prepared_table} set id = 3",
            f"delete from {prepared_table}",
            f"truncate {prepared_table}",
            f"drop table {prepared_table}",
            "create table prepared_layers.planted (x int)",
            "select * from cdr_data.data_records",
            "insert into cdr_data.files (file_name) values ('x')",
            "create schema planted",
        ):
            with pytest.raises(DENIED):
                conn.execute(statement)


def test_dbts_role_reads_raw_and_owns_its_schemas(stack) -> None:
    with connect(stack, "dbt") as conn:
        conn.execute("select count(*) from cdr_data.data_records").fetchone()
        conn.execute("select count(*) from crm_data.accounts_changes").fetchone()
        owners = dict(
            conn.execute(
                "select nspname, nspowner::regrole::text from pg_namespace "
                "where nspname in ('staging', 'intermediate', 'prepared_layers')"
            ).fetchall()
        )
        assert owners == dict.fromkeys(("staging", "intermediate", "prepared_layers"), "wtc_dbt")
        with pytest.raises(DENIED):
            conn.execute("delete from cdr_data.files")


def test_the_cdc_role_reads_the_source_and_writes_only_its_change_log(stack) -> None:
    with connect(stack, "cdc", "wtc_prod") as conn:
        conn.execute("select count(*) from crm_system.accounts").fetchone()
        with pytest.raises(DENIED):
            conn.execute("delete from crm_system.accounts")
    with connect(stack, "cdc") as conn:
        assert conn.execute(
            "select rolreplication from pg_roles where rolname = current_user"
        ).fetchone() == (True,)
        conn.execute("select count(*) from crm_data.accounts_changes").fetchone()
        with pytest.raises(DENIED):
            conn.execute("select count(*) from cdr_data.files")


def test_only_scram_passwords_on_loopback(stack) -> None:
    with psycopg.connect(stack.analytics_dsn) as conn:
        rules = conn.execute(
            "select type, address, auth_method from pg_hba_file_rules where error is null"
        ).fetchall()
        listen = conn.execute("show listen_addresses").fetchone()
        encryption = conn.execute("show password_encryption").fetchone()
        stored = conn.execute(
            "select rolname, rolpassword like 'SCRAM-SHA-256$%' from pg_authid "
            "where rolname like 'wtc\\_%'"
        ).fetchall()
    assert listen == ("127.0.0.1",) and encryption == ("scram-sha-256",)
    for kind, address, method in rules:
        if kind == "local":
            assert method == "peer"
        else:
            assert method == "scram-sha-256", (kind, address, method)
            assert address in ("127.0.0.1", "::1"), address
    assert sorted(stored) == [(f"wtc_{r}", True) for r in sorted(ROLES)]


def test_the_cdc_role_starts_its_reader_on_the_publication_the_stack_made(stack) -> None:
    """The publication is the stack's (the cdc role owns nothing in the source) and already
    sends TRUNCATE, so the reader, as the cdc role, starts on it without altering it."""
    from ingestion.crm_cdc import CdcSettings, CrmCdc

    with connect(stack, "cdc", "wtc_prod") as conn:
        assert conn.execute(
            "select pubtruncate, pg_get_userbyid(pubowner) <> current_user from pg_publication "
            "where pubname = 'wtc_crm_cdc'"
        ).fetchone() == (True, True)
    settings = CdcSettings(
        analytics_dsn=stack.settings.pg_dsn("wtc_analytics", "cdc"),
        prod_dsn=stack.settings.pg_dsn("wtc_prod", "cdc"),
        slot="wtc_roles_test",
        metrics_port=0,
    )
    with CrmCdc(settings) as cdc:
        cdc.ensure_publication()  # refused before: "must be owner of publication wtc_crm_cdc"


def test_dbts_role_runs_the_projects_start_hooks(tmp_path) -> None:
    """dbt as the dbt role: its on-run-start hooks (the indicator functions, the landing
    horizons' table) need no right to create in the database, its incremental models build and
    build again, and the role sees the other roles' sessions (their start times bound the
    landing horizon).

    A stack of its own: the session's stack holds models other tests built as the superuser."""
    import subprocess

    from ops.dbt import DBT_BIN, DBT_DIR, connection_env, dbt_env
    from ops.stack import throwaway

    with throwaway("wtc-dbt-role-") as own:
        env = {**dbt_env(own.s, tmp_path), **connection_env(own.s, role="dbt")}
        for _run in ("first", "incremental"):
            done = subprocess.run(
                [str(DBT_BIN), "run", "--select", "+int_crm__account_versions"],
                cwd=DBT_DIR,
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert done.returncode == 0, done.stdout[-2000:]
        dsn = own.s.pg_dsn("wtc_analytics", "dbt")
        with psycopg.connect(dsn, autocommit=True) as conn:
            assert conn.execute(
                "select pg_has_role(current_user, 'pg_read_all_stats', 'member')"
            ).fetchone() == (True,)
            # made by the on-run-start hook, owned by the role that runs dbt
            assert conn.execute(
                "select tableowner from pg_tables where schemaname = 'prepared_layers' "
                "and tablename = 'dbt_landing_horizons'"
            ).fetchone() == ("wtc_dbt",)


# -- the Kafka path's and monitoring's roles ----------------------------------------------------

DATA_TABLES = (
    "cdr_data.files",
    "cdr_data.data_records",
    "forex_data.ticks",
    "crm_data.accounts_changes",
)


def test_debeziums_role_reads_the_source_replicates_and_writes_nothing(stack) -> None:
    with connect(stack, "debezium", "wtc_prod") as conn:
        assert conn.execute(
            "select rolreplication, rolsuper from pg_roles where rolname = current_user"
        ).fetchone() == (True, False)
        conn.execute("select count(*) from crm_system.accounts").fetchone()
        # its publication is the stack's, on the three tables, and it may stream it
        assert conn.execute(
            "select count(*) from pg_publication_tables where pubname = 'wtc_crm_debezium'"
        ).fetchone() == (3,)
        conn.execute("select pg_create_logical_replication_slot('wtc_roles_dbz', 'pgoutput')")
        conn.execute("select pg_drop_replication_slot('wtc_roles_dbz')")
        for statement in (
            "insert into crm_system.accounts (account_id) values (-1)",
            "update crm_system.accounts set email = 'x'",
            "delete from crm_system.accounts",
            "truncate crm_system.accounts",
            "create table crm_system.planted (x int)",
            "create publication planted for table crm_system.accounts",
            "alter publication wtc_crm_debezium drop table crm_system.devices",
        ):
            with pytest.raises(DENIED):
                conn.execute(statement)
    with pytest.raises(psycopg.OperationalError):
        connect(stack, "debezium", "wtc_analytics")


def test_the_sinks_role_upserts_the_change_log_and_cannot_touch_a_prepared_table(
    stack, analytics, prepared_table
) -> None:
    with connect(stack, "sink") as conn:
        conn.execute(
            "insert into crm_data.accounts_changes (account_id, __op, __lsn, __source_ts_ms) "
            "values (1, 'c', 10, 0) on conflict (__lsn, account_id) "
            "do update set email = excluded.email"
        )
        conn.execute("update crm_data.accounts_changes set email = 'e' where account_id = 1")
        for statement in (
            f"select * from {prepared_table}",
            f"insert into {prepared_table} values (2)",
            f"drop table {prepared_table}",
            f"truncate {prepared_table}",
            "create table prepared_layers.planted (x int)",
            "delete from crm_data.accounts_changes",
            "create table crm_data.planted (x int)",
            "select * from cdr_data.files",
            "insert into forex_data.ticks (pair_name) values ('x')",
        ):
            with pytest.raises(DENIED):
                conn.execute(statement)
    with pytest.raises(psycopg.OperationalError):
        connect(stack, "sink", "wtc_prod")


def test_the_probes_role_reads_the_landed_files_only(stack, analytics) -> None:
    with connect(stack, "probe") as conn:
        conn.execute("select file_name, size_bytes, loaded_at from cdr_data.files").fetchall()
        for statement in (
            "insert into cdr_data.files (file_name) values ('x')",
            "select * from cdr_data.data_records",
            "select * from crm_data.accounts_changes",
        ):
            with pytest.raises(DENIED):
                conn.execute(statement)


def test_the_exporters_role_reads_no_table_and_its_scrape_works(stack, analytics) -> None:
    """pg_monitor: the server's statistics and the replication slots' lag, not a row of data.
    Then the real postgres exporter, as the stack's monitoring runs it, scrapes as that role."""
    with connect(stack, "exporter") as conn:
        for table in DATA_TABLES:
            for statement in (f"select * from {table}", f"delete from {table}"):
                with pytest.raises(DENIED):
                    conn.execute(statement)
        with pytest.raises(DENIED):
            conn.execute("create table planted (x int)")
        for extra in yaml.safe_load(POSTGRES_QUERIES.read_text()).values():
            conn.execute(extra["query"]).fetchall()  # the exporter's extra queries run
    port = free_port()
    s = stack.settings
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "DATA_SOURCE_NAME": s.pg_dsn("wtc_analytics", "exporter") + "?sslmode=disable",
    }
    exporter = subprocess.Popen(
        [
            POSTGRES_EXPORTER,
            f"--web.listen-address=127.0.0.1:{port}",
            f"--extend.query-path={POSTGRES_QUERIES}",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        metrics: dict[str, str] = {}

        def scraped() -> bool:
            try:
                text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
            except httpx.HTTPError:
                return False
            metrics.update(
                line.rsplit(" ", 1) for line in text.splitlines() if line[:1] not in ("#", "")
            )
            return "pg_up" in metrics

        with connect(stack, "cdc", "wtc_prod") as conn:  # a slot, for the extra query's rows
            conn.execute("select pg_create_logical_replication_slot('wtc_roles_exp', 'pgoutput')")
        try:
            wait_until(scraped, "the postgres exporter to answer", timeout=60, interval=0.2)
            assert metrics["pg_up"] == "1"
            assert metrics["pg_exporter_last_scrape_error"] == "0"
            slot = (
                'pg_replication_slot_wal_retained_bytes{server="%s:%s",slot_name="wtc_roles_exp"}'
            )
            assert slot % (s.host, s.pg_port) in metrics, sorted(metrics)[:20]
            assert any(k.startswith("pg_stat_database_xact_commit{") for k in metrics)
        finally:
            with connect(stack, "cdc", "wtc_prod") as conn:
                conn.execute("select pg_drop_replication_slot('wtc_roles_exp')")
    finally:
        exporter.terminate()
        exporter.wait(30)
