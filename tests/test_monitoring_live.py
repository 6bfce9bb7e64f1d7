"""Every PromQL expression of the alert rules and the Grafana dashboards parses in the real
Prometheus, and every metric they name exists in a live scrape: the project's real services
(CDR loader, tick sink, CDC reader, HVS consumer, usage API, drop probe), the real exporters, and
a real dbt build and freshness check pushed to the Pushgateway, all against the test stack.

It runs the embedded path, so no Kafka: the `kafka_*` names (the JMX exporter agents on the
brokers and the Connect worker) are checked in a live scrape of the real cluster by
tests/test_monitoring_kafka.py."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import httpx
import psycopg
import pytest
import yaml

from common.settings import PROJECT_ROOT
from ingestion.generators.cdr import CdrConfig, cdr_files
from monitoring.config import render_rules
from ops.stack import free_port
from ops.stack.monitoring import Monitoring
from tests.fixtures.polling import wait_for
from tests.test_monitoring_e2e import fast_settings, stop

pytestmark = pytest.mark.skipif(
    Monitoring.missing_packages() != [], reason="`make setup` installs Prometheus and friends"
)

DASHBOARDS = PROJECT_ROOT / "monitoring" / "grafana" / "dashboards"
KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
    "bool", "offset", "inf", "nan",
}  # fmt: skip


def rule_expressions() -> list[str]:
    groups = yaml.safe_load(render_rules(fast_settings()))["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


def dashboard_expressions() -> list[str]:
    exprs = []
    for path in sorted(DASHBOARDS.glob("*.json")):
        for panel in json.loads(path.read_text())["panels"]:
            exprs += [t["expr"] for t in panel.get("targets", [])]
    return exprs


def for_prometheus(expr: str) -> str:
    """A dashboard's expression as Prometheus reads it (Grafana fills its own variables)."""
    return expr.replace("$__rate_interval", "1m")


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects: strings, label matchers, ranges and grouping
    clauses taken out, then every identifier that is not a function, a keyword or a number."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*(?=\s*(\()?)", text):
        name, call = match.group(0), match.group(1)
        start = match.start()
        if call or name.lower() in KEYWORDS or (start and text[start - 1].isdigit()):
            continue
        names.add(name)
    return names


def test_metric_names_finds_selectors_not_functions_or_labels() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le) (rate(x_bucket{job="a", le="1"}[5m]))) > 3'
        " and on (job) time() - y_seconds offset 5m or absent(z) > 1e3"
    )
    assert metric_names(expr) == {"x_bucket", "y_seconds", "z"}


@pytest.fixture
def drop_dir(stack, analytics) -> Iterator[tuple[str, Path]]:
    name = f"live_{uuid.uuid4().hex[:8]}"
    path = stack.cdr_dir / name
    path.mkdir()
    shutil.chown(path, "cdr_data")
    yield name, path
    shutil.rmtree(path, ignore_errors=True)


