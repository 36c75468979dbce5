"""Easy on the model, ready for the roadmap: relative time, allow-list, prompts, org scoping, token scope."""
from __future__ import annotations

import json
import re
import time

import pytest
import requests
import responses

import kvmfleet_mcp as kv
from conftest import (API, INIT, MODERN_META, line, make_config, make_server, replies, rpc, run_server, server_env,
                      text_of)


def rfc3339(seconds_ago):
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - seconds_ago))


# -- relative time ---------------------------------------------------------------

@pytest.mark.parametrize("given,seconds", [("30m", 1800), ("24h", 86400), ("7d", 604800), ("2w", 1209600)])
@responses.activate
def test_a_relative_since_is_sent_as_an_absolute_utc_time_and_the_result_says_which(given, seconds):
    responses.add("GET", API + "/v1/audit/events", json={"items": [], "next_cursor": None})
    before = rfc3339(seconds)
    result = rpc(make_server(), "tools/call", {"name": "query_audit_log", "arguments": {"since": given}})["result"]
    after = rfc3339(seconds)
    sent = responses.calls[0].request.params["since"]
    assert before <= sent <= after and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", sent)
    assert [block["type"] for block in result["content"]] == ["text", "text"]
    assert json.loads(result["content"][0]["text"]) == {"items": [], "next_cursor": None}
    assert result["content"][1]["text"].startswith("Time window used: since=%s (%s before now); now is " % (sent, given))


@responses.activate
def test_an_absolute_time_is_sent_unchanged_with_no_window_note():
    responses.add("GET", API + "/v1/alerts/history", json={"items": []})
    result = rpc(make_server(), "tools/call", {"name": "list_alerts", "arguments": {"since": "2026-11-23T00:00:00Z"}})
    assert responses.calls[0].request.params["since"] == "2026-11-23T00:00:00Z"
    assert len(result["result"]["content"]) == 1


@pytest.mark.parametrize("bad", ["yesterday", "24", "0h", "24H", "1y", "-2h", "24h\n", "2026-11-23"])
@responses.activate
def test_a_malformed_time_is_a_tool_error_that_shows_the_accepted_forms(bad):
    result = rpc(make_server(), "tools/call", {"name": "query_audit_log", "arguments": {"since": bad}})["result"]
    text = text_of(result)
    assert result["isError"] and "%r is not in the accepted form" % bad in text
    assert "RFC 3339 (2026-11-23T08:00:00Z) or a duration back from now (30m, 24h, 7d, 2w)" in text
    assert len(responses.calls) == 0


# -- tool allow-list -----------------------------------------------------------------

def test_the_allow_list_offers_only_the_named_tools_in_table_order():
    server = make_server(KVMFLEET_MCP_TOOLS=" list_alerts, list_devices ,")
    assert [t["name"] for t in rpc(server, "tools/list")["result"]["tools"]] == ["list_devices", "list_alerts"]


@responses.activate
def test_a_tool_left_off_the_allow_list_is_unknown_and_sends_nothing():
    server = make_server(KVMFLEET_MCP_TOOLS="list_devices")
    assert rpc(server, "tools/call", {"name": "list_isos"})["error"]["code"] == kv.INVALID_PARAMS
    assert len(responses.calls) == 0


def test_a_write_tool_on_the_allow_list_still_needs_write_mode():
    assert [t.name for t in kv.advertised_tools(False, ("list_devices", "power_action"))] == ["list_devices"]
    assert [t.name for t in kv.advertised_tools(True, ("list_devices", "power_action"))] == ["list_devices",
                                                                                             "power_action"]


def test_an_unknown_name_on_the_allow_list_stops_the_start():
    with pytest.raises(kv.ConfigError, match="KVMFLEET_MCP_TOOLS names unknown tools: rm_rf"):
        make_config(KVMFLEET_MCP_TOOLS="list_devices,rm_rf")
    proc = run_server([], server_env("https://127.0.0.1:9", KVMFLEET_MCP_TOOLS="nope"), [])
    assert proc.returncode == 2 and proc.stdout == b"" and b"unknown tools: nope" in proc.stderr


# -- prompts ---------------------------------------------------------------------------

def test_every_prompt_names_only_real_tools_with_valid_arguments():
    assert len(kv.PROMPTS) == 6
    for prompt in kv.PROMPTS:
        steps = kv.prompt_steps(prompt, {})
        assert 1 <= len(steps) <= 2
        for tool, args in steps:
            kv.check_arguments(kv.TOOLS_BY_NAME[tool], args)


