"""The webhook receiver's HTTP server: `POST /alerts` takes Alertmanager's webhook payload and
writes each alert in it as one JSON line; `GET /metrics` and `GET /health` serve the rest.

`forward()` is where a pager or chat hook goes (README.md): it gets every alert after it is
written, and a failure in it is logged and counted, never lost from the file.
"""

from __future__ import annotations

import json
import logging
import threading
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from common.settings import PROJECT_ROOT

log = logging.getLogger("monitoring.receiver")

MAX_BODY = 4 * 1024 * 1024
"""Alertmanager's payloads are small; a larger body is refused, not read."""


class ReceiverSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="WTC_RECEIVER_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 19095
    alerts_file: Path = Field(
        default=PROJECT_ROOT / ".wtc" / "monitoring" / "alerts.jsonl",
        description="where each received alert is appended as one JSON line",
    )


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.alerts = Counter(
            "wtc_receiver_alerts",
            "Alerts received, by status (firing, resolved); the log and the file name each one",
            ["status"],
            registry=self.registry,
        )
        self.errors = Counter(
            "wtc_receiver_errors",
            "Payloads refused or hooks that failed, by where",
            ["where"],
            registry=self.registry,
        )
        # the series exist from the start, so a dashboard or rule finds them before any alert
        for where in ("payload", "forward"):
            self.errors.labels(where)
        for status in ("firing", "resolved"):
            self.alerts.labels(status)


def alert_lines(payload: dict[str, Any], received_at: datetime) -> list[dict[str, Any]]:
    """One record per alert of an Alertmanager webhook payload (version 4)."""
    common = {
        "received_at": received_at.isoformat(timespec="milliseconds"),
        "receiver": payload.get("receiver"),
        "group_key": payload.get("groupKey"),
    }
    return [
        {
            **common,
            "status": alert.get("status"),
            "alertname": alert.get("labels", {}).get("alertname"),
            "labels": alert.get("labels", {}),
            "annotations": alert.get("annotations", {}),
            "starts_at": alert.get("startsAt"),
            "ends_at": alert.get("endsAt"),
            "fingerprint": alert.get("fingerprint"),
        }
        for alert in payload.get("alerts", [])
    ]


def forward(alert: dict[str, Any]) -> None:
    """The pager or chat hook: called with every alert once it is written. It does nothing here;
    README.md shows one that posts to a chat webhook."""


class AlertWriter:
    """Appends alert records to the alerts file, one JSON line each, whole lines only."""

    def __init__(self, path: Path, metrics: Metrics) -> None:
        self.path = path
        self.metrics = metrics
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, records: list[dict[str, Any]]) -> None:
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
        with self._lock, self.path.open("a", encoding="utf-8") as out:
            out.write(text)
            out.flush()
        for record in records:
            self.metrics.alerts.labels(record["status"]).inc()
            log.info(
                "alert",
                extra={k: record[k] for k in ("status", "alertname", "labels", "annotations")},
            )
            try:
                forward(record)
            except Exception:
                self.metrics.errors.labels("forward").inc()
                log.exception("the alert hook failed", extra={"alertname": record["alertname"]})


def make_server(settings: ReceiverSettings, metrics: Metrics | None = None) -> ThreadingHTTPServer:
    return _make_server(settings, metrics or Metrics())


def _make_server(settings: ReceiverSettings, metrics: Metrics) -> ThreadingHTTPServer:
    writer = AlertWriter(settings.alerts_file, metrics)

    class Handler(BaseHTTPRequestHandler):
        server_version = "wtc-receiver"

        def log_message(self, format: str, *args: object) -> None:
            log.debug(format, *args)

        def _answer(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            if self.path == "/metrics":
                self._answer(HTTPStatus.OK, generate_latest(metrics.registry), CONTENT_TYPE_LATEST)
            elif self.path == "/health":
                self._answer(HTTPStatus.OK, b"ok\n", "text/plain")
            else:
                self._answer(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain")

        def do_POST(self) -> None:
            if self.path != "/alerts":
                self._answer(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain")
                return
            length = int(self.headers.get("Content-Length") or 0)
            if length <= 0 or length > MAX_BODY:
                metrics.errors.labels("payload").inc()
                self._answer(HTTPStatus.BAD_REQUEST, b"bad length\n", "text/plain")
                return
            try:
                payload = json.loads(self.rfile.read(length))
                records = alert_lines(payload, datetime.now(UTC))
            except (ValueError, AttributeError, TypeError) as exc:
                metrics.errors.labels("payload").inc()
                log.warning("refused a payload", extra={"error": str(exc)})
                self._answer(HTTPStatus.BAD_REQUEST, b"not an Alertmanager payload\n", "text/plain")
                return
            writer.write(records)
            self._answer(HTTPStatus.OK, b"ok\n", "text/plain")

    return ThreadingHTTPServer((settings.host, settings.port), Handler)
