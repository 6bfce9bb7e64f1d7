"""Typed settings shared by every process: where the local stack lives and how to reach it.

Every value comes from the environment (or `.wtc/demo.env` written by the demo) with a default
that matches the embedded local stack. The passwords below are development defaults for the local
stack only; set the environment variables for anything else.
"""

from __future__ import annotations

import hashlib
import os
from datetime import datetime
from pathlib import Path
from typing import ClassVar
from urllib.parse import quote, unquote, urlsplit

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONTRACTS_DIR = PROJECT_ROOT / "contracts"
"""The warehouse contract: the raw-layer DDL (`wtc_analytics.sql`) and the CRM source
(`wtc_prod.sql`), applied by the local stack and by the compose init alike."""

# Development defaults for the local stack only (documented in the README).
# Refused when WTC_ENV=production (refuse_dev_secret below).
DEV_PG_PASSWORD = "postgres"  # noqa: S105
DEV_SFTP_PASSWORD = "password"  # noqa: S105
DEV_REDIS_PASSWORDS = {
    role: f"dev-redis-{role}"
    for role in ("admin", "hvs", "api", "cdr_loader", "tick_sink", "sources", "exporter")
}
"""The local stack's Redis users (ops/stack/redis_acl.py says what each may do)."""
DEV_PG_ROLE_PASSWORDS = {
    role: f"dev-pg-{role}"
    for role in ("loader", "cdc", "dbt", "analyst", "debezium", "sink", "exporter", "probe")
}
"""The local stack's Postgres roles (contracts/roles.sql says what each may do)."""


def production() -> bool:
    """`WTC_ENV=production`: no development default password is accepted anywhere."""
    return os.environ.get("WTC_ENV", "development").strip().lower() == "production"


def dev_passwords() -> set[str]:
    return {
        DEV_PG_PASSWORD,
        DEV_SFTP_PASSWORD,
        *DEV_REDIS_PASSWORDS.values(),
        *DEV_PG_ROLE_PASSWORDS.values(),
    }


class DefaultSecretError(ValueError):
    """A development default password in production; the message names the variable."""


def refuse_dev_secret(variable: str, value: str, *, url: bool = False) -> None:
    """Raise (in production only) if `value`, or the password of the URL `value`, is a
    development default or missing."""
    if not production():
        return
    secret = unquote(urlsplit(value).password or "") if url else value
    if url and urlsplit(value).scheme == "sftp" and not secret:
        return  # a key login (SFTP_KEY_FILE) carries no password
    if url and urlsplit(value).scheme == "kafka":
        return  # the brokers take no login here (docs/security.md: TLS and SASL at the edge)
    if not secret or secret in dev_passwords():
        raise DefaultSecretError(
            f"WTC_ENV=production and {variable} has no password of its own "
            "(unset or a development default): set it"
        )


SFTP_CHROOT_BASE = Path("/var/lib/wtc-analytics")
"""Where the SFTP chroots live: OpenSSH wants every component of a chroot's path owned by root
and writable by no one else, which no folder under /tmp (nor a project checkout) is."""
CDR_DROP = "/cdr"
"""The CDR drop folder as the SFTP login sees it (inside its chroot); the login starts there."""


def default_sftp_user(state_dir: Path) -> str:
    """The SFTP login of the stack in `state_dir`: one per state folder, so that two stacks on
    one machine never share an OS user (a short hash of the folder's path)."""
    digest = hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:10]
    return f"wtcsftp_{digest}"


