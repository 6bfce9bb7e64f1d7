"""Typed settings shared by every process: where the local stack lives and how to reach it.

Every value comes from the environment (or `.wtc/demo.env` written by the demo) with a default
that matches the embedded local stack. The passwords below are development defaults for the local
stack only; set the environment variables for anything else.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from urllib.parse import quote

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONTRACTS_DIR = PROJECT_ROOT / "contracts"
"""The warehouse contract: the raw-layer DDL (`wtc_analytics.sql`) and the CRM source
(`wtc_prod.sql`), applied by the local stack and by the compose init alike."""

# Development defaults for the local stack only (documented in the README).
DEV_PG_PASSWORD = "postgres"
DEV_SFTP_PASSWORD = "password"


class StackSettings(BaseSettings):
    """The embedded local stack: Postgres, Redis and an SFTP server on loopback."""

    model_config = SettingsConfigDict(env_prefix="WTC_", extra="ignore")

    state_dir: Path = Field(default=PROJECT_ROOT / ".wtc", description="ignored state folder")
    host: str = "127.0.0.1"
    pg_port: int = 15432
    pg_user: str = "postgres"
    pg_password: str = DEV_PG_PASSWORD
    pg_bin_dir: Path = Path("/usr/lib/postgresql/15/bin")
    pg_os_user: str = Field(
        default="postgres", description="unprivileged OS user that runs Postgres when run as root"
    )
    redis_port: int = 16379
    redis_maxmemory_mb: int = Field(
        default=2048,
        ge=16,
        description="Redis `maxmemory` (HVS and stream together), with `noeviction`: when full, "
        "writes fail and are retried as an outage; no key is ever evicted in silence",
    )
    sftp_port: int = 10022
    sftp_user: str = "cdr_data"
    sftp_password: str = DEV_SFTP_PASSWORD
    api_port: int = 18089
    docs_port: int = 18088
    monitoring: bool = Field(
        default=True,
        description="also run Prometheus, Alertmanager and the exporters (docs/monitoring.md)",
    )

    def pg_dsn(self, database: str) -> str:
        return (
            f"postgresql://{quote(self.pg_user)}:{quote(self.pg_password, safe='')}"
            f"@{self.host}:{self.pg_port}/{database}"
        )

    @property
    def analytics_dsn(self) -> str:
        return self.pg_dsn("wtc_analytics")

    @property
    def prod_dsn(self) -> str:
        return self.pg_dsn("wtc_prod")

    @property
    def redis_url(self) -> str:
        return f"redis://{self.host}:{self.redis_port}/0"

    @property
    def stream_url(self) -> str:
        """The embedded stream backend: Redis Streams in database 1 of the local Redis."""
        return f"redis://{self.host}:{self.redis_port}/1"

    @property
    def sftp_url(self) -> str:
        return (
            f"sftp://{quote(self.sftp_user)}:{quote(self.sftp_password, safe='')}"
            f"@{self.host}:{self.sftp_port}/"
        )

    @property
    def cdr_dir(self) -> Path:
        """The directory the SFTP server serves to the `cdr_data` user."""
        return self.state_dir / "sftp" / "cdr_data"


def local_stack() -> StackSettings:
    """The local stack's addresses, read from the environment now (`WTC_*`): the defaults of
    every connection below."""
    return StackSettings()


class Connections(BaseSettings):
    """How a process reaches the warehouse, the CRM, Redis, the stream and the SFTP server.

    Every process's settings class inherits from this one (or from `ServiceSettings`), so each
    connection variable is defined here and nowhere else. The names are the ones `.wtc/demo.env`
    exports; the defaults are the local stack's.
    """

    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True)

    analytics_dsn: str = Field(
        default_factory=lambda: local_stack().analytics_dsn, alias="WTC_ANALYTICS_DSN"
    )
    prod_dsn: str = Field(default_factory=lambda: local_stack().prod_dsn, alias="WTC_PROD_DSN")
    redis_url: str = Field(default_factory=lambda: local_stack().redis_url, alias="REDIS_URL")
    stream_url: str = Field(default_factory=lambda: local_stack().stream_url, alias="STREAM_URL")
    sftp_url: str = Field(default_factory=lambda: local_stack().sftp_url, alias="SFTP_URL")
    cdr_dir: str = Field(
        default=".",
        alias="CDR_DIR",
        description="directory on the SFTP server holding CDR files, relative to the login's "
        "start directory",
    )


class ServiceSettings(Connections):
    """What every long-running process adds to its connections: where it serves its metrics.
    Subclasses set their own `env_prefix` and their own default `metrics_port`."""

    metrics_host: str = Field(default="127.0.0.1", description="address of the metrics server")
    metrics_port: int = Field(default=0, description="Prometheus metrics port; 0 = off")


class TickRules(BaseSettings):
    """The plausible time window of a forex tick, shared by every reader of ticks (the tick sink
    and the HVS consumer check the same window, so they accept the same ticks)."""

    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True)

    tick_not_before: datetime = Field(
        default=datetime(2000, 1, 1),
        alias="WTC_TICK_NOT_BEFORE",
        description="a tick dated before this (naive UTC) is rejected",
    )
    tick_max_ahead_seconds: float = Field(
        default=86_400.0,
        gt=0,
        alias="WTC_TICK_MAX_AHEAD_SECONDS",
        description="a tick dated more than this ahead of the wall clock (UTC) is rejected",
    )
