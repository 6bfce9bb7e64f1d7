"""Settings, logs and the demo's environment file."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys

import psycopg
import pytest

from common.logs import JsonFormatter, ReadableFormatter, setup_logging
from common.settings import Connections, StackSettings, default_sftp_user
from ops.demo import demo_env, process_env, write_env_file


def test_settings_come_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("WTC_PG_PORT", "6543")
    monkeypatch.setenv("WTC_PG_PASSWORD", "p@ss:w/rd")
    monkeypatch.setenv("WTC_STATE_DIR", str(tmp_path))
    s = StackSettings()
    assert s.pg_port == 6543
    assert s.sftp_user == default_sftp_user(tmp_path)  # one login per state folder
    assert s.cdr_dir == s.sftp_chroot_base / s.sftp_user / "cdr"
    info = psycopg.conninfo.conninfo_to_dict(s.analytics_dsn)
    assert info == {
        "user": "postgres",
        "password": "p@ss:w/rd",
        "host": "127.0.0.1",
        "port": "6543",
        "dbname": "wtc_analytics",
    }
    monkeypatch.setenv("WTC_ANALYTICS_DSN", "postgresql://elsewhere/wtc_analytics")
    monkeypatch.setenv("STREAM_URL", "kafka://127.0.0.1:9092")
    c = Connections()
    assert c.analytics_dsn == "postgresql://elsewhere/wtc_analytics"
    assert c.stream_url == "kafka://127.0.0.1:9092"


def _record(**extra) -> logging.LogRecord:
    record = logging.makeLogRecord({"name": "wtc.test", "levelname": "INFO", "msg": "landed %s"})
    record.args = ("file.csv",)
    record.__dict__.update(extra)
    return record


def test_json_log_lines_carry_the_extra_fields():
    line = JsonFormatter().format(_record(rows=1000))
    entry = json.loads(line)
    assert entry["msg"] == "landed file.csv"
    assert entry["rows"] == 1000
    assert entry["level"] == "info" and entry["logger"] == "wtc.test"
    assert "\n" not in line


def test_logs_go_to_stderr_as_it_is_when_logging(monkeypatch):
    """A handler set up under one stderr (a test's capture, closed later) keeps working."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        first = io.StringIO()
        monkeypatch.setattr(sys, "stderr", first)
        setup_logging(level="INFO", json_lines=True)
        first.close()
        later = io.StringIO()
        monkeypatch.setattr(sys, "stderr", later)
        logging.getLogger("wtc.test").info("after the first stderr closed")
        assert json.loads(later.getvalue())["msg"] == "after the first stderr closed"
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)


def test_readable_log_lines():
    line = ReadableFormatter().format(_record(rows=1000))
    assert line.endswith("wtc.test: landed file.csv  rows=1000")


def test_demo_env_file_exports_every_documented_variable(tmp_path):
    settings = StackSettings(
        state_dir=tmp_path, sftp_password="it's", pg_analyst_password="p'$`x\\"
    )
    env = demo_env(settings)
    documented = {
        "WTC_ANALYTICS_DSN",
        "REDIS_URL",
        "CDR_DIR",
        "API_URL",
        "API_USER",
        "API_PASSWORD",
        "DBT_DOCS_URL",
    }
    assert documented <= set(env)
    path = tmp_path / "demo.env"
    write_env_file(path, env)
    script = f"source {path} && " + " && ".join(f'echo "${k}"' for k in sorted(documented))
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == [env[k] for k in sorted(documented)]
    # each process's own file, quoted the same way (the SFTP password has a quote)
    loader = process_env(settings, "cdr_loader")
    write_env_file(tmp_path / "cdr_loader.env", loader)
    script = f'source {tmp_path / "cdr_loader.env"} && echo "$SFTP_URL"'
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == loader["SFTP_URL"] == settings.sftp_url


def test_demo_env_on_the_kafka_path_names_the_brokers_and_connect(tmp_path):
    from ops.stack.kafka import KafkaSettings, KafkaStack

    s = StackSettings(state_dir=tmp_path)
    kafka = KafkaStack(
        s, KafkaSettings(broker_ports=[1, 2, 3], controller_ports=[4, 5, 6], connect_port=7)
    )
    env = demo_env(s, kafka)
    assert env["STREAM_URL"] == (
        "kafka://127.0.0.1:1,127.0.0.1:2,127.0.0.1:3?group.protocol=consumer"
    )
    assert env["CONNECT_URL"] == "http://127.0.0.1:7"
    # the embedded default: no Connect, and the person's file names no stream (the analyst has
    # no Redis stream user); each process's own file carries its stream, Redis or Kafka
    assert "CONNECT_URL" not in demo_env(s) and "STREAM_URL" not in demo_env(s)
    for process in ("cdr_loader", "tick_sink", "hvs"):
        assert process_env(s, process)["STREAM_URL"] == s.redis_url_for(process, 1)
        assert process_env(s, process, kafka)["STREAM_URL"] == env["STREAM_URL"]
    assert "STREAM_URL" not in process_env(s, "crm_cdc", kafka)


