"""Monitoring in the local stack: Debian's Prometheus, Alertmanager, Pushgateway,
postgres-exporter and redis-exporter, and the project's receiver and drop probe, run under
`<state>/monitoring/` on loopback (docs/monitoring.md).

The configuration is rendered from `MonitoringSettings` (`WTC_MON_*`) on every start; a running
Prometheus or Alertmanager reloads it (SIGHUP). As root, the Debian daemons run as the stack's
unprivileged service user, like Postgres and Redis.
"""

from __future__ import annotations

import logging
import os
import pwd
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from common.settings import PROJECT_ROOT, StackSettings
from monitoring.config import POSTGRES_QUERIES, Targets, local_targets, render
from monitoring.settings import MonitoringSettings
from ops.stack.kafka import KafkaStack
from ops.stack.process import (
    Component,
    StackError,
    is_root,
    port_open,
    read_pid,
    terminate,
    wait_until,
)

log = logging.getLogger("ops.stack")

PROMETHEUS = "prometheus"
ALERTMANAGER = "prometheus-alertmanager"
PUSHGATEWAY = "prometheus-pushgateway"
POSTGRES_EXPORTER = "prometheus-postgres-exporter"
REDIS_EXPORTER = "prometheus-redis-exporter"
DEBIAN_PACKAGES = {
    PROMETHEUS: "prometheus",  # also brings promtool
    ALERTMANAGER: "prometheus-alertmanager",  # also brings amtool
    PUSHGATEWAY: "prometheus-pushgateway",
    POSTGRES_EXPORTER: "prometheus-postgres-exporter",
    REDIS_EXPORTER: "prometheus-redis-exporter",
}


def service_targets(stack: StackSettings, s: MonitoringSettings) -> dict[str, str]:
    """The project's processes as the demo runs them: each one's metrics port from its own
    settings (so `CDR_METRICS_PORT` and the like move the scrape target too)."""
    from api.settings import ApiSettings
    from hvs.settings import HvsSettings
    from ingestion.cdr_loader import LoaderSettings
    from ingestion.crm_cdc import CdcSettings
    from ingestion.tick_sink import TickSinkSettings

    ports = {
        "cdr_loader": LoaderSettings().metrics_port,
        "tick_sink": TickSinkSettings().metrics_port,
        "crm_cdc": CdcSettings().metrics_port,
        "hvs": HvsSettings().metrics_port,
        "api": ApiSettings().metrics_port,  # its own port on 127.0.0.1, not the HTTP one
        "drop_probe": s.drop_probe_port,
    }
    return {job: f"{stack.host}:{port}" for job, port in ports.items()}


@dataclass
class Daemon:
    name: str
    port: int
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    service_user: bool = True  # a Debian daemon: as the unprivileged user when root


