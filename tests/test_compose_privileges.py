"""Least privilege in the scale-out stack, as on the local one (docs/security.md).

- the compose model (validated by the real Compose binary, see tests/test_scaleout.py): every
  service logs in to Postgres and Redis as its own job role or ACL user, holds no other
  service's password, and none logs in as the Postgres superuser or Redis' `default` user;
- the compose Postgres init (docker/postgres/00-wtc-databases.sh) on a real server: it makes
  the roles of contracts/roles.sql with the passwords of the compose file, each logs in, and a
  development default is refused with WTC_ENV=production;
- the compose Redis' ACL file (docker/redis/users-acl.sh): the same file the local stack writes
  from the same definition (contracts/redis_users.acl), and on a real redis-server the
  unauthenticated client gets NOAUTH, the API's user cannot write, unused users cannot log in.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import psycopg
import pytest
import redis

from common.settings import (
    DEV_PG_PASSWORD,
    DEV_PG_ROLE_PASSWORDS,
    DEV_REDIS_PASSWORDS,
    DEV_SFTP_PASSWORD,
    PROJECT_ROOT,
)
from ops.stack import free_port, wait_until
from ops.stack.pg_roles import ROLES as PG_ROLES
from ops.stack.redis_acl import USERS_FILE, acl_file
from tests.test_scaleout import PG_INIT_SCRIPT, compose_binary, compose_model  # noqa: F401

DBT = ("dbt", "dbt-docs")
ACL_SCRIPT = PROJECT_ROOT / "docker" / "redis" / "users-acl.sh"

# Who logs in as whom in compose: service -> Postgres roles, Redis users (the local stack's
# process_env in ops/demo.py gives the same processes the same logins).
POSTGRES_LOGINS = {
    "cdr-loader": {"wtc_loader"},
    "tick-sink": {"wtc_loader"},
    "connect-register": {"wtc_debezium", "wtc_sink"},  # names only: the worker has the secrets
    "dbt": {"wtc_dbt"},
    "dbt-docs": {"wtc_dbt"},
    "postgres-exporter": {"wtc_exporter"},
    "drop-probe": {"wtc_probe"},
}
REDIS_LOGINS = {"hvs": {"hvs"}, "api": {"api"}, "redis-exporter": {"exporter"}}
# Whose password each service holds (by the development defaults, each one distinct).
SECRETS = {
    "postgres": {"pg:superuser", *(f"pg:{r}" for r in PG_ROLES)},  # the server: it makes them
    "redis": {"redis:hvs", "redis:api", "redis:exporter"},  # the server: it hashes them
    "connect": {"pg:debezium", "pg:sink"},  # the worker: its connectors' own
    "cdr-loader": {"pg:loader", "sftp"},
    "tick-sink": {"pg:loader"},
    "hvs": {"redis:hvs"},
    "api": {"redis:api"},
    "dbt": {"pg:dbt"},
    "dbt-docs": {"pg:dbt"},
    "postgres-exporter": {"pg:exporter"},
    "redis-exporter": {"redis:exporter"},
    "drop-probe": {"pg:probe", "sftp"},
    "sftp": {"sftp"},  # the server
    "grafana": {"grafana"},  # its own admin, the only one it has
}
DEV_SECRETS = {
    DEV_PG_PASSWORD: "pg:superuser",
    DEV_SFTP_PASSWORD: "sftp",
    "admin": "grafana",
    **{v: f"pg:{k}" for k, v in DEV_PG_ROLE_PASSWORDS.items()},
    **{v: f"redis:{k}" for k, v in DEV_REDIS_PASSWORDS.items()},
}


def strings(service: dict[str, Any]) -> list[str]:
    env = service.get("environment") or {}
    command = service.get("command") or []
    return [v for v in env.values() if v] + [c for c in command if isinstance(c, str)]


def logins(service: dict[str, Any]) -> tuple[set[str], set[str]]:
    """(Postgres users, Redis users) a service's environment logs in as; a Redis URL without a
    user is Redis' `default` user."""
    env = service.get("environment") or {}
    pg, rd = set(), set()
    for value in strings(service):
        for url in value.split():
            parts = urlsplit(url)
            if parts.scheme in ("postgres", "postgresql"):
                pg.add(unquote(parts.username or ""))
            elif parts.scheme in ("redis", "rediss"):
                rd.add(unquote(parts.username or "") or env.get("REDIS_USER") or "default")
    if "WTC_PG_USER" in env:
        pg.add(env["WTC_PG_USER"])
    return pg, rd


def secrets_held(service: dict[str, Any]) -> set[str]:
    """Whose passwords a service holds: every password in its environment's URLs and
    `*PASSWORD*` variables and its command, named by the development default it is."""
    env = service.get("environment") or {}
    found = set()
    for value in strings(service):
        for url in value.split():
            password = urlsplit(url).password if "://" in url else None
            if password:
                found.add(unquote(password))
    found |= {v for k, v in env.items() if "PASSWORD" in k and v}
    found |= {  # atmoz/sftp takes `user:password:uid:gid:dir`
        c.split(":")[1] for c in service.get("command") or [] if str(c).count(":") == 4
    }
    unknown = found - DEV_SECRETS.keys()
    assert not unknown, f"passwords that are no development default: {unknown}"
    return {DEV_SECRETS[f] for f in found}


