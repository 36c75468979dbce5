"""Runs where users run it: the file alone on Debian's python3, any locale, the console script."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import kvmfleet_mcp as kv
from conftest import INIT, SERVER, line, platform_calls, replies, require, server_env

DEBIAN_PYTHON = "/usr/bin/python3"
WORLD = "Küche 日本 🖥 naïve"


def session(python, server, env, calls, cwd=None):
    lines = [line({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": INIT})]
    lines += [line({"jsonrpc": "2.0", "id": n, "method": "tools/call", "params": {"name": name, "arguments": args}})
              for n, (name, args) in enumerate(calls, 1)]
    proc = subprocess.run([python, "-I", server], input=b"".join(lines), capture_output=True, env=env, cwd=cwd,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert env["KVMFLEET_TOKEN"].encode() not in proc.stdout + proc.stderr
    return proc, {m["id"]: m for m in replies(proc.stdout)}


def test_the_file_alone_runs_on_debian_python3_with_only_apt_packages(platform, tmp_path):
    usable = os.path.exists(DEBIAN_PYTHON) and subprocess.run(
        [DEBIAN_PYTHON, "-I", "-c", "import requests, jsonschema"], capture_output=True).returncode == 0
    require(usable, "Debian's python3 with python3-requests and python3-jsonschema (apt)")
    lonely = tmp_path / "kvmfleet_mcp.py"
    shutil.copy(SERVER, lonely)
    assert os.listdir(tmp_path) == ["kvmfleet_mcp.py"]
    env = server_env(platform.url, "kvmf_demo_operator", KVMFLEET_MCP_ALLOW_WRITES="true")
    _, out = session(DEBIAN_PYTHON, str(lonely), env, [
        ("list_devices", {"status": "offline"}),
        ("list_alerts", {"severity": "critical", "limit": "many"}),
        ("power_action", {"device_id": "dev_srv_pdx_3", "action": "cycle", "confirm": True}),
    ], cwd=tmp_path)
    assert {d["status"] for d in json.loads(out[1]["result"]["content"][0]["text"])["items"]} == {"offline"}
    assert "Invalid arguments for list_alerts at limit" in out[2]["result"]["content"][0]["text"]
    assert json.loads(out[3]["result"]["content"][0]["text"])["status"] == "accepted"
    assert [r["path"] for r in platform.requests] == ["/v1/tokens/current", "/v1/devices",
                                                      "/v1/devices/dev_srv_pdx_3/power"]


def test_windows_codepage_and_c_locale_change_nothing_on_the_wire(platform):
    env = server_env(platform.url, "kvmf_demo_operator", KVMFLEET_MCP_ALLOW_WRITES="true")
    calls = [("request_access", {"device_id": "dev_srv_pdx_3", "reason": WORLD, "duration_minutes": 30})]
    _, plain = session(sys.executable, SERVER, env, calls)
    platform.reset()
    env.update(PYTHONIOENCODING="cp1252", LANG="C", LC_ALL="C", PYTHONUTF8="0")
    proc, hostile = session(sys.executable, SERVER, env, calls)
    grant = json.loads(hostile[1]["result"]["content"][0]["text"])
    assert grant["reason"] == WORLD and platform_calls(platform)[0]["body"]["reason"] == WORLD
    assert WORLD.encode("utf-8") in proc.stdout and b"\r\n" not in proc.stdout
    assert hostile[1]["result"]["content"][0]["text"].split('"reason"')[1][:30] == \
        plain[1]["result"]["content"][0]["text"].split('"reason"')[1][:30]


def test_the_console_script_is_installed_with_the_package():
    script = Path(sys.executable).parent / "kvmfleet-mcp"
    require(script.exists(), "the kvmfleet-mcp console script (pip install -e .)")
    proc = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and proc.stdout.startswith("kvmfleet-mcp %s sha256:" % kv.__version__)
