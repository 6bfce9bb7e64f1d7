"""Settings of the HVS consumer and the usage API (pydantic-settings, from the environment).

Connection URLs reuse the stack's variables (`REDIS_URL`, `STREAM_URL`); everything else has
the prefix `HVS_` (consumer and store) or is named below (`API_USERS`).
"""

from __future__ import annotations

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from common.settings import Connections, ServiceSettings, production

# Development default only: user `wtc`, password `wtc-dev` (pbkdf2-sha256, see api/auth.py).
DEV_API_USERS = (
    "wtc:pbkdf2_sha256$100000$d3RjLWRldi1zYWx0LTAx$YDqgN1pd0dNkWMZ3w5T+sxVBPDo081JPAYr/olMHMEE="
)


class HvsSettings(ServiceSettings):
    """The high velocity store (Redis db 0) and its consumer: `REDIS_URL`, `STREAM_URL`, the rest
    `HVS_*`."""

    model_config = SettingsConfigDict(env_prefix="HVS_", extra="ignore", populate_by_name=True)

    retention_days: int = Field(
        default=35, ge=1, description="keys expire this long after their last write"
    )
    group: str = "hvs"
    consumer_name: str | None = Field(
        default=None, description="stable name: a restart re-reads its own uncommitted entries"
    )
    data_topic: str = "cdr-data"
    voice_topic: str = "cdr-voice"
    tick_topic: str = "tick-data"
    batch_size: int = Field(default=5000, ge=1, le=100_000)
    poll_timeout: float = Field(default=0.5, gt=0)
    refresh_seconds: float = Field(
        default=0.5, ge=0, description="reload rates shared by the group's consumers this often"
    )
    metrics_port: int = Field(default=19104, description="0 disables the metrics server")

    @property
    def retention_seconds(self) -> int:
        return self.retention_days * 86_400


class ApiSettings(Connections):
    """The usage API: `REDIS_URL`, and the variables named below."""

    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True)

    REDIS_ROLE = "api"
    SECRET_FIELDS = ("redis_url",)

    retention_days: int = Field(default=35, ge=1, alias="HVS_RETENTION_DAYS")
    api_users: str = Field(
        default=DEV_API_USERS,
        alias="API_USERS",
        description="comma-separated `user:pbkdf2_sha256$iterations$salt$hash` entries",
    )
    realm: str = Field(default="wtc-usage", alias="API_REALM")
    redis_max_connections: int = Field(default=64, alias="API_REDIS_MAX_CONNECTIONS")

    @model_validator(mode="after")
    def _no_dev_users_in_production(self) -> ApiSettings:
        if production() and self.api_users == DEV_API_USERS:
            raise ValueError(
                "WTC_ENV=production and API_USERS is the development default (user wtc): set it"
            )
        return self
