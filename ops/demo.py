"""`make demo`: set up the local stack, generate sources, run the whole pipeline, keep serving.

Steps, each a project command run as its own process:

1. start Postgres, Redis and the SFTP server (`ops.stack`), bootstrap the databases;
2. generate the three sources: CDR files into the SFTP directory, CRM transactions in
   `wtc_prod` (after the change capture has taken its snapshot), forex ticks on the
   `tick-data` stream;
3. land them once (CDR loader, tick sink, CRM change capture), which also publishes CDR rows;
4. start the live side in the background: the loaders in follow mode, the HVS consumer, the
   usage API on :18089;
5. `dbt build` the prepared layers and serve the dbt docs site;
6. write `.wtc/demo.env` with the connection variables and print how to use them.

`--stream kafka` (`make demo STREAM=kafka`) runs the same pipeline on the Kafka path: three
KRaft brokers and a Kafka Connect worker (`ops.stack.kafka`, from the jars `make setup` fetched);
the CDR rows and the ticks travel over Kafka topics, and Debezium's PostgreSQL source with the
JDBC sinks (`connect/register.py`) capture the CRM in place of the embedded reader.

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
from common.settings import PROJECT_ROOT, StackSettings
from ops.dbt import DBT_BIN, DBT_DIR, connection_env
from ops.stack import Stack, StackError, port_open, wait_until
from ops.stack.kafka import KafkaStack

log = logging.getLogger("ops.demo")

PY = sys.executable
DEV_API_USER = "wtc"
DEV_API_PASSWORD = "wtc-dev"  # development default for the local demo only (see README)
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
    """The variables `.wtc/demo.env` exports (documented in the README)."""
    stream = {"STREAM_URL": s.stream_url}
    if kafka is not None:
        stream = {"STREAM_URL": kafka.stream_url, "CONNECT_URL": kafka.connect_url}
    api_user = os.environ.get("API_USER", DEV_API_USER)
    api_password = os.environ.get("API_PASSWORD", DEV_API_PASSWORD)
    return {
        "WTC_ANALYTICS_DSN": s.analytics_dsn,
        "WTC_PROD_DSN": s.prod_dsn,
        "REDIS_URL": s.redis_url,
        **stream,
        "SFTP_URL": s.sftp_url,
        "CDR_DIR": ".",
        "API_URL": f"http://{s.host}:{s.api_port}",
        "API_USER": api_user,
        "API_PASSWORD": api_password,
        "DBT_DOCS_URL": f"http://{s.host}:{s.docs_port}",
        **connection_env(s),
    }


def write_env_file(path: Path, env: dict[str, str]) -> None:
    lines = ["# Written by `make demo`: `source .wtc/demo.env` to use the local stack."]
    lines += [f"export {key}={shlex.quote(value)}" for key, value in env.items()]
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)


def run(step: str, argv: list[str], env: dict[str, str], cwd: Path = PROJECT_ROOT) -> None:
    log.info("step: %s", step)
    started = time.monotonic()
    result = subprocess.run(argv, cwd=cwd, env={**os.environ, **env})
    if result.returncode != 0:
        raise StackError(f"step failed: {step} (exit {result.returncode}): {' '.join(argv)}")
    log.info("done: %s", step, extra={"seconds": round(time.monotonic() - started, 1)})


def start_capture(env: dict[str, str]) -> None:
    """Start the CRM change capture and let it take its snapshot: the embedded reader's first
    run, or Debezium's source and the JDBC sinks registered with Connect."""
    if "CONNECT_URL" not in env:
        run("start CRM change capture", [PY, "-m", "ingestion.crm_cdc", "--once"], env)
        return
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
                (want,) = prod.execute(f"select count(*) from crm_system.{table}").fetchone()
                (have,) = ana.execute(
                    f"select count(*) from (select distinct on ({key}) __op "
                    f"from crm_data.{table}_changes order by {key}, __op <> 'r' desc, __lsn desc"
                    ") latest where __op <> 'd'"
                ).fetchone()
                if have != want:
                    return False
        return True

    log.info("waiting for %s", what)
    wait_until(caught_up, what, timeout=timeout, interval=1.0)


def generate(scale: Scale, stack: Stack, env: dict[str, str]) -> None:
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
        env,
    )
    # The change capture starts first (slot and snapshot), so the CRM transactions that follow
    # land as real inserts, updates and deletes rather than as one snapshot.
    start_capture(env)
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
            "--dsn",
            stack.s.prod_dsn,
        ],
        env,
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
            "--stream-url",
            env["STREAM_URL"],
        ],
        env,
    )


