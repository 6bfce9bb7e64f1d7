"""`make demo`: set up the local stack, generate sources, run the whole pipeline, keep serving.

Steps, each a project command run as its own process:

1. start Postgres, Redis and the SFTP server (`ops.stack`), bootstrap the databases; with
   `--stream kafka`, fetch the pinned Kafka and Connect jars once (Maven) and start them;
2. generate the three sources: CDR files into the SFTP directory, CRM transactions in
   `wtc_prod` (after the change capture has taken its snapshot), forex ticks on the
   `tick-data` stream;
3. land them once (CDR loader, tick sink, CRM change capture), which also publishes CDR rows;
4. start the live side in the background: the loaders in follow mode, the HVS consumer, the
   usage API on :18089;
5. `dbt build` the prepared layers with their data tests (unit tests run in `make test`) and
   serve the dbt docs site;
6. write `.wtc/demo.env` with the connection variables and print how to use them.

`make stop` stops everything this started.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from api.auth import hash_password
from common.logs import setup_logging
from common.settings import CDR_DROP, PROJECT_ROOT, StackSettings
from ops.dbt import DBT_BIN, DBT_DIR, PRODUCTION_BUILD_EXCLUDES, connection_env
from ops.progress import landing_display
from ops.stack import Stack, StackError, jvm, port_open, wait_until
from ops.stack.kafka import KafkaStack

log = logging.getLogger("ops.demo")

PY = sys.executable
DEV_API_USER = "wtc"
DEV_API_PASSWORD = "wtc-dev"  # noqa: S105 development default for the local demo only (see README)
DEBEZIUM_SLOT = "wtc_crm_debezium"  # slot.name in connect/connectors/crm-source.json


@dataclass(frozen=True)
class Scale:
    subscribers: int
    hours: int
    crm_transactions: int
    profile: str


SCALES = {
    # A few hours of realistic traffic: the whole demo runs well under two minutes.
    "small": Scale(subscribers=2000, hours=4, crm_transactions=2000, profile="realistic"),
    # The starter's full two days: 864 file pairs, 1.728 M CDR rows, 691 200 ticks.
    "starter": Scale(subscribers=50000, hours=48, crm_transactions=50000, profile="starter"),
}


def demo_env(s: StackSettings, kafka: KafkaStack | None = None) -> dict[str, str]:
    """The variables `.wtc/demo.env` exports for a person at the terminal (documented in the
    README): the warehouse as the read-only analyst, Redis as the API's read-only user, and on
    the Kafka path the brokers and the Connect REST API."""
    stream = (
        {} if kafka is None else {"STREAM_URL": kafka.stream_url, "CONNECT_URL": kafka.connect_url}
    )
    api_user = os.environ.get("API_USER", DEV_API_USER)
    api_password = os.environ.get("API_PASSWORD", DEV_API_PASSWORD)
    return {
        "WTC_ANALYTICS_DSN": s.pg_dsn("wtc_analytics", "analyst"),
        "REDIS_URL": s.redis_url_for("api", 0),
        "CDR_DIR": CDR_DROP,
        **stream,
        "API_URL": f"http://{s.host}:{s.api_port}",
        "API_USER": api_user,
        "API_PASSWORD": api_password,
        "DBT_DOCS_URL": f"http://{s.host}:{s.docs_port}",
    }


# Each process's own Postgres role and Redis user (ops/stack/pg_roles.py, redis_acl.py).
PROCESS_ROLES = {
    # process: (Postgres role, Redis user)
    "cdr_loader": ("loader", "cdr_loader"),
    "tick_sink": ("loader", "tick_sink"),
    "crm_cdc": ("cdc", None),
    "hvs": (None, "hvs"),
    "api": (None, "api"),
    "generators": (None, "sources"),  # dev tooling: writes the CRM source as its owner
    "dbt": ("dbt", None),
}


def process_env(s: StackSettings, process: str, kafka: KafkaStack | None = None) -> dict[str, str]:
    """The connections of one process, each as that process's own role and user only (on the
    Kafka path the stream is the brokers, which take no password here)."""
    pg_role, redis_user = PROCESS_ROLES[process]
    env = {"SFTP_URL": s.sftp_url, "CDR_DIR": CDR_DROP} if process == "cdr_loader" else {}
    if process == "generators":
        env.update(WTC_PROD_DSN=s.prod_dsn, SFTP_URL=s.sftp_url)
    elif pg_role is not None:
        env["WTC_ANALYTICS_DSN"] = s.pg_dsn("wtc_analytics", pg_role)
        env["WTC_PROD_DSN"] = s.pg_dsn("wtc_prod", pg_role)
    if redis_user is not None:
        env["REDIS_URL"] = s.redis_url_for(redis_user, 0)
        env["STREAM_URL"] = s.redis_url_for(redis_user, 1)
    if kafka is not None and "STREAM_URL" in env:
        env["STREAM_URL"] = kafka.stream_url
    if process == "dbt":
        env.update(connection_env(s, role="dbt"))
    return env


def write_env_file(path: Path, env: dict[str, str], what: str = "") -> None:
    """Write `env` as shell exports, readable by its owner only from the first byte on."""
    lines = [f"# Written by `make demo`: `source {path.name}` {what or 'to use the local stack'}."]
    lines += [f"export {key}={shlex.quote(value)}" for key, value in env.items()]
    path.parent.mkdir(mode=0o700, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write("\n".join(lines) + "\n")


def write_process_env_files(stack: Stack, kafka: KafkaStack | None = None) -> Path:
    """`.wtc/env/<process>.env`: each process's own connections (its role, its user)."""
    folder = stack.state / "env"
    for process in PROCESS_ROLES:
        env = process_env(stack.s, process, kafka)
        write_env_file(folder / f"{process}.env", env, f"as {process}")
    return folder


