"""A person's confirmation, asked through the official MCP Python SDK client's elicitation callback.

The real server process, the demo platform, and mcp 2.3.0's Client with an elicitation_callback, in both
modes. What each mode does on the wire (seen in the callback's request id and in the server's record of
agent actions, KVMFLEET_MCP_AUDIT_LOG):

- "legacy": the initialize handshake (2025-11-25); the server sends elicitation/create in the middle of the
  tools/call (JSON-RPC id "kvmfleet-mcp-confirm-1") and the SDK answers it with the callback's result.
- "auto": the SDK probes server/discover and talks 2026-07-28; the first tools/call comes back
  resultType "input_required", the SDK's multi-round-trip driver runs the embedded request (key
  "confirm_action") through the same callback, and retries the call with inputResponses and the
  requestState echoed back: two tools/call requests, one question, no user code.
"""
from __future__ import annotations

import importlib.util
import json
import re
import sys
import tempfile
from typing import Any, Dict, List, Tuple

import pytest

from conftest import SERVER, platform_calls, require, server_env, writes_sent

require(importlib.util.find_spec("mcp") is not None, "the MCP Python SDK (pip install mcp==2.3.0)")
import anyio  # noqa: E402
from mcp import Client, StdioServerParameters, types  # noqa: E402
from mcp.client.stdio import stdio_client  # noqa: E402

from demo_platform import TOKENS  # noqa: E402
from test_sdk_client import MODES  # noqa: E402

OPERATOR = "kvmf_demo_operator"  # olga.operator; dev_srv_pdx_3 needs no just-in-time grant to be powered
assert TOKENS[OPERATOR] == "operator"
CYCLE = {"device_id": "dev_srv_pdx_3", "action": "cycle"}
WHAT = ("power_action would send power action 'cycle' to device dev_srv_pdx_3, "
        "interrupting everything running on it")
PREVIEW = ["/v1/devices/dev_srv_pdx_3", "/v1/console-sessions", "/v1/access-grants"]
ERA = {"auto": "2026-07-28", "legacy": "2025-11-25"}
# The callback's context.request_id: the inputRequests key (2026-07-28) or the JSON-RPC id of the
# server's elicitation/create request (legacy).
ASK_ID = {"auto": "confirm_action", "legacy": re.compile(r"kvmfleet-mcp-confirm-[0-9a-f]{16}")}


def is_ask_id(ask_id, mode) -> bool:
    """The question's id: our 2026 input key, or an unpredictable legacy request id."""
    return ask_id == ASK_ID[mode] if mode == "auto" else bool(ASK_ID[mode].fullmatch(str(ask_id)))

ACCEPT = types.ElicitResult(action="accept", content={"approve": True})
REFUSALS = [
    pytest.param(types.ElicitResult(action="decline"), "declined", "decline", id="decline"),
    pytest.param(types.ElicitResult(action="cancel"), "dismissed the question", "cancel", id="cancel"),
    pytest.param(types.ElicitResult(action="accept", content={"approve": False}),
                 "accepted without ticking the box", "accept unticked", id="accept-unticked"),
]


def run_asking_client(mode: str, env: Dict[str, str], answer: types.ElicitResult, script: Any) -> Dict[str, Any]:
    """Like test_sdk_client.run_client, with an elicitation callback that records each question and answers it.

    (run_client builds its Client itself, with no way to pass a callback, so it is not reused.)
    """
    params = StdioServerParameters(command=sys.executable, args=[SERVER], env=env)
    asked: List[Tuple[Any, Any]] = []
    outcome: Dict[str, Any] = {"asked": asked}

    async def on_elicit(context: Any, question: Any) -> types.ElicitResult:
        asked.append((context.request_id, question))
        return answer

    async def main() -> None:
        with tempfile.TemporaryFile("w+") as errlog:
            async with Client(stdio_client(params, errlog=errlog), mode=mode,
                              elicitation_callback=on_elicit) as client:
                outcome["version"] = client.session.protocol_version
                with anyio.fail_after(60):
                    outcome["value"] = await script(client)
            errlog.seek(0)
            outcome["stderr"] = errlog.read()

    anyio.run(main)
    assert OPERATOR not in outcome["stderr"]
    assert OPERATOR not in json.dumps([(i, q.model_dump()) for i, q in asked] + [outcome["value"]], default=str)
    return outcome


def writing_env(platform: Any, tmp_path: Any) -> Dict[str, str]:
    # A short answer timeout, so a callback that is never reached fails the test instead of hanging it.
    return server_env(platform.url, OPERATOR, KVMFLEET_MCP_ALLOW_WRITES="true", KVMFLEET_MCP_CONFIRM_TIMEOUT="30",
                      KVMFLEET_MCP_AUDIT_LOG=str(tmp_path / "agent-actions.jsonl"))


def recorded(tmp_path: Any) -> List[Tuple[str, Dict[str, Any], str]]:
    """(tool, confirmation, outcome) of each tools/call the server handled, from its record of agent actions."""
    lines = (tmp_path / "agent-actions.jsonl").read_text().splitlines()
    return [(e["tool"], e.get("confirmation"), e["outcome"]) for e in map(json.loads, lines)]


def call_cycle(arguments: Dict[str, Any]) -> Any:
    async def script(client: Any) -> Tuple[bool, List[str]]:
        result = await client.call_tool("power_action", arguments)
        assert all(block.type == "text" for block in result.content)
        return result.is_error, [block.text for block in result.content]
    return script