def test_each_service_logs_in_as_its_own_role_and_user_only(compose_model):  # noqa: F811
    services = compose_model["services"]
    for name, service in services.items():
        pg, rd = logins(service)
        assert pg == POSTGRES_LOGINS.get(name, set()), (name, pg)
        assert rd == REDIS_LOGINS.get(name, set()), (name, rd)
        assert "postgres" not in pg and "default" not in rd, name


def test_no_service_holds_another_ones_password(compose_model):  # noqa: F811
    services = compose_model["services"]
    assert set(SECRETS) <= set(services)
    for name, service in services.items():
        assert secrets_held(service) == SECRETS.get(name, set()), name
    superuser = [n for n, s in services.items() if "pg:superuser" in secrets_held(s)]
    assert superuser == ["postgres"]


def test_the_defaults_are_development_ones_the_project_refuses_in_production(compose_model):  # noqa: F811
    """Every password default in the compose file is one `WTC_ENV=production` refuses (the
    Python services by common/settings.dev_passwords, the init and Redis by their scripts), and
    every project service that holds a password, and both servers, see WTC_ENV."""
    from common.settings import dev_passwords

    services = compose_model["services"]
    for name, service in services.items():
        held = {k for k, v in DEV_SECRETS.items() if v in secrets_held(service)}
        assert held - {"admin"} <= dev_passwords(), name  # Grafana's own, refused by Grafana
        # dbt reads no WTC_ENV: its role got no default password in production, as the init
        # refused it (tested below)
        python = service.get("image") == "wtc-analytics/python:dev" and name not in DBT
        if held and (python or name in ("postgres", "redis")):
            assert service["environment"]["WTC_ENV"] == "development", name


# -- the compose Postgres init on a real server --------------------------------------------------


def init_script(tmp_path: Path) -> Path:
    sql_link = tmp_path / "sql"
    sql_link.symlink_to(PROJECT_ROOT / "contracts")
    script = PG_INIT_SCRIPT.read_text().replace("/docker-entrypoint-initdb.d/sql", str(sql_link))
    local = tmp_path / "init.sh"
    local.write_text(script)
    return local


def init_env(stack, compose_env: dict[str, str]) -> dict[str, str]:
    s = stack.settings
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith(("WTC_", "PG"))},
        **{k: v for k, v in compose_env.items() if k.startswith("WTC_")},
        "PATH": f"{s.pg_bin_dir}:{os.environ.get('PATH', '')}",
        "POSTGRES_USER": s.pg_user,
        "POSTGRES_PASSWORD": s.pg_password,
        "PGHOST": s.host,
        "PGPORT": str(s.pg_port),
        "PGPASSWORD": s.pg_password,
    }


def test_the_init_makes_every_role_with_the_compose_password(stack, tmp_path, compose_model):  # noqa: F811
    """The compose file's passwords are the local stack's defaults, so the session's stack
    keeps its passwords; each role of contracts/roles.sql logs in with its compose password,
    and the init prints none of them."""
    env = init_env(stack, compose_model["services"]["postgres"]["environment"])
    assert {f"WTC_PG_{r.upper()}_PASSWORD" for r in PG_ROLES} <= set(env)
    result = subprocess.run(
        ["bash", str(init_script(tmp_path))], capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stderr
    for role in PG_ROLES:
        password = env[f"WTC_PG_{role.upper()}_PASSWORD"]
        assert password not in result.stdout + result.stderr
        database = "wtc_prod" if role == "debezium" else "wtc_analytics"
        s = stack.settings
        dsn = f"postgresql://wtc_{role}:{password}@{s.host}:{s.pg_port}/{database}"
        with psycopg.connect(dsn) as conn:
            assert conn.execute("select current_user").fetchone() == (f"wtc_{role}",)
    with psycopg.connect(stack.prod_dsn) as conn:
        tables = conn.execute(
            "select schemaname || '.' || tablename from pg_publication_tables "
            "where pubname = 'wtc_crm_debezium' order by 1"
        ).fetchall()
    assert tables == [("crm_system.accounts",), ("crm_system.addresses",), ("crm_system.devices",)]


@pytest.mark.parametrize(
    ("variable", "value"),
    [("WTC_PG_SINK_PASSWORD", DEV_PG_ROLE_PASSWORDS["sink"]), ("WTC_PG_PROBE_PASSWORD", "")],
)
def test_the_init_refuses_a_default_or_missing_password_in_production(
    stack,
    tmp_path,
    variable,
    value,
):
    env = init_env(stack, {f"WTC_PG_{r.upper()}_PASSWORD": f"real-{r}-pw" for r in PG_ROLES})
    # checked, not used to log in (PGPASSWORD is): the superuser's password is not a default
    env |= {"WTC_ENV": "production", "POSTGRES_PASSWORD": "real-superuser-pw", variable: value}
    result = subprocess.run(
        ["bash", str(init_script(tmp_path))], capture_output=True, text=True, env=env
    )
    assert result.returncode != 0
    assert variable in result.stderr
    with psycopg.connect(stack.analytics_dsn) as conn:  # no role took the would-be passwords
        assert conn.execute(
            "select count(*) from pg_roles where rolname = 'wtc_sink'"
        ).fetchone() == (1,)
    ok = stack.settings.pg_dsn("wtc_analytics", "sink")
    with psycopg.connect(ok) as conn:  # the sink still logs in with its old password
        conn.execute("select 1")


# -- the compose Redis' ACL file -----------------------------------------------------------------


def render_acl(env: dict[str, str], out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(ACL_SCRIPT), str(USERS_FILE), str(out)],
        capture_output=True,
        text=True,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env},
    )


