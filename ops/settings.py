"""Typed settings shared by every process: where the local stack lives and how to reach it.

Every value comes from the environment (or `.wtc/demo.env` written by the demo) with a default
that matches the embedded local stack. The passwords below are development defaults for the local
stack only; set the environment variables for anything else.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent.parent

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
    sftp_port: int = 10022
    sftp_user: str = "cdr_data"
    sftp_password: str = DEV_SFTP_PASSWORD
    api_port: int = 18089
    docs_port: int = 18088

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


_stack = StackSettings()


class Connections(BaseSettings):
    """How a process reaches the warehouse, the CRM, Redis, the stream and the SFTP server.

    The variable names are the ones `.wtc/demo.env` exports.
    """

    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True)

    analytics_dsn: str = Field(default=_stack.analytics_dsn, alias="WTC_ANALYTICS_DSN")
    prod_dsn: str = Field(default=_stack.prod_dsn, alias="WTC_PROD_DSN")
    redis_url: str = Field(default=_stack.redis_url, alias="REDIS_URL")
    stream_url: str = Field(default=_stack.stream_url, alias="STREAM_URL")
    sftp_url: str = Field(default=_stack.sftp_url, alias="SFTP_URL")
    cdr_dir: str = Field(
        default=".",
        alias="CDR_DIR",
        description="directory on the SFTP server holding CDR files, relative to the login's "
        "start directory",
    )
