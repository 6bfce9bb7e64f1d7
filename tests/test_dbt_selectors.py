"""The named selections of dbt/selectors.yml and the production build's exclusions (ops/dbt.py),
checked with `dbt ls` (it parses the project; no database is contacted)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from ops.dbt import DBT_BIN, DBT_DIR, PRODUCTION_BUILD_EXCLUDES


@pytest.fixture(scope="module")
def ls(tmp_path_factory: pytest.TempPathFactory):
    work = tmp_path_factory.mktemp("dbt-ls")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WTC_", "DBT_"))}
    env.update(
        {
            "DBT_PROFILES_DIR": str(DBT_DIR),
            "DBT_TARGET_PATH": str(Path(work) / "target"),
            "DBT_LOG_PATH": str(Path(work) / "logs"),
            "WTC_DBT_TARGET": "lint",
        }
    )

    def run(*args: str, types: tuple[str, ...] = ("model", "test", "unit_test")) -> set[str]:
        done = subprocess.run(
            [str(DBT_BIN), "ls", "-q", "--resource-type", *types, *args],
            cwd=DBT_DIR,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
        )
        return set(done.stdout.split())

    return run


def test_before_cdr_and_cdr_split_the_project_in_two(ls) -> None:
    """Every model and test is in exactly one of the two parts of bench.pipeline's first build,
    and `cdr` holds everything that reads the CDR landing (crm_balance_hourly among them)."""
    everything = ls()
    before, cdr = ls("--selector", "before_cdr"), ls("--selector", "cdr")
    assert before | cdr == everything
    assert not before & cdr
    assert "wtc_analytics.marts.crm.crm_balance_hourly" in cdr
    assert "wtc_analytics.marts.forex.fx_rates_hourly" in before
    assert all(".cdr." not in node and "tower" not in node for node in before), before


def test_the_production_build_leaves_out_the_unit_tests_alone(ls) -> None:
    """The demo's and the benchmarks' builds run every model and data test, and no unit test (the
    unit tests run in make test)."""
    everything, production = ls(), ls(*PRODUCTION_BUILD_EXCLUDES)
    unit_tests = ls(types=("unit_test",))
    assert len(unit_tests) >= 20
    assert everything - production == unit_tests
    assert production == ls(types=("model", "test"))
