"""The monitoring configuration: rendered from the settings, checked by promtool and amtool, and
the alert rules' own unit tests (`promtool test rules`, each alert with a series that fires it
and one that must not)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from monitoring.config import RULES_TESTS, local_targets, render
from monitoring.settings import MonitoringSettings

PROMTOOL = shutil.which("promtool")
AMTOOL = shutil.which("amtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is missing: `make setup` installs Debian's prometheus"
)


def rendered(tmp_path: Path, **settings: object) -> dict[str, Path]:
    s = MonitoringSettings(**settings)
    return render(tmp_path, s, local_targets(s, {"cdr_loader": "127.0.0.1:19101"}))


LABEL = re.compile(r'(\w+)="([^"]*)"')


def differs(series: dict[str, str], alert: dict[str, str]) -> bool:
    return any(series[k] != str(v) for k, v in alert.items() if k in series)


def rules_of(path: Path) -> dict[str, dict]:
    groups = yaml.safe_load(path.read_text())["groups"]
    return {rule["alert"]: rule for group in groups for rule in group["rules"] if "alert" in rule}


@needs_promtool
def test_rendered_config_and_rules_pass_promtool_and_amtool(tmp_path: Path) -> None:
    files = rendered(tmp_path)
    for command in (
        [PROMTOOL, "check", "config", str(files["prometheus"])],
        [PROMTOOL, "check", "rules", str(files["rules"])],
        [AMTOOL, "check-config", str(files["alertmanager"])],
    ):
        result = subprocess.run(command, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_alert_rule_unit_tests_pass(tmp_path: Path) -> None:
    rendered(tmp_path)
    shutil.copy(RULES_TESTS, tmp_path / RULES_TESTS.name)
    result = subprocess.run(
        [PROMTOOL, "test", "rules", RULES_TESTS.name],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@needs_promtool
def test_the_rule_unit_tests_fail_when_a_threshold_is_wrong(tmp_path: Path) -> None:
    """The unit tests hold the thresholds: the same tests against rules rendered with a stall
    threshold no file reaches in them must fail."""
    rendered(tmp_path, loader_stall_seconds=10**6)
    shutil.copy(RULES_TESTS, tmp_path / RULES_TESTS.name)
    result = subprocess.run(
        [PROMTOOL, "test", "rules", RULES_TESTS.name],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert "alertname: CdrLoaderStalled" in result.stdout + result.stderr


def test_every_alert_has_a_firing_and_a_quiet_case_and_a_runbook(tmp_path: Path) -> None:
    rules = rules_of(rendered(tmp_path)["rules"])
    tests = yaml.safe_load(RULES_TESTS.read_text())["tests"]
    fires: set[str] = set()
    quiet: set[str] = set()
    for case in tests:
        series = [dict(LABEL.findall(s["series"])) for s in case["input_series"]]
        for check in case.get("alert_rule_test", []):
            expected = [e["exp_labels"] for e in check.get("exp_alerts") or []]
            if not expected:
                quiet.add(check["alertname"])  # an evaluation that must fire nothing
                continue
            fires.add(check["alertname"])
            # a series that differs from every expected alert in a label they share is one that
            # must not fire next to ones that must
            if any(all(differs(labels, e) for e in expected) for labels in series):
                quiet.add(check["alertname"])
    assert set(rules) <= fires, f"alerts no test fires: {set(rules) - fires}"
    assert set(rules) <= quiet, f"alerts no test keeps quiet: {set(rules) - quiet}"
    runbook = (Path(__file__).parent.parent / "docs" / "monitoring.md").read_text().lower()
    for name, rule in rules.items():
        assert rule["annotations"]["summary"]
        anchor = rule["annotations"]["runbook_url"].split("#")[1]
        assert anchor == name.lower()
        assert f"### {name.lower()}" in runbook, f"no runbook section for {name}"


def test_durations_and_thresholds_come_from_the_settings(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("WTC_MON_LOADER_STALL_FOR", "7s")
    monkeypatch.setenv("WTC_MON_LOADER_STALL_SECONDS", "3")
    monkeypatch.setenv("WTC_MON_SCRAPE_INTERVAL", "2s")
    s = MonitoringSettings()
    files = render(tmp_path, s, local_targets(s, {}))
    stalled = rules_of(files["rules"])["CdrLoaderStalled"]
    assert stalled["for"] == "7s"
    assert "> 3.0" in stalled["expr"]
    assert yaml.safe_load(files["prometheus"].read_text())["global"]["scrape_interval"] == "2s"
