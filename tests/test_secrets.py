"""Secrets: with WTC_ENV=production no development default password is accepted (the process
refuses to start and names the variable); the demo's env files are owner-only and the demo
prints no password."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest
from pydantic import ValidationError

from api.settings import ApiSettings
from common.settings import (
    DEV_PG_PASSWORD,
    DEV_REDIS_PASSWORDS,
    PROJECT_ROOT,
    Connections,
    StackSettings,
)
from ingestion.cdr_loader import LoaderSettings
from ops.demo import demo_env, process_env, summary, write_env_file

STRONG = "s3cret-not-a-default"


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any connection or password variable, plus `extra`."""
    names = ("WTC_", "REDIS_URL", "STREAM_URL", "SFTP_", "API_", "CDR_", "HVS_", "TICK_SINK_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(names)}
    return {**env, **extra}


def test_a_process_refuses_to_start_on_a_default_password_and_names_the_variable() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ingestion.cdr_loader", "--once"],
        cwd=PROJECT_ROOT,
        env=clean_env(WTC_ENV="production"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "WTC_ANALYTICS_DSN" in result.stderr
    assert DEV_PG_PASSWORD not in result.stderr.replace("postgres://", "").replace("postgresql", "")


def test_production_names_each_variable_that_keeps_a_default(monkeypatch) -> None:
    for name in list(os.environ):
        if name.startswith(("WTC_", "REDIS_URL", "STREAM_URL", "SFTP_URL", "API_USERS")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("WTC_ENV", "production")
    with pytest.raises(ValidationError, match="WTC_PG_PASSWORD"):
        StackSettings()
    dev_redis = f"redis://api:{DEV_REDIS_PASSWORDS['api']}@redis:6379/0"
    with pytest.raises(ValidationError, match="REDIS_URL"):
        ApiSettings(REDIS_URL=dev_redis, API_USERS="u:x")
    with pytest.raises(ValidationError, match="API_USERS"):
        ApiSettings(REDIS_URL=f"redis://api:{STRONG}@redis:6379/0")
    with pytest.raises(ValidationError, match="SFTP_URL"):
        LoaderSettings(
            WTC_ANALYTICS_DSN=f"postgresql://wtc_loader:{STRONG}@db/wtc_analytics",
            STREAM_URL=f"redis://cdr_loader:{STRONG}@redis:6379/1",
        )
    loader = LoaderSettings(
        WTC_ANALYTICS_DSN=f"postgresql://wtc_loader:{STRONG}@db/wtc_analytics",
        STREAM_URL=f"redis://cdr_loader:{STRONG}@redis:6379/1",
        SFTP_URL=f"sftp://cdr:{STRONG}@sftp:22/",
    )
    assert loader.sftp_url.endswith("@sftp:22/")
    monkeypatch.setenv("WTC_ENV", "development")
    assert "dev-redis-admin" in Connections().redis_url  # the local stack's defaults, in dev


def test_the_demo_env_files_are_owner_only_and_the_summary_prints_no_password(tmp_path) -> None:
    settings = StackSettings(state_dir=tmp_path)
    env = demo_env(settings)
    path = tmp_path / "demo.env"
    path.write_text("stale\n")
    path.chmod(0o644)
    write_env_file(path, env)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert f"API_PASSWORD={env['API_PASSWORD']}" in path.read_text()
    text = summary(env, path, tmp_path / "env")
    secrets = [env["API_PASSWORD"], settings.pg_analyst_password, settings.redis_api_password]
    for secret in secrets:
        assert secret not in text
    assert str(path) in text and "$API_PASSWORD" in text


def test_each_process_gets_only_its_own_role_and_user() -> None:
    s = StackSettings()
    loader = process_env(s, "cdr_loader")
    assert loader["WTC_ANALYTICS_DSN"].startswith("postgresql://wtc_loader:")
    assert loader["STREAM_URL"].startswith("redis://cdr_loader:")
    assert process_env(s, "api") == {
        "REDIS_URL": s.redis_url_for("api", 0),
        "STREAM_URL": s.redis_url_for("api", 1),
    }
    assert process_env(s, "crm_cdc")["WTC_PROD_DSN"].startswith("postgresql://wtc_cdc:")
    assert process_env(s, "dbt")["WTC_PG_USER"] == "wtc_dbt"
    everything = " ".join(
        v
        for p in ("cdr_loader", "tick_sink", "crm_cdc", "hvs", "api", "dbt")
        for v in process_env(s, p).values()
    )
    assert s.pg_password not in everything.replace("postgresql", "")  # no superuser
    assert s.redis_admin_password not in everything
