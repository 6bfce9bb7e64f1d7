"""How a process runs the project's dbt: where it lives and the environment that points it at
a stack's Postgres (`dbt/profiles.yml` reads the `WTC_PG_*` variables)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from common.settings import PROJECT_ROOT, StackSettings

DBT_DIR = PROJECT_ROOT / "dbt"
DBT_BIN = Path(sys.executable).parent / "dbt"

# What a production build leaves out: dbt's unit tests check the SQL of the models against fixed
# inputs, so they belong to development and CI (`make test` runs them: tests/test_dbt_*.py build
# with every unit test), not to every build of the data (dbt's docs recommend the same). The
# demo's and the benchmarks' builds add these arguments to `dbt build`.
PRODUCTION_BUILD_EXCLUDES = ("--exclude-resource-type", "unit_test")


def connection_env(
    settings: StackSettings, database: str = "wtc_analytics", role: str | None = None
) -> dict[str, str]:
    """The variables of `dbt/profiles.yml` for `settings`' Postgres, as the superuser or as the
    job role `role` (the demo runs dbt as `dbt`, ops/stack/pg_roles.py)."""
    return {
        "DBT_PROFILES_DIR": str(DBT_DIR),
        "WTC_PG_HOST": settings.host,
        "WTC_PG_PORT": str(settings.pg_port),
        "WTC_PG_USER": settings.pg_user if role is None else f"wtc_{role}",
        "WTC_PG_PASSWORD": settings.pg_password
        if role is None
        else getattr(settings, f"pg_{role}_password"),
        "WTC_PG_DBNAME": database,
    }


def dbt_env(
    settings: StackSettings, work_dir: Path, database: str = "wtc_analytics"
) -> dict[str, str]:
    """A whole environment for a dbt subprocess: this process's environment without its own
    `WTC_*`/`DBT_*` settings, the connection to `settings`' Postgres, and target and log
    folders of its own under `work_dir` (so runs never share `dbt/target`)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WTC_", "DBT_"))}
    env.update(connection_env(settings, database))
    env.update(
        {
            "DBT_TARGET_PATH": str(work_dir / "target"),
            "DBT_LOG_PATH": str(work_dir / "logs"),
            "DBT_SEND_ANONYMOUS_USAGE_STATS": "false",
            "DBT_USE_COLORS": "false",
            "DBT_PRINTER_WIDTH": "120",
        }
    )
    return env
