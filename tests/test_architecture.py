"""The import rules between the project's packages (docs/architecture.md): the import-linter
contracts in pyproject.toml hold, and the check does see a broken one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from common.settings import PROJECT_ROOT

LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint_imports(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--no-logo", *args],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_import_contracts_are_kept() -> None:
    run = lint_imports()
    assert run.returncode == 0, f"import contracts broken:\n{run.stdout}\n{run.stderr}"
    assert "0 broken" in run.stdout


def test_a_broken_contract_fails_the_check(tmp_path: Path) -> None:
    """A contract the code breaks (the API reads the HVS key layout, hvs.keys) makes the check
    fail and name the import, so the test above cannot pass on an empty import graph."""
    config = tmp_path / "contracts.toml"
    config.write_text(
        """
[tool.importlinter]
root_packages = ["api", "hvs"]
include_external_packages = false

[[tool.importlinter.contracts]]
name = "api does not import hvs"
type = "forbidden"
source_modules = ["api"]
forbidden_modules = ["hvs"]
"""
    )
    run = lint_imports(str(config))
    assert run.returncode != 0, run.stdout
    assert "api does not import hvs BROKEN" in run.stdout
    assert "api.routes -> hvs.keys" in run.stdout
