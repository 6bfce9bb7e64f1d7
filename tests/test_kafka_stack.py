"""The Kafka path on real parts: 3 KRaft brokers and a Kafka Connect worker from the pinned jars
(`real_kafka`), Debezium's PostgreSQL source and JDBC sink against the session's Postgres.

- the cluster: brokers, topics (the compose list, RF 3, min.insync.replicas=2), the worker's
  internal topics at RF 3, exactly the two plugins; its start time and memory are reported;
- capture-path parity: one CRM workload captured by Debezium + JDBC sink and by the embedded
  pgoutput reader; both change logs rebuild `wtc_prod` exactly and agree row for row.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import psycopg
import pytest
from confluent_kafka.admin import AdminClient, ConfigResource

from common.settings import CONTRACTS_DIR
from ingestion.crm_cdc import CdcSettings, CrmCdc, Metrics
from ops.stack import wait_until
from ops.stack.kafka import project_topics
from tests.fixtures.kafka import Connectors, RealKafka
from tests.test_crm_cdc import TABLES, UPSERT_DEVICE, account, insert_people

DBZ_DATABASE = "wtc_analytics_dbz"


# -- the cluster --------------------------------------------------------------------------------


def test_cluster_runs_three_brokers_and_the_project_topics(real_kafka: RealKafka):
    print(
        f"\nkafka path start: {real_kafka.start_seconds:.1f} s, "
        f"{real_kafka.start_mib} MiB resident (3 brokers + Connect)"
    )
    admin = AdminClient({"bootstrap.servers": real_kafka.bootstrap})
    metadata = admin.list_topics(timeout=30)
    assert len(metadata.brokers) == 3
    for name, (partitions, replicas) in project_topics().items():
        topic = metadata.topics[name]
        assert len(topic.partitions) == partitions, name
        assert {len(p.replicas) for p in topic.partitions.values()} == {replicas}, name
    resources = [ConfigResource(ConfigResource.Type.TOPIC, n) for n in project_topics()]
    for resource, future in admin.describe_configs(resources).items():
        assert future.result(timeout=30)["min.insync.replicas"].value == "2", resource
    for internal in ("_wtc-connect-configs", "_wtc-connect-offsets", "_wtc-connect-status"):
        replicas = {len(p.replicas) for p in metadata.topics[internal].partitions.values()}
        assert replicas == {3}, internal


def test_connect_worker_has_exactly_the_two_plugins(real_kafka: RealKafka):
    assert real_kafka.cluster.connector_plugins() == [
        "io.debezium.connector.jdbc.JdbcSinkConnector",
        "io.debezium.connector.postgresql.PostgresConnector",
    ]


def test_connect_worker_holds_its_connectors_passwords_only(real_kafka: RealKafka, stack):
    """The worker's environment: the passwords of Debezium's and the sinks' roles, and no other
    password, DSN or URL it could have inherited from whoever started it (ops/stack/kafka.py)."""
    from pathlib import Path

    from ops.stack.kafka import not_a_secret
    from ops.stack.process import read_pid

    pid = read_pid(real_kafka.cluster.connect.pidfile)
    assert pid is not None
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    env = dict(item.decode().split("=", 1) for item in raw if b"=" in item)
    s = stack.settings
    assert env["WTC_PG_DEBEZIUM_PASSWORD"] == s.pg_debezium_password
    assert env["WTC_PG_SINK_PASSWORD"] == s.pg_sink_password
    secrets = {k for k in env if not not_a_secret(k)}
    assert secrets == {"WTC_PG_DEBEZIUM_PASSWORD", "WTC_PG_SINK_PASSWORD"}
    for name in ("WTC_PG_PASSWORD", "WTC_ANALYTICS_DSN", "REDIS_URL", "API_USERS"):
        assert not not_a_secret(name)


# -- capture-path parity ------------------------------------------------------------------------


@pytest.fixture
def dbz_analytics(stack) -> Iterator[str]:
    """A second warehouse database with the raw-layer contract, where the JDBC sinks land (the
    embedded reader lands in `wtc_analytics`): the two change logs side by side."""
    with psycopg.connect(stack.settings.pg_dsn("postgres"), autocommit=True) as conn:
        conn.execute(f"drop database if exists {DBZ_DATABASE} with (force)")
        conn.execute(f"create database {DBZ_DATABASE}")
    dsn = stack.settings.pg_dsn(DBZ_DATABASE)
    with psycopg.connect(dsn) as conn:
        conn.execute((CONTRACTS_DIR / "wtc_analytics.sql").read_text())
        conn.execute((CONTRACTS_DIR / "wtc_analytics_grants.sql").read_text())  # the sinks' role
    yield dsn
    with psycopg.connect(stack.settings.pg_dsn("postgres"), autocommit=True) as conn:
        conn.execute(f"drop database if exists {DBZ_DATABASE} with (force)")


def change_log(dsn: str, table: str, with_snapshot_lsn: bool) -> list[tuple]:
    key, cols = TABLES[table]
    lsn = "__lsn" if with_snapshot_lsn else "case when __op = 'r' then 0 else __lsn end"
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            f"select {', '.join(cols)}, __op, {lsn} from crm_data.{table}_changes "
            f"order by {key}, __op <> 'r', __lsn"
        ).fetchall()


def rebuilt(dsn: str, table: str) -> set[tuple]:
    key, cols = TABLES[table]
    col_list = ", ".join(cols)
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            f"select {col_list} from ("
            f"  select distinct on ({key}) * from crm_data.{table}_changes"
            f"  order by {key}, __op <> 'r' desc, __lsn desc"
            f") latest where __op <> 'd'"
        ).fetchall()
    assert len(rows) == len(set(rows))
    return set(rows)


def source_rows(prod_dsn: str, table: str) -> set[tuple]:
    _, cols = TABLES[table]
    with psycopg.connect(prod_dsn) as conn:
        return set(conn.execute(f"select {', '.join(cols)} from crm_system.{table}").fetchall())


def lock_waiters(conn: psycopg.Connection, xid: int) -> int:
    (n,) = conn.execute(
        "select count(*) from pg_locks where locktype = 'transactionid' and not granted "
        "and transactionid::text = %s",
        (str(xid),),
    ).fetchone()
    return n


def crm_workload(prod: psycopg.Connection) -> None:
    """Inserts, updates, deletes, a multi-row INSERT, a COPY (many rows in one WAL record), an
    UPDATE of many rows in one statement, a key change, a delete and re-insert."""
    insert_people(prod, range(21, 26))
    prod.execute(
        "insert into crm_system.accounts values " + ", ".join(["(%s, %s, %s, %s, %s)"] * 4),
        [v for i in range(30, 34) for v in account(i)],
    )
    with prod.cursor().copy(
        "copy crm_system.devices (device_id, account_id, device_name, device_type, device_os, "
        "modified_ts) from stdin"
    ) as copy:
        for i in range(40):
            copy.write_row((5000 + i, 30 + i % 4, f"Phone {i}", "Mobile", "Android", None))
    prod.execute(
        "update crm_system.accounts set email = 'bulk-' || account_id || '@example.com', "
        "modified_ts = '2024-01-03 10:00:00.123456' where account_id between 7 and 18"
    )
    prod.execute("update crm_system.accounts set email = 'new@example.com' where account_id = 1")
    prod.execute(UPSERT_DEVICE, (1001, 999, "iPad Air", "2024-01-02 00:00:00"))
    for k in range(10):
        prod.execute(
            "update crm_system.accounts set email = %s where account_id = 2", (f"e{k}@x.org",)
        )
    with prod.transaction():
        prod.execute("delete from crm_system.accounts where account_id = 4")
        prod.execute("delete from crm_system.addresses where account_id = 4")
        prod.execute("delete from crm_system.devices where device_id between 5000 and 5009")
    with prod.transaction():
        prod.execute("delete from crm_system.accounts where account_id = 5")
        prod.execute("insert into crm_system.accounts values (%s, %s, %s, %s, %s)", account(5))
    prod.execute("update crm_system.accounts set account_id = 60 where account_id = 6")
    insert_people(prod, range(900, 901))  # the last transaction: one row in each table


def test_debezium_and_the_embedded_reader_capture_the_same_history(
    real_kafka: RealKafka, stack, analytics, dbz_analytics
):
    """The same CRM workload through Debezium + the JDBC sinks and through the embedded pgoutput
    reader, a transaction spanning both snapshots included. Both change logs rebuild `wtc_prod`
    exactly, and agree row for row on every column but two:

    - `__lsn` of snapshot rows (`r`): each path stamps its snapshot with its own slot's
      consistent point; the two slots are created at nearly the same moment but not at one LSN;
    - `__source_ts_ms` of snapshot rows: the time each snapshot was read (for changes both
      carry the commit time; compared below within a millisecond's rounding) and `landed_at`.
    """
    prod_dsn = stack.prod_dsn
    connectors = Connectors(real_kafka, prod_dsn, dbz_analytics)
    name = f"t_{connectors.slot}"
    settings = CdcSettings(
        analytics_dsn=stack.analytics_dsn,
        prod_dsn=prod_dsn,
        slot=name,
        publication=name,
        metrics_port=0,
    )
    opened: list[psycopg.Connection] = []

    def open_tx(account_id: int, email: str) -> tuple[psycopg.Connection, int]:
        conn = psycopg.connect(prod_dsn)
        opened.append(conn)
        conn.execute(
            "update crm_system.accounts set email = %s where account_id = %s", (email, account_id)
        )
        (xid,) = conn.execute("select txid_current()").fetchone()
        return conn, xid

    with psycopg.connect(prod_dsn, autocommit=True) as prod:
        prod.execute("truncate crm_system.accounts, crm_system.addresses, crm_system.devices")
        insert_people(prod, range(1, 21))
        embedded: list = []
        runner = threading.Thread(
            target=lambda: embedded.append(CrmCdc(settings, Metrics()).run(once=True))
        )
        try:
            # Both slots are created while t0 is open; both then wait for t1, which began
            # while they waited; t2 begins before they are consistent and commits after.
            t0, xid0 = open_tx(1, "t0@x")
            connectors.register()
            runner.start()
            wait_until(lambda: lock_waiters(prod, xid0) == 2, "both slots to wait for t0", 60)
            t1, xid1 = open_tx(2, "t1@x")
            t0.commit()
            wait_until(lambda: lock_waiters(prod, xid1) == 2, "both slots to wait for t1", 60)
            t2, _ = open_tx(3, "t2@x")
            t1.commit()
            runner.join(120)
            assert embedded and embedded[0].snapshot_rows == 60
            connectors.wait_running()
            wait_until(
                lambda: len(rebuilt(dbz_analytics, "devices")) == 20,
                "Debezium's snapshot to land",
                timeout=120,
                interval=0.5,
            )
            # the connectors log in as their own roles, never the superuser
            slot_user = prod.execute(
                "select a.usename from pg_replication_slots as s "
                "join pg_stat_activity as a on a.pid = s.active_pid where s.slot_name = %s",
                (connectors.slot,),
            ).fetchone()
            assert slot_user == ("wtc_debezium",)
            sink_users = prod.execute(
                "select distinct usename from pg_stat_activity where datname = %s "
                "and usename <> current_user",
                (DBZ_DATABASE,),
            ).fetchall()
            assert sink_users == [("wtc_sink",)]
            t2.commit()
            started = time.monotonic()
            crm_workload(prod)
            with CrmCdc(settings, Metrics()) as cdc:
                stats = cdc.run(once=True)
            assert stats.changes_landed > 0

            def landed() -> bool:
                return all(rebuilt(dbz_analytics, t) == source_rows(prod_dsn, t) for t in TABLES)

            wait_until(landed, "the JDBC sinks to land the workload", timeout=120, interval=0.5)
            caught_up = time.monotonic() - started
            print(f"\nDebezium + JDBC sinks caught up {caught_up:.1f} s after the workload began")
        finally:
            for conn in opened:
                conn.close()
            if runner.is_alive():
                runner.join(60)
            connectors.remove()
            with CrmCdc(settings) as cdc:
                cdc.drop()

        for table in TABLES:
            source = source_rows(prod_dsn, table)
            assert rebuilt(stack.analytics_dsn, table) == source, table
            assert rebuilt(dbz_analytics, table) == source, table
            assert change_log(stack.analytics_dsn, table, False) == change_log(
                dbz_analytics, table, False
            ), table
        # the spanning transaction: a change below its snapshot's LSN on both paths
        for dsn in (stack.analytics_dsn, dbz_analytics):
            rows = [r for r in change_log(dsn, "accounts", True) if r[0] == 3]
            assert [r[5] for r in rows][:2] == ["r", "u"] and rows[1][2] == "t2@x"
            assert rows[1][6] < rows[0][6]
        # change rows carry the commit time on both paths
        query = (
            "select account_id, __lsn, __source_ts_ms from crm_data.accounts_changes "
            "where __op <> 'r' order by 1, 2"
        )
        with (
            psycopg.connect(stack.analytics_dsn) as a,
            psycopg.connect(dbz_analytics) as b,
        ):
            ours, theirs = a.execute(query).fetchall(), b.execute(query).fetchall()
        assert [r[:2] for r in ours] == [r[:2] for r in theirs]
        assert max(abs(x[2] - y[2]) for x, y in zip(ours, theirs, strict=True)) <= 1
