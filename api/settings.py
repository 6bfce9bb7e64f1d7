"""Settings of the usage API (pydantic-settings, from the environment)."""

from __future__ import annotations

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from common.settings import Connections, production

# Development default only: user `wtc`, password `wtc-dev` (pbkdf2-sha256, see api/auth.py).
DEV_API_USERS = (
    "wtc:pbkdf2_sha256$100000$d3RjLWRldi1zYWx0LTAx$YDqgN1pd0dNkWMZ3w5T+sxVBPDo081JPAYr/olMHMEE="
)


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
    auth_failures_per_minute: int = Field(
        default=10,
        ge=0,
        alias="API_AUTH_FAILURES_PER_MINUTE",
        description="failed logins a client may make in 60 s before it gets 429 (0 = no limit)",
    )
    auth_cache_seconds: float = Field(
        default=300.0,
        ge=0,
        alias="API_AUTH_CACHE_SECONDS",
        description="how long a verified login is remembered (0 = verify every request)",
    )
    auth_threads: int = Field(
        default=2,
        ge=1,
        alias="API_AUTH_THREADS",
        description="password-hash checks run at once, in worker threads (the rest queue)",
    )
    metrics_host: str = Field(
        default="127.0.0.1",
        alias="API_METRICS_HOST",
        description="address of the Prometheus endpoint (its own port, not the API's)",
    )
    metrics_port: int = Field(
        default=19106, ge=0, alias="API_METRICS_PORT", description="0 = no metrics endpoint"
    )

    @model_validator(mode="after")
    def _no_dev_users_in_production(self) -> ApiSettings:
        if production() and self.api_users == DEV_API_USERS:
            raise ValueError(
                "WTC_ENV=production and API_USERS is the development default (user wtc): set it"
            )
        return self