def test_prompts_list_and_get_in_the_legacy_era():
    server = make_server()
    listed = rpc(server, "prompts/list")["result"]["prompts"]
    assert [p["name"] for p in listed] == [p.name for p in kv.PROMPTS]
    failed = next(p for p in listed if p["name"] == "failed_logins")
    assert failed["arguments"] == [{"name": "window", "description": "How far back: 30m, 24h, 7d, 2w.",
                                    "required": False}]
    got = rpc(server, "prompts/get", {"name": "failed_logins", "arguments": {"window": "7d"}})["result"]
    assert got["description"] == "Failed logins" and got["messages"][0]["role"] == "user"
    assert got["messages"][0]["content"]["text"] == (
        "Who failed to log in during the last 7d, and how often?\nAnswer it with these KVM Fleet tool calls, then "
        'summarise what they return:\n1. query_audit_log {"action": "auth.login", "outcome": "failure", "since": "7d", '
        '"count_by": "actor"}')


def test_prompts_in_the_2026_era_carry_cache_hints():
    server = make_server(initialize=None)
    result = rpc(server, "prompts/list", {"_meta": MODERN_META})["result"]
    assert result["resultType"] == "complete" and result["ttlMs"] == kv.LIST_TTL_MS and len(result["prompts"]) == 6


@pytest.mark.parametrize("params", [
    {"name": "nope"}, {"name": "failed_logins", "arguments": {"window": "yesterday"}},
    {"name": "failed_logins", "arguments": {"colour": "red"}}, {"name": "nis2_snapshot", "arguments": {"period": 202611}},
    {"name": "nis2_snapshot", "arguments": {"period": "2026-13"}},
])
def test_an_unknown_prompt_or_a_bad_argument_is_minus_32602(params):
    assert rpc(make_server(), "prompts/get", params)["error"]["code"] == kv.INVALID_PARAMS


def test_a_prompt_whose_tools_are_not_offered_is_not_offered_either():
    server = make_server(KVMFLEET_MCP_TOOLS="list_devices,list_alerts,verify_audit_integrity")
    assert [p["name"] for p in rpc(server, "prompts/list")["result"]["prompts"]] == ["fleet_status", "overnight_alerts"]


