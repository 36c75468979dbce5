"""The benchmark script still runs, and its --floor server is what it claims (no timing is asserted)."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

from conftest import ROOT
from conftest import SERVER

import benchmark


def test_the_floor_server_is_the_compare_server_with_all_of_this_files_code_never_run(tmp_path: Path) -> None:
    compare = tmp_path / "compare.py"
    compare.write_text('"""A stand-in server."""\nimport sys\nsys.stdout.write("compare ran\\n")\n')
    floor = benchmark.floor_server(str(compare), str(tmp_path))

    ran = subprocess.run([sys.executable, floor], capture_output=True, text=True, timeout=30)
    assert (ran.returncode, ran.stdout, ran.stderr) == (0, "compare ran\n", "")
    ours = ast.parse(Path(SERVER).read_text(encoding="utf-8"))
    tree = ast.parse(Path(floor).read_text(encoding="utf-8"))
    never_called = tree.body[-1]
    assert isinstance(never_called, ast.FunctionDef) and never_called.name == "_never_called"
    # Every statement of the module but its docstring, the __future__ import
    # and the __main__ block: the same syntax tree, node for node (only the
    # text inside multi-line strings gains the indent).
    ours_body = ours.body[2:-1]
    assert [type(node).__name__ + getattr(node, "name", "") for node in never_called.body] == [
        type(node).__name__ + getattr(node, "name", "") for node in ours_body]
    assert Counter(type(n).__name__ for node in never_called.body for n in ast.walk(node)) == Counter(
        type(n).__name__ for node in ours_body for n in ast.walk(node))
    assert len(ours_body) > 100


def test_the_benchmark_runs_and_reports_every_budget_for_the_server_and_the_floor() -> None:
    ran = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "benchmark.py"), "--rounds", "1", "--spawns", "1", "--calls", "5",
         "--compare", SERVER, "--floor"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert ran.returncode == 0, ran.stderr
    summary = json.loads(ran.stdout.splitlines()[-1])
    assert set(summary["results"]) == {"kvmfleet_mcp", "compare", "floor"}
    assert set(summary["budgets"]) == {
        "cold_init <= 0.5x", "first_result <= 1.1x", "peak_rss <= 1.1x",
        "list_devices calls/s >= 1.0x", "list_devices p99 <= 1.0x",
        "get_device_health calls/s >= 1.0x", "get_device_health p99 <= 1.0x"}
    assert set(summary["floor"]) == {"first_result_ms", "peak_rss_mib"}
    assert "the floor, %s with this file's code added and never called: first tool result" % SERVER in ran.stdout
    ours = summary["results"]["kvmfleet_mcp"]
    assert ours["tools_list_bytes"] == summary["results"]["floor"]["tools_list_bytes"]
    assert ours["list_devices"]["result_text_bytes"] == ours["list_devices"]["platform_body_bytes"]
