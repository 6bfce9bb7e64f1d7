"""Failures on the real Kafka path (`real_kafka`): the Connect worker SIGKILLed during a burst of
CRM changes, a record the JDBC sink cannot take, one broker of three killed while events are
published and the HVS consumes them, and rebalances: HVS consumers, then tick-sink processes,
joining and leaving one group while data flows."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import orjson
import psycopg
import pytest

from common.settings import CONTRACTS_DIR, PROJECT_ROOT
from ingestion.crm_cdc import CdcSettings, CrmCdc, Metrics
from ingestion.stream import open_producer
from ops.stack import wait_until
from tests.fixtures.kafka import Connectors, RealKafka
from tests.test_crm_cdc import TABLES, account, insert_people
from tests.test_hvs import HvsSettings, expected_usage, make_events, run, stored_usage
from tests.test_kafka_stack import change_log, rebuilt, source_rows

SINK_DATABASE = "wtc_analytics_dbz_f"


@pytest.fixture
def sink_dsn(stack) -> Iterator[str]:
    """A warehouse database of its own with the raw-layer contract, for the JDBC sinks."""
    admin = stack.settings.pg_dsn("postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"drop database if exists {SINK_DATABASE} with (force)")
        conn.execute(f"create database {SINK_DATABASE}")
    dsn = stack.settings.pg_dsn(SINK_DATABASE)
    with psycopg.connect(dsn) as conn:
        conn.execute((CONTRACTS_DIR / "wtc_analytics.sql").read_text())
        conn.execute((CONTRACTS_DIR / "wtc_analytics_grants.sql").read_text())  # the sinks' role
    yield dsn
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"drop database if exists {SINK_DATABASE} with (force)")


@pytest.fixture
def prod(stack) -> Iterator[psycopg.Connection]:
    with psycopg.connect(stack.prod_dsn, autocommit=True) as conn:
        conn.execute("truncate crm_system.accounts, crm_system.addresses, crm_system.devices")
        yield conn


def wait_landed(prod_dsn: str, sink: str, timeout: float = 180.0) -> None:
    wait_until(
        lambda: all(rebuilt(sink, t) == source_rows(prod_dsn, t) for t in TABLES),
        "the JDBC sinks to land every change",
        timeout=timeout,
        interval=0.5,
    )


def burst(prod_dsn: str, first: int, count: int, stop: threading.Event) -> None:
    """One change per transaction: an insert, then an update of it (single-row statements:
    see docs/scale-out.md on debezium/dbz#1554 and multi-row WAL records)."""
    with psycopg.connect(prod_dsn, autocommit=True) as conn:
        for i in range(first, first + count):
            if stop.is_set():
                return
            conn.execute("insert into crm_system.accounts values (%s, %s, %s, %s, %s)", account(i))
            conn.execute(
                "update crm_system.accounts set email = %s where account_id = %s",
                (f"u{i}@example.com", i),
            )


def test_connect_worker_killed_during_a_burst_loses_and_doubles_nothing(
    real_kafka: RealKafka, stack, analytics, prod, sink_dsn
):
    """SIGKILL the worker while a burst of CRM changes is captured, restart it: the sinks' change
    log equals the embedded reader's, change for change (a change redelivered after the restart
    lands on its own (`__lsn`, key) again; one lost would be missing)."""
    cluster = real_kafka.cluster
    insert_people(prod, range(1, 11))
    name = f"t_kill_{int(time.time())}"
    settings = CdcSettings(
        analytics_dsn=stack.analytics_dsn,
        prod_dsn=stack.prod_dsn,
        slot=name,
        publication=name,
        metrics_port=0,
    )
    connectors = Connectors(real_kafka, stack.prod_dsn, sink_dsn)
    stop = threading.Event()
    try:
        with CrmCdc(settings, Metrics()) as cdc:
            cdc.run(once=True)  # the embedded reader's slot and snapshot
        connectors.register()
        connectors.wait_running()
        wait_landed(stack.prod_dsn, sink_dsn)
        writer = threading.Thread(target=burst, args=(stack.prod_dsn, 1000, 1500, stop))
        writer.start()

        def some_landed() -> bool:
            with psycopg.connect(sink_dsn) as conn:
                (n,) = conn.execute(
                    "select count(*) from crm_data.accounts_changes where __op <> 'r'"
                ).fetchone()
            return n >= 300

        wait_until(some_landed, "part of the burst to land", timeout=120, interval=0.2)
        cluster.kill(cluster.connect)
        writer.join(300)
        assert not writer.is_alive()
        cluster.start_connect()
        connectors.wait_running()
        wait_landed(stack.prod_dsn, sink_dsn)
        with CrmCdc(settings, Metrics()) as cdc:
            cdc.run(once=True)
    finally:
        stop.set()
        connectors.remove()
        with CrmCdc(settings) as cdc:
            cdc.drop()
    for table in TABLES:
        assert change_log(stack.analytics_dsn, table, False) == change_log(
            sink_dsn, table, False
        ), table
    with psycopg.connect(sink_dsn) as conn:
        (changes,) = conn.execute(
            "select count(*) from crm_data.accounts_changes where __op <> 'r'"
        ).fetchone()
    assert changes == 1500 * 2


def test_a_record_the_sink_cannot_take_fails_the_task_and_resumes_after_the_fix(
    real_kafka: RealKafka, stack, prod, sink_dsn
):
    """A change the raw table refuses (here: a check constraint added to the sink's table, as a
    stricter contract would) stops the sink task: FAILED in /status, the record and everything
    after it on that partition unlanded, nothing skipped. Fixed and restarted, it resumes there."""
    insert_people(prod, range(1, 6))
    connectors = Connectors(real_kafka, stack.prod_dsn, sink_dsn)
    accounts_sink = next(n for n in connectors.names if "accounts-sink" in n)
    with psycopg.connect(sink_dsn, autocommit=True) as conn:
        conn.execute(
            "alter table crm_data.accounts_changes add constraint no_poison "
            "check (email is null or email not like 'poison%')"
        )
    try:
        connectors.register()
        connectors.wait_running()
        wait_landed(stack.prod_dsn, sink_dsn)
        # one account per transaction, same partition key for the poison and the one after
        prod.execute(
            "update crm_system.accounts set email = 'poison@example.com' where account_id = 3"
        )
        prod.execute(
            "update crm_system.accounts set email = 'after@example.com' where account_id = 3"
        )
        wait_until(
            lambda: connectors.states()[accounts_sink][1:] == ("FAILED",),
            "the accounts sink task to fail",
            timeout=120,
            interval=0.5,
        )
        status = connectors.states()
        assert status[accounts_sink][0] == "RUNNING"  # the connector runs; its task failed
        with psycopg.connect(sink_dsn) as conn:
            landed = conn.execute(
                "select email from crm_data.accounts_changes where account_id = 3 order by __lsn"
            ).fetchall()
        assert ("after@example.com",) not in landed  # nothing after the poison was skipped to
        assert ("poison@example.com",) not in landed
        with psycopg.connect(sink_dsn, autocommit=True) as conn:
            conn.execute("alter table crm_data.accounts_changes drop constraint no_poison")
        connectors.restart(accounts_sink)
        connectors.wait_running()
        wait_landed(stack.prod_dsn, sink_dsn)
        with psycopg.connect(sink_dsn) as conn:
            emails = [
                r[0]
                for r in conn.execute(
                    "select email from crm_data.accounts_changes where account_id = 3 "
                    "and __op = 'u' order by __lsn"
                )
            ]
        assert emails == ["poison@example.com", "after@example.com"]
    finally:
        connectors.remove()


def test_a_broker_killed_while_publishing_and_consuming_loses_nothing(
    real_kafka: RealKafka, stack, redis_client
):
    """Kill one broker of three while CDR events are published (acks=all, idempotent) and the
    HVS consumes them; the HVS totals equal the sums over the published events, exactly."""
    cluster = real_kafka.cluster
    suffix = str(int(time.time() * 1000))
    topics = {"cdr-data": f"cdr-data-{suffix}", "cdr-voice": f"cdr-voice-{suffix}"}
    cluster.create_topics({t: (6, 3) for t in topics.values()})
    settings = HvsSettings(
        redis_url=stack.redis_url,
        stream_url=real_kafka.stream_url,
        metrics_port=0,
        poll_timeout=0.2,
        group=f"hvs-{suffix}",
        data_topic=topics["cdr-data"],
        voice_topic=topics["cdr-voice"],
        tick_topic=f"tick-data-{suffix}",
    )
    cluster.create_topics({settings.tick_topic: (1, 3)})
    events = make_events(n_files=8, rows=500, seed=18, start=datetime(2024, 1, 1))
    want = expected_usage(events, None)
    stop = threading.Event()
    consumer = threading.Thread(target=run, args=(settings, stop))
    consumer.start()
    killed = 1
    try:
        with open_producer(real_kafka.stream_url) as producer:
            for chunk in range(8):
                part = slice(chunk * 500, (chunk + 1) * 500)
                for topic, evs in events.items():
                    producer.publish_many(
                        topics[topic],
                        ((e["msisdn"].encode(), orjson.dumps(e), None) for e in evs[part]),
                    )
                producer.flush()
                if chunk == 3:
                    cluster.kill(cluster.node(killed))
        wait_until(lambda: stored_usage(redis_client) == want, "HVS totals", 120, 0.5)
    finally:
        stop.set()
        consumer.join(60)
        cluster.start_broker(killed)
        wait_until(cluster.brokers_healthy, "the third broker to return", 120, 0.5)
    assert not consumer.is_alive()
    assert stored_usage(redis_client) == want


def test_hvs_consumers_joining_and_leaving_share_the_work_exactly(
    real_kafka: RealKafka, stack, redis_client
):
    """Rebalances on the real cluster: a second HVS consumer joins the group while events flow,
    then the first leaves; every event is applied once, the totals are exact."""
    cluster = real_kafka.cluster
    suffix = f"r{int(time.time() * 1000)}"
    topics = {"cdr-data": f"cdr-data-{suffix}", "cdr-voice": f"cdr-voice-{suffix}"}
    base = HvsSettings(
        redis_url=stack.redis_url,
        stream_url=real_kafka.stream_url,
        metrics_port=0,
        poll_timeout=0.2,
        batch_size=200,
        group=f"hvs-{suffix}",
        data_topic=topics["cdr-data"],
        voice_topic=topics["cdr-voice"],
        tick_topic=f"tick-data-{suffix}",
    )
    cluster.create_topics({t: (6, 3) for t in topics.values()} | {base.tick_topic: (1, 3)})
    events = make_events(n_files=6, rows=400, seed=21, start=datetime(2024, 1, 1))
    want = expected_usage(events, None)
    stops = {name: threading.Event() for name in ("a", "b")}
    workers = {
        name: threading.Thread(
            target=run, args=(base.model_copy(update={"consumer_name": name}), stops[name])
        )
        for name in stops
    }

    def publish(chunk: int) -> None:
        part = slice(chunk * 400, (chunk + 1) * 400)
        with open_producer(real_kafka.stream_url) as producer:
            for topic, evs in events.items():
                producer.publish_many(
                    topics[topic],
                    ((e["msisdn"].encode(), orjson.dumps(e), None) for e in evs[part]),
                )

    try:
        workers["a"].start()
        publish(0)
        publish(1)
        workers["b"].start()  # joins: partitions move while events flow
        publish(2)
        publish(3)
        stops["a"].set()  # leaves: its partitions go to b
        workers["a"].join(60)
        publish(4)
        publish(5)
        wait_until(lambda: stored_usage(redis_client) == want, "HVS totals", 120, 0.5)
    finally:
        for name in stops:
            stops[name].set()
        for worker in workers.values():
            if worker.is_alive():
                worker.join(60)
    assert not any(w.is_alive() for w in workers.values())
    assert stored_usage(redis_client) == want


def _landed_by(log_file) -> tuple[int, int]:
    """(ticks landed, duplicates) that one tick-sink process logged, from its JSON lines."""
    landed = duplicates = 0
    for line in log_file.read_text().splitlines():
        if not line.startswith("{"):
            continue
        entry = orjson.loads(line)
        if entry.get("msg") == "batch landed":
            landed += entry["landed"]
            duplicates += entry["duplicates"]
    return landed, duplicates


def test_tick_sink_processes_joining_and_leaving_land_every_tick_once(
    real_kafka: RealKafka, stack, analytics, tmp_path
):
    """Two `python -m ingestion.tick_sink` processes in one group over a 12-partition tick topic
    (the compose count), ticks published steadily throughout: the second process joins and lands
    ticks while the first runs, then the first leaves (SIGTERM) and the second takes over.
    `forex_data.ticks` then holds exactly the published ticks, once each, and the two processes'
    landed counts add up to them: each tick was inserted by one process only (a redelivery
    across a rebalance shows as a duplicate, never as a second row)."""
    from tests.test_tick_sink import expected_rows, landed, make_ticks

    cluster = real_kafka.cluster
    topic = f"tick-data-r{int(time.time() * 1000)}"
    cluster.create_topics({topic: (12, 3)})
    ticks = make_ticks(40_000)  # up to 80 000 messages, far more than the phases need
    published: list[tuple[bytes, bytes]] = []
    stop_publishing = threading.Event()

    def publisher() -> None:
        """50 ticks every 50 ms until told to stop (about 1 000 ticks/s)."""
        with open_producer(real_kafka.stream_url) as producer:
            for start in range(0, len(ticks), 50):
                if stop_publishing.is_set():
                    return
                chunk = ticks[start : start + 50]
                producer.publish_many(topic, [(k, v, None) for k, v in chunk])
                producer.flush()
                published.extend(chunk)
                time.sleep(0.05)

    def count() -> int:
        (n,) = analytics.execute("select count(*) from forex_data.ticks").fetchone()
        return n

    def sink(name: str) -> tuple[subprocess.Popen, Path]:
        log_file = tmp_path / f"tick-sink-{name}.log"
        env = {
            **os.environ,
            "WTC_ANALYTICS_DSN": stack.analytics_dsn,
            "STREAM_URL": real_kafka.stream_url,
            "TICK_SINK_TOPIC": topic,
            "TICK_SINK_GROUP": f"g-{topic}",
            "TICK_SINK_CONSUMER_NAME": name,
            "TICK_SINK_BATCH_SIZE": "100",
            "TICK_SINK_POLL_TIMEOUT": "0.2",
            "WTC_LOG_FORMAT": "json",
        }
        with log_file.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "ingestion.tick_sink", "--metrics-port", "0"],
                env=env,
                cwd=PROJECT_ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        return proc, log_file

    def landed_by(name: str) -> int:
        return _landed_by(procs[name][1])[0]

    procs: dict[str, tuple[subprocess.Popen, Path]] = {}
    feeding = threading.Thread(target=publisher)
    try:
        procs["a"] = sink("a")
        feeding.start()
        wait_until(lambda: landed_by("a") > 0, "the first sink to land ticks", 120, 0.2)
        procs["b"] = sink("b")  # joins: partitions move while ticks flow
        wait_until(lambda: landed_by("b") > 0, "the second sink to land ticks", 120, 0.2)
        procs["a"][0].send_signal(signal.SIGTERM)  # leaves: its partitions go to b
        assert procs["a"][0].wait(60) == 0, procs["a"][1].read_text()[-2000:]
        after_a = landed_by("b")
        wait_until(lambda: landed_by("b") > after_a + 500, "the second sink to take over", 120, 0.2)
        stop_publishing.set()
        feeding.join(60)
        assert not feeding.is_alive()
        assert len(published) < len(ticks), "the publisher ran out of ticks before the end"
        wait_until(lambda: count() >= len(published), "the last ticks", 120, 0.2)
    finally:
        stop_publishing.set()
        if feeding.is_alive():
            feeding.join(60)
        for proc, _ in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    assert procs["b"][0].returncode == 0, procs["b"][1].read_text()[-2000:]
    assert count() == len(published)
    assert landed(analytics) == expected_rows(published)
    (rejected,) = analytics.execute("select count(*) from forex_data.rejected_messages").fetchone()
    assert rejected == 0
    by_a, by_b = landed_by("a"), landed_by("b")
    assert by_a > 0 and by_b > 0
    assert by_a + by_b == len(published)
