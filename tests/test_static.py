"""Static gates: ruff (security rules, no print), mypy --strict, nothing newer than Python 3.9, the file's shape."""
from __future__ import annotations

import ast
import importlib.util
import re
import subprocess
import sys

import pytest

from conftest import ROOT, SERVER, require


def run_module(module: str, *args: str) -> subprocess.CompletedProcess:
    require(importlib.util.find_spec(module) is not None, module)
    # vermin has no __main__; its console script calls vermin.main().
    command = ["-c", "import sys, vermin; sys.exit(vermin.main())"] if module == "vermin" else ["-m", module]
    return subprocess.run([sys.executable, *command, *args], capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_ruff_finds_nothing_with_the_security_rules_and_the_print_ban():
    proc = run_module("ruff", "check", "--output-format", "concise", "kvmfleet_mcp.py", "tests")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ruff_would_catch_a_print_or_a_subprocess_in_the_module(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import subprocess\nprint(subprocess.call('ls', shell=True))\n")
    proc = run_module("ruff", "check", "--output-format", "concise", "--config", str(ROOT / "pyproject.toml"), str(bad))
    assert "T201" in proc.stdout and "S602" in proc.stdout


def test_mypy_strict_passes_on_the_module():
    proc = run_module("mypy", "--strict", "--no-error-summary", SERVER)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_module_needs_nothing_newer_than_python_3_9():
    proc = run_module("vermin", "--target=3.9-", "--violations", "--no-tips", "--eval-annotations", SERVER)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = run_module("vermin", "--no-tips", "--eval-annotations", SERVER)
    found = re.search(r"Minimum required versions: 3\.(\d+)", proc.stdout)
    assert found and int(found.group(1)) <= 9, proc.stdout


@pytest.mark.parametrize("newer", ["match x:\n    case 1: pass\n", "import tomllib\n", "from itertools import pairwise\n"])
def test_vermin_would_catch_syntax_or_stdlib_newer_than_3_9(tmp_path, newer):
    bad = tmp_path / "bad.py"
    bad.write_text(newer)
    proc = run_module("vermin", "--target=3.9-", "--violations", "--no-tips", "--eval-annotations", str(bad))
    assert proc.returncode != 0


def test_the_file_reads_top_down_in_short_units_with_imports_at_the_top():
    source = (ROOT / "kvmfleet_mcp.py").read_text(encoding="utf-8")
    tree = ast.parse(source)
    long = ["%s: %d lines" % (node.name, node.end_lineno - node.lineno + 1) for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef) and node.end_lineno - node.lineno >= 40
            or isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno >= 250]
    assert long == [], "no function over 40 lines, no class over 250"
    late = sorted({alias.name for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                   and node not in tree.body for alias in node.names})
    assert late == ["jsonschema", "requests"], "only requests and jsonschema are imported on first use"
    banners = re.findall(r"^# (.+?) #{4,}$", source, re.M)
    assert banners == ["Constants", "Errors", "The tool table", "Pure helpers", "Configuration",
                       "The platform client: the only code that touches the network", "Tool calls",
                       "Asking a person", "JSON-RPC dispatch", "The stdio loop: the only code that touches stdout",
                       "Command line"]
