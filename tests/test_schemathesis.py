"""Schemathesis, with all its checks, against the real usage API (uvicorn) on the stack's
real Redis as the API's ACL user: every phase (examples, coverage, fuzzing), zero failures and
zero warnings (`tests/schemathesis.toml` makes every warning fail the run)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from common.settings import PROJECT_ROOT
from ops.stack import free_port
from tests.fixtures.polling import wait_for

CONFIG = Path(__file__).with_name("schemathesis.toml")


@pytest.fixture
def api_url(stack, redis_client) -> Iterator[str]:
    redis_client.hset(
        "hvs:u:0123456789012:20240101",
        mapping={"data:video:ev": 1, "data:video:by": 10, "data:video:zar": 5},
    )
    port = free_port()
    env = {
        **os.environ,
        "REDIS_URL": stack.settings.redis_url_for("api"),
        "API_METRICS_PORT": "0",
        # the fuzzer sends thousands of wrong logins on purpose: the limiter has its own tests
        "API_AUTH_FAILURES_PER_MINUTE": "0",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "api.app:app", "--host", "127.0.0.1",
         "--port", str(port), "--no-access-log", "--log-level", "error"],
        cwd=PROJECT_ROOT, env=env,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(
            lambda: httpx.get(f"{url}/health").status_code == 200,
            "the API to start",
            20,
            ignore=(httpx.HTTPError,),
        )
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def test_schemathesis_all_checks_no_failures_no_warnings(api_url, tmp_path):
    # the login is the documented development default (`wtc`), as in the other API tests
    run = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "--config-file", str(CONFIG), "run",
         f"{api_url}/openapi.json", "--checks", "all", "--auth", "wtc:wtc-dev",
         "--phases", "examples,coverage,fuzzing", "--max-examples", "50", "--seed", "1",
         "--no-color"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-6000:]
    assert "warning" not in out.lower(), out[-6000:]
    assert "2 selected / 2 total" in out, out[-3000:]
    assert "failed" not in out.lower(), out[-3000:]