@pytest.mark.parametrize("mode", MODES)
def test_a_ticked_approval_sends_the_power_cycle_once_after_asking_about_srv_pdx_3_by_name_and_id(
        platform, tmp_path, mode):
    outcome = run_asking_client(mode, writing_env(platform, tmp_path), ACCEPT, call_cycle(CYCLE))
    assert outcome["version"] == ERA[mode]
    is_error, texts = outcome["value"]
    assert is_error is False
    assert json.loads(texts[0]) == {"request_id": "pw_0001", "device_id": "dev_srv_pdx_3", "action": "cycle",
                                    "status": "accepted"}

    # One question, through the callback, shaped as a form with one boolean box.
    [(ask_id, question)] = outcome["asked"]
    assert is_ask_id(ask_id, mode)
    assert isinstance(question, types.ElicitRequestFormParams) and question.mode == "form"
    assert "asks to send power action 'cycle' to device dev_srv_pdx_3, interrupting" in question.message
    assert '- device "srv-pdx-3" (dev_srv_pdx_3): status "online", power "on"' in question.message
    schema = question.requested_schema
    assert schema["type"] == "object" and schema["required"] == ["approve"]
    assert list(schema["properties"]) == ["approve"]
    assert schema["properties"]["approve"]["type"] == "boolean"
    assert schema["properties"]["approve"]["default"] is False

    # The previews were read first; then exactly one write, this one.
    calls = platform_calls(platform)
    assert [c["path"] for c in calls if c["method"] == "GET"] == PREVIEW
    assert [(c["method"], c["path"], c["body"]) for c in writes_sent(calls)] == [
        ("POST", "/v1/devices/dev_srv_pdx_3/power", {"action": "cycle"})]
    assert calls[-1]["method"] == "POST"

    person = {"by": "person", "answer": "accept"}
    if mode == "auto":  # input_required, then the SDK's retry carrying the answer
        assert recorded(tmp_path) == [("power_action", {"by": "person", "answer": "asked"}, "asked a person"),
                                      ("power_action", person, "done")]
    else:  # one tools/call, with elicitation/create in its middle
        assert recorded(tmp_path) == [("power_action", person, "done")]


@pytest.mark.parametrize("answer,why,label", REFUSALS)
@pytest.mark.parametrize("mode", MODES)
def test_a_decline_a_cancel_or_an_unticked_accept_sends_no_write_and_says_not_done(
        platform, tmp_path, mode, answer, why, label):
    outcome = run_asking_client(mode, writing_env(platform, tmp_path), answer, call_cycle(CYCLE))
    assert outcome["version"] == ERA[mode]
    assert [is_ask_id(ask_id, mode) for ask_id, _ in outcome["asked"]] == [True]
    is_error, texts = outcome["value"]
    assert is_error is True
    assert texts == ["Not done: %s, and the user %s. No write was sent to KVM Fleet. Do not try again unless "
                     "the user asks you to." % (WHAT, why)]
    calls = platform_calls(platform)
    assert writes_sent(calls) == []
    assert all(c["method"] == "GET" and c["path"] in PREVIEW for c in calls)  # previews only
    refused = ("power_action", {"by": "person", "answer": label}, "error")
    if mode == "auto":
        assert recorded(tmp_path) == [("power_action", {"by": "person", "answer": "asked"}, "asked a person"),
                                      refused]
    else:
        assert recorded(tmp_path) == [refused]


@pytest.mark.parametrize("mode", MODES)
def test_the_models_confirm_true_does_not_skip_the_persons_question(platform, tmp_path, mode):
    answer = types.ElicitResult(action="decline")
    outcome = run_asking_client(mode, writing_env(platform, tmp_path), answer, call_cycle(dict(CYCLE, confirm=True)))
    assert [is_ask_id(ask_id, mode) for ask_id, _ in outcome["asked"]] == [True]
    is_error, texts = outcome["value"]
    assert is_error is True and texts[0].startswith("Not done: %s, and the user declined." % WHAT)
    assert writes_sent(platform_calls(platform)) == []


@pytest.mark.parametrize("mode", MODES)
def test_each_other_destructive_tool_asks_about_its_target_and_a_yes_sends_exactly_its_post(
        platform, tmp_path, mode):
    cases = [
        ("end_console_session", {"session_id": "cs_pdx3_9h"},
         "end console session cs_pdx3_9h, disconnecting its user", "/v1/console-sessions/cs_pdx3_9h:end"),
        ("mount_iso", {"device_id": "dev_srv_pdx_3", "iso_id": "iso_ubuntu_2404"},
         "mount ISO iso_ubuntu_2404 on device dev_srv_pdx_3", "/v1/devices/dev_srv_pdx_3/iso:mount"),
        ("revoke_access", {"grant_id": "gr_db_migration"},
         "revoke access grant gr_db_migration at once", "/v1/access-grants/gr_db_migration:revoke"),
    ]

    async def script(client: Any) -> List[Tuple[bool, int]]:
        out = []
        for name, arguments, _, _ in cases:
            result = await client.call_tool(name, arguments)
            out.append((result.is_error, len(writes_sent(platform_calls(platform)))))
        return out

    outcome = run_asking_client(mode, writing_env(platform, tmp_path), ACCEPT, script)
    # Each call succeeded and had sent exactly one more write when it returned.
    assert outcome["value"] == [(False, 1), (False, 2), (False, 3)]
    assert [is_ask_id(ask_id, mode) for ask_id, _ in outcome["asked"]] == [True] * 3
    assert len({ask_id for ask_id, _ in outcome["asked"]}) == (1 if mode == "auto" else 3)
    for (_, _, effect, _), (_, question) in zip(cases, outcome["asked"]):
        assert effect in question.message
    assert [(c["method"], c["path"]) for c in writes_sent(platform_calls(platform))] == [
        ("POST", path) for _, _, _, path in cases]
    assert [confirmation for _, confirmation, outcome_ in recorded(tmp_path) if outcome_ == "done"] == [
        {"by": "person", "answer": "accept"}] * 3
