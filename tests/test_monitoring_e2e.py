"""End to end: real Prometheus, Alertmanager, the project's receiver and drop probe, and the real
CDR loader against the test stack. Stop the loader while files keep arriving: the stalled-loader
alert fires and reaches the receiver; start it again: the alert resolves.

The rule is the one in monitoring/prometheus/rules.yml; only its threshold and `for:`, the
scrape and evaluation intervals and Alertmanager's grouping are shortened, through the settings.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import httpx
import psycopg
import pytest

from common.settings import PROJECT_ROOT
from ingestion.generators.cdr import CdrConfig, cdr_files
from monitoring.settings import MonitoringSettings
from ops.stack import free_port
from ops.stack.monitoring import Monitoring
from tests.fixtures.polling import wait_for

pytestmark = pytest.mark.skipif(
    Monitoring.missing_packages() != [], reason="`make setup` installs Prometheus and friends"
)


def fast_settings(**overrides: object) -> MonitoringSettings:
    """Free ports, one-second scrapes and evaluations, Alertmanager without delays, and no
    alert but the one under test within the test's time (their `for:` is an hour)."""
    values: dict[str, object] = {
        "prometheus_port": free_port(),
        "alertmanager_port": free_port(),
        "pushgateway_port": free_port(),
        "postgres_exporter_port": free_port(),
        "redis_exporter_port": free_port(),
        "receiver_port": free_port(),
        "drop_probe_port": free_port(),
        "scrape_interval": "1s",
        "evaluation_interval": "1s",
        "group_wait": "1s",
        "group_interval": "1s",
        "repeat_interval": "1h",
    }
    for name in MonitoringSettings.model_fields:
        if name.endswith("_for"):
            values[name] = "1h"
    values.update(overrides)
    return MonitoringSettings(**values)


@pytest.fixture
def drop_dir(stack, analytics) -> Iterator[tuple[str, Path]]:
    name = f"mon_{uuid.uuid4().hex[:8]}"
    path = stack.cdr_dir / name
    path.mkdir()
    shutil.chown(path, "cdr_data")
    yield name, path
    shutil.rmtree(path, ignore_errors=True)


def alerts(monitoring: Monitoring) -> list[dict]:
    if not monitoring.alerts_file.exists():
        return []
    return [json.loads(line) for line in monitoring.alerts_file.read_text().splitlines()]


def received(monitoring: Monitoring, name: str, status: str) -> list[dict]:
    return [a for a in alerts(monitoring) if a["alertname"] == name and a["status"] == status]


def start_loader(stack, directory: str, port: int, log_path: Path) -> subprocess.Popen:
    env = {
        **os.environ,
        "WTC_ANALYTICS_DSN": stack.analytics_dsn,
        "SFTP_URL": stack.sftp_url,
        "STREAM_URL": stack.stream_url,
        "CDR_DIR": directory,
        "CDR_SETTLE_SECONDS": "0",
        "CDR_POLL_INTERVAL": "0.2",
        "CDR_METRICS_PORT": str(port),
        "WTC_LOG_FORMAT": "json",
    }
    with log_path.open("ab") as log_file:
        return subprocess.Popen(
            [sys.executable, "-m", "ingestion.cdr_loader", "--no-publish"],
            env=env,
            cwd=PROJECT_ROOT,
            stdout=subprocess.DEVNULL,
            stderr=log_file,
        )


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_a_stalled_loader_fires_the_alert_and_a_restarted_one_resolves_it(
    stack, drop_dir, tmp_path
) -> None:
    directory, path = drop_dir
    loader_port = free_port()
    settings = fast_settings(loader_stall_seconds=4, loader_stall_for="3s")
    monitoring = Monitoring(
        stack.settings,
        settings,
        services={
            "cdr_loader": f"127.0.0.1:{loader_port}",
            "drop_probe": f"127.0.0.1:{settings.drop_probe_port}",
        },
        cdr_dir=directory,
    )
    files = list(
        cdr_files(
            CdrConfig(
                start=datetime(2033, 3, 1),
                duration=timedelta(seconds=200 * 60),
                window_seconds=200,
                rows_per_file=20,
                subscribers=50,
            )
        )
    )
    arriving = threading.Event()
    done = threading.Event()

    def keep_arriving() -> None:
        for name, data in files[1:]:
            if done.wait(1.0):
                return
            if arriving.is_set():
                (path / name).write_bytes(data)

    feeder = threading.Thread(target=keep_arriving, daemon=True)
    log_path = tmp_path / "loader.log"
    monitoring.start()
    loader = start_loader(stack, directory, loader_port, log_path)
    try:
        (path / files[0][0]).write_bytes(files[0][1])
        with psycopg.connect(stack.analytics_dsn, autocommit=True) as conn:
            wait_for(
                lambda: conn.execute(
                    "select 1 from cdr_data.files where file_name = %s", (files[0][0],)
                ).fetchone(),
                "the first file to land",
                180,
            )

        def scraped(job: str) -> bool:
            targets = httpx.get(f"{monitoring.prometheus_url}/api/v1/targets").json()
            return any(
                t["labels"]["job"] == job and t["health"] == "up"
                for t in targets["data"]["activeTargets"]
            )

        wait_for(lambda: scraped("cdr_loader") and scraped("drop_probe"), "both targets up", 180)
        assert received(monitoring, "CdrLoaderStalled", "firing") == []

        stop(loader)
        arriving.set()
        feeder.start()
        firing = wait_for(
            lambda: received(monitoring, "CdrLoaderStalled", "firing"),
            "the stalled-loader alert at the receiver",
            timeout=180,
        )
        alert = firing[0]
        assert alert["labels"]["severity"] == "page"
        assert alert["labels"]["job"] == "drop_probe"
        assert alert["annotations"]["runbook_url"] == "docs/monitoring.md#cdrloaderstalled"
        assert "none landed meanwhile" in alert["annotations"]["summary"]

        loader = start_loader(stack, directory, loader_port, log_path)
        resolved = wait_for(
            lambda: received(monitoring, "CdrLoaderStalled", "resolved"),
            "the alert to resolve once the loader runs again",
            timeout=180,
        )
        assert resolved[0]["fingerprint"] == alert["fingerprint"]
        # the files that arrived meanwhile have landed
        with psycopg.connect(stack.analytics_dsn, autocommit=True) as conn:
            landed = conn.execute("select count(*) from cdr_data.files").fetchone()[0]
        assert landed >= 3
    finally:
        done.set()
        if feeder.is_alive():
            feeder.join(timeout=5)
        stop(loader)
        monitoring.stop()