def test_rules_and_dashboards_parse_and_name_only_scraped_metrics(
    stack, drop_dir, redis_client, dbt_project, tmp_path
) -> None:
    directory, path = drop_dir
    settings = fast_settings()
    ports = {job: free_port() for job in ("cdr_loader", "tick_sink", "crm_cdc", "hvs", "api")}
    services = {job: f"127.0.0.1:{port}" for job, port in ports.items()}
    api_port = free_port()  # the API's HTTP port; Prometheus scrapes its metrics port
    services["drop_probe"] = f"127.0.0.1:{settings.drop_probe_port}"
    monitoring = Monitoring(stack.settings, settings, services=services, cdr_dir=directory)
    slot = f"wtc_mon_{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        "WTC_ANALYTICS_DSN": stack.analytics_dsn,
        "WTC_PROD_DSN": stack.prod_dsn,
        "REDIS_URL": stack.redis_url,
        "STREAM_URL": stack.stream_url,
        "SFTP_URL": stack.sftp_url,
        "CDR_DIR": directory,
        "CDR_SETTLE_SECONDS": "0",
        "CDR_POLL_INTERVAL": "0.2",
        "CDR_METRICS_PORT": str(ports["cdr_loader"]),
        "TICK_SINK_METRICS_PORT": str(ports["tick_sink"]),
        "CRM_CDC_METRICS_PORT": str(ports["crm_cdc"]),
        "HVS_METRICS_PORT": str(ports["hvs"]),
        "API_METRICS_PORT": str(ports["api"]),
        "WTC_LOG_FORMAT": "json",
    }
    commands = {
        "cdr_loader": ["-m", "ingestion.cdr_loader"],
        "tick_sink": ["-m", "ingestion.tick_sink"],
        "crm_cdc": ["-m", "ingestion.crm_cdc", "--slot", slot, "--publication", slot,
                    "--metrics-port", str(ports["crm_cdc"])],
        "hvs": ["-m", "hvs"],
        "api": ["-m", "uvicorn", "api.app:app", "--host", "127.0.0.1",
                "--port", str(api_port), "--no-access-log"],
    }  # fmt: skip
    files = list(
        cdr_files(
            CdrConfig(
                start=datetime(2033, 5, 1),
                duration=timedelta(seconds=400),
                window_seconds=200,
                rows_per_file=20,
                subscribers=50,
            )
        )
    )
    procs: dict[str, subprocess.Popen] = {}
    monitoring.start()
    try:
        for name, args in commands.items():
            with (tmp_path / f"{name}.log").open("wb") as log_file:
                procs[name] = subprocess.Popen(
                    [sys.executable, *args],
                    env=env,
                    cwd=PROJECT_ROOT,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                )
        # traffic for every labelled series: CDR files (one row rejected), ticks, API requests
        for name, data in files:
            lines = data.splitlines(keepends=True)
            if name == files[0][0]:
                lines[1] = b"not,a,valid,row\r\n"
            (path / name).write_bytes(b"".join(lines))
        subprocess.run(
            [sys.executable, "-m", "ingestion.generators", "forex", "--hours", "0.05",
             "--stream-url", stack.stream_url],
            cwd=PROJECT_ROOT, env=env, check=True, capture_output=True,
        )  # fmt: skip
        api = f"http://127.0.0.1:{api_port}"
        wait_for(lambda: _answers(f"{api}/health"), "the usage API", 180)
        httpx.get(f"{api}/data_usage", timeout=5)  # 401 without a login: a counted request
        # a real dbt build and freshness check, pushed as `make demo` pushes them
        dbt_project.run("build", "--select", "stg_forex__ticks")
        dbt_project.run("source", "freshness", "--select", "source:forex", check=False)
        for what in ("build", "freshness"):
            subprocess.run(
                [sys.executable, "-m", "monitoring.dbt_metrics", what,
                 "--target-dir", str(dbt_project.work_dir / "target"),
                 "--gateway", settings.pushgateway],
                cwd=PROJECT_ROOT, env=env, check=True, capture_output=True,
            )  # fmt: skip

        expressions = rule_expressions() + [for_prometheus(e) for e in dashboard_expressions()]
        names = set().union(*(metric_names(e) for e in expressions))
        needed = {n for n in names if not n.startswith("kafka_")}  # test_monitoring_kafka.py
        prometheus = monitoring.prometheus_url

        def scraped() -> set[str]:
            answer = httpx.get(f"{prometheus}/api/v1/label/__name__/values", timeout=5).json()
            return set(answer["data"])

        def all_there() -> bool:
            return needed <= scraped()

        with contextlib.suppress(AssertionError):  # the assertion below names what is missing
            wait_for(all_there, "every metric named to be scraped", timeout=120)
        assert needed - scraped() == set(), "named by rules or dashboards, scraped from nothing"

        targets = httpx.get(f"{prometheus}/api/v1/targets", timeout=5).json()
        health = {t["labels"]["job"]: t["health"] for t in targets["data"]["activeTargets"]}
        assert set(health.values()) == {"up"}, health

        for expr in expressions:
            answer = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=10)
            assert answer.status_code == 200, f"{expr}: {answer.text}"
            assert answer.json()["status"] == "success", expr
    finally:
        for proc in procs.values():
            stop(proc)
        monitoring.stop()
        with psycopg.connect(stack.prod_dsn, autocommit=True) as conn:
            conn.execute(
                "select pg_drop_replication_slot(slot_name) from pg_replication_slots"
                " where slot_name = %s",
                (slot,),
            )
            conn.execute(f'drop publication if exists "{slot}"')


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
