"""Benchmark: the Kafka path against the embedded one, in one run on one machine.

- the Kafka path's start: 3 KRaft brokers, the project's topics and a Connect worker, seconds
  and resident MiB of the four JVMs;
- CRM capture of one backlog of single-row changes: Debezium + the JDBC sinks (paused while the
  backlog is written, then resumed and timed until the change log rebuilds the source) against
  the embedded pgoutput reader (`CrmCdc.run(once=True)` over the same backlog), changes/s;
- CDR events published (`ingestion.stream` producer, acks=all) and consumed by the HVS (drain),
  rows/s, on Kafka against Redis Streams.

Starts its own stack and cluster (needs `make setup` with a JDK). Never fails on a timing.
"""

from __future__ import annotations

import argparse
import threading
import time
from datetime import datetime

import orjson
import psycopg
import redis

from common.logs import setup_logging
from connect.register import _call as connect_call
from ingestion.crm_cdc import CdcSettings, CrmCdc, Metrics
from ingestion.stream import open_producer
from ops.stack import throwaway, wait_until
from ops.stack.kafka import KafkaStack, scratch_kafka_settings


def crm_backlog(prod_dsn: str, accounts: int, rounds: int) -> int:
    """`accounts` inserts, then `rounds` updates of each, one statement per transaction."""
    with psycopg.connect(prod_dsn, autocommit=True) as conn:
        for i in range(accounts):
            conn.execute(
                "insert into crm_system.accounts values (%s, %s, %s, %s, %s)",
                (100_000 + i, f"Owner {i}", f"o{i}@x.org", f"27{i:011d}", "2024-01-01 00:00:00"),
            )
        for r in range(rounds):
            for i in range(accounts):
                conn.execute(
                    "update crm_system.accounts set email = %s where account_id = %s",
                    (f"r{r}-{i}@x.org", 100_000 + i),
                )
    return accounts * (1 + rounds)


def changes_landed(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        (n,) = conn.execute(
            "select count(*) from crm_data.accounts_changes where __op <> 'r'"
        ).fetchone()
    return n


def bench_capture(stack, kafka: KafkaStack, accounts: int, rounds: int) -> None:
    from tests.fixtures.kafka import Connectors, RealKafka

    s = stack.s
    with psycopg.connect(s.pg_dsn("postgres"), autocommit=True) as conn:
        conn.execute("create database wtc_analytics_dbz")
    sink = s.pg_dsn("wtc_analytics_dbz")
    with psycopg.connect(sink) as conn, open("contracts/wtc_analytics.sql") as ddl:
        conn.execute(ddl.read())
    connectors = Connectors(RealKafka(kafka, 0.0, 0), s.prod_dsn, sink)
    settings = CdcSettings(
        analytics_dsn=s.analytics_dsn,
        prod_dsn=s.prod_dsn,
        slot="bench",
        publication="bench",
        metrics_port=0,
    )
    with CrmCdc(settings, Metrics()) as cdc:
        cdc.run(once=True)
    connectors.register()
    connectors.wait_running()
    for name in connectors.names:
        connect_call("PUT", f"{kafka.connect_url}/connectors/{name}/pause")
    wait_until(
        lambda: all(st[0] == "PAUSED" for st in connectors.states().values()), "pause", 60, 0.5
    )
    total = crm_backlog(s.prod_dsn, accounts, rounds)
    started = time.monotonic()
    with CrmCdc(settings, Metrics()) as cdc:
        cdc.run(once=True)
    embedded = time.monotonic() - started
    assert changes_landed(s.analytics_dsn) == total
    started = time.monotonic()
    for name in connectors.names:
        connect_call("PUT", f"{kafka.connect_url}/connectors/{name}/resume")
    wait_until(lambda: changes_landed(sink) == total, "the JDBC sinks", 600, 0.2)
    debezium = time.monotonic() - started
    print(f"CRM capture of {total} single-row changes (backlog):")
    print(f"  embedded pgoutput reader   {total / embedded:8.0f} changes/s ({embedded:.1f} s)")
    print(f"  Debezium + JDBC sink       {total / debezium:8.0f} changes/s ({debezium:.1f} s)")
    print(f"  ratio Debezium/embedded    {embedded / debezium:8.2f}")


def bench_stream(stack, kafka: KafkaStack, files: int, rows: int) -> None:
    from tests.test_hvs import HvsSettings, make_events, run

    events = make_events(n_files=files, rows=rows, seed=7, start=datetime(2024, 1, 1))
    n = sum(len(v) for v in events.values())
    for label, url in (("Redis Streams", stack.s.stream_url), ("Kafka", kafka.stream_url)):
        suffix = f"{int(time.time() * 1000)}"
        topics = {"cdr-data": f"cdr-data-{suffix}", "cdr-voice": f"cdr-voice-{suffix}"}
        if url.startswith("kafka"):
            kafka.create_topics({t: (6, 3) for t in topics.values()} | {f"tick-{suffix}": (1, 3)})
        redis.Redis.from_url(stack.s.redis_url).flushdb()
        started = time.monotonic()
        with open_producer(url) as producer:
            for topic, evs in events.items():
                producer.publish_many(
                    topics[topic], ((e["msisdn"].encode(), orjson.dumps(e), None) for e in evs)
                )
            producer.flush()
        published = time.monotonic() - started
        settings = HvsSettings(
            redis_url=stack.s.redis_url,
            stream_url=url,
            metrics_port=0,
            poll_timeout=0.2,
            group=f"hvs-{suffix}",
            data_topic=topics["cdr-data"],
            voice_topic=topics["cdr-voice"],
            tick_topic=f"tick-{suffix}",
        )
        started = time.monotonic()
        run(settings, threading.Event(), drain=True)
        consumed = time.monotonic() - started
        print(
            f"{label:14} publish {n / published:8.0f} rows/s   HVS consume {n / consumed:8.0f} "
            f"rows/s   ({n} rows)"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.kafka_path", description=__doc__)
    parser.add_argument("--accounts", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--files", type=int, default=20)
    parser.add_argument("--rows", type=int, default=2000)
    args = parser.parse_args(argv)
    setup_logging()
    with throwaway("wtc-bench-kafka-") as stack:
        kafka = KafkaStack(stack.s, scratch_kafka_settings())
        try:
            seconds = kafka.start()
            print(f"Kafka path start: {seconds:.1f} s, {kafka.memory_mib()} MiB resident (4 JVMs)")
            bench_stream(stack, kafka, args.files, args.rows)
            bench_capture(stack, kafka, args.accounts, args.rounds)
            print(f"Kafka path after the runs: {kafka.memory_mib()} MiB resident")
        finally:
            kafka.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
