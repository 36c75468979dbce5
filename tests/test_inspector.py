"""End to end through a second real MCP client, the MCP Inspector CLI (pinned, run with npx)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from typing import Any, Callable, Dict, Tuple

import pytest

from conftest import SERVER, make_server, require, rpc, platform_calls
from conftest import text_of as text, writes_sent

require(shutil.which("npx") is not None, "node/npx (for the MCP Inspector CLI)")

INSPECTOR = "@modelcontextprotocol/inspector@2.12.0"
HINTS = ("readOnlyHint", "destructiveHint", "idempotentHint", "openWorldHint")
# tool, arguments without confirm, the one POST it should make, and (key, value) in the platform's answer.
WRITES = [
    ("power_action", {"device_id": "dev_srv_pdx_3", "action": "cycle"},
     ("POST", "/v1/devices/dev_srv_pdx_3/power", {"action": "cycle"}), ("status", "accepted")),
    ("mount_iso", {"device_id": "dev_srv_pdx_3", "iso_id": "iso_ubuntu_2404"},
     ("POST", "/v1/devices/dev_srv_pdx_3/iso:mount", {"iso_id": "iso_ubuntu_2404"}),
     ("mounted_iso", "iso_ubuntu_2404")),
]
Run = Callable[..., Tuple[int, Dict[str, Any], str]]


def npx(args: list, timeout: float) -> subprocess.CompletedProcess:
    """npx -y the pinned Inspector, without update nags and without any KVMFLEET_* from our own shell."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVMFLEET_")}
    env.update(NPM_CONFIG_UPDATE_NOTIFIER="false", NO_UPDATE_NOTIFIER="1")
    return subprocess.run(["npx", "-y", INSPECTOR] + args, capture_output=True, text=True, env=env,
                          timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def inspector() -> Run:
    """Download the Inspector once (slow the first time), then run it against the real server process."""
    proc = npx(["--version"], timeout=300)
    assert proc.returncode == 0 and "2.12.0" in proc.stdout, proc.stdout + proc.stderr

    def run(url: str, token: str, *method_args: str, writes: bool = False) -> Tuple[int, Dict[str, Any], str]:
        env = {"KVMFLEET_API": url, "KVMFLEET_TOKEN": token}
        if writes:
            env["KVMFLEET_MCP_ALLOW_WRITES"] = "true"
        flags = [arg for key, value in env.items() for arg in ("-e", "%s=%s" % (key, value))]
        proc = npx(["--cli"] + flags + ["--format", "json", sys.executable, SERVER] + list(method_args),
                   timeout=120)
        # node/npm may warn on stderr (e.g. engine >=22.19); stdout must be exactly one JSON object.
        assert token not in proc.stdout + proc.stderr
        assert proc.stdout.strip(), proc.stderr
        return proc.returncode, json.loads(proc.stdout), proc.stderr

    return run


def call_args(tool: str, arguments: Dict[str, Any]) -> Tuple[str, ...]:
    return ("--method", "tools/call", "--tool-name", tool, "--tool-args-json", json.dumps(arguments))


@pytest.mark.parametrize("writes,count", [(False, 11), (True, 21)])
def test_the_inspector_lists_the_servers_tools_in_order_with_all_four_hints(platform, inspector, writes, count):
    status, out, _ = inspector(platform.url, "kvmf_demo_viewer", "--method", "tools/list", writes=writes)
    assert status == 0
    tools = out["result"]["tools"]
    assert len(tools) == count and tools[0]["name"] == "list_devices"
    assert tools == rpc(make_server(writes=writes), "tools/list")["result"]["tools"]
    assert all(isinstance(t["annotations"][hint], bool) for t in tools for hint in HINTS)
    assert all(t["annotations"]["readOnlyHint"] for t in tools) is not writes
    assert platform_calls(platform) == []


def test_the_inspector_calls_a_read_tool_and_gets_the_platforms_items(platform, inspector):
    status, out, _ = inspector(platform.url, "kvmf_demo_viewer", *call_args("list_devices", {"status": "offline"}))
    assert status == 0 and not out["result"].get("isError")
    items = json.loads(text(out["result"]))["items"]
    assert items and {d["status"] for d in items} == {"offline"}
    assert {"dev_pdu_fra_1", "dev_edge_ams_2"} <= {d["id"] for d in items}
    assert [(r["method"], r["path"], r["query"]) for r in platform_calls(platform)] == [
        ("GET", "/v1/devices", {"status": ["offline"]})]


@pytest.mark.parametrize("tool,arguments,sent,answer", WRITES)
def test_a_confirmed_write_through_the_inspector_posts_once_without_confirm(platform, inspector, tool, arguments,
                                                                             sent, answer):
    args = call_args(tool, dict(arguments, confirm=True))
    status, out, _ = inspector(platform.url, "kvmf_demo_operator", *args, writes=True)
    assert status == 0 and not out["result"].get("isError"), out
    key, value = answer
    assert json.loads(text(out["result"]))[key] == value
    assert [(r["method"], r["path"], r["body"]) for r in platform_calls(platform)] == [sent]
    assert "confirm" not in platform_calls(platform)[0]["body"]


@pytest.mark.parametrize("tool,arguments,sent,answer", WRITES)
def test_an_unconfirmed_write_is_a_tool_error_exit_5_and_writes_nothing(platform, inspector, tool, arguments,
                                                                        sent, answer):
    status, out, stderr = inspector(platform.url, "kvmf_demo_operator", *call_args(tool, arguments), writes=True)
    assert status == 5 and "tool_is_error" in stderr
    assert out["result"]["isError"] is True
    assert text(out["result"]).startswith("Not done: %s would" % tool)
    assert "What it would touch" in text(out["result"])
    assert writes_sent(platform_calls(platform)) == []
