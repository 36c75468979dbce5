"""End to end through the official MCP Python SDK client, in both protocol eras."""
from __future__ import annotations

import json
import sys
import tempfile
from typing import Any, Dict

import importlib.util

import pytest

from conftest import REQUEST_ID, SERVER, platform_calls, require, server_env, writes_sent

require(importlib.util.find_spec("mcp") is not None, "the MCP Python SDK (pip install mcp==2.3.0)")
import anyio  # noqa: E402
from mcp import Client, StdioServerParameters  # noqa: E402
from mcp.client.stdio import stdio_client  # noqa: E402

MODES = ["auto", "legacy"]


def run_client(mode: str, env: Dict[str, str], script: Any) -> Any:
    """Start the real server under the SDK client, run script(client), return its value and the server's stderr."""
    params = StdioServerParameters(command=sys.executable, args=[SERVER], env=env)
    outcome: Dict[str, Any] = {}

    async def main() -> None:
        with tempfile.TemporaryFile("w+") as errlog:
            async with Client(stdio_client(params, errlog=errlog), mode=mode) as client:
                outcome["version"] = client.session.protocol_version
                outcome["value"] = await script(client)
            errlog.seek(0)
            outcome["stderr"] = errlog.read()

    anyio.run(main)
    token = env["KVMFLEET_TOKEN"]
    assert token not in outcome["stderr"] and token not in json.dumps(outcome["value"], default=str)
    return outcome


def text(result: Any) -> str:
    """The first text block; a write's result may end with its request-id block, nothing else."""
    assert all(block.type == "text" for block in result.content)
    assert len(result.content) == 1 or len(result.content) == 2 and REQUEST_ID.fullmatch(result.content[1].text)
    return result.content[0].text


@pytest.mark.parametrize("mode,version", [("auto", "2026-07-28"), ("legacy", "2025-11-25")])
def test_each_mode_negotiates_its_era_and_lists_11_read_tools(platform, mode, version):
    async def script(client):
        return (await client.list_tools()).tools

    outcome = run_client(mode, server_env(platform.url, "kvmf_demo_viewer"), script)
    assert outcome["version"] == version
    tools = outcome["value"]
    assert len(tools) == 11 and tools[0].name == "list_devices"
    assert all(t.annotations.read_only_hint is True for t in tools)


@pytest.mark.parametrize("mode", MODES)
def test_every_read_tool_answers_through_the_sdk(platform, mode):
    calls = [
        ("list_devices", {"status": "offline"}), ("get_device_health", {"device_id": "dev_r7525_nord_1"}),
        ("query_audit_log", {"action": "auth.login", "outcome": "failure"}), ("verify_audit_integrity", {}),
        ("list_open_console_sessions", {}), ("list_access_grants", {"awaiting_my_approval": True}),
        ("list_alerts", {"severity": "critical"}), ("list_policies", {}), ("list_isos", {}),
        ("get_audit_chain_head", {}), ("get_compliance_score", {"framework": "nis2"}),
    ]

    async def script(client):
        out = {}
        for name, args in calls:
            result = await client.call_tool(name, args)
            out[name] = (result.is_error, json.loads(text(result)))
        return out

    out = run_client(mode, server_env(platform.url, "kvmf_demo_admin"), script)["value"]
    assert all(not is_error for is_error, _ in out.values()), out
    assert {d["status"] for d in out["list_devices"][1]["items"]} == {"offline"}
    assert out["get_device_health"][1]["name"] == "R7525-NORD-1"
    assert out["verify_audit_integrity"][1]["ok"] is True
    assert any(s["id"] == "cs_pdx3_9h" for s in out["list_open_console_sessions"][1]["items"])
    assert any(a["id"] == "al_disk_full" for a in out["list_alerts"][1]["items"])
    assert any(g["id"] == "gr_kernel_patch" for g in out["list_access_grants"][1]["items"])
    assert out["get_compliance_score"][1]["framework"] == "nis2"


@pytest.mark.parametrize("mode", MODES)
def test_writes_through_the_sdk_with_confirm_and_the_platforms_refusals(platform, mode):
    async def script(client):
        names = [t.name for t in (await client.list_tools()).tools]
        unconfirmed = await client.call_tool("power_action", {"device_id": "dev_srv_pdx_3", "action": "cycle"})
        sent_before_confirm = len(writes_sent(platform_calls(platform)))  # preview reads only
        confirmed = await client.call_tool("power_action",
                                           {"device_id": "dev_srv_pdx_3", "action": "cycle", "confirm": True})
        mounted = await client.call_tool("mount_iso", {"device_id": "dev_srv_pdx_3", "iso_id": "iso_ubuntu_2404",
                                                       "confirm": True})
        own = await client.call_tool("approve_access", {"grant_id": "gr_kernel_patch"})
        ended = await client.call_tool("end_console_session", {"session_id": "cs_pdx3_9h", "confirm": True})
        acked = await client.call_tool("acknowledge_alert", {"alert_id": "al_disk_full", "note": "cleaning /var"})
        return names, sent_before_confirm, [(r.is_error, text(r)) for r in (unconfirmed, confirmed, mounted, own, ended, acked)]

    env = server_env(platform.url, "kvmf_demo_operator", KVMFLEET_MCP_ALLOW_WRITES="true")
    names, sent_before_confirm, results = run_client(mode, env, script)["value"]
    assert len(names) == 21
    assert sent_before_confirm == 0
    (unconfirmed, confirmed, mounted, own, ended, acked) = results
    assert unconfirmed[0] and unconfirmed[1].startswith("Not done: power_action would")
    assert not confirmed[0] and json.loads(confirmed[1])["action"] == "cycle"
    assert not mounted[0]
    # 4-eyes: olga.operator asked for this grant, so the platform refuses, verbatim.
    assert own[0] and "HTTP 403" in own[1] and "four_eyes" in own[1]
    assert not ended[0] and json.loads(ended[1])["ended_at"]
    assert not acked[0]
    bodies = [r["body"] for r in platform.requests if r["method"] == "POST"]
    assert all("confirm" not in body for body in bodies)


@pytest.mark.parametrize("mode", MODES)
def test_a_jit_device_refuses_power_without_a_grant(platform, mode):
    async def script(client):
        result = await client.call_tool("power_action", {"device_id": "dev_r7525_nord_1", "action": "on"})
        return result.is_error, text(result)

    env = server_env(platform.url, "kvmf_demo_admin", KVMFLEET_MCP_ALLOW_WRITES="true")
    is_error, message = run_client(mode, env, script)["value"]
    assert is_error and "HTTP 403" in message and "jit_required" in message


@pytest.mark.parametrize("mode", MODES)
def test_hidden_write_tools_cannot_be_called_through_the_sdk(platform, mode):
    async def script(client):
        try:
            await client.call_tool("power_action", {"device_id": "dev_srv_pdx_3", "action": "on"})
        except Exception as exc:  # the SDK raises on a JSON-RPC error
            return str(exc)
        return "no error"

    message = run_client(mode, server_env(platform.url, "kvmf_demo_admin"), script)["value"]
    assert "Unknown tool: power_action" in message
    assert platform_calls(platform) == []
