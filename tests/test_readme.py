"""The README tells the truth: its tool table, its env table and its quick start."""
from __future__ import annotations

import re
import subprocess
import sys

import kvmfleet_mcp as kv
from conftest import ROOT

README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_readme_tool_table_matches_the_tool_table_with_every_argument():
    rows = re.findall(r"^\| `(\w+)` \| `(GET|POST) ([^`]+)` \| ([^|]+) \| ([^|]+) \|([^|]*)\|$", README, re.M)
    assert [row[0] for row in rows] == [t.name for t in kv.TOOLS]
    for (name, method, path, arguments, confirm, hints), tool in zip(rows, kv.TOOLS):
        query = "&".join("%s=%s" % pair for pair in tool.fixed_query)
        assert (method, path) == (tool.method, tool.path + ("?" + query if query else ""))
        # The arguments, in the table's order, the required ones in bold.
        assert arguments.strip() == (", ".join(("**`%s`**" if n in tool.required else "`%s`") % n
                                               for n in tool.properties) or "none"), name
        rule = kv._confirm_rule(tool).replace("|", ", ").replace(", cycle", " or cycle")
        assert confirm.strip() == rule, name
        expected = [letter for letter, on in (("R", tool.read_only), ("D", tool.destructive),
                                              ("I", tool.idempotent)) if on]
        assert hints.split() == expected, name


def test_the_prompt_table_gives_each_prompts_calls():
    rows = dict(re.findall(r"^\| `(\w+)` \|[^|]*\| (.+) \|$", README, re.M))
    for prompt in kv.PROMPTS:
        tools = [tool for tool in re.findall(r"`(\w+)(?: \{[^`]*\})?`", rows[prompt.name]) if tool in kv.TOOLS_BY_NAME]
        assert tools == [tool for tool, _ in prompt.steps], prompt.name


def test_the_changelog_names_this_version_and_the_sha256_of_this_very_file():
    import hashlib

    digest = hashlib.sha256((ROOT / "kvmfleet_mcp.py").read_bytes()).hexdigest()
    assert re.search(r"^\| %s \| `%s` \|$" % (re.escape(kv.__version__), digest), README, re.M), (
        "README's 'Upgrading and verifying the file' must list %s with sha256 %s" % (kv.__version__, digest))
    assert re.search(r"^### %s \(\d{4}-\d{2}-\d{2}\)$" % re.escape(kv.__version__), README, re.M)


def test_the_readme_has_a_map_whose_links_all_lead_somewhere():
    anchors = {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
               for heading in re.findall(r"^#{2,3} (.+)$", README, re.M)}
    links = re.findall(r"\]\(#([\w-]+)\)", README)
    assert len(links) >= 10 and set(links) <= anchors, set(links) - anchors


def test_every_environment_variable_is_documented():
    documented = set(re.findall(r"^\| `(KVMFLEET_\w+)`", README, re.M))
    in_code = set(re.findall(r"\b(KVMFLEET_[A-Z_]+)\b", open(kv.__file__, encoding="utf-8").read()))
    assert documented == in_code


def test_the_quick_start_demo_runs_and_shows_the_platform_enforcing(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "demo.py")], capture_output=True, timeout=120)
    out = proc.stdout.decode()
    assert proc.returncode == 0, proc.stderr.decode()
    assert out.count("\n> ") == 13
    compact = out.replace('": ', '":')  # results are the platform's bytes, spaces and all
    assert '"status":"offline"' in compact and '"framework":"nis2"' in compact and '"ok":true' in compact
    assert "Not done: power_action would" in out and "jit_required" in out and "four_eyes" in out
    assert '"status":"accepted"' in compact and '"status":"acknowledged"' in compact


def test_every_test_the_security_model_names_exists():
    named = set(re.findall(r"`(test_\w+)`", README))
    defined = set()
    for path in (ROOT / "tests").glob("test_*.py"):
        defined |= set(re.findall(r"^def (test_\w+)", path.read_text(encoding="utf-8"), re.M))
    assert len(named) >= 15 and named <= defined, named - defined