def run(
    step: str,
    argv: list[str],
    env: dict[str, str],
    cwd: Path = PROJECT_ROOT,
    output: Path | None = None,
) -> None:
    log.info("step: %s", step)
    started = time.monotonic()
    # under a progress display, the step's logs go to a file
    out = output.open("ab") if output else None
    result = subprocess.run(argv, cwd=cwd, env={**os.environ, **env}, stdout=out, stderr=out)
    if out:
        out.close()
    if result.returncode != 0:
        raise StackError(f"step failed: {step} (exit {result.returncode}): {' '.join(argv)}")
    log.info("done: %s", step, extra={"seconds": round(time.monotonic() - started, 1)})


def connect_env(s: StackSettings, kafka: KafkaStack) -> dict[str, str]:
    """What registering the connectors needs: the DSNs name the logins the connectors use,
    Debezium's replication role and the sinks' writer role (contracts/roles.sql); the worker
    holds their passwords (ops/stack/kafka.py)."""
    return {
        "WTC_PROD_DSN": s.pg_dsn("wtc_prod", "debezium"),
        "WTC_ANALYTICS_DSN": s.pg_dsn("wtc_analytics", "sink"),
        "CONNECT_URL": kafka.connect_url,
    }


def start_capture(stack: Stack, kafka: KafkaStack | None) -> None:
    """Start the CRM change capture and let it take its snapshot: the embedded reader's first
    run, or Debezium's source and the JDBC sinks registered with Connect."""
    if kafka is None:
        run("start CRM change capture", CRM_CDC_ONCE, process_env(stack.s, "crm_cdc"))
        return
    env = connect_env(stack.s, kafka)
    run(
        "register the Debezium source and JDBC sinks",
        [PY, "connect/register.py", "--wait", "120"],
        env,
    )
    wait_for_slot(env, DEBEZIUM_SLOT)
    wait_for_capture(env, "Debezium's snapshot to land")


def wait_for_slot(env: dict[str, str], slot: str, timeout: float = 120.0) -> None:
    """Debezium creates its replication slot when its task starts: changes made after that are
    captured as changes, not folded into the snapshot."""
    import psycopg

    def exists() -> bool:
        with psycopg.connect(env["WTC_PROD_DSN"]) as prod:
            return bool(
                prod.execute(
                    "select 1 from pg_replication_slots where slot_name = %s", (slot,)
                ).fetchone()
            )

    wait_until(exists, f"the replication slot {slot}", timeout=timeout, interval=0.5)


def wait_for_capture(env: dict[str, str], what: str, timeout: float = 300.0) -> None:
    """Poll until the change log, rebuilt (latest change per key, deletes dropped), holds as many
    rows per table as the CRM source: the JDBC sinks have caught up."""
    import psycopg

    tables = {"accounts": "account_id", "addresses": "account_id", "devices": "device_id"}

    def caught_up() -> bool:
        with (
            psycopg.connect(env["WTC_PROD_DSN"]) as prod,
            psycopg.connect(env["WTC_ANALYTICS_DSN"]) as ana,
        ):
            for table, key in tables.items():
                want = prod.execute(f"select count(*) from crm_system.{table}").fetchone()
                have = ana.execute(
                    f"select count(*) from (select distinct on ({key}) __op "
                    f"from crm_data.{table}_changes order by {key}, __op <> 'r' desc, __lsn desc"
                    ") latest where __op <> 'd'"
                ).fetchone()
                if have != want:  # count(*): one row each
                    return False
        return True

    log.info("waiting for %s", what)
    wait_until(caught_up, what, timeout=timeout, interval=1.0)


