"""The monitoring settings: where Prometheus, Alertmanager and the exporters listen, how often
Prometheus scrapes and evaluates, and every alert's threshold and `for:` duration.

The alert rules (`monitoring/prometheus/rules.yml`) are a template: each threshold and duration
below fills one `@{name}` placeholder in it, so a test or an operator shortens a rule's `for:`
through the environment (`WTC_MON_<NAME>`) and never through a second copy of the rule.
"""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DURATION = r"^[0-9]+(ms|s|m|h|d|w|y)$"


class MonitoringSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="WTC_MON_", extra="ignore")

    host: str = "127.0.0.1"
    prometheus_port: int = 19090
    alertmanager_port: int = 19097  # 19092-19094 are the Kafka path's brokers
    pushgateway_port: int = 19091
    postgres_exporter_port: int = 19187
    redis_exporter_port: int = 19121
    receiver_port: int = 19095
    drop_probe_port: int = 19105
    pushgateway_url: str = Field(
        default="",
        description="where dbt's metrics are pushed; empty: http://host:pushgateway_port",
    )

    scrape_interval: str = Field(default="15s", pattern=DURATION)
    evaluation_interval: str = Field(default="15s", pattern=DURATION)
    retention: str = Field(default="15d", pattern=DURATION, description="TSDB retention")
    # Alertmanager's grouping (`route:`): how long it waits before the first and later messages.
    group_wait: str = Field(default="30s", pattern=DURATION)
    group_interval: str = Field(default="5m", pattern=DURATION)
    repeat_interval: str = Field(default="4h", pattern=DURATION)

    def address(self, port: int) -> str:
        """`host:port` of one of the monitoring services (as Prometheus' targets name them)."""
        return f"{self.host}:{port}"

    def url(self, port: int, path: str = "") -> str:
        """`http://host:port/path` of one of the monitoring services."""
        return f"http://{self.address(port)}{path}"

    @property
    def prometheus_url(self) -> str:
        return self.url(self.prometheus_port)

    @property
    def alertmanager_url(self) -> str:
        return self.url(self.alertmanager_port)

    @property
    def pushgateway(self) -> str:
        return self.pushgateway_url or self.url(self.pushgateway_port)

    # -- alert thresholds and durations (docs/monitoring.md explains each alert) -------------------
    down_for: str = Field(default="2m", pattern=DURATION)
    loader_stall_seconds: float = Field(
        default=600, gt=0, description="a file waited this long and nothing landed meanwhile"
    )
    loader_stall_for: str = Field(default="5m", pattern=DURATION)
    rejected_ratio: float = Field(
        default=0.01, gt=0, description="rejected share of the rows or messages handled"
    )
    rejected_for: str = Field(default="10m", pattern=DURATION)
    usage_latency_seconds: float = Field(
        default=60, gt=0, description="the brief's promise: a CDR file's usage in the API"
    )
    usage_latency_for: str = Field(default="5m", pattern=DURATION)
    consumer_lag_messages: int = Field(
        default=100_000, gt=0, description="stream entries a consumer may be behind"
    )
    consumer_lag_for: str = Field(default="10m", pattern=DURATION)
    redis_memory_ratio: float = Field(
        default=0.85, gt=0, le=1, description="share of Redis `maxmemory` in use"
    )
    redis_memory_for: str = Field(default="5m", pattern=DURATION)
    marts_stale_seconds: float = Field(
        default=6 * 3600, gt=0, description="age of the last successful dbt build"
    )
    marts_stale_for: str = Field(default="15m", pattern=DURATION)
    dbt_tests_for: str = Field(default="0s", pattern=DURATION)
    source_stale_for: str = Field(default="15m", pattern=DURATION)
    api_error_ratio: float = Field(default=0.05, gt=0, description="share of 5xx answers")
    api_p99_seconds: float = Field(default=0.5, gt=0, description="99th percentile latency")
    api_for: str = Field(default="10m", pattern=DURATION)
    wal_retained_bytes: int = Field(
        default=1024**3, gt=0, description="WAL a replication slot holds back"
    )
    wal_for: str = Field(default="30m", pattern=DURATION)
    connect_failed_for: str = Field(
        default="1m", pattern=DURATION, description="a Connect task or connector FAILED this long"
    )
    kafka_partitions_for: str = Field(default="5m", pattern=DURATION)
