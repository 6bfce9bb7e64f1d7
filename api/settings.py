"""Settings of the usage API (pydantic-settings, from the environment)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from common.settings import Connections

# Development default only: user `wtc`, password `wtc-dev` (pbkdf2-sha256, see api/auth.py).
DEV_API_USERS = (
    "wtc:pbkdf2_sha256$100000$d3RjLWRldi1zYWx0LTAx$YDqgN1pd0dNkWMZ3w5T+sxVBPDo081JPAYr/olMHMEE="
)


class ApiSettings(Connections):
    """The usage API: `REDIS_URL`, and the variables named below."""

    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True)

    retention_days: int = Field(default=35, ge=1, alias="HVS_RETENTION_DAYS")
    api_users: str = Field(
        default=DEV_API_USERS,
        alias="API_USERS",
        description="comma-separated `user:pbkdf2_sha256$iterations$salt$hash` entries",
    )
    realm: str = Field(default="wtc-usage", alias="API_REALM")
    redis_max_connections: int = Field(default=64, alias="API_REDIS_MAX_CONNECTIONS")