def generate(scale: Scale, stack: Stack, kafka: KafkaStack | None = None) -> None:
    s = stack.s
    common = ["--profile", scale.profile, "--seed", "42", "--subscribers", str(scale.subscribers)]
    run(
        "generate CDR files into the SFTP directory",
        [
            PY,
            "-m",
            "ingestion.generators",
            "cdr",
            *common,
            "--hours",
            str(scale.hours),
            "--out",
            str(stack.s.cdr_dir),
        ],
        {},
    )
    # The change capture starts first (slot and snapshot), so the CRM transactions that follow
    # land as real inserts, updates and deletes rather than as one snapshot.
    start_capture(stack, kafka)
    run(
        "generate CRM transactions in wtc_prod",
        [
            PY,
            "-m",
            "ingestion.generators",
            "crm",
            *common,
            "--transactions",
            str(scale.crm_transactions),
        ],
        process_env(s, "generators"),
    )
    run(
        "publish forex ticks to tick-data",
        [
            PY,
            "-m",
            "ingestion.generators",
            "forex",
            "--seed",
            "42",
            "--hours",
            str(scale.hours),
        ],
        process_env(s, "generators", kafka),
    )


CRM_CDC_ONCE = [PY, "-m", "ingestion.crm_cdc", "--once"]


def land_once(stack: Stack, kafka: KafkaStack | None = None) -> None:
    steps = {
        "land CDR files (and publish them)": ("ingestion.cdr_loader", "cdr_loader"),
        "land forex ticks": ("ingestion.tick_sink", "tick_sink"),
    }
    if kafka is None:
        steps["capture CRM changes"] = ("ingestion.crm_cdc", "crm_cdc")
    with landing_display(stack.s) as display:  # rows, rate and ETA of each landing in a terminal
        for step, (module, process) in steps.items():
            output = stack.run_dir / f"{module}.once.log" if display.enabled else None
            env = process_env(stack.s, process, kafka)
            run(step, [PY, "-m", module, "--once"], env, output=output)
    if kafka is not None:
        wait_for_capture(connect_env(stack.s, kafka), "the JDBC sinks to land the CRM changes")


def start_live(stack: Stack, env: dict[str, str], kafka: KafkaStack | None = None) -> None:
    services = {
        "cdr_loader": [PY, "-m", "ingestion.cdr_loader"],
        "tick_sink": [PY, "-m", "ingestion.tick_sink"],
        "crm_cdc": [PY, "-m", "ingestion.crm_cdc"],
        "hvs": [PY, "-m", "hvs"],
        "api": [
            PY,
            "-m",
            "uvicorn",
            "api.app:app",
            "--host",
            stack.s.host,
            "--port",
            str(stack.s.api_port),
            "--no-access-log",
        ],
    }
    if kafka is not None:
        del services["crm_cdc"]  # Debezium and the JDBC sinks capture the CRM on this path
    common = {"WTC_LOG_FORMAT": "json"}
    if "API_USERS" not in os.environ and env["API_PASSWORD"] != DEV_API_PASSWORD:
        # A login of your own: the API accepts exactly the one that demo.env names.
        common["API_USERS"] = f"{env['API_USER']}:{hash_password(env['API_PASSWORD'])}"
    for name, argv in services.items():
        stack.start_process(name, argv, {**common, **process_env(stack.s, name, kafka)})
    wait_until(lambda: port_open(stack.s.host, stack.s.api_port), "the usage API", timeout=60)


def build_warehouse(stack: Stack) -> None:
    env = process_env(stack.s, "dbt")
    try:
        run(
            "dbt build (prepared layers and their data tests)",
            [str(DBT_BIN), "build", *PRODUCTION_BUILD_EXCLUDES],
            env,
            DBT_DIR,
        )
    finally:
        if stack.s.monitoring:  # the run's outcome as metrics, a failed one too
            stack.monitoring.push_dbt("build", env)
    if stack.s.monitoring:
        # stale sources are what this reports, not a failed demo: its exit code is not checked
        subprocess.run(
            [str(DBT_BIN), "source", "freshness"], cwd=DBT_DIR, env={**os.environ, **env}
        )
        stack.monitoring.push_dbt("freshness", env)
    serve_docs(stack)