def test_every_seed_question_is_answered_by_the_real_server_in_at_most_two_calls(platform):
    names = [p.name for p in kv.PROMPTS]
    lines = [line({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": INIT})]
    lines += [line({"jsonrpc": "2.0", "id": n, "method": "prompts/get", "params": {"name": name}})
              for n, name in enumerate(names, 1)]
    out = {m["id"]: m for m in replies(run_server(lines, server_env(platform.url, "kvmf_demo_viewer")).stdout)}
    calls, owner = [], []
    for n, name in enumerate(names, 1):
        text = out[n]["result"]["messages"][0]["content"]["text"]
        steps = re.findall(r"^\d\. (\w+) (\{.*\})$", text, re.M)
        assert 1 <= len(steps) <= 2, (name, text)
        for tool, args in steps:
            calls.append({"name": tool, "arguments": json.loads(args)})
            owner.append(name)
    lines = [lines[0]] + [line({"jsonrpc": "2.0", "id": n, "method": "tools/call", "params": c})
                          for n, c in enumerate(calls, 1)]
    answers = {m["id"]: m["result"] for m in replies(run_server(lines, server_env(platform.url, "kvmf_demo_viewer")).stdout)}
    for n, name in enumerate(owner, 1):
        assert not answers[n].get("isError"), (name, answers[n])
        data = json.loads(answers[n]["content"][0]["text"])
        assert data.get("items") or data.get("ok") or data.get("head_hash") or data.get("controls") or (
            data.get("complete") and data.get("counts")), (name, data)
    nis2 = json.loads(answers[owner.index("nis2_snapshot") + 1]["content"][0]["text"])
    assert nis2["dropped_controls"] == ["NIS2-21.2.i"]
    logins = json.loads(answers[owner.index("failed_logins") + 1]["content"][0]["text"])
    day_ago = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 86400))
    failed = [e for e in platform.events if e["action"] == "auth.login" and e["outcome"] == "failure"
              and e["ts"] >= day_ago]
    assert logins["counts"] and logins["total"] == len(failed) > 0


# -- MSP org scoping -------------------------------------------------------------------------

@responses.activate
def test_the_org_header_goes_on_every_call_including_the_scope_probe():
    responses.add("GET", API + "/v1/tokens/current", status=404)
    responses.add("GET", API + "/v1/devices", json={"items": []})
    server = kv.Server(make_config(KVMFLEET_ORG_ID="org_customer_a", KVMFLEET_MCP_ALLOW_WRITES="true"))
    rpc(server, "initialize", INIT, id=0)
    rpc(server, "tools/call", {"name": "list_devices"})
    assert [c.request.headers["x-kvmfleet-org-id"] for c in responses.calls] == ["org_customer_a"] * 2


def test_the_model_cannot_switch_org_with_a_tool_argument():
    # Security: no argument reaches the org header; an extra one is refused outright.
    result = rpc(make_server(KVMFLEET_ORG_ID="org_customer_a"), "tools/call",
                 {"name": "list_devices", "arguments": {"x-kvmfleet-org-id": "org_other"}})["result"]
    assert result["isError"] and "Additional properties are not allowed" in text_of(result)


@pytest.mark.parametrize("bad", ["org a", "org\r\nx-evil: 1", "../org", "ö"])
def test_an_org_id_that_could_break_a_header_stops_the_start(bad):
    with pytest.raises(kv.ConfigError, match="KVMFLEET_ORG_ID"):
        make_config(KVMFLEET_ORG_ID=bad)


def test_the_demo_platform_honours_the_org_and_check_shows_it(platform):
    proc = run_server([], server_env(platform.url, "kvmf_demo_operator", KVMFLEET_ORG_ID="org_customer_a"), ["--check"])
    assert proc.returncode == 0 and "org: org_customer_a" in proc.stdout.decode()
    assert {r["headers"]["x-kvmfleet-org-id"] for r in platform.requests} == {"org_customer_a"}
    proc = run_server([], server_env(platform.url, "kvmf_demo_operator", KVMFLEET_ORG_ID="org_evil"), ["--check"])
    assert proc.returncode == 1 and "org_forbidden" in proc.stdout.decode()


# -- token scope ---------------------------------------------------------------------------------

def write_server():
    server = kv.Server(make_config(KVMFLEET_MCP_ALLOW_WRITES="true"))
    rpc(server, "initialize", INIT, id=0)
    return server


@responses.activate
def test_a_read_only_token_hides_the_write_tools_for_the_life_of_the_process(capsys):
    responses.add("GET", API + "/v1/tokens/current", json={"scope": "read", "role": "operator"})
    server = write_server()
    assert len(responses.calls) == 0  # initialize asks nothing
    assert len(rpc(server, "tools/list")["result"]["tools"]) == 11
    assert len(rpc(server, "tools/list")["result"]["tools"]) == 11 and len(responses.calls) == 1
    assert rpc(server, "tools/call", {"name": "power_action", "arguments": {}})["error"]["code"] == kv.INVALID_PARAMS
    assert "the token is read-only (role operator, scope read): write tools stay hidden" in capsys.readouterr().err


@pytest.mark.parametrize("answer", [{"status": 404}, {"body": requests.exceptions.ReadTimeout("slow")},
                                    {"body": "<html>"}, {"json": ["not", "an", "object"]}])
@responses.activate
def test_no_answer_about_scope_leaves_the_environments_decision_and_says_so(answer, capsys):
    responses.add("GET", API + "/v1/tokens/current", **answer)
    assert len(rpc(write_server(), "tools/list")["result"]["tools"]) == 21
    assert "token scope unknown" in capsys.readouterr().err


@responses.activate
def test_the_scope_probe_is_bounded_to_a_short_wait():
    responses.add("GET", API + "/v1/tokens/current", json={"scope": "write"})
    server = write_server()
    rpc(server, "tools/list")
    assert responses.calls[0].request.req_kwargs["timeout"] == (kv.SCOPE_TIMEOUT, kv.SCOPE_TIMEOUT)


@responses.activate
def test_without_write_mode_the_scope_is_never_asked():
    rpc(make_server(), "tools/list")
    assert len(responses.calls) == 0


def test_a_read_only_token_on_the_demo_platform_sees_11_tools_and_check_shows_the_scope(platform):
    lines = [line({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": INIT}),
             line({"jsonrpc": "2.0", "id": 1, "method": "tools/list"})]
    env = server_env(platform.url, "kvmf_demo_readonly", KVMFLEET_MCP_ALLOW_WRITES="true")
    proc = run_server(lines, env)
    assert len(replies(proc.stdout)[1]["result"]["tools"]) == 11 and b"read-only" in proc.stderr
    proc = run_server([], env, ["--check"])
    assert "token: role operator, scope read" in proc.stdout.decode()
