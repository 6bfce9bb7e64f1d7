"""dbt runs as metrics, pushed to the Pushgateway after each `dbt build` and `dbt source freshness`.

    python -m monitoring.dbt_metrics build       # after `dbt build`: target/run_results.json
    python -m monitoring.dbt_metrics freshness   # after `dbt source freshness`: target/sources.json

Why a Pushgateway and not an exporter that reads the target folder (docs/monitoring.md): a build
is a batch job; its outcome is read from its own `run_results.json` at once, before a later dbt
command overwrites the file; the last success time is pushed only by a successful build, so a
failed build leaves it as it was; and the compose stack's one-shot dbt container pushes over the
network instead of sharing its target volume with a long-running process.

Pushes are `POST`s to the group `job="dbt"`: they replace the metrics of the names pushed and
keep the others, so a build's push keeps the last freshness check and the last success time.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, pushadd_to_gateway

from common.logs import setup_logging
from common.settings import PROJECT_ROOT
from monitoring.settings import MonitoringSettings

log = logging.getLogger("monitoring.dbt_metrics")

JOB = "dbt"
TEST_STATUSES = ("pass", "warn", "fail", "error", "skipped")
FRESHNESS_STATUSES = ("pass", "warn", "error", "runtime error")
FAILED = {"error", "fail", "runtime error"}


def _timestamp(value: str | None) -> float | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def _name(unique_id: str, parts: int = 1) -> str:
    """`model.wtc_analytics.stg_x` -> `stg_x`; with parts=2, `source.p.cdr_data.files` ->
    `cdr_data.files`."""
    return ".".join(unique_id.split(".")[-parts:])


def build_registry(results: dict[str, Any]) -> tuple[CollectorRegistry, bool]:
    """The metrics of one `dbt build` (its `run_results.json`), and whether it succeeded."""
    registry = CollectorRegistry()
    entries = results.get("results", [])
    success = not any(r.get("status") in FAILED for r in entries)
    finished = _timestamp(results.get("metadata", {}).get("generated_at"))
    Gauge(
        "wtc_dbt_last_run_timestamp_seconds", "When the last dbt build ended", registry=registry
    ).set(finished or 0)
    Gauge(
        "wtc_dbt_last_run_success", "1 when the last dbt build had no error", registry=registry
    ).set(int(success))
    Gauge(
        "wtc_dbt_last_run_duration_seconds", "Wall time of the last dbt build", registry=registry
    ).set(results.get("elapsed_time") or 0)
    if success:
        Gauge(
            "wtc_dbt_last_success_timestamp_seconds",
            "When the last successful dbt build ended",
            registry=registry,
        ).set(finished or 0)
    durations = Gauge(
        "wtc_dbt_model_duration_seconds",
        "Execution time of each model in the last dbt build",
        ["model", "status"],
        registry=registry,
    )
    tests = Gauge(
        "wtc_dbt_tests", "Tests of the last dbt build by status", ["status"], registry=registry
    )
    counts = dict.fromkeys(TEST_STATUSES, 0)
    for entry in entries:
        unique_id = entry.get("unique_id", "")
        kind = unique_id.split(".", 1)[0]
        if kind in ("model", "snapshot", "seed"):
            durations.labels(_name(unique_id), entry.get("status", "")).set(
                entry.get("execution_time") or 0
            )
        elif kind in ("test", "unit_test"):
            status = entry.get("status", "")
            counts[status] = counts.get(status, 0) + 1
    for status, count in counts.items():
        tests.labels(status).set(count)
    return registry, success


def freshness_registry(sources: dict[str, Any]) -> CollectorRegistry:
    """The metrics of one `dbt source freshness` (its `sources.json`)."""
    registry = CollectorRegistry()
    status = Gauge(
        "wtc_dbt_source_freshness",
        "1 for each source's status in the last freshness check",
        ["source", "status"],
        registry=registry,
    )
    loaded = Gauge(
        "wtc_dbt_source_max_loaded_at_timestamp_seconds",
        "The newest loaded_at of each source at the last freshness check",
        ["source"],
        registry=registry,
    )
    for entry in sources.get("results", []):
        source = _name(entry.get("unique_id", ""), parts=2)
        status.labels(source, entry.get("status", "")).set(1)
        stamp = _timestamp(entry.get("max_loaded_at"))
        if stamp is not None:
            loaded.labels(source).set(stamp)
    return registry


def push(registry: CollectorRegistry, gateway: str) -> None:
    pushadd_to_gateway(gateway, job=JOB, registry=registry, timeout=10)


def target_dir() -> Path:
    return Path(os.environ.get("DBT_TARGET_PATH") or PROJECT_ROOT / "dbt" / "target")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m monitoring.dbt_metrics",
        description="Push the outcome of the last `dbt build` (run_results.json) or `dbt source "
        "freshness` (sources.json) to the Pushgateway.",
    )
    parser.add_argument("what", choices=["build", "freshness"])
    parser.add_argument("--target-dir", type=Path, help="dbt's target folder (DBT_TARGET_PATH)")
    parser.add_argument("--gateway", help="Pushgateway URL (WTC_MON_PUSHGATEWAY_URL)")
    args = parser.parse_args(argv)
    setup_logging()
    folder = args.target_dir or target_dir()
    gateway = args.gateway or MonitoringSettings().pushgateway
    name = "run_results.json" if args.what == "build" else "sources.json"
    document = json.loads((folder / name).read_text())
    if args.what == "build":
        registry, success = build_registry(document)
        log.info("pushing the dbt build's metrics", extra={"success": success})
    else:
        registry = freshness_registry(document)
        log.info("pushing the source freshness metrics")
    push(registry, gateway)
    return 0


if __name__ == "__main__":
    sys.exit(main())