class StackSettings(BaseSettings):
    """The embedded local stack: Postgres, Redis and an SFTP server on loopback."""

    model_config = SettingsConfigDict(env_prefix="WTC_", extra="ignore")

    state_dir: Path = Field(default=PROJECT_ROOT / ".wtc", description="ignored state folder")
    host: str = "127.0.0.1"
    pg_port: int = 15432
    pg_user: str = "postgres"
    pg_password: str = DEV_PG_PASSWORD
    pg_loader_password: str = DEV_PG_ROLE_PASSWORDS["loader"]
    pg_cdc_password: str = DEV_PG_ROLE_PASSWORDS["cdc"]
    pg_dbt_password: str = DEV_PG_ROLE_PASSWORDS["dbt"]
    pg_analyst_password: str = DEV_PG_ROLE_PASSWORDS["analyst"]
    pg_debezium_password: str = DEV_PG_ROLE_PASSWORDS["debezium"]
    pg_sink_password: str = DEV_PG_ROLE_PASSWORDS["sink"]
    pg_exporter_password: str = DEV_PG_ROLE_PASSWORDS["exporter"]
    pg_probe_password: str = DEV_PG_ROLE_PASSWORDS["probe"]
    pg_bin_dir: Path = Path("/usr/lib/postgresql/15/bin")
    pg_os_user: str = Field(
        default="postgres", description="unprivileged OS user that runs Postgres when run as root"
    )
    redis_port: int = 16379
    redis_os_user: str = Field(
        default="wtcredis", description="unprivileged OS user that runs Redis when run as root"
    )
    redis_admin_password: str = DEV_REDIS_PASSWORDS["admin"]
    redis_hvs_password: str = DEV_REDIS_PASSWORDS["hvs"]
    redis_api_password: str = DEV_REDIS_PASSWORDS["api"]
    redis_cdr_loader_password: str = DEV_REDIS_PASSWORDS["cdr_loader"]
    redis_tick_sink_password: str = DEV_REDIS_PASSWORDS["tick_sink"]
    redis_sources_password: str = DEV_REDIS_PASSWORDS["sources"]
    redis_exporter_password: str = DEV_REDIS_PASSWORDS["exporter"]
    redis_maxmemory_mb: int = Field(
        default=2048,
        ge=16,
        description="Redis `maxmemory` (HVS and stream together), with `noeviction`: when full, "
        "writes fail and are retried as an outage; no key is ever evicted in silence",
    )
    sftp_port: int = 10022
    sftp_user: str = Field(
        default="",
        description="the SFTP login, an OS user of its own; default derived from the state folder",
    )
    sftp_password: str = DEV_SFTP_PASSWORD
    sftp_authorized_keys: str = Field(
        default="", description="OpenSSH public keys (one per line) that may log in as sftp_user"
    )
    sftp_chroot_base: Path = Field(
        default=SFTP_CHROOT_BASE, description="root-owned folder holding the SFTP chroots"
    )
    api_port: int = 18089
    docs_port: int = 18088
    monitoring: bool = Field(
        default=True,
        description="also run Prometheus, Alertmanager and the exporters (docs/monitoring.md)",
    )

    @model_validator(mode="after")
    def _derive_sftp_user(self) -> StackSettings:
        if not self.sftp_user:
            self.sftp_user = default_sftp_user(self.state_dir)
        for name in type(self).model_fields:
            if name.endswith("_password"):
                refuse_dev_secret(f"WTC_{name.upper()}", getattr(self, name))
        return self

    def pg_dsn(self, database: str, role: str | None = None) -> str:
        """`database` as the superuser, or as the job's role `role` (`loader`, `cdc`, `dbt`,
        `analyst`, `debezium`, `sink`, `exporter`, `probe`: the login `wtc_<role>`)."""
        user = self.pg_user if role is None else f"wtc_{role}"
        password = self.pg_password if role is None else getattr(self, f"pg_{role}_password")
        return (
            f"postgresql://{quote(user)}:{quote(password, safe='')}"
            f"@{self.host}:{self.pg_port}/{database}"
        )

    @property
    def analytics_dsn(self) -> str:
        return self.pg_dsn("wtc_analytics")

    @property
    def prod_dsn(self) -> str:
        return self.pg_dsn("wtc_prod")

    def redis_password(self, role: str) -> str:
        return str(getattr(self, f"redis_{role}_password"))

    def redis_url_for(self, role: str, db: int = 0) -> str:
        """Redis database `db` as the ACL user `role` (db 0 the HVS, db 1 the stream)."""
        password = quote(self.redis_password(role), safe="")
        return f"redis://{role}:{password}@{self.host}:{self.redis_port}/{db}"

    @property
    def redis_url(self) -> str:
        """The HVS database as the stack's admin user (bootstrap, tests)."""
        return self.redis_url_for("admin", 0)

    @property
    def stream_url(self) -> str:
        """The embedded stream backend: Redis Streams in database 1 of the local Redis, as the
        stack's admin user."""
        return self.redis_url_for("admin", 1)

    @property
    def sftp_url(self) -> str:
        return (
            f"sftp://{quote(self.sftp_user)}:{quote(self.sftp_password, safe='')}"
            f"@{self.host}:{self.sftp_port}/"
        )

    @property
    def sftp_root(self) -> Path:
        """The SFTP login's chroot (root-owned): the login sees nothing above it."""
        return self.sftp_chroot_base / self.sftp_user

    @property
    def cdr_dir(self) -> Path:
        """The CDR drop folder on this machine (`CDR_DROP` inside the chroot), writable by the
        SFTP login; the generators write here and the loader reads it over SFTP."""
        return self.sftp_root / CDR_DROP.lstrip("/")


