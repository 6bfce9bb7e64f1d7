"""The Kafka path's local processes: a 3-node KRaft cluster and one Kafka Connect worker.

    python -m ops.stack start --stream kafka    # the embedded stack, then these
    python -m ops.stack status                  # lists them when they run

Everything runs from the pinned jars that `make setup` fetched (`ops.stack.jvm`), as plain
`java -cp <cache>/lib/* ...` processes on 127.0.0.1, under `<state>/kafka/`:

- three nodes, each broker and controller (`kafka.Kafka`), formatted once with one cluster id;
  the project's topics at replication factor 3 with `min.insync.replicas=2`, created from the
  compose stack's own list (`docker/kafka/create-topics.sh`) with its partition counts;
- one Connect worker in distributed mode (`ConnectDistributed`) with the settings the compose
  image uses (`docker/kafka/connect-distributed.properties`: config, offset and status topics at
  RF 3) and exactly the two plugins of the manifest on its `plugin.path`.

Each has a bounded heap, a log in `<state>/run/`, a health check and a graceful stop (SIGTERM:
a broker's controlled shutdown, the worker's rebalance-free exit). Each carries Prometheus' JMX
exporter as a Java agent (`<cache>/agents/`, rules in `monitoring/jmx/`), serving its metrics on
127.0.0.1 at `WTC_KAFKA_BROKER_METRICS_PORTS` / `WTC_KAFKA_CONNECT_METRICS_PORT`; Prometheus
scrapes them as the jobs `kafka` and `kafka_connect` (`scrape_jobs()`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shlex
import signal
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from base64 import urlsafe_b64encode
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from common.settings import PROJECT_ROOT, StackSettings
from ops.stack import jvm
from ops.stack.process import (
    StackError,
    alive,
    free_port,
    port_open,
    read_pid,
    terminate,
    wait_until,
)

log = logging.getLogger("ops.stack")

NODES = 3
TOPICS_SCRIPT = PROJECT_ROOT / "docker" / "kafka" / "create-topics.sh"
WORKER_PROPERTIES = PROJECT_ROOT / "docker" / "kafka" / "connect-distributed.properties"
PROJECT_TOPIC_CONFIG = {
    "min.insync.replicas": "2",
    # as long as the HVS keeps usage (35 days), as the Redis streams (ingestion.stream)
    "retention.ms": str(35 * 86_400_000),
}
JMX_RULES = PROJECT_ROOT / "monitoring" / "jmx"

LOG4J2 = """\
status = warn
appender.console.type = Console
appender.console.name = STDOUT
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = %d{ISO8601}{UTC}Z %-5p [%c{1}] %m%n
rootLogger.level = INFO
rootLogger.appenderRef.stdout.ref = STDOUT
logger.kafka.name = kafka
logger.kafka.level = WARN
logger.state.name = state.change.logger
logger.state.level = WARN
logger.raft.name = org.apache.kafka.raft
logger.raft.level = WARN
logger.reflections.name = org.reflections
logger.reflections.level = ERROR
logger.clients.name = org.apache.kafka.clients
logger.clients.level = WARN
logger.common.name = org.apache.kafka.common
logger.common.level = WARN
logger.coordinator.name = org.apache.kafka.coordinator
logger.coordinator.level = WARN
"""


class KafkaSettings(BaseSettings):
    """Ports and heaps of the local Kafka path (`WTC_KAFKA_*`)."""

    model_config = SettingsConfigDict(env_prefix="WTC_KAFKA_", extra="ignore")

    broker_ports: list[int] = Field(default=[19092, 19093, 19094])
    controller_ports: list[int] = Field(default=[19192, 19193, 19194])
    connect_port: int = 18083
    # Prometheus' JMX exporter agent on each node and on the worker (0: no agent on it)
    broker_metrics_ports: list[int] = Field(default=[19111, 19112, 19113])
    connect_metrics_port: int = 19114
    # 2 cores, 24 GiB: small heaps leave the memory to Postgres' cache and the page cache.
    broker_heap: str = "-Xms256m -Xmx512m"
    connect_heap: str = "-Xms256m -Xmx768m"
    java: str = "java"


def connect_worker_env(stack: StackSettings) -> dict[str, str]:
    """The Connect worker's secrets: the passwords of the two roles its connectors log in as
    (`${env:WTC_PG_DEBEZIUM_PASSWORD}` in the source, `${env:WTC_PG_SINK_PASSWORD}` in the
    sinks; contracts/roles.sql)."""
    return {
        "WTC_PG_DEBEZIUM_PASSWORD": stack.pg_debezium_password,
        "WTC_PG_SINK_PASSWORD": stack.pg_sink_password,
    }


SECRET_VARIABLES = re.compile(r"(PASSWORD|_DSN|_URL|API_USERS)", re.I)


def not_a_secret(name: str) -> bool:
    """Whether the worker may inherit the variable `name` from whoever starts it: no password,
    DSN or URL of any other process (`make demo` may run with the superuser's in its env)."""
    return not SECRET_VARIABLES.search(name)


def scratch_kafka_settings() -> KafkaSettings:
    """Every port a free one (the tests' and the benchmarks' clusters)."""
    return KafkaSettings(
        broker_ports=[free_port() for _ in range(NODES)],
        controller_ports=[free_port() for _ in range(NODES)],
        connect_port=free_port(),
        broker_metrics_ports=[free_port() for _ in range(NODES)],
        connect_metrics_port=free_port(),
    )


def project_topics(script: Path = TOPICS_SCRIPT) -> dict[str, tuple[int, int]]:
    """The compose stack's topics: name -> (partitions, replicas), from its TOPICS array."""
    block = re.search(r"TOPICS=\((.*?)\n\)", script.read_text(), re.S)
    if not block:
        raise StackError(f"no TOPICS=( ... ) array in {script}")
    topics = {}
    for line in block.group(1).strip().splitlines():
        name, partitions, replicas = shlex.split(line)[0].split()
        topics[name] = (int(partitions), int(replicas))
    return topics


def read_properties(path: Path) -> dict[str, str]:
    pairs = [
        line.split("=", 1)
        for line in path.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    return {k.strip(): v.strip() for k, v in pairs}


def write_properties(path: Path, values: dict[str, Any]) -> None:
    path.write_text("".join(f"{k}={v}\n" for k, v in values.items()))


def rss_mib(pid: int) -> float:
    """Resident memory of `pid` in MiB (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except FileNotFoundError:
        pass
    return 0.0


@dataclass
class JvmProcess:
    name: str
    pidfile: Path
    logfile: Path


class KafkaStack:
    """Start, check and stop the three KRaft nodes and the Connect worker of one state folder."""

    def __init__(
        self,
        stack_settings: StackSettings | None = None,
        settings: KafkaSettings | None = None,
        cache: Path | None = None,
    ) -> None:
        self.stack_settings = stack_settings or StackSettings()
        self.s = settings or KafkaSettings()
        if {len(self.s.broker_ports), len(self.s.controller_ports)} != {NODES} or len(
            self.s.broker_metrics_ports
        ) not in (0, NODES):
            raise StackError(
                f"the cluster has {NODES} nodes: give {NODES} broker, controller and "
                "broker metrics ports"
            )
        self.host = self.stack_settings.host
        self.state = self.stack_settings.state_dir.resolve()
        self.dir = self.state / "kafka"
        self.run_dir = self.state / "run"
        self.cache = (cache or jvm.cache_dir()).resolve()

    # -- addresses -----------------------------------------------------------------------------

    @property
    def bootstrap(self) -> str:
        return ",".join(f"{self.host}:{port}" for port in self.s.broker_ports)

    @property
    def stream_url(self) -> str:
        """For `ingestion.stream`: the KIP-848 group protocol, which a reopened consumer joins
        at once (the classic one holds its partitions for the session timeout)."""
        return f"kafka://{self.bootstrap}?group.protocol=consumer"

    @property
    def connect_url(self) -> str:
        return f"http://{self.host}:{self.s.connect_port}"

    def scrape_jobs(self) -> dict[str, list[str]]:
        """Prometheus' jobs for the JMX exporter agents: `kafka` (the nodes) and
        `kafka_connect` (the worker), as `host:port` lists; a port 0 is left out."""
        jobs = {
            "kafka": [f"{self.host}:{p}" for p in self.s.broker_metrics_ports if p],
            "kafka_connect": [f"{self.host}:{p}"] if (p := self.s.connect_metrics_port) else [],
        }
        return {job: targets for job, targets in jobs.items() if targets}

    def node(self, index: int) -> JvmProcess:
        return JvmProcess(
            f"kafka-{index}", self.dir / f"kafka-{index}.pid", self.run_dir / f"kafka-{index}.log"
        )

    @property
    def connect(self) -> JvmProcess:
        return JvmProcess("connect", self.dir / "connect.pid", self.run_dir / "connect.log")

    # -- processes -----------------------------------------------------------------------------

    def _check_ready(self) -> None:
        if not jvm.is_fetched(self.cache):
            raise StackError(
                f"the Kafka path's jars are not in {self.cache}: run `make setup` "
                "(or `python -m ops.stack jvm`) first"
            )

    def jmx_agent(self) -> Path:
        """The JMX exporter agent's jar in the cache (`make setup` fetched it)."""
        jars = sorted((self.cache / "agents").glob("jmx_prometheus_javaagent-*.jar"))
        if not jars:
            raise StackError(f"no JMX exporter agent in {self.cache / 'agents'}: run `make setup`")
        return jars[-1]

    def _agent(self, port: int, rules: str) -> list[str]:
        """`-javaagent:<jar>=host:port:<rules>`: the agent serves /metrics there (none for 0)."""
        if not port:
            return []
        return [f"-javaagent:{self.jmx_agent()}={self.host}:{port}:{JMX_RULES / rules}"]

    def _java(self, heap: str, main: list[str], agent: list[str] | None = None) -> list[str]:
        return [
            self.s.java,
            *heap.split(),
            *(agent or []),
            "-XX:+UseG1GC",
            "-XX:MaxGCPauseMillis=20",
            "-XX:+ExitOnOutOfMemoryError",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.dir / 'log4j2.properties'}",
            "-cp",
            f"{self.cache / 'lib'}/*",
            *main,
        ]

    def _launch(
        self,
        proc: JvmProcess,
        argv: list[str],
        env: dict[str, str] | None = None,
        inherit: Callable[[str], bool] = lambda _name: True,
    ) -> int:
        pid = read_pid(proc.pidfile)
        if pid is not None:
            log.info("already running", extra={"service": proc.name, "pid": pid})
            return pid
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with proc.logfile.open("ab") as logfile:
            child = subprocess.Popen(
                argv,
                cwd=self.dir,
                env={**{k: v for k, v in os.environ.items() if inherit(k)}, **(env or {})},
                stdout=logfile,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        proc.pidfile.write_text(f"{child.pid}\n")
        log.info("started", extra={"service": proc.name, "pid": child.pid})
        return child.pid

    def _cluster_id(self) -> str:
        path = self.dir / "cluster.id"
        if not path.exists():
            path.write_text(urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode() + "\n")
        return path.read_text().strip()

    def _node_properties(self, index: int) -> Path:
        voters = ",".join(
            f"{i + 1}@{self.host}:{port}" for i, port in enumerate(self.s.controller_ports)
        )
        broker, controller = self.s.broker_ports[index], self.s.controller_ports[index]
        path = self.dir / f"node-{index}" / "server.properties"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_properties(
            path,
            {
                "process.roles": "broker,controller",
                "node.id": index + 1,
                "controller.quorum.voters": voters,
                "listeners": f"PLAINTEXT://{self.host}:{broker},CONTROLLER://{self.host}:{controller}",
                "advertised.listeners": f"PLAINTEXT://{self.host}:{broker}",
                "controller.listener.names": "CONTROLLER",
                "inter.broker.listener.name": "PLAINTEXT",
                "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
                "log.dirs": path.parent / "data",
                "num.partitions": 3,
                "default.replication.factor": NODES,
                "min.insync.replicas": 2,
                "offsets.topic.replication.factor": NODES,
                "offsets.topic.num.partitions": 12,
                "transaction.state.log.replication.factor": NODES,
                "transaction.state.log.min.isr": 2,
                "share.coordinator.state.topic.replication.factor": NODES,
                "share.coordinator.state.topic.min.isr": 2,
                "auto.create.topics.enable": "false",
                "group.initial.rebalance.delay.ms": 0,
                # two cores: a few threads each, not one per core of a big server
                "num.network.threads": 2,
                "num.io.threads": 2,
                "background.threads": 2,
                "num.recovery.threads.per.data.dir": 1,
                "log.retention.hours": 24,
            },
        )
        return path

    def _format(self, index: int, properties: Path) -> None:
        if (properties.parent / "data" / "meta.properties").exists():
            return
        result = subprocess.run(
            self._java(
                "-Xmx256m -XX:TieredStopAtLevel=1",
                [
                    "kafka.tools.StorageTool",
                    "format",
                    "--cluster-id",
                    self._cluster_id(),
                    "--config",
                    str(properties),
                    "--ignore-formatted",
                ],
            ),
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise StackError(f"formatting kafka-{index} failed: {result.stdout}{result.stderr}")

    def start_broker(self, index: int) -> int:
        proc = self.node(index)
        metrics_port = self.s.broker_metrics_ports[index] if self.s.broker_metrics_ports else 0
        if read_pid(proc.pidfile) is None:
            for port in (self.s.broker_ports[index], self.s.controller_ports[index], metrics_port):
                if port and port_open(self.host, port):
                    raise StackError(
                        f"port {port} for {proc.name} is taken by another program; set "
                        "WTC_KAFKA_BROKER_PORTS / WTC_KAFKA_CONTROLLER_PORTS / "
                        "WTC_KAFKA_BROKER_METRICS_PORTS"
                    )
        properties = self._node_properties(index)
        self._format(index, properties)
        argv = self._java(
            self.s.broker_heap,
            ["kafka.Kafka", str(properties)],
            self._agent(metrics_port, "kafka_broker.yml"),
        )
        return self._launch(proc, argv)

    def start_brokers(self, timeout: float = 120.0) -> None:
        self._check_ready()
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "log4j2.properties").write_text(LOG4J2)
        for index in range(NODES):
            self._format(index, self._node_properties(index))
        for index in range(NODES):
            self.start_broker(index)
        wait_until(self.brokers_healthy, "the 3 Kafka brokers", timeout=timeout, interval=0.5)

    def _worker_properties(self) -> Path:
        values = read_properties(WORKER_PROPERTIES)
        values.update(
            {
                "bootstrap.servers": self.bootstrap,
                "listeners": f"http://{self.host}:{self.s.connect_port}",
                "rest.advertised.host.name": self.host,
                "rest.advertised.port": str(self.s.connect_port),
                # one directory holding one directory per plugin (each jar directly on the
                # path would be a plugin of its own)
                "plugin.path": str(self.cache / "plugins"),
            }
        )
        path = self.dir / "connect-distributed.properties"
        write_properties(path, values)
        return path

    def start_connect(self, timeout: float = 180.0) -> None:
        self._check_ready()
        proc = self.connect
        if read_pid(proc.pidfile) is None:
            for port, name in (
                (self.s.connect_port, "WTC_KAFKA_CONNECT_PORT"),
                (self.s.connect_metrics_port, "WTC_KAFKA_CONNECT_METRICS_PORT"),
            ):
                if port and port_open(self.host, port):
                    raise StackError(f"port {port} for Connect is taken; set {name}")
        argv = self._java(
            self.s.connect_heap,
            ["org.apache.kafka.connect.cli.ConnectDistributed", str(self._worker_properties())],
            self._agent(self.s.connect_metrics_port, "kafka_connect.yml"),
        )
        # The connectors' ${env:...} passwords are resolved from the worker's environment: its
        # two roles' own (Debezium's replication role, the sinks' writer), never the superuser's.
        self._launch(proc, argv, env=connect_worker_env(self.stack_settings), inherit=not_a_secret)
        wait_until(self.connect_healthy, "the Kafka Connect worker", timeout=timeout, interval=0.5)

    def create_topics(self, topics: dict[str, tuple[int, int]] | None = None) -> None:
        """Create the project's topics (idempotent: existing ones are left as they are)."""
        from confluent_kafka.admin import AdminClient, NewTopic

        topics = project_topics() if topics is None else topics
        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        existing = set(admin.list_topics(timeout=30).topics)
        wanted = [
            NewTopic(name, partitions, replicas, config=dict(PROJECT_TOPIC_CONFIG))
            for name, (partitions, replicas) in topics.items()
            if name not in existing
        ]
        if not wanted:
            return
        for name, future in admin.create_topics(wanted, request_timeout=30).items():
            try:
                future.result(timeout=60)
            except Exception as exc:  # KafkaException carries the broker's reason
                if "TOPIC_ALREADY_EXISTS" not in str(exc):
                    raise StackError(f"creating topic {name} failed: {exc}") from exc
            log.info("topic created", extra={"topic": name})

    def start(self) -> float:
        """Start the brokers, create the topics, start Connect; the seconds it took."""
        started = time.monotonic()
        self.start_brokers()
        self.create_topics()
        self.start_connect()
        seconds = time.monotonic() - started
        log.info("kafka path up", extra={"seconds": round(seconds, 1), "mib": self.memory_mib()})
        return seconds

    # -- health --------------------------------------------------------------------------------

    def brokers_healthy(self, expected: int = NODES) -> bool:
        """`expected` brokers registered, and every partition of the offsets topic led."""
        from confluent_kafka.admin import AdminClient

        try:
            admin = AdminClient(
                {"bootstrap.servers": self.bootstrap, "socket.timeout.ms": 2000, "log_level": 0}
            )
            metadata = admin.list_topics(timeout=2)
        except Exception:  # not answering yet
            return False
        return len(metadata.brokers) >= expected

    def connect_healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.connect_url}/connectors", timeout=2) as response:
                return response.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def connector_plugins(self) -> list[str]:
        url = f"{self.connect_url}/connector-plugins?connectorsOnly=true"
        with urllib.request.urlopen(url, timeout=10) as response:
            return sorted(p["class"] for p in json.load(response))

    def pids(self) -> dict[str, int | None]:
        procs = [self.node(i) for i in range(NODES)] + [self.connect]
        return {p.name: read_pid(p.pidfile) for p in procs}

    def memory_mib(self) -> int:
        """Resident memory of the four JVMs together, in MiB."""
        return round(sum(rss_mib(pid) for pid in self.pids().values() if pid))

    # -- stopping ------------------------------------------------------------------------------

    def kill(self, proc: JvmProcess) -> None:
        """SIGKILL (the failure tests): no shutdown hook runs."""
        pid = read_pid(proc.pidfile)
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not alive(pid), f"{proc.name} to die")
        proc.pidfile.unlink(missing_ok=True)

    def stop_connect(self) -> None:
        terminate({self.connect.pidfile: "kafka connect"}, timeout=60)

    def stop_broker(self, index: int) -> None:
        terminate({self.node(index).pidfile: f"kafka-{index}"}, timeout=60)

    def stop(self) -> None:
        """Connect first, then the three nodes together (a controlled shutdown each)."""
        self.stop_connect()
        terminate({self.node(i).pidfile: f"kafka-{i}" for i in range(NODES)}, timeout=60)

    def status(self) -> list[tuple[str, int, int | None, str]]:
        """(name, port, pid or None, detail) of the four processes."""
        rows = [
            (f"kafka-{i}", self.s.broker_ports[i], read_pid(self.node(i).pidfile), str(self.dir))
            for i in range(NODES)
        ]
        rows.append(
            ("connect", self.s.connect_port, read_pid(self.connect.pidfile), self.connect_url)
        )
        return rows

    def any_running(self) -> bool:
        return any(pid for pid in self.pids().values())
