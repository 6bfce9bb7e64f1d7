"""Register the scale-out stack's Kafka Connect connectors, idempotently.

    python connect/register.py                 # PUT every connect/connectors/*.json
    python connect/register.py --wait 120      # first wait up to 120 s for the Connect REST API
    python connect/register.py --dry-run       # print the request bodies, send nothing

Each file holds `{"name": ..., "config": {...}}` and is sent as
`PUT /connectors/<name>/config`, which creates the connector or updates it in place, so a
rerun converges instead of failing.

Placeholders in the configs:

- `${NAME}` or `${NAME:-default}` (upper-case names) are filled in here, before sending: the
  database coordinates (`CRM_DB_HOST`, `CRM_DB_PORT`, `CRM_DB_NAME`, `CRM_DB_USER`,
  `ANALYTICS_JDBC_URL`, `ANALYTICS_DB_USER`) come from `WTC_PROD_DSN` (as Debezium's role,
  `wtc_debezium`) and `WTC_ANALYTICS_DSN` (as the sinks' role, `wtc_sink`); an environment
  variable of the same name wins. Neither DSN needs a password.
- `${env:NAME}` is left alone: the Connect worker resolves it from its own environment
  (Kafka's `EnvVarConfigProvider`), so passwords never travel in a request body nor show up in
  `GET /connectors/<name>/config`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import quote, unquote, urlsplit

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.logs import setup_logging
from common.settings import Connections

log = logging.getLogger("connect.register")

CONNECTORS_DIR = Path(__file__).resolve().parent / "connectors"
PLACEHOLDER = re.compile(r"\$\{([A-Z][A-Z0-9_]*)(?::-([^}]*))?\}")
"""`${NAME}` / `${NAME:-default}`; lower-case provider references such as `${env:X}` never match."""


class RegisterError(RuntimeError):
    """A connector config cannot be built or registered; the message says which and why."""


class RegisterConnections(Connections):
    """The two DSNs name the connectors' hosts, databases and logins (Debezium's replication role
    in `WTC_PROD_DSN`, the sinks' role in `WTC_ANALYTICS_DSN`). Registration sends no password
    (the worker resolves `${env:...}`), so the DSNs need none, in production too."""

    SECRET_FIELDS: ClassVar[tuple[str, ...]] = ()


class RegisterSettings(BaseSettings):
    """Where the Connect REST API is and where the connector configs live."""

    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True)

    connect_url: str = Field(default="http://localhost:8083", alias="CONNECT_URL")
    connectors_dir: Path = Field(default=CONNECTORS_DIR, alias="CONNECTORS_DIR")


@dataclass(frozen=True)
class ConnectorRequest:
    """One idempotent registration: `PUT /connectors/<name>/config` with `config` as the body."""

    name: str
    config: dict[str, str]

    @property
    def path(self) -> str:
        return f"/connectors/{quote(self.name, safe='')}/config"

    def body(self) -> bytes:
        return json.dumps(self.config, sort_keys=True).encode()


def dsn_variables(prod_dsn: str, analytics_dsn: str) -> dict[str, str]:
    """Template variables derived from the two Postgres DSNs (passwords deliberately left out)."""
    prod = urlsplit(prod_dsn)
    analytics = urlsplit(analytics_dsn)
    for what, url in (("WTC_PROD_DSN", prod), ("WTC_ANALYTICS_DSN", analytics)):
        if url.scheme not in ("postgresql", "postgres") or not url.hostname:
            raise RegisterError(f"{what} must be a postgresql://user@host:port/db URL")
    analytics_db = analytics.path.lstrip("/") or "wtc_analytics"
    analytics_port = analytics.port or 5432
    return {
        "CRM_DB_HOST": prod.hostname or "",
        "CRM_DB_PORT": str(prod.port or 5432),
        "CRM_DB_NAME": prod.path.lstrip("/") or "wtc_prod",
        "CRM_DB_USER": unquote(prod.username or "postgres"),
        "ANALYTICS_JDBC_URL": (
            f"jdbc:postgresql://{analytics.hostname}:{analytics_port}/{analytics_db}"
        ),
        "ANALYTICS_DB_USER": unquote(analytics.username or "postgres"),
    }


def template_variables(
    connections: Connections, environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """DSN-derived variables, overridden by (and extended with) the environment."""
    env = os.environ if environ is None else environ
    return {**dsn_variables(connections.prod_dsn, connections.analytics_dsn), **env}


def substitute(value: Any, variables: Mapping[str, str], where: str = "config") -> Any:
    """Fill `${NAME}` / `${NAME:-default}` in every string of `value` (dicts and lists too)."""
    if isinstance(value, dict):
        return {k: substitute(v, variables, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [substitute(v, variables, f"{where}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value
    missing: list[str] = []

    def fill(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in variables:
            return variables[name]
        if default is not None:
            return default
        missing.append(name)
        return match.group(0)

    result = PLACEHOLDER.sub(fill, value)
    if missing:
        raise RegisterError(f"{where}: no value for {', '.join(sorted(set(missing)))}")
    return result


def load_connector(path: Path) -> tuple[str, dict[str, Any]]:
    """Read one connector file: a JSON object with a `name` and a `config` object."""
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise RegisterError(f"{path.name}: not valid JSON ({exc})") from exc
    if not isinstance(doc, dict) or set(doc) != {"name", "config"}:
        raise RegisterError(f"{path.name}: expected exactly the keys 'name' and 'config'")
    name, config = doc["name"], doc["config"]
    if not isinstance(name, str) or not name:
        raise RegisterError(f"{path.name}: 'name' must be a non-empty string")
    if not isinstance(config, dict) or "connector.class" not in config:
        raise RegisterError(f"{path.name}: 'config' must be an object with 'connector.class'")
    if not all(isinstance(v, str) for v in config.values()):
        raise RegisterError(f"{path.name}: every config value must be a string")
    if config.get("name", name) != name:
        raise RegisterError(f"{path.name}: config.name differs from name")
    return name, config


def build_requests(directory: Path, variables: Mapping[str, str]) -> list[ConnectorRequest]:
    """One request per `*.json` in `directory`, placeholders filled, sorted by file name."""
    files = sorted(directory.glob("*.json"))
    if not files:
        raise RegisterError(f"no connector configs (*.json) in {directory}")
    requests: list[ConnectorRequest] = []
    names: set[str] = set()
    for path in files:
        name, config = load_connector(path)
        if name in names:
            raise RegisterError(f"{path.name}: connector name {name!r} used twice")
        names.add(name)
        requests.append(ConnectorRequest(name, substitute(config, variables, path.name)))
    # Sources first, so their topics exist (with their own partitioning) before sinks subscribe.
    return sorted(requests, key=lambda r: r.config["connector.class"].endswith("SinkConnector"))


# -- HTTP (thin) -------------------------------------------------------------------------------


def _call(method: str, url: str, body: bytes | None = None, timeout: float = 30.0) -> Any:
    request = urllib.request.Request(  # noqa: S310 (see below)
        url,
        data=body,
        method=method,
        headers={"Content-Type": "application/json", "Accept": "application/json"},
    )
    try:
        # the URL is Connect's REST address from the settings (http), never user input
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            payload = response.read()
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")
        raise RegisterError(f"{method} {url}: HTTP {exc.code}: {detail}") from exc
    return json.loads(payload) if payload else None


def wait_for_connect(connect_url: str, timeout: float) -> None:
    """Poll `GET /connector-plugins` until the worker answers or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            _call("GET", f"{connect_url}/connector-plugins", timeout=5.0)
            return
        except (OSError, RegisterError) as exc:
            if time.monotonic() > deadline:
                raise RegisterError(f"Connect at {connect_url} not ready: {exc}") from exc
            time.sleep(2.0)


