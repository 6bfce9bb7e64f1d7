"""Monitoring on the Kafka path, on the real cluster (`real_kafka`: 3 KRaft brokers and a Connect
worker, each with Prometheus' JMX exporter agent) and a real Prometheus:

- Prometheus, told of the running cluster as `make demo STREAM=kafka` tells it
  (`expect_kafka_path`, then `scrape_kafka`: a reload), scrapes the four agents as up;
- a JDBC sink whose task cannot reach its database makes `kafka_connect_task_status{status=
  "failed"}` read 1 in Prometheus and fires `ConnectTaskFailed`; a sink that runs next to it
  reads 0 failed tasks and fires nothing;
- every `kafka_*` metric the rules and dashboards name is in the live scrape (the embedded
  path's names are checked by tests/test_monitoring_live.py, which runs no Kafka).
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator

import httpx
import pytest

from common.settings import Connections
from connect.register import (
    ConnectorRequest,
    RegisterError,
    connector_status,
    states,
    template_variables,
)
from connect.register import _call as connect_call
from ops.stack import free_port
from ops.stack.monitoring import Monitoring
from tests.fixtures.kafka import RealKafka
from tests.test_monitoring_e2e import fast_settings, wait_for
from tests.test_monitoring_live import (
    dashboard_expressions,
    for_prometheus,
    metric_names,
    rule_expressions,
)

pytestmark = pytest.mark.skipif(
    Monitoring.missing_packages() != [], reason="`make setup` installs Prometheus and friends"
)

KAFKA_JOBS = {"kafka", "kafka_connect"}


def kafka_metric_names() -> set[str]:
    expressions = rule_expressions() + [for_prometheus(e) for e in dashboard_expressions()]
    names = set().union(*(metric_names(e) for e in expressions))
    return {n for n in names if n.startswith("kafka_")}


def jdbc_sink(name: str, topic: str, jdbc_url: str) -> ConnectorRequest:
    """A JDBC sink logged in as the sinks' role, with the password the worker is given."""
    return ConnectorRequest(
        name,
        {
            "name": name,
            "connector.class": "io.debezium.connector.jdbc.JdbcSinkConnector",
            "tasks.max": "1",
            "topics": topic,
            "connection.url": jdbc_url,
            "connection.username": "wtc_sink",
            "connection.password": "${env:WTC_PG_SINK_PASSWORD}",
            "table.name.format": f"public.{name.replace('-', '_')}",
            "schema.evolution": "none",
            "errors.tolerance": "none",
        },
    )


@pytest.fixture
def monitored(real_kafka: RealKafka, stack) -> Iterator[Monitoring]:
    """A real Prometheus (and the rest of the monitoring) on free ports, with the project's
    services left out, then told of the cluster the way the demo tells it."""
    settings = fast_settings(connect_failed_for="2s")
    monitoring = Monitoring(stack.settings, settings, services={})
    monitoring.start()
    try:
        monitoring.expect_kafka_path(real_kafka.cluster)
        monitoring.scrape_kafka()
        yield monitoring
    finally:
        monitoring.stop()


def test_prometheus_scrapes_the_agents_and_a_failed_task_fires_its_alert(
    real_kafka: RealKafka, stack, monitored: Monitoring
) -> None:
    prometheus = monitored.prometheus_url
    cluster = real_kafka.cluster
    assert set(cluster.scrape_jobs()) == KAFKA_JOBS

    def kafka_targets_up() -> dict[str, str] | None:
        targets = httpx.get(f"{prometheus}/api/v1/targets", timeout=5).json()
        health = {
            t["scrapeUrl"]: t["health"]
            for t in targets["data"]["activeTargets"]
            if t["labels"]["job"] in KAFKA_JOBS
        }
        return health if len(health) == 4 and set(health.values()) == {"up"} else None

    health = wait_for(kafka_targets_up, "Prometheus to scrape 3 brokers and Connect", 60)
    assert len(health) == 4

    tag = uuid.uuid4().hex[:8]
    topic = f"mon-{tag}"
    cluster.create_topics({topic: (1, 3)})
    variables = template_variables(
        Connections(WTC_PROD_DSN=stack.prod_dsn, WTC_ANALYTICS_DSN=stack.analytics_dsn), {}
    )
    good, bad = f"mon-good-{tag}", f"mon-bad-{tag}"
    nowhere = f"jdbc:postgresql://127.0.0.1:{free_port()}/wtc_analytics"  # nothing listens
    requests = [
        jdbc_sink(good, topic, variables["ANALYTICS_JDBC_URL"]),
        jdbc_sink(bad, topic, nowhere),
    ]
    try:
        for req in requests:  # PUT alone: `register` stops at a FAILED task, this test wants one
            connect_call("PUT", cluster.connect_url + req.path, req.body())

        def value(query: str) -> float | None:
            answer = httpx.get(f"{prometheus}/api/v1/query", params={"query": query}, timeout=5)
            result = answer.json()["data"]["result"]
            return float(result[0]["value"][1]) if result else None

        failed = f'kafka_connect_task_status{{connector="{bad}", task="0", status="failed"}}'
        wait_for(lambda: value(failed) == 1, "the failed task's gauge to read 1", 120)
        # the worker's own count agrees, and so does Connect's REST API
        count = f'kafka_connect_worker_connector_failed_task_count{{connector="{bad}"}}'
        assert value(count) == 1
        assert states(connector_status(cluster.connect_url, bad)) == ("RUNNING", "FAILED")

        running = f'kafka_connect_task_status{{connector="{good}", status="running"}}'
        wait_for(lambda: value(running) == 1, "the good sink's task to run", 120)
        good_count = f'kafka_connect_worker_connector_running_task_count{{connector="{good}"}}'
        wait_for(lambda: value(good_count) == 1, "the worker to count the good sink's task", 60)
        assert value(f'kafka_connect_worker_connector_failed_task_count{{connector="{good}"}}') == 0
        assert value(f'kafka_connect_task_status{{connector="{good}", status="failed"}}') is None

        def firing() -> set[str] | None:
            alerts = httpx.get(f"{prometheus}/api/v1/alerts", timeout=5).json()["data"]["alerts"]
            names = {
                a["labels"].get("connector", "")
                for a in alerts
                if a["labels"]["alertname"] == "ConnectTaskFailed" and a["state"] == "firing"
            }
            return names or None

        assert wait_for(firing, "ConnectTaskFailed to fire", 60) == {bad}

        needed = kafka_metric_names()
        assert {
            "kafka_connect_task_status",
            "kafka_connect_sink_records_lag_max",
            "kafka_server_replicamanager_underreplicatedpartitions",
        } <= needed

        def scraped() -> set[str]:
            answer = httpx.get(f"{prometheus}/api/v1/label/__name__/values", timeout=5).json()
            return set(answer["data"])

        with contextlib.suppress(AssertionError):  # the assertion below names what is missing
            wait_for(lambda: needed <= scraped(), "every Kafka metric named to be scraped", 60)
        assert needed - scraped() == set(), "named by rules or dashboards, scraped from nothing"
    finally:
        for name in (good, bad):
            with contextlib.suppress(RegisterError, OSError):
                connect_call("DELETE", f"{cluster.connect_url}/connectors/{name}")