def test_the_kafka_paths_jmx_agents_are_scrape_jobs_and_port_0_leaves_them_out(tmp_path):
    from monitoring.config import local_targets
    from monitoring.settings import MonitoringSettings
    from ops.stack import StackError
    from ops.stack.kafka import KafkaSettings, KafkaStack
    from ops.stack.monitoring import Monitoring

    s = StackSettings(state_dir=tmp_path)
    ports = {"broker_ports": [1, 2, 3], "controller_ports": [4, 5, 6], "connect_port": 7}
    kafka = KafkaStack(s, KafkaSettings(**ports))
    assert kafka.scrape_jobs() == {
        "kafka": ["127.0.0.1:19111", "127.0.0.1:19112", "127.0.0.1:19113"],
        "kafka_connect": ["127.0.0.1:19114"],
    }
    bare = KafkaStack(s, KafkaSettings(**ports, broker_metrics_ports=[], connect_metrics_port=0))
    assert bare.scrape_jobs() == {}
    assert bare._agent(0, "kafka_broker.yml") == []
    with pytest.raises(StackError, match="broker metrics ports"):
        KafkaStack(s, KafkaSettings(**ports, broker_metrics_ports=[8, 9]))
    # what Prometheus is given: the embedded stack's jobs, and the agents once the demo says so
    m = MonitoringSettings()
    jobs = local_targets(m, {"hvs": "127.0.0.1:19104"}, kafka.scrape_jobs()).jobs
    assert jobs["kafka"] == kafka.scrape_jobs()["kafka"] and jobs["hvs"] == ["127.0.0.1:19104"]
    # the demo's own processes: told of the Kafka path before the start, Prometheus never
    # scrapes the embedded change capture (Debezium captures the CRM), nor the agents of a
    # cluster that does not run yet
    demo = Monitoring(s, m)
    assert "crm_cdc" in demo.targets().jobs and "kafka" not in demo.targets().jobs
    with pytest.raises(StackError, match="expect_kafka_path"):
        demo.scrape_kafka()  # which cluster?
    demo.expect_kafka_path(kafka)
    jobs = demo.targets().jobs
    assert "crm_cdc" not in jobs and "hvs" in jobs and "kafka" not in jobs
    # the cluster up (a process in its Connect worker's pid file): its agents are scraped
    kafka.connect.pidfile.parent.mkdir(parents=True, exist_ok=True)
    worker = subprocess.Popen(["sleep", "60"])
    try:
        kafka.connect.pidfile.write_text(f"{worker.pid}\n")
        demo.scrape_kafka()  # no Prometheus runs: renders, reloads nobody
        assert demo.targets().jobs["kafka"] == kafka.scrape_jobs()["kafka"]
    finally:
        worker.kill()
        worker.wait()
    rendered = (demo.config_dir / "prometheus.yml").read_text()
    assert "job_name: kafka_connect" in rendered and "127.0.0.1:19114" in rendered
    assert "job_name: crm_cdc" not in rendered and "job_name: hvs" in rendered


def test_the_default_ports_of_every_part_are_distinct():
    """The embedded stack, the Kafka path, monitoring and the services' metrics all run on one
    machine at once (`make demo STREAM=kafka`): no two default ports may be the same."""
    from api.settings import ApiSettings
    from hvs.settings import HvsSettings
    from ingestion.cdr_loader import LoaderSettings
    from ingestion.crm_cdc import CdcSettings
    from ingestion.tick_sink import TickSinkSettings
    from monitoring.settings import MonitoringSettings
    from ops.stack.kafka import KafkaSettings

    s, k, m = StackSettings(), KafkaSettings(), MonitoringSettings()
    ports = [s.pg_port, s.redis_port, s.sftp_port, s.api_port, s.docs_port]
    ports += [*k.broker_ports, *k.controller_ports, k.connect_port]
    ports += [getattr(m, name) for name in type(m).model_fields if name.endswith("_port")]
    ports += [*k.broker_metrics_ports, k.connect_metrics_port]
    ports += [
        cls().metrics_port for cls in (LoaderSettings, TickSinkSettings, CdcSettings, HvsSettings)
    ]
    ports.append(ApiSettings().metrics_port)
    # `python -m hvs --processes N`: process 0 on HVS_METRICS_PORT, the others a range of their own
    ports += HvsSettings().process_metrics_ports(HVS_PROCESSES_CHECKED)[1:]
    assert len(ports) == len(set(ports)), sorted(p for p in ports if ports.count(p) > 1)


HVS_PROCESSES_CHECKED = 16  # far more consumers than two cores would ever run


def test_hvs_consumer_group_metrics_ports_are_their_own_range():
    """`--processes N` gave process i port 19104 + i, so process 1 took the drop probe's 19105
    and process 2 the API's metrics port 19106."""
    from hvs.settings import HvsSettings

    ports = HvsSettings().process_metrics_ports(4)
    assert ports == [19104, 19140, 19141, 19142]
    moved = HvsSettings(metrics_port=20000, group_metrics_port=21000)
    assert moved.process_metrics_ports(3) == [20000, 21000, 21001]
    assert HvsSettings(metrics_port=0).process_metrics_ports(3) == [0, 0, 0]
    with pytest.raises(ValueError, match="HVS_GROUP_METRICS_PORT"):
        HvsSettings(metrics_port=19141).process_metrics_ports(3)


def test_prometheus_scrapes_each_service_at_its_metrics_port(monkeypatch):
    """The API serves its metrics on a port of its own, not on the HTTP port users call."""
    from monitoring.settings import MonitoringSettings
    from ops.stack.monitoring import service_targets

    monkeypatch.setenv("API_METRICS_PORT", "19999")
    monkeypatch.setenv("HVS_METRICS_PORT", "19998")
    stack = StackSettings()
    targets = service_targets(stack, MonitoringSettings())
    assert targets["api"] == f"{stack.host}:19999"
    assert targets["hvs"] == f"{stack.host}:19998"
    assert all(not t.endswith(f":{stack.api_port}") for t in targets.values())
