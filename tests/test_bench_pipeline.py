"""`make bench` must keep working: a tiny run of the whole-pipeline benchmark on its own stack."""

from __future__ import annotations

import json
import subprocess
import sys

from common.settings import PROJECT_ROOT


def test_the_pipeline_benchmark_runs_end_to_end_and_writes_its_report(tmp_path) -> None:
    """The landing and the live side at the tiny scale (dbt and the baselines are left out to
    keep it to seconds): every CDR row, tick and CRM change lands, the HVS consumer applies every
    event, the API answers for the last file, and the report names each goal with a verdict."""
    out = subprocess.run(
        [sys.executable, "-m", "bench.pipeline", "--scale", "tiny", "--skip-dbt",
         "--skip-baselines", "--no-progress", "--out", str(tmp_path)],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300, check=True,
    ).stdout  # fmt: skip
    result = json.loads((tmp_path / "pipeline-tiny.json").read_text())
    stages = {s["name"]: s for s in result["stages"]}
    assert stages["CDR loader"]["rows"] == result["sources"]["cdr_rows"] == 1800
    assert stages["tick sink"]["rows"] == result["sources"]["ticks"] > 0
    assert stages["CRM CDC"]["rows"] == result["sources"]["crm_changes"] > 0
    assert result["hvs_e2e"]["events"] == 1800
    assert result["api_last_file"]["status"] == 200 and result["api_last_file"]["answer_nonempty"]
    processes = [
        "CDR loader",
        "tick sink",
        "CRM CDC",
        "HVS consumer (process)",
        "usage API (process)",
    ]
    assert all(stages[name]["peak_rss_mb"] > 0 for name in processes)
    assert result["memory_peak"]["postgres_pss_mb"] > 0 and result["redis"]["subscriber_days"] > 0
    report = (tmp_path / "report.md").read_text()
    assert "| tiny | end to end" in report and "(img/timeline-tiny.png)" in report
    assert (tmp_path / "img" / "throughput.png").stat().st_size > 0
    assert "end to end" in out and ("met" in out)