def test_the_compose_acl_file_is_the_local_stacks_from_one_definition(compose_model, tmp_path):  # noqa: F811
    env = {k: v for k, v in compose_model["services"]["redis"]["environment"].items() if v}
    out = tmp_path / "users.acl"
    result = render_acl(env, out)
    assert result.returncode == 0, result.stderr
    passwords = {
        k.removeprefix("WTC_REDIS_").removesuffix("_PASSWORD").lower(): v
        for k, v in env.items()
        if k.startswith("WTC_REDIS_")
    }
    assert out.read_text() == acl_file(passwords)
    assert out.stat().st_mode & 0o777 == 0o600
    lines = [line.split() for line in out.read_text().splitlines()]
    assert lines[0][:4] == ["user", "default", "on", "resetpass"]  # with no password: no login
    on = {words[1] for words in lines[1:] if words[2] == "on"}
    assert on == {"hvs", "api", "exporter"}  # the compose stack's users; the stream ones off
    for secret in passwords.values():
        assert secret not in out.read_text()


def test_the_compose_acl_refuses_a_default_password_in_production(compose_model, tmp_path):  # noqa: F811
    env = {k: v for k, v in compose_model["services"]["redis"]["environment"].items() if v}
    env |= {"WTC_ENV": "production", "WTC_REDIS_HVS_PASSWORD": "real-hvs-pw"}
    result = render_acl(env, tmp_path / "users.acl")
    assert result.returncode != 0
    assert "WTC_REDIS_API_PASSWORD" in result.stderr or "WTC_REDIS_EXPORTER_PASSWORD" in (
        result.stderr
    )
    assert not (tmp_path / "users.acl").exists()


def test_the_compose_redis_lets_each_user_do_its_job_only(compose_model, tmp_path):  # noqa: F811
    """A real redis-server on the compose ACL file, started as the compose service starts it."""
    service = compose_model["services"]["redis"]
    env = {k: v for k, v in service["environment"].items() if v}
    acl = tmp_path / "users.acl"
    assert render_acl(env, acl).returncode == 0
    command = service["command"]
    assert command[:3] == ["redis-server", "--aclfile", "/run/wtc/users.acl"]
    port = free_port()
    with tempfile.TemporaryDirectory() as data:
        server = subprocess.Popen(
            [
                "redis-server",
                "--aclfile",
                str(acl),
                *command[3:],
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--dir",
                data,
                "--save",
                "",
            ],
            stdout=subprocess.DEVNULL,
        )
        try:
            url = f"redis://127.0.0.1:{port}/0"

            def up() -> bool:
                try:
                    redis.Redis.from_url(url, protocol=2).ping()
                except redis.AuthenticationError:
                    return True
                except redis.ConnectionError:
                    return False
                return True

            wait_until(up, "the compose redis to answer", timeout=30, interval=0.1)
            with pytest.raises(redis.AuthenticationError):  # NOAUTH: default is off
                redis.Redis.from_url(url, protocol=2).get("hvs:x")
            hvs = redis.Redis.from_url(url, username="hvs", password=env["WTC_REDIS_HVS_PASSWORD"])
            hvs.hset("hvs:u:27820000001:20240101", "data_bytes", 5)
            with pytest.raises(redis.exceptions.NoPermissionError):
                hvs.set("other", 1)
            api = redis.Redis.from_url(url, username="api", password=env["WTC_REDIS_API_PASSWORD"])
            assert api.hgetall("hvs:u:27820000001:20240101") == {b"data_bytes": b"5"}
            with pytest.raises(redis.exceptions.NoPermissionError):
                api.hset("hvs:u:27820000001:20240101", "data_bytes", 6)
            exporter = redis.Redis.from_url(
                url, username="exporter", password=env["WTC_REDIS_EXPORTER_PASSWORD"]
            )
            assert exporter.info("memory")["maxmemory_policy"] == "noeviction"
            with pytest.raises(redis.exceptions.NoPermissionError):
                exporter.hgetall("hvs:u:27820000001:20240101")
            for user in ("admin", "cdr_loader", "tick_sink", "sources"):  # off in compose
                with pytest.raises(redis.AuthenticationError):
                    redis.Redis.from_url(
                        url, username=user, password=DEV_REDIS_PASSWORDS[user]
                    ).ping()
        finally:
            server.terminate()
            server.wait(30)