def connector_status(connect_url: str, name: str) -> dict[str, Any] | None:
    """`GET /connectors/<name>/status`, or None while the worker has written no status yet (a
    connector just created: its status reaches the status topic a moment later)."""
    try:
        return _call("GET", f"{connect_url}/connectors/{quote(name, safe='')}/status")
    except RegisterError as exc:
        if "HTTP 404" in str(exc):
            return None
        raise


def states(status: dict[str, Any] | None) -> tuple[str, ...]:
    """(connector state, task states in task order), ("UNKNOWN",) without a status."""
    if not status:
        return ("UNKNOWN",)
    tasks = sorted(status.get("tasks", []), key=lambda t: t["id"])
    return (status["connector"]["state"], *(t["state"] for t in tasks))


def register(connect_url: str, requests: list[ConnectorRequest], wait: float = 30.0) -> None:
    """PUT each config (create or update), then log the connector's and its tasks' state once
    the worker reports one (polled for up to `wait` seconds)."""
    for req in requests:
        _call("PUT", connect_url + req.path, req.body())
    for req in requests:
        deadline = time.monotonic() + wait
        status = connector_status(connect_url, req.name)
        while (status is None or not status.get("tasks")) and time.monotonic() < deadline:
            time.sleep(0.5)
            status = connector_status(connect_url, req.name)
        found = states(status)
        log.info(
            "connector registered",
            extra={"connector": req.name, "state": found[0], "tasks": list(found[1:])},
        )
        failed = [t for t in (status or {}).get("tasks", []) if t["state"] == "FAILED"]
        if failed:
            trace = (failed[0].get("trace") or "").splitlines()[:1]
            raise RegisterError(f"{req.name}: task {failed[0]['id']} FAILED: {' '.join(trace)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python connect/register.py",
        description="Create or update the Kafka Connect connectors in connect/connectors/.",
    )
    parser.add_argument("--connect-url", help="Connect REST API (default: $CONNECT_URL)")
    parser.add_argument(
        "--wait", type=float, default=0.0, metavar="SECONDS", help="wait for Connect first"
    )
    parser.add_argument("--dry-run", action="store_true", help="print the requests, send none")
    args = parser.parse_args(argv)
    setup_logging()
    settings = RegisterSettings()
    connect_url = (args.connect_url or settings.connect_url).rstrip("/")
    try:
        requests = build_requests(
            settings.connectors_dir, template_variables(RegisterConnections())
        )
        if args.dry_run:
            for req in requests:
                print(f"PUT {req.path}\n{json.dumps(req.config, indent=2, sort_keys=True)}")
            return 0
        if args.wait:
            wait_for_connect(connect_url, args.wait)
        register(connect_url, requests)
    except (RegisterError, OSError) as exc:
        log.error("registration failed: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