def serve_docs(stack: Stack) -> None:
    env = process_env(stack.s, "dbt")
    run("dbt docs generate", [str(DBT_BIN), "docs", "generate"], env, cwd=DBT_DIR)
    stack.start_process(
        "dbt_docs",
        [
            PY,
            "-m",
            "http.server",
            str(stack.s.docs_port),
            "--bind",
            stack.s.host,
            "--directory",
            str(DBT_DIR / "target"),
        ],
        env,
    )
    wait_until(lambda: port_open(stack.s.host, stack.s.docs_port), "the dbt docs site")


def wait_for_healthy_api(api_url: str, timeout: float = 60.0) -> None:
    """Poll the API's /health (it answers 200 once Redis does) until it is healthy."""

    def healthy() -> bool:
        try:
            # the demo's own API on loopback, http
            with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    wait_until(healthy, "the usage API to report healthy", timeout=timeout, interval=0.5)


def summary(env: dict[str, str], env_file: Path, env_dir: Path, stack: Stack | None = None) -> str:
    """What the demo started and how to use it. It names the variables that hold passwords and
    the files that hold them; it prints none of them."""
    api = env["API_URL"]
    return "\n".join(
        [
            "",
            f"The demo is up. Connection variables: source {env_file} (owner-only, mode 0600)",
            "",
            f"  usage API   {api}/data_usage?msisdn=...&start_time=YYYYmmddHHMMSS&end_time=...",
            f"              basic auth as {env['API_USER']}, password in $API_PASSWORD "
            f"({env_file})",
            f"              OpenAPI docs at {api}/docs",
            f"  dbt docs    {env['DBT_DOCS_URL']}",
            '  warehouse   psql "$WTC_ANALYTICS_DSN"   (read-only analyst role)',
            f"  processes   each one's own role and user: {env_dir}/<process>.env",
            *monitoring_lines(stack),
            *(
                [
                    f"  stream      {env['STREAM_URL']}",
                    f"  Connect     {env['CONNECT_URL']}/connectors?expand=status",
                ]
                if "CONNECT_URL" in env
                else []
            ),
            "",
            f"  try:  source {env_file}",
            "        msisdn=$(psql -Atc 'select msisdn from prepared_layers.cdr_usage_1h limit 1' "
            '"$WTC_ANALYTICS_DSN")',
            '        curl -s -u "$API_USER:$API_PASSWORD" '
            '"$API_URL/data_usage?msisdn=$msisdn&start_time=20240101000000&end_time=20240103000000"',
            "",
            "`make stop` stops everything.",
        ]
    )


def monitoring_lines(stack: Stack | None) -> list[str]:
    if stack is None or not stack.s.monitoring:
        return []
    m = stack.monitoring
    return [
        f"  Prometheus  {m.prometheus_url}  (Status > Targets: every target up; Alerts)",
        f"  alerts      {m.alertmanager_url}, each one a line in {m.alerts_file}",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ops.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="small")
    parser.add_argument(
        "--stream",
        choices=["redis", "kafka"],
        default="redis",
        help="redis: the embedded default (Redis Streams, the pgoutput reader; no Java); "
        "kafka: 3 Kafka brokers and Kafka Connect (Debezium) as local JVM processes",
    )
    parser.add_argument(
        "--docs-only", action="store_true", help="only (re)generate and serve the dbt docs site"
    )
    args = parser.parse_args(argv)
    setup_logging()
    stack = Stack()
    kafka = KafkaStack(stack.s) if args.stream == "kafka" else None
    env = demo_env(stack.s, kafka)
    try:
        if kafka is not None:
            stack.monitoring.expect_kafka_path(kafka)
        stack.start()
        if kafka is not None:
            jvm.fetch(kafka.cache)  # once: the pinned jars, as `make setup` fetches them
            kafka.start()
            if stack.s.monitoring:
                stack.monitoring.scrape_kafka()
        env_file = stack.state / "demo.env"
        write_env_file(env_file, env)
        env_dir = write_process_env_files(stack, kafka)
        if args.docs_only:
            serve_docs(stack)
            print(f"dbt docs: {env['DBT_DOCS_URL']}")
            return 0
        started = time.monotonic()
        scale = SCALES[args.scale]
        generate(scale, stack, kafka)
        land_once(stack, kafka)
        start_live(stack, env, kafka)
        build_warehouse(stack)
        wait_for_healthy_api(env["API_URL"])
        log.info("demo ready", extra={"seconds": round(time.monotonic() - started, 1)})
    except (StackError, subprocess.CalledProcessError) as exc:
        log.error("%s", exc)
        log.error("see the logs under %s; `make stop` stops what started", stack.run_dir)
        return 1
    print(summary(env, env_file, env_dir, stack))
    return 0


if __name__ == "__main__":
    sys.exit(main())
