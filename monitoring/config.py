"""Render the monitoring configuration from `MonitoringSettings`: Prometheus' `prometheus.yml`
(scrape jobs, rule file, Alertmanager), the alert rules and Alertmanager's routing.

    python -m monitoring.config --out DIR             # the local stack's targets (loopback)
    python -m monitoring.config --out DIR --compose   # docker-compose.yml's service names

The rules and the routing are templates (`@{name}` placeholders, one per setting); the scrape
jobs are built here. The local stack (`ops.stack.monitoring`), the compose stack's one-shot
`monitoring-config` service, `make lint` and the tests all render through this one module.
"""

from __future__ import annotations

import argparse
import string
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from monitoring.settings import MonitoringSettings

HERE = Path(__file__).resolve().parent
RULES_TEMPLATE = HERE / "prometheus" / "rules.yml"
RULES_TESTS = HERE / "prometheus" / "rules_test.yml"
ALERTMANAGER_TEMPLATE = HERE / "alertmanager" / "alertmanager.yml"
POSTGRES_QUERIES = HERE / "prometheus" / "postgres_queries.yml"


class _Template(string.Template):
    delimiter = "@"


def fill(template: str, values: dict[str, object]) -> str:
    """`template` with each `@{name}` replaced; a placeholder without a value is an error."""
    return _Template(template).substitute({k: str(v) for k, v in values.items()})


@dataclass
class Targets:
    """Where Prometheus finds each scrape job (`host:port` lists) and where Alertmanager finds
    the receiver. `honor_labels` jobs keep the labels the target exposes (the Pushgateway)."""

    jobs: dict[str, list[str]]
    alertmanager: str
    receiver_url: str
    honor_labels: set[str] = field(default_factory=lambda: {"pushgateway"})


# The project's services and their metrics ports (each service's settings define the default).
SERVICE_JOBS = ("cdr_loader", "tick_sink", "crm_cdc", "hvs", "api", "drop_probe")

COMPOSE_TARGETS = Targets(
    jobs={
        "prometheus": ["localhost:9090"],
        "alertmanager": ["alertmanager:9093"],
        "pushgateway": ["pushgateway:9091"],
        "postgres": ["postgres-exporter:9187"],
        "redis": ["redis-exporter:9121"],
        "receiver": ["alert-receiver:19095"],
        "cdr_loader": ["cdr-loader:19101"],
        "tick_sink": ["tick-sink:19102"],
        "hvs": ["hvs:19104"],
        "api": ["api:19106"],  # the API's metrics port (API_METRICS_PORT), not its HTTP port
        "drop_probe": ["drop-probe:19105"],
        # the Connect worker's JMX exporter agent (docker/connect.Dockerfile); the brokers run the
        # stock apache/kafka image, which has no agent (docs/monitoring.md, "Kafka path")
        "kafka_connect": ["connect:19114"],
    },
    alertmanager="alertmanager:9093",
    receiver_url="http://alert-receiver:19095/alerts",
)
"""docker-compose.yml's services (no `crm_cdc` there: Debezium captures the CRM changes)."""


def prometheus_config(s: MonitoringSettings, targets: Targets) -> dict:
    jobs = []
    for job, addresses in targets.jobs.items():
        entry: dict[str, object] = {
            "job_name": job,
            "static_configs": [{"targets": list(addresses)}],
        }
        if job in targets.honor_labels:
            entry["honor_labels"] = True
        jobs.append(entry)
    return {
        "global": {
            "scrape_interval": s.scrape_interval,
            "evaluation_interval": s.evaluation_interval,
            "external_labels": {"project": "wtc-analytics"},
        },
        "rule_files": ["rules.yml"],
        "alerting": {"alertmanagers": [{"static_configs": [{"targets": [targets.alertmanager]}]}]},
        "scrape_configs": jobs,
    }


def render_rules(s: MonitoringSettings) -> str:
    return fill(RULES_TEMPLATE.read_text(), s.model_dump())


def render_alertmanager(s: MonitoringSettings, receiver_url: str) -> str:
    return fill(ALERTMANAGER_TEMPLATE.read_text(), {**s.model_dump(), "receiver_url": receiver_url})


def render(out: Path, s: MonitoringSettings, targets: Targets) -> dict[str, Path]:
    """Write `prometheus.yml`, `rules.yml` and `alertmanager.yml` into `out`; their paths."""
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "prometheus": out / "prometheus.yml",
        "rules": out / "rules.yml",
        "alertmanager": out / "alertmanager.yml",
    }
    header = "# Rendered by `python -m monitoring.config` from monitoring/; edit those, not this.\n"
    files["prometheus"].write_text(
        header + yaml.safe_dump(prometheus_config(s, targets), sort_keys=False)
    )
    files["rules"].write_text(header + render_rules(s))
    files["alertmanager"].write_text(header + render_alertmanager(s, targets.receiver_url))
    return files


def local_targets(
    s: MonitoringSettings, services: dict[str, str], more: dict[str, list[str]] | None = None
) -> Targets:
    """The local stack's jobs: the monitoring processes on `s.host`, `services` (job:
    `host:port`) for the project's processes, and `more` (job: `host:port` list) such as the
    Kafka path's JMX exporter agents."""
    own = {
        "prometheus": s.prometheus_port,
        "alertmanager": s.alertmanager_port,
        "pushgateway": s.pushgateway_port,
        "postgres": s.postgres_exporter_port,
        "redis": s.redis_exporter_port,
        "receiver": s.receiver_port,
    }
    jobs = {job: [s.address(port)] for job, port in own.items()}
    jobs.update({job: [address] for job, address in services.items()})
    jobs.update({job: list(addresses) for job, addresses in (more or {}).items()})
    return Targets(
        jobs=jobs,
        alertmanager=s.address(s.alertmanager_port),
        receiver_url=s.url(s.receiver_port, "/alerts"),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m monitoring.config",
        description="Render prometheus.yml, rules.yml and alertmanager.yml from the "
        "monitoring settings (WTC_MON_*) into a folder.",
    )
    parser.add_argument("--out", type=Path, required=True, help="folder to write the files to")
    parser.add_argument(
        "--compose", action="store_true", help="docker-compose.yml's targets, not the local ones"
    )
    args = parser.parse_args(argv)
    s = MonitoringSettings()
    if args.compose:
        targets = COMPOSE_TARGETS
    else:
        defaults = {
            "cdr_loader": 19101,
            "tick_sink": 19102,
            "crm_cdc": 19103,
            "hvs": 19104,
            "api": 19106,  # API_METRICS_PORT
            "drop_probe": s.drop_probe_port,
        }
        targets = local_targets(s, {job: s.address(port) for job, port in defaults.items()})
    for path in render(args.out, s, targets).values():
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