def local_stack() -> StackSettings:
    """The local stack's addresses, read from the environment now (`WTC_*`): the defaults of
    every connection below."""
    return StackSettings()


def _local(attribute: str) -> str:
    """A connection of the local stack, the default of a process's connection; none in
    production (where every connection is set, and checked, in the environment)."""
    return "" if production() else getattr(local_stack(), attribute)


class Connections(BaseSettings):
    """How a process reaches the warehouse, the CRM, Redis, the stream and the SFTP server.

    Every process's settings class inherits from this one (or from `ServiceSettings`), so each
    connection variable is defined here and nowhere else. The names are the ones `.wtc/demo.env`
    exports; the defaults are the local stack's.
    """

    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True)

    SECRET_FIELDS: ClassVar[tuple[str, ...]] = (
        "analytics_dsn",
        "prod_dsn",
        "redis_url",
        "stream_url",
        "sftp_url",
    )
    """The connections this process uses: in production each must carry a password of its own
    (a subclass that uses fewer names only those)."""
    REDIS_ROLE: ClassVar[str] = "admin"
    """The local stack's Redis user whose URLs are this process's defaults (a subclass names
    its own; see ops/stack/redis_acl.py)."""

    analytics_dsn: str = Field(
        default_factory=lambda: _local("analytics_dsn"), alias="WTC_ANALYTICS_DSN"
    )
    prod_dsn: str = Field(default_factory=lambda: _local("prod_dsn"), alias="WTC_PROD_DSN")
    redis_url: str = Field(
        default="", alias="REDIS_URL", description="the HVS (db 0); default: the local stack's"
    )
    stream_url: str = Field(
        default="", alias="STREAM_URL", description="the stream; default: the local stack's db 1"
    )
    sftp_url: str = Field(default_factory=lambda: _local("sftp_url"), alias="SFTP_URL")
    sftp_key_file: Path | None = Field(
        default=None,
        alias="SFTP_KEY_FILE",
        description="private key to log in to the SFTP server with (instead of the URL's password)",
    )
    cdr_dir: str = Field(
        default=".",
        alias="CDR_DIR",
        description="directory on the SFTP server holding CDR files: absolute inside the login's "
        "chroot, or relative to its start directory (the local stack's drop folder, `/cdr`)",
    )

    @model_validator(mode="after")
    def _local_redis_defaults(self) -> Connections:
        if production():
            for name in self.SECRET_FIELDS:
                alias = type(self).model_fields[name].alias or name.upper()
                refuse_dev_secret(alias, getattr(self, name) or "", url=True)
            return self
        stack = None
        if not self.redis_url:
            stack = local_stack()
            self.redis_url = stack.redis_url_for(self.REDIS_ROLE, 0)
        if not self.stream_url:
            stack = stack or local_stack()
            self.stream_url = stack.redis_url_for(self.REDIS_ROLE, 1)
        return self


def redacted(url: str) -> str:
    """`url` with its password replaced by `***`, for logs and messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return parts._replace(netloc=user + netloc).geturl()


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
