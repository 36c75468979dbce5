"""The benchmark script still runs and reports every budget (no timing is asserted)."""
from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT
from conftest import SERVER



def test_the_benchmark_runs_and_reports_every_budget() -> None:
    ran = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "benchmark.py"), "--rounds", "1", "--spawns", "1", "--calls", "5",
         "--compare", SERVER], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert ran.returncode == 0, ran.stderr
    summary = json.loads(ran.stdout.splitlines()[-1])
    assert set(summary["results"]) == {"kvmfleet_mcp", "compare"}
    assert set(summary["budgets"]) == {
        "cold_init <= 0.6x", "first_result <= 1.6x", "peak_rss <= 1.35x",
        "list_devices calls/s >= 0.9x", "list_devices p99 <= 1.3x",
        "get_device_health calls/s >= 0.9x", "get_device_health p99 <= 1.3x"}
    ours = summary["results"]["kvmfleet_mcp"]
    assert ours["list_devices"]["result_text_bytes"] == ours["list_devices"]["platform_body_bytes"]