class Monitoring:
    """Start, report and stop the monitoring processes of one stack."""

    def __init__(
        self,
        stack: StackSettings,
        settings: MonitoringSettings | None = None,
        services: dict[str, str] | None = None,
        cdr_dir: str | None = None,
    ) -> None:
        self.stack = stack
        self.cdr_dir = cdr_dir or os.environ.get("CDR_DIR", ".")
        self.s = settings or MonitoringSettings()
        self._services = services
        self._kafka: KafkaStack | None = None  # the Kafka path this stack runs, once told
        self.dir = stack.state_dir.resolve() / "monitoring"
        self.config_dir = self.dir / "config"
        self.run_dir = self.dir / "run"
        self.alerts_file = self.dir / "alerts.jsonl"

    @property
    def prometheus_url(self) -> str:
        return self.s.prometheus_url

    @property
    def alertmanager_url(self) -> str:
        return self.s.alertmanager_url

    def targets(self) -> Targets:
        """What Prometheus scrapes. On the Kafka path (told, or found running by a re-render such
        as `make start` after it) Debezium captures the CRM, so the embedded change capture is left
        out; the cluster's JMX exporter agents (jobs `kafka`, `kafka_connect`) are scraped while
        it runs."""
        services, kafka = self._services, self._kafka
        if services is None:  # the demo's processes on their configured ports
            services = service_targets(self.stack, self.s)
            if kafka is None:
                running = KafkaStack(self.stack)
                kafka = running if running.any_running() else None
            if kafka is not None:
                services = {job: t for job, t in services.items() if job != "crm_cdc"}
        kafka_jobs = kafka.scrape_jobs() if kafka is not None and kafka.any_running() else {}
        return local_targets(self.s, services, kafka_jobs)

    def expect_kafka_path(self, kafka: KafkaStack) -> None:
        """The stack runs the Kafka path `kafka`. Told before the start, Prometheus never waits
        for the embedded change capture (a job removed by a reload keeps its last `up` for
        minutes); the cluster's agents are scraped once it runs (`scrape_kafka` then)."""
        self._kafka = kafka

    def scrape_kafka(self) -> None:
        """The Kafka path's cluster is up: the configuration is rendered again with its JMX
        exporter agents, and a running Prometheus reloads it."""
        if self._kafka is None:
            raise StackError("scrape_kafka: say which cluster first (expect_kafka_path)")
        render(self.config_dir, self.s, self.targets())
        pid = read_pid(self._pidfile("prometheus"))
        if pid is not None:
            os.kill(pid, signal.SIGHUP)

    @staticmethod
    def missing_packages() -> list[str]:
        return [pkg for binary, pkg in DEBIAN_PACKAGES.items() if not shutil.which(binary)]

    def daemons(self) -> list[Daemon]:
        s, host = self.s, self.s.host
        cfg = self.config_dir
        python = sys.executable
        return [
            Daemon(
                "prometheus",
                s.prometheus_port,
                [
                    PROMETHEUS,
                    f"--config.file={cfg / 'prometheus.yml'}",
                    f"--storage.tsdb.path={self.dir / 'prometheus'}",
                    f"--storage.tsdb.retention.time={s.retention}",
                    f"--web.listen-address={host}:{s.prometheus_port}",
                ],
            ),
            Daemon(
                "alertmanager",
                s.alertmanager_port,
                [
                    ALERTMANAGER,
                    f"--config.file={cfg / 'alertmanager.yml'}",
                    f"--storage.path={self.dir / 'alertmanager'}",
                    f"--web.listen-address={host}:{s.alertmanager_port}",
                    "--cluster.listen-address=",  # one instance: no gossip port at all
                ],
            ),
            Daemon(
                "pushgateway",
                s.pushgateway_port,
                [
                    PUSHGATEWAY,
                    f"--web.listen-address={host}:{s.pushgateway_port}",
                    f"--persistence.file={self.dir / 'pushgateway' / 'metrics.store'}",
                ],
            ),
            Daemon(
                "postgres_exporter",
                s.postgres_exporter_port,
                [
                    POSTGRES_EXPORTER,
                    f"--web.listen-address={host}:{s.postgres_exporter_port}",
                    f"--extend.query-path={POSTGRES_QUERIES}",
                ],
                # its own role (pg_monitor, no table); the DSN carries the password: the
                # environment, never the command line
                {
                    "DATA_SOURCE_NAME": self.stack.pg_dsn("wtc_analytics", "exporter")
                    + "?sslmode=disable"
                },
            ),
            Daemon(
                "redis_exporter",
                s.redis_exporter_port,
                [
                    REDIS_EXPORTER,
                    f"--web.listen-address={host}:{s.redis_exporter_port}",
                    f"--redis.addr=redis://{self.stack.host}:{self.stack.redis_port}",
                ],
                # its own read-only ACL user; the password in the environment, never the argv
                {"REDIS_USER": "exporter", "REDIS_PASSWORD": self.stack.redis_exporter_password},
            ),
            Daemon(
                "receiver",
                s.receiver_port,
                [python, "-m", "monitoring.receiver"],
                {
                    "WTC_RECEIVER_HOST": host,
                    "WTC_RECEIVER_PORT": str(s.receiver_port),
                    "WTC_RECEIVER_ALERTS_FILE": str(self.alerts_file),
                    "WTC_LOG_FORMAT": "json",
                },
                service_user=False,
            ),
            Daemon(
                "drop_probe",
                s.drop_probe_port,
                [python, "-m", "monitoring.drop_probe"],
                {
                    "DROP_PROBE_METRICS_HOST": host,
                    "DROP_PROBE_METRICS_PORT": str(s.drop_probe_port),
                    "WTC_ANALYTICS_DSN": self.stack.pg_dsn("wtc_analytics", "probe"),
                    "SFTP_URL": self.stack.sftp_url,
                    "CDR_DIR": self.cdr_dir,
                    "WTC_LOG_FORMAT": "json",
                },
                service_user=False,
            ),
        ]

    # -- start, stop, status -----------------------------------------------------------------

    def _pidfile(self, name: str) -> Path:
        return self.run_dir / f"{name}.pid"

    def start(self) -> None:
        missing = self.missing_packages()
        if missing:
            raise StackError(f"missing packages {missing}: `make setup` installs them")
        user = pwd.getpwnam(self.stack.pg_os_user) if is_root() else None
        for directory in ("prometheus", "alertmanager", "pushgateway"):
            (self.dir / directory).mkdir(parents=True, exist_ok=True)
            if user is not None:
                os.chown(self.dir / directory, user.pw_uid, user.pw_gid)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        render(self.config_dir, self.s, self.targets())
        daemons = self.daemons()
        for daemon in daemons:
            self._start(daemon, user)
        for daemon in daemons:
            self._wait(daemon)
        log.info("monitoring up", extra={"prometheus": self.prometheus_url})

    def _start(self, daemon: Daemon, user: pwd.struct_passwd | None) -> None:
        pid = read_pid(self._pidfile(daemon.name))
        if pid is not None:
            if daemon.name in ("prometheus", "alertmanager"):
                os.kill(pid, signal.SIGHUP)  # reload the configuration just rendered
            return
        if port_open(self.s.host, daemon.port):
            raise StackError(
                f"port {daemon.port} for {daemon.name} is taken by another program; "
                f"set WTC_MON_{daemon.name.upper()}_PORT to a free one"
            )
        as_user = user if daemon.service_user else None
        log.info("starting %s", daemon.name, extra={"port": daemon.port})
        with (self.run_dir / f"{daemon.name}.log").open("ab") as logfile:
            proc = subprocess.Popen(
                daemon.argv,
                cwd=PROJECT_ROOT,
                env={**os.environ, **daemon.env},
                stdout=logfile,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                user=as_user.pw_uid if as_user else None,
                group=as_user.pw_gid if as_user else None,
                extra_groups=[] if as_user else None,
            )
        self._pidfile(daemon.name).write_text(f"{proc.pid}\n")

    def _wait(self, daemon: Daemon) -> None:
        pidfile = self._pidfile(daemon.name)

        def listening() -> bool:
            if read_pid(pidfile) is None:
                tail = (self.run_dir / f"{daemon.name}.log").read_text().splitlines()[-3:]
                raise StackError(f"{daemon.name} exited: " + " | ".join(tail))
            return port_open(self.s.host, daemon.port)

        wait_until(listening, f"{daemon.name} on port {daemon.port}", timeout=60)

    def stop(self) -> None:
        if self.run_dir.is_dir():
            terminate({p: p.stem for p in sorted(self.run_dir.glob("*.pid"))})

    def status(self) -> list[Component]:
        rows = []
        for daemon in self.daemons():
            pid = read_pid(self._pidfile(daemon.name))
            rows.append(Component(daemon.name, daemon.port, pid is not None, pid, str(self.dir)))
        return rows

    def push_dbt(self, what: str, env: dict[str, str]) -> None:
        """Push the last `dbt build` or `dbt source freshness` to the Pushgateway; a failure is
        logged, never raised (the metrics must not fail the build)."""
        if not port_open(self.s.host, self.s.pushgateway_port):
            log.warning("no pushgateway: the dbt metrics were not pushed")
            return
        done = subprocess.run(
            [sys.executable, "-m", "monitoring.dbt_metrics", what, "--gateway", self.s.pushgateway],
            cwd=PROJECT_ROOT,
            env={**os.environ, **env},
            check=False,
        )
        if done.returncode != 0:
            log.warning("pushing the dbt metrics failed", extra={"exit": done.returncode})
