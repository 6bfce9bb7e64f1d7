"""Benchmark: the Kafka path against the embedded one, in one run on one machine.

    python -m bench.kafka_path                       # everything, on a stack of its own
    python -m bench.kafka_path --parts capture --jstack --variants 0,1

- the Kafka path's start: 3 KRaft brokers, the project's topics and a Connect worker, seconds
  and resident MiB of the four JVMs;
- CDR events published (`ingestion.stream` producer, acks=all) and consumed by the HVS (drain),
  rows/s, on Kafka against Redis Streams;
- file-to-API latency, p50 and p99, on Kafka against Redis Streams: the loader, the HVS
  consumer and the usage API as processes, one CDR file at a time dropped into the SFTP folder;
- CRM capture of one backlog of single-row transactions: the embedded pgoutput reader
  (`CrmCdc.run(once=True)`) against Debezium + the JDBC sinks in several variants of the
  connector configs (the Connect/Debezium defaults, the tuned configs of connect/connectors,
  the tuned ones with plain inserts), each stopped while the backlog is written, then resumed
  and timed alone; a timeline splits the source (changes produced to the topic) from the sink
  (changes landed), and `--jstack` samples the busy threads of the Connect worker.

Starts its own stack and cluster (needs `make setup` with a JDK). Never fails on a timing.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from base64 import b64encode
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import psycopg
import redis

from common.logs import setup_logging
from common.settings import PROJECT_ROOT
from connect.register import _call as connect_call
from ingestion.cdr_format import DATA
from ingestion.crm_cdc import CdcSettings, CrmCdc, Metrics
from ingestion.stream import open_producer
from ops.stack import free_port, port_open, throwaway, wait_until
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


# The connector settings in connect/connectors/*.json that change throughput only (what lands
# is the same with or without them). The "defaults" variant removes them: one run measures the
# configs with and without them on the same backlog. docs/scale-out.md explains each.
THROUGHPUT_KEYS = (
    "max.batch.size",
    "max.queue.size",
    "poll.interval.ms",
    "producer.override.linger.ms",
    "producer.override.batch.size",
    "extended.headers.enabled",
    "batch.size",
    "consumer.override.max.poll.records",
    "consumer.override.fetch.min.bytes",
    "consumer.override.fetch.max.wait.ms",
)


def untuned(config: dict[str, str]) -> None:
    for key in THROUGHPUT_KEYS:
        config.pop(key, None)


def as_is(config: dict[str, str]) -> None:
    pass


def plain_insert(config: dict[str, str]) -> None:
    if "insert.mode" in config:
        config["insert.mode"] = "insert"


VARIANTS: dict[str, Callable[[dict[str, str]], None]] = {
    "Connect/Debezium defaults": untuned,
    "tuned (connect/connectors)": as_is,
    "tuned, insert.mode=insert (not idempotent)": plain_insert,
}


def set_connectors(kafka: KafkaStack, connectors, verb: str, state: str) -> None:
    for name in connectors.names:
        connect_call("PUT", f"{kafka.connect_url}/connectors/{name}/{verb}")
    wait_until(lambda: all(st[0] == state for st in connectors.states().values()), state, 120, 0.5)


class Timeline:
    """Samples, every 0.1 s, the changes Debezium has produced to the accounts topic and the
    changes the JDBC sink has landed; remembers when each first reached a count."""

    def __init__(self, bootstrap: str, topic: str, sink_dsn: str) -> None:
        from confluent_kafka import TopicPartition
        from confluent_kafka.admin import AdminClient

        self.admin = AdminClient({"bootstrap.servers": bootstrap})
        parts = self.admin.list_topics(topic, timeout=30).topics[topic].partitions
        self.partitions = [TopicPartition(topic, p) for p in parts]
        self.sink_dsn = sink_dsn
        self.base = self.produced()

    def produced(self) -> int:
        from confluent_kafka.admin import OffsetSpec

        futures = self.admin.list_offsets({tp: OffsetSpec.latest() for tp in self.partitions})
        return sum(f.result(timeout=10).offset for f in futures.values())

    def run(self, total: int, started: float, timeout: float = 900.0) -> dict[str, float]:
        marks: dict[str, float] = {}
        with psycopg.connect(self.sink_dsn, autocommit=True) as conn:
            while "all landed" not in marks:
                now = time.monotonic() - started
                if now > timeout:
                    raise TimeoutError(f"the JDBC sink landed too little in {timeout:.0f} s")
                produced = self.produced() - self.base
                (landed,) = conn.execute(
                    "select count(*) from crm_data.accounts_changes where __op <> 'r'"
                ).fetchone()
                for name, reached in (
                    ("first produced", produced > 0),
                    ("all produced", produced >= total),
                    ("first landed", landed > 0),
                    ("all landed", landed >= total),
                ):
                    if reached:
                        marks.setdefault(name, now)
                time.sleep(0.1)
        return marks


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds `pid` has used so far (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, TypeError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def jstack_sampler(pid: int, stop: threading.Event, out: list[str]) -> None:
    """Thread dumps of the Connect worker every 0.5 s while `stop` is unset (`--jstack`)."""
    while not stop.wait(0.5):
        dump = subprocess.run(["jstack", str(pid)], capture_output=True, text=True, timeout=30)
        out.append(dump.stdout)


# the threads that carry the backlog: the JDBC sink's task, the source's task (which drains
# Debezium's queue) and Debezium's streaming thread (which reads the slot into the queue)
TRACED = ("accounts-sink", "task-thread-wtc-crm-source", "change-event-source-c")
OURS = ("io.debezium", "org.hibernate", "org.postgresql", "org.apache.kafka")


def task_frames(dumps: list[str], top: int = 12) -> list[tuple[int, str]]:
    """The most frequent innermost project-of-interest frame of the connector task threads."""
    counts: dict[str, int] = {}
    for dump in dumps:
        for block in dump.split("\n\n"):
            thread = block.split("\n", 1)[0]
            if not any(t in thread for t in TRACED):
                continue
            name = block.split('"')[1][:60]
            frames = [ln.strip()[3:] for ln in block.splitlines() if ln.strip().startswith("at ")]
            interesting = next((f for f in frames if f.startswith(OURS)), "?")
            key = f"{name}: {frames[0] if frames else '?'} <- {interesting}"
            counts[key] = counts.get(key, 0) + 1
    return sorted(((n, k) for k, n in counts.items()), reverse=True)[:top]


def bench_capture(
    stack, kafka: KafkaStack, accounts: int, rounds: int, jstack: bool, only: list[str]
) -> dict:
    """One backlog of single-row CRM transactions, drained by the embedded reader and by each
    variant of the Debezium + JDBC sink connectors (each with its own slot, topics and sink
    database, stopped while the backlog is written, then resumed and timed alone)."""
    from tests.fixtures.kafka import Connectors, RealKafka

    s = stack.s
    settings = CdcSettings(
        analytics_dsn=s.analytics_dsn,
        prod_dsn=s.prod_dsn,
        slot="bench",
        publication="bench",
        metrics_port=0,
    )
    with CrmCdc(settings, Metrics()) as cdc:
        cdc.run(once=True)
    variants = []
    for i, (label, change) in enumerate(VARIANTS.items()):
        if only and str(i) not in only:
            continue
        with psycopg.connect(s.pg_dsn("postgres"), autocommit=True) as conn:
            conn.execute(f"create database wtc_analytics_dbz{i}")
        sink = s.pg_dsn(f"wtc_analytics_dbz{i}")
        with psycopg.connect(sink) as conn, open("contracts/wtc_analytics.sql") as ddl:
            conn.execute(ddl.read())
        connectors = Connectors(RealKafka(kafka, 0.0, 0), s.prod_dsn, sink)
        # the accounts topic exists before the backlog (Debezium makes it on its first event)
        kafka.create_topics({f"{connectors.prefix}.crm_system.accounts": (3, 3)})
        for request in connectors.requests:
            change(request.config)
        connectors.register()
        connectors.wait_running()
        # a change landed means the snapshot is over: stopped now, the connector resumes
        # streaming (stopped during its snapshot, it would snapshot the backlog instead)
        with psycopg.connect(s.prod_dsn, autocommit=True) as conn:
            conn.execute(
                "insert into crm_system.devices (device_id, account_id, device_name, "
                "device_type, device_os) values (%s, 1, 'bench', 'Mobile', 'Android')",
                (900_000 + i,),
            )

        def sentinel_landed(dsn: str = sink, device: int = 900_000 + i) -> bool:
            with psycopg.connect(dsn) as conn:
                return bool(
                    conn.execute(
                        "select 1 from crm_data.devices_changes where device_id = %s "
                        "and __op = 'c'",
                        (device,),
                    ).fetchone()
                )

        wait_until(sentinel_landed, "the connectors to stream", 180, 0.5)
        set_connectors(kafka, connectors, "stop", "STOPPED")
        variants.append((label, connectors, sink))
    total = crm_backlog(s.prod_dsn, accounts, rounds)
    started = time.monotonic()
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    with CrmCdc(settings, Metrics()) as cdc:
        cdc.run(once=True)
    embedded = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    embedded_cpu = after.ru_utime + after.ru_stime - cpu.ru_utime - cpu.ru_stime
    assert changes_landed(s.analytics_dsn) == total
    results = {"changes": total, "embedded_s": embedded, "variants": {}}
    print(f"CRM capture of a backlog of {total} single-row transactions:")
    print(
        f"  embedded pgoutput reader {total / embedded:8.0f} changes/s ({embedded:.1f} s; "
        f"{embedded_cpu:.1f} CPU s in the reader's process)"
    )
    for label, connectors, sink in variants:
        timeline = Timeline(kafka.bootstrap, f"{connectors.prefix}.crm_system.accounts", sink)
        dumps: list[str] = []
        stop = threading.Event()
        sampler = None
        pid = kafka.pids()["connect"]
        if jstack and pid:
            sampler = threading.Thread(target=jstack_sampler, args=(pid, stop, dumps))
            sampler.start()
        jvms = kafka.pids()
        cpu_before = {name: cpu_seconds(p) for name, p in jvms.items()}
        started = time.monotonic()
        for name in connectors.names:
            connect_call("PUT", f"{kafka.connect_url}/connectors/{name}/resume")
        try:
            marks = timeline.run(total, started)
        finally:
            stop.set()
            if sampler is not None:
                sampler.join(60)
        used = {name: cpu_seconds(p) - cpu_before[name] for name, p in jvms.items()}
        done = marks["all landed"]
        steady = done - marks["first landed"]
        results["variants"][label] = {"marks": marks, "changes_per_s": total / done}
        print(f"  Debezium + JDBC sink, {label}:")
        print(
            f"    {total / done:8.0f} changes/s from resume to all landed ({done:.1f} s); "
            f"{total / steady:.0f}/s from the first change landed"
        )
        print(
            "    timeline (s after resume): " + ", ".join(f"{k} {v:.1f}" for k, v in marks.items())
        )
        print(f"    ratio to the embedded reader {embedded / done:.2f}")
        brokers = sum(v for k, v in used.items() if k != "connect")
        print(
            f"    CPU s: Connect worker {used['connect']:.1f} "
            f"({used['connect'] / total * 1e6:.0f} us per change), the 3 brokers {brokers:.1f}"
        )
        results["variants"][label]["cpu"] = used
        for n, frame in task_frames(dumps):
            print(f"      {n:4d}  {frame}")
        set_connectors(kafka, connectors, "stop", "STOPPED")
    for _, connectors, _ in variants:
        connectors.remove()
    return results


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


LOADER_POLL_SECONDS = 1.0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]


def usage_total(port: int, msisdn: str, day: str) -> int:
    """Bytes the usage API reports for `msisdn` on `day` (YYYYMMDD); 0 when none yet."""
    end = (datetime.strptime(day, "%Y%m%d") + timedelta(days=1)).strftime("%Y%m%d")
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/data_usage?msisdn={msisdn}"
        f"&start_time={day}000000&end_time={end}000000",
        headers={"Authorization": "Basic " + b64encode(b"wtc:wtc-dev").decode()},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        body = json.loads(response.read())
    return sum(item["total"] for item in body["usage"] if item["category"] == "data")


def bench_latency(stack, kafka: KafkaStack, probes: int, rows: int) -> dict:
    """File-to-API latency on each stream: the CDR loader (following the SFTP folder, polling
    every LOADER_POLL_SECONDS), the HVS consumer and the usage API run as processes, as in the
    demo; one CDR data file at a time is dropped into the folder (written aside, then renamed in),
    and the clock stops when the API reports the file's bytes for its subscriber. The landing's
    and the publishing's times (`cdr_data.files.loaded_at`, `published_at`) split each figure."""
    s = stack.s
    results = {}
    day = datetime.now(UTC).strftime("%Y%m%d")
    for b, (label, url) in enumerate(
        (("Redis Streams", s.stream_url), ("Kafka", kafka.stream_url))
    ):
        api_port = free_port()
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("WTC_", "DBT_"))},
            "WTC_ANALYTICS_DSN": s.analytics_dsn,
            "REDIS_URL": s.redis_url,
            "STREAM_URL": url,
            "SFTP_URL": s.sftp_url,
            "CDR_DIR": ".",
            "CDR_POLL_INTERVAL": str(LOADER_POLL_SECONDS),
            "CDR_METRICS_PORT": "0",
            "HVS_METRICS_PORT": "0",
            "HVS_GROUP": f"hvs-latency-{b}",
            "API_METRICS_PORT": "0",
            "WTC_LOG_FORMAT": "json",
        }
        logs = s.state_dir / "run"
        argvs = {
            "loader": [sys.executable, "-m", "ingestion.cdr_loader"],
            "hvs": [sys.executable, "-m", "hvs"],
            "api": [sys.executable, "-m", "uvicorn", "api.app:app", "--host", "127.0.0.1",
                    "--port", str(api_port), "--no-access-log"],
        }  # fmt: skip
        procs = []
        for name, argv in argvs.items():
            with (logs / f"latency-{b}-{name}.log").open("wb") as out:
                procs.append(
                    subprocess.Popen(argv, env=env, cwd=PROJECT_ROOT, stdout=out, stderr=out)
                )
        try:
            wait_until(lambda p=api_port: port_open("127.0.0.1", p), "the usage API", 60)
            seconds, after_landing, after_publish = [], [], []
            for n in range(probes):
                msisdn = f"0799{b}{n:08d}"
                stamp = f"{day}_{(b * probes + n) * 20 // 3600:02d}"
                stamp += f"{(b * probes + n) * 20 // 60 % 60:02d}{(b * probes + n) * 20 % 60:02d}"
                name = f"cdr_data_{stamp}.csv"
                lines = [DATA.header.decode()]
                want = 0
                for r in range(rows):
                    up, down = 100_000 + r, 200_000 + r
                    want += up + down
                    lines.append(
                        f"{msisdn},{1 + r % 2000},{up},{down},video,,,"
                        f"{day[:4]}-{day[4:6]}-{day[6:]} 00:{r // 60 % 60:02d}:{r % 60:02d}"
                    )
                aside = s.cdr_dir / f".{name}"
                aside.write_text("\n".join(lines) + "\n")
                aside.rename(s.cdr_dir / name)
                t0 = time.time()
                wait_until(
                    lambda m=msisdn, p=api_port, w=want: usage_total(p, m, day) >= w,
                    f"the API to answer for {name}",
                    120,
                    0.01,
                )
                t1 = time.time()
                with psycopg.connect(s.analytics_dsn) as conn:
                    loaded, published = conn.execute(
                        "select extract(epoch from loaded_at), extract(epoch from published_at) "
                        "from cdr_data.files where file_name = %s",
                        (name,),
                    ).fetchone()
                seconds.append(t1 - t0)
                after_landing.append(t1 - float(loaded))
                after_publish.append(t1 - float(published))
                # the next file lands on its own poll, not in the middle of one
                time.sleep(0.3)
        finally:
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
            for proc in procs:
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
        figures = {
            name: {"p50": percentile(v, 0.5), "p99": percentile(v, 0.99)}
            for name, v in (
                ("file_to_api", seconds),
                ("landed_to_api", after_landing),
                ("published_to_api", after_publish),
            )
        }
        results[label] = figures
        print(
            f"{label:14} file-to-API p50 {figures['file_to_api']['p50']:.2f} s "
            f"p99 {figures['file_to_api']['p99']:.2f} s; after landing p50 "
            f"{figures['landed_to_api']['p50']:.3f} s p99 {figures['landed_to_api']['p99']:.3f} s;"
            f" after publishing p50 {figures['published_to_api']['p50']:.3f} s "
            f"p99 {figures['published_to_api']['p99']:.3f} s ({probes} files of {rows} rows, "
            f"loader polling every {LOADER_POLL_SECONDS:.0f} s)"
        )
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.kafka_path", description=__doc__)
    parser.add_argument("--accounts", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--files", type=int, default=20)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--probes", type=int, default=60, help="files for the latency probe")
    parser.add_argument("--probe-rows", type=int, default=200, help="rows per probe file")
    parser.add_argument(
        "--variants", default="", help="comma-separated indexes of the capture variants to run"
    )
    parser.add_argument(
        "--parts", default="stream,latency,capture", help="which measurements to run"
    )
    parser.add_argument(
        "--jstack", action="store_true", help="sample the Connect worker's task threads"
    )
    args = parser.parse_args(argv)
    setup_logging()
    with throwaway("wtc-bench-kafka-") as stack:
        kafka = KafkaStack(stack.s, scratch_kafka_settings())
        try:
            seconds = kafka.start()
            print(f"Kafka path start: {seconds:.1f} s, {kafka.memory_mib()} MiB resident (4 JVMs)")
            parts = args.parts.split(",")
            if "stream" in parts:
                bench_stream(stack, kafka, args.files, args.rows)
            if "latency" in parts:
                bench_latency(stack, kafka, args.probes, args.probe_rows)
            if "capture" in parts:
                only = [v for v in args.variants.split(",") if v]
                bench_capture(stack, kafka, args.accounts, args.rounds, args.jstack, only)
            print(f"Kafka path after the runs: {kafka.memory_mib()} MiB resident")
        finally:
            kafka.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