def land_once(env: dict[str, str]) -> None:
    run("land CDR files (and publish them)", [PY, "-m", "ingestion.cdr_loader", "--once"], env)
    run("land forex ticks", [PY, "-m", "ingestion.tick_sink", "--once"], env)
    if "CONNECT_URL" in env:
        wait_for_capture(env, "the JDBC sinks to land the CRM changes")
    else:
        run("capture CRM changes", [PY, "-m", "ingestion.crm_cdc", "--once"], env)


def start_live(stack: Stack, env: dict[str, str]) -> None:
    services = {
        "cdr_loader": [PY, "-m", "ingestion.cdr_loader"],
        "tick_sink": [PY, "-m", "ingestion.tick_sink"],
        "crm_cdc": [PY, "-m", "ingestion.crm_cdc"],
        "hvs": [PY, "-m", "api.hvs"],
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
    if "CONNECT_URL" in env:
        del services["crm_cdc"]  # Debezium and the JDBC sinks capture the CRM on this path
    service_env = {**env, "WTC_LOG_FORMAT": "json"}
    if "API_USERS" not in os.environ and env["API_PASSWORD"] != DEV_API_PASSWORD:
        # A login of your own: the API accepts exactly the one that demo.env names.
        service_env["API_USERS"] = f"{env['API_USER']}:{hash_password(env['API_PASSWORD'])}"
    for name, argv in services.items():
        stack.start_process(name, argv, service_env)
    wait_until(lambda: port_open(stack.s.host, stack.s.api_port), "the usage API", timeout=60)


def build_warehouse(stack: Stack, env: dict[str, str]) -> None:
    run("dbt build (prepared layers and their tests)", [str(DBT_BIN), "build"], env, cwd=DBT_DIR)
    serve_docs(stack, env)


def serve_docs(stack: Stack, env: dict[str, str]) -> None:
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
            with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    wait_until(healthy, "the usage API to report healthy", timeout=timeout, interval=0.5)


def summary(env: dict[str, str], env_file: Path) -> str:
    user, password = env["API_USER"], env["API_PASSWORD"]
    api = env["API_URL"]
    return "\n".join(
        [
            "",
            f"The demo is up. Connection variables: source {env_file}",
            "",
            f"  usage API   {api}/data_usage?msisdn=...&start_time=YYYYmmddHHMMSS&end_time=...",
            f"              basic auth {user} / {password} (development default)",
            f"              OpenAPI docs at {api}/docs",
            f"  dbt docs    {env['DBT_DOCS_URL']}",
            f'  warehouse   psql "{env["WTC_ANALYTICS_DSN"]}"',
            f'  CRM source  psql "{env["WTC_PROD_DSN"]}"',
            f"  SFTP        {env['SFTP_URL']}",
            f"  stream      {env['STREAM_URL']}",
            *(
                [f"  Connect     {env['CONNECT_URL']}/connectors?expand=status"]
                if "CONNECT_URL" in env
                else []
            ),
            "",
            f"  try:  source {env_file}",
            "        msisdn=$(psql -Atc 'select msisdn from cdr_data.data_records limit 1' "
            '"$WTC_ANALYTICS_DSN")',
            f"        curl -s -u {shlex.quote(f'{user}:{password}')} "
            '"$API_URL/data_usage?msisdn=$msisdn&start_time=20240101000000&end_time=20240103000000"',
            "",
            "`make stop` stops everything.",
        ]
    )


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
        stack.start()
        if kafka is not None:
            kafka.start()
        env_file = stack.state / "demo.env"
        write_env_file(env_file, env)
        if args.docs_only:
            serve_docs(stack, env)
            print(f"dbt docs: {env['DBT_DOCS_URL']}")
            return 0
        started = time.monotonic()
        scale = SCALES[args.scale]
        generate(scale, stack, env)
        land_once(env)
        start_live(stack, env)
        build_warehouse(stack, env)
        wait_for_healthy_api(env["API_URL"])
        log.info("demo ready", extra={"seconds": round(time.monotonic() - started, 1)})
    except (StackError, subprocess.CalledProcessError) as exc:
        log.error("%s", exc)
        log.error("see the logs under %s; `make stop` stops what started", stack.run_dir)
        return 1
    print(summary(env, env_file))
    return 0


if __name__ == "__main__":
    sys.exit(main())
