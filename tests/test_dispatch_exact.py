"""The exact words and shapes of the dispatcher's answers, and main() serving stdio in-process.

Covers what the other files check only loosely (an error code, a key's presence):
the full text of protocol errors (bad cursor, unknown prompt, a prompt's bad
arguments, server/discover in the legacy era), prompts/list and prompts/get
exactly as a client receives them, one tools/list entry field by field,
tools/call's argument checks (size caps, a fresh pattern cache, draft-7-only
jsonschema, fail-closed disagreement, lone surrogates, 5.0 as 5, since and
until resolved), a write's network failure with its request id, the
token-scope probe's words as --check prints them, and main() with no
arguments: the SIGTERM handler it installs, the stdin and stdout it serves,
and its quiet exit when the client goes away.
"""
from __future__ import annotations

import io
import json
import os
import signal
import sys
import types

import pytest
import requests
import responses

import kvmfleet_mcp as kv
from conftest import API, CANARY, INIT, REQUEST_ID, line, make_config, make_server, replies, rpc

CALLS_HEADER = "Answer it with these KVM Fleet tool calls, then summarise what they return:"


@pytest.fixture
def env(monkeypatch):
    """A clean environment for main(): the test API and token, no KVMFLEET_* or proxy of the developer's shell."""
    for name in list(os.environ):
        if name.startswith("KVMFLEET") or name.lower() in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("KVMFLEET_API", API)
    monkeypatch.setenv("KVMFLEET_TOKEN", CANARY)
    return monkeypatch


# -- protocol errors, word for word --------------------------------------------------------------


@pytest.mark.parametrize("method", ["tools/list", "prompts/list"])
def test_a_cursor_the_server_never_issued_is_refused_with_the_reason(method):
    reply = rpc(make_server(), method, {"cursor": "page-2"})
    assert reply["error"] == {"code": kv.INVALID_PARAMS,
                              "message": "Invalid cursor: this server lists everything on one page"}


def test_server_discover_after_a_legacy_initialize_names_both_protocols():
    reply = rpc(make_server(initialize="2025-06-18"), "server/discover", {})
    assert reply["error"] == {
        "code": kv.METHOD_NOT_FOUND,
        "message": "server/discover is a 2026-07-28 method; this process was initialized with protocol 2025-06-18"}


def test_initialize_without_a_string_protocol_version_says_what_it_needs():
    reply = rpc(make_server(initialize=None), "initialize", dict(INIT, protocolVersion=20251125))
    assert reply["error"] == {"code": kv.INVALID_PARAMS, "message": "initialize needs a string protocolVersion"}


# -- tools/call arguments --------------------------------------------------------------------------


@responses.activate
def test_a_search_text_over_its_max_length_is_refused_and_nothing_is_sent():
    # Size cap: q allows 256 characters; the fast check must refuse 257 itself, not leave it to the platform.
    responses.add("GET", API + "/v1/devices", json={"items": []})
    server = make_server()
    result = rpc(server, "tools/call", {"name": "list_devices", "arguments": {"q": "x" * 257}})["result"]
    text = result["content"][0]["text"]
    assert result["isError"] is True and len(responses.calls) == 0
    assert text.startswith("Invalid arguments for list_devices at q: 'xxx") and " is too long" in text
    assert text.endswith(". q: Search in device name or host. See the tool's inputSchema.")
    assert "isError" not in rpc(server, "tools/call", {"name": "list_devices", "arguments": {"q": "x" * 256}})["result"]
    assert responses.calls[0].request.params == {"q": "x" * 256}


@pytest.mark.parametrize("params", [{"name": 5}, {}, {"name": "list_isos", "arguments": [1]}])
def test_malformed_tools_call_params_say_what_tools_call_needs(params):
    assert rpc(make_server(), "tools/call", params)["error"] == {
        "code": kv.INVALID_PARAMS, "message": "tools/call needs a string name and an object of arguments"}


@responses.activate
def test_tools_call_with_null_arguments_is_a_call_without_arguments():
    responses.add("GET", API + "/v1/isos", json={"items": []})
    result = rpc(make_server(), "tools/call", {"name": "list_isos", "arguments": None})["result"]
    assert result == {"content": [{"type": "text", "text": '{"items": []}'}]}
    assert responses.calls[0].request.url == API + "/v1/isos"


@responses.activate
def test_a_lone_surrogate_in_an_argument_is_refused_as_invalid_unicode_and_nothing_is_sent():
    # JSON text may hold "\\ud800"; UTF-8 cannot, so it must not reach the request (or crash the reply).
    result = rpc(make_server(), "tools/call", {"name": "list_devices", "arguments": {"q": "pc\ud800"}})["result"]
    assert result == {"isError": True, "content": [{"type": "text", "text": (
        "Invalid arguments for list_devices: a string holds a lone surrogate, which is not valid Unicode.")}]}
    assert len(responses.calls) == 0


@responses.activate
def test_an_integer_given_as_5_point_0_is_sent_as_5():
    responses.add("GET", API + "/v1/devices", json={"items": []})
    responses.add("POST", API + "/v1/devices/d1/access-requests", json={"id": "g1"})
    read = {"name": "list_devices", "arguments": {"limit": 5.0, "q": "5.0"}}
    assert "isError" not in rpc(make_server(), "tools/call", read)["result"]
    assert responses.calls[0].request.params == {"q": "5.0", "limit": "5"}
    write = {"name": "request_access", "arguments": {"device_id": "d1", "reason": "patching", "duration_minutes": 60.0}}
    assert "isError" not in rpc(make_server(writes=True), "tools/call", write)["result"]
    assert responses.calls[1].request.body == b'{"reason":"patching","duration_minutes":60}'


@responses.activate
def test_a_refusal_of_a_relative_time_query_carries_no_time_window_note():
    responses.add("GET", API + "/v1/audit/events", status=403, json={"error": {"code": "forbidden"}})
    result = rpc(make_server(), "tools/call", {"name": "query_audit_log", "arguments": {"since": "24h"}})["result"]
    assert result["isError"] is True and len(result["content"]) == 1
    assert result["content"][0]["text"].startswith("KVM Fleet refused GET /v1/audit/events: HTTP 403 Forbidden")


@responses.activate
def test_a_write_that_fails_on_the_network_says_why_and_then_its_request_id():
    responses.add("POST", API + "/v1/devices/d1/access-requests", body=requests.ConnectionError("refused"))
    result = rpc(make_server(writes=True), "tools/call", {"name": "request_access", "arguments": {
        "device_id": "d1", "reason": "patching", "duration_minutes": 60}})["result"]
    key = responses.calls[0].request.headers["Idempotency-Key"]
    assert len(responses.calls) == 1 and REQUEST_ID.fullmatch(
        "Request id: %s (sent as its Idempotency-Key; quote it to find this call in KVM Fleet's audit log)." % key)
    assert result == {"isError": True, "content": [{"type": "text", "text": (
        "POST /v1/devices/d1/access-requests could not connect to KVM Fleet at %s (ConnectionError: refused). "
        "It is not known whether KVM Fleet acted on it: check with a read tool before retrying.\n"
        "Request id: %s (sent as its Idempotency-Key; quote it to find this call in KVM Fleet's audit log)."
        % (API, key))}]}


@responses.activate
def test_with_a_jsonschema_that_has_only_draft_7_a_rejection_is_still_worded(monkeypatch):
    # Debian 11's python3-jsonschema (3.2) has no Draft202012Validator; our schemas mean the same under draft 7.
    import jsonschema

    draft7_only = types.SimpleNamespace(Draft7Validator=jsonschema.Draft7Validator, exceptions=jsonschema.exceptions)
    monkeypatch.setitem(sys.modules, "jsonschema", draft7_only)
    result = rpc(make_server(), "tools/call", {"name": "list_devices", "arguments": {"limit": 0}})["result"]
    assert result == {"isError": True, "content": [{"type": "text", "text": (
        "Invalid arguments for list_devices at limit: 0 is less than the minimum of 1. limit: Items per page, "
        "1-500. See the tool's inputSchema.")}]}
    assert len(responses.calls) == 0


@responses.activate
def test_an_id_in_the_wrong_form_is_quoted_back_cut_at_100_characters():
    result = rpc(make_server(), "tools/call", {"name": "get_device_health", "arguments": {"device_id": "-" * 120}})
    assert result["result"]["content"][0]["text"] == (
        "Invalid arguments for get_device_health at device_id: '%s\n[... 22 more characters not shown] is not in the "
        "accepted form. device_id: Device id (the `id` field from list_devices, not its name). See the tool's "
        "inputSchema." % ("-" * 99))
    assert len(responses.calls) == 0


@pytest.mark.parametrize("name,arguments,text", [
    ("list_devices", {"colour": "red"},
     "Invalid arguments for list_devices: Additional properties are not allowed ('colour' was unexpected). "
     "See the tool's inputSchema."),
    ("list_devices", {"c" * 300: 1},
     "Invalid arguments for list_devices: Additional properties are not allowed ('%s\n[... 57 more characters not "
     "shown]. See the tool's inputSchema." % ("c" * 260)),
    ("get_device_health", {},
     "Invalid arguments for get_device_health: 'device_id' is a required property. See the tool's inputSchema."),
], ids=["unexpected", "unexpected-and-long", "missing"])
@responses.activate
def test_a_problem_with_the_arguments_as_a_whole_names_no_property_and_is_cut_at_300_characters(name, arguments, text):
    result = rpc(make_server(), "tools/call", {"name": name, "arguments": arguments})["result"]
    assert result == {"isError": True, "content": [{"type": "text", "text": text}]}
    assert len(responses.calls) == 0


@responses.activate
def test_a_validator_that_cannot_be_had_refuses_the_call_and_sends_nothing(monkeypatch, capsys):
    # Fail closed: without jsonschema there is no check, so there is no call.
    def broken():
        raise ImportError("No module named 'jsonschema'")

    monkeypatch.setattr(kv, "_VALIDATORS", {})
    monkeypatch.setattr(kv, "_jsonschema", broken)
    reply = rpc(make_server(), "tools/call", {"name": "list_devices", "arguments": {"limit": 5}})
    assert reply["error"] == {"code": kv.INTERNAL_ERROR, "message": "Internal error (details on the server's stderr)"}
    assert len(responses.calls) == 0
    assert "ImportError: No module named 'jsonschema'" in capsys.readouterr().err


@responses.activate
def test_the_first_call_of_a_fresh_process_builds_its_validator_once_and_uses_it(monkeypatch):
    monkeypatch.setattr(kv, "_VALIDATORS", {})
    responses.add("GET", API + "/v1/devices/d1", json={"id": "d1"})
    server = make_server()
    assert json.loads(rpc(server, "tools/call", {"name": "get_device_health",
                                                 "arguments": {"device_id": "d1"}})["result"]["content"][0]["text"]) \
        == {"id": "d1"}
    built = kv._VALIDATORS["get_device_health"]
    refused = rpc(server, "tools/call", {"name": "get_device_health", "arguments": {"device_id": "../d1"}})["result"]
    assert refused["isError"] is True and len(responses.calls) == 1
    assert refused["content"][0]["text"].startswith(
        "Invalid arguments for get_device_health at device_id: '../d1' is not in the accepted form.")
    assert kv._VALIDATORS["get_device_health"] is built and list(kv._VALIDATORS) == ["get_device_health"]


@responses.activate
def test_relative_since_and_until_are_both_resolved_against_one_now_and_said(monkeypatch):
    now = 1_790_000_000.0  # 2026-09-21T14:13:20Z
    monkeypatch.setattr(kv.time, "time", lambda: now)
    responses.add("GET", API + "/v1/audit/events", json={"items": []})
    result = rpc(make_server(), "tools/call", {"name": "query_audit_log",
                                               "arguments": {"since": "2d", "until": "90m"}})["result"]
    assert responses.calls[0].request.params == {"since": "2026-09-19T14:13:20Z", "until": "2026-09-21T12:43:20Z"}
    assert result["content"][1] == {"type": "text", "text": (
        "Time window used: since=2026-09-19T14:13:20Z (2d before now), until=2026-09-21T12:43:20Z (90m before now); "
        "now is 2026-09-21T14:13:20Z. To follow next_cursor, give these times, not the durations.")}


@responses.activate
def test_a_duration_with_a_cursor_is_refused_since_the_next_page_would_have_another_window():
    # Resolved afresh, "24h" names another second on each page: a cursor bound to the first page's filters
    # would be refused, or, worse, pages would come from two windows. Nothing is sent.
    reply = rpc(make_server(), "tools/call", {"name": "query_audit_log", "arguments": {"since": "24h", "cursor": "c2"}})
    assert reply["result"] == {"isError": True, "content": [{"type": "text", "text": (
        "Invalid arguments: since=24h is relative to now, so the next page would have other filters; with cursor, "
        "give the RFC 3339 time that the first page's 'Time window used' names.")}]}
    assert len(responses.calls) == 0


# -- tools/list ----------------------------------------------------------------------------------


def test_a_tools_list_entry_carries_name_description_schema_and_all_four_hints():
    tools = rpc(make_server(), "tools/list")["result"]["tools"]
    assert tools[1] == {
        "name": "get_device_health",
        "description": "Get one device with its health: temperatures, fans, PSUs, firmware, uptime. Reads only.",
        "inputSchema": {
            "type": "object",
            "properties": {"device_id": {
                "type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._~:@-]{0,127}$(?!\\n)",
                "description": "Device id (the `id` field from list_devices, not its name)."}},
            "additionalProperties": False,
            "required": ["device_id"]},
        "annotations": {"title": "Get device health", "readOnlyHint": True, "destructiveHint": False,
                        "idempotentHint": True, "openWorldHint": False},
    }


# -- prompts/list and prompts/get ----------------------------------------------------------------


def test_prompts_list_shows_each_prompts_title_question_calls_and_arguments():
    prompts = rpc(make_server(), "prompts/list")["result"]["prompts"]
    assert prompts[0] == {
        "name": "fleet_status", "title": "Fleet status",
        "description": "How many devices are there, and which are offline?\n%s\n"
                       '1. list_devices {"count_by": "status"}\n'
                       '2. list_devices {"status": "offline", "fields": ["name"], "limit": 500}' % CALLS_HEADER,
        "arguments": []}
    assert prompts[3] == {
        "name": "nis2_snapshot", "title": "NIS2 snapshot",
        # An empty default reads as "this month" in the question and is left out of the call.
        "description": "Generate the NIS2 snapshot for this month, with its dropped controls.\n%s\n"
                       '1. get_compliance_score {"framework": "nis2"}' % CALLS_HEADER,
        "arguments": [{"name": "period", "description": "Month as YYYY-MM; empty for the current month.",
                       "required": False}]}


def test_prompts_get_returns_one_user_text_message_with_the_numbered_calls():
    result = rpc(make_server(), "prompts/get", {"name": "audit_integrity"})["result"]
    assert result == {"description": "Audit integrity", "messages": [{"role": "user", "content": {
        "type": "text",
        "text": "Is the audit log intact, and when was its chain last anchored?\n%s\n"
                "1. verify_audit_integrity {}\n2. get_audit_chain_head {}" % CALLS_HEADER}}]}


def test_prompts_get_with_a_given_period_puts_it_in_the_question_and_the_call():
    result = rpc(make_server(), "prompts/get", {"name": "nis2_snapshot", "arguments": {"period": "2026-10"}})["result"]
    assert result["messages"][0]["content"]["text"] == (
        "Generate the NIS2 snapshot for 2026-10, with its dropped controls.\n%s\n"
        '1. get_compliance_score {"framework": "nis2", "period": "2026-10"}' % CALLS_HEADER)


def test_an_unknown_prompt_is_named_in_the_error_cut_at_100_characters():
    reply = rpc(make_server(), "prompts/get", {"name": "n" * 101})
    assert reply["error"] == {"code": kv.INVALID_PARAMS,
                              "message": "Unknown prompt: %s\n[... 1 more characters not shown]" % ("n" * 100)}
    assert rpc(make_server(), "prompts/get", {"name": "n" * 100})["error"]["message"] == "Unknown prompt: " + "n" * 100


@pytest.mark.parametrize("name,shown", [(["fleet_status"], "['fleet_status']"), ({"a": 1}, "{'a': 1}"),
                                        (None, "None"), (7, "7")])
def test_a_prompt_name_that_is_not_a_string_is_an_unknown_prompt(name, shown):
    # A list or an object as the name must not reach the dict lookup (TypeError, -32603).
    reply = rpc(make_server(), "prompts/get", {"name": name})
    assert reply["error"] == {"code": kv.INVALID_PARAMS, "message": "Unknown prompt: " + shown}


@pytest.mark.parametrize("name,arguments,message", [
    ("fleet_status", {"window": "24h"}, "fleet_status takes only these string arguments: none"),
    ("failed_logins", {"colour": "red"}, "failed_logins takes only these string arguments: window"),
    ("nis2_snapshot", {"period": 202611}, "nis2_snapshot takes only these string arguments: period"),
])
def test_a_prompt_argument_it_does_not_take_is_refused_naming_the_ones_it_does(name, arguments, message):
    reply = rpc(make_server(), "prompts/get", {"name": name, "arguments": arguments})
    assert reply["error"] == {"code": kv.INVALID_PARAMS, "message": message}


def test_a_prompt_argument_its_tool_would_refuse_is_refused_in_the_tools_words():
    reply = rpc(make_server(), "prompts/get", {"name": "failed_logins", "arguments": {"window": "yesterday"}})
    assert reply["error"] == {"code": kv.INVALID_PARAMS, "message": (
        "Invalid arguments for query_audit_log at since: 'yesterday' is not in the accepted form. since: Only "
        "items at or after this time: RFC 3339 (2026-11-23T08:00:00Z) or a duration back from now (30m, 24h, "
        "7d, 2w). See the tool's inputSchema.")}


# -- the token-scope probe, as --check prints it -------------------------------------------------


@responses.activate
def test_check_says_the_token_scope_probe_got_no_answer_and_why_cut_at_200_characters(env, capsys):
    responses.add("GET", API + "/v1/devices", json={"items": []})
    responses.add("GET", API + "/v1/tokens/current", body=requests.ConnectionError("refused " + "x" * 200))
    assert kv.main(["--check"]) == 0
    why = ("GET /v1/tokens/current could not connect to KVM Fleet at %s (ConnectionError: refused %s). "
           "A read changes nothing; it is safe to retry." % (API, "x" * 200))
    out = capsys.readouterr().out
    assert out.splitlines()[3:5] == ["token: no answer from GET /v1/tokens/current (%s" % why[:200],
                                     "[... %d more characters not shown])" % (len(why) - 200)]
    assert len(responses.calls) == 2 and responses.calls[1].request.method == "GET"


@responses.activate
def test_check_shows_a_role_and_scope_of_up_to_40_characters_and_cuts_longer_ones(env, capsys):
    responses.add("GET", API + "/v1/devices", json={"items": []})
    responses.add("GET", API + "/v1/tokens/current", json={"role": "r" * 41, "scope": "s" * 40})
    responses.add("GET", API + "/v1/tokens/current", json={"role": "r" * 40, "scope": "s" * 41})
    assert kv.main(["--check"]) == 0
    # One line, whatever the platform says: a line break in it is shown as \n, and cannot forge a line.
    assert capsys.readouterr().out.splitlines()[3] == (
        "token: role %s\\n[... 1 more characters not shown], scope %s" % ("r" * 40, "s" * 40))
    assert kv.main(["--check"]) == 0
    assert capsys.readouterr().out.splitlines()[3] == (
        "token: role %s, scope %s\\n[... 1 more characters not shown]" % ("r" * 40, "s" * 40))


@pytest.mark.parametrize("message", [{"jsonrpc": "2.0", "id": 1, "result": {}},
                                     {"jsonrpc": "2.0", "id": 1, "error": {"code": -1, "message": "no"}}])
def test_a_response_from_the_client_to_a_request_we_never_sent_gets_no_reply(message):
    assert make_server().handle(message) is None


@pytest.mark.parametrize("message,answer", [
    ({"jsonrpc": "2.0", "id": 1.5, "method": "ping"}, (None, kv.INVALID_REQUEST, "id must be a string or an integer")),
    ({"id": 7, "method": "ping"}, (7, kv.INVALID_REQUEST, 'Invalid request: need "jsonrpc": "2.0" and a string "method"')),
    ({"jsonrpc": "2.0", "id": 8, "method": "ping", "params": [1]}, (8, kv.INVALID_PARAMS, "params must be an object")),
])
def test_a_malformed_request_is_answered_with_its_id_and_the_exact_reason(message, answer):
    request_id, code, text = answer
    assert make_server().handle(message) == {"jsonrpc": "2.0", "id": request_id,
                                             "error": {"code": code, "message": text}}


@pytest.mark.parametrize("scope,said", [
    ({"json": {"scope": "read", "role": "viewer"}},
     "kvmfleet-mcp: the token is read-only (role viewer, scope read): write tools stay hidden for this process\n"),
    ({"status": 404},
     "kvmfleet-mcp: token scope unknown (GET /v1/tokens/current answered HTTP 404 without a token description); "
     "write tools follow KVMFLEET_MCP_ALLOW_WRITES\n"),
])
def test_the_token_scope_decision_is_logged_in_one_exact_line(scope, said, capsys):
    server = kv.Server(make_config(KVMFLEET_MCP_ALLOW_WRITES="true"))
    with responses.RequestsMock() as mock:
        mock.add("GET", API + "/v1/tokens/current", **scope)
        names = set(server.offered())
    assert ("power_action" in names) is (scope.get("status") == 404)
    assert capsys.readouterr().err == said


def test_a_request_line_with_nan_is_a_parse_error_naming_it():
    out = make_server().handle_line(b'{"jsonrpc":"2.0","id":1,"method":"ping","params":{"x":NaN}}')
    assert json.loads(out) == {"jsonrpc": "2.0", "id": None,
                               "error": {"code": kv.PARSE_ERROR, "message": "Parse error: NaN is not JSON"}}


# -- main() serving stdio in-process ---------------------------------------------------------------


class Stdin:
    """sys.stdin as main() sees it: .buffer, whose .raw (when it has one) is what must be served."""

    def __init__(self, data: bytes, raw: bool = True) -> None:
        self.buffer = Buffered(io.BytesIO(data)) if raw else io.BytesIO(data)  # BytesIO: no .raw


class Buffered:
    """A buffered stdin that must not be read: a thread blocked in it would hold its lock at exit."""

    def __init__(self, raw: io.BytesIO) -> None:
        self.raw = raw

    def read(self, *args):
        raise AssertionError("main() read the buffered stdin, not its raw stream")

    read1 = read


class Stdout:
    """sys.stdout as main() sees it: .buffer to write replies to, and a real file descriptor."""

    def __init__(self, fd: int, buffer) -> None:
        self.buffer = buffer
        self._fd = fd

    def fileno(self) -> int:
        return self._fd


@pytest.fixture
def stdio(env, tmp_path):
    """Install a fake stdin/stdout and record the signal handlers main() sets; returns a runner."""
    handlers: list = []
    env.setattr(kv.signal, "signal", lambda signum, handler: handlers.append((signum, handler)))
    exits: list = []
    env.setattr(kv.os, "_exit", exits.append)  # main([]) serves in place: it must never get here
    opened: list = []

    def run(data: bytes, raw: bool = True, buffer=None):
        fd = os.open(str(tmp_path / ("stdout%d" % len(opened))), os.O_RDWR | os.O_CREAT)
        opened.append(fd)
        out = Stdout(fd, buffer if buffer is not None else io.BytesIO())
        env.setattr(kv.sys, "stdin", Stdin(data, raw))
        env.setattr(kv.sys, "stdout", out)
        status = kv.main([])
        return status, out, handlers

    yield run
    for fd in opened:
        os.close(fd)
    assert exits == []


@pytest.mark.parametrize("raw", [True, False], ids=["raw-stdin", "buffered-stdin-without-raw"])
def test_main_without_arguments_serves_stdin_to_stdout_and_exits_0_at_its_end(stdio, raw):
    lines = [line({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": INIT}),
             line({"jsonrpc": "2.0", "id": 1, "method": "ping"}),
             line({"jsonrpc": "2.0", "id": 2, "method": "tools/list"})]
    status, out, handlers = stdio(b"".join(lines), raw)
    assert status == 0
    got = replies(out.buffer.getvalue())
    assert [m["id"] for m in got] == [0, 1, 2]
    assert got[0]["result"]["serverInfo"] == {"name": "kvmfleet-mcp", "title": "KVM Fleet", "version": kv.__version__}
    assert got[1] == {"jsonrpc": "2.0", "id": 1, "result": {}}
    assert len(got[2]["result"]["tools"]) == 11  # the environment's configuration: read tools only
    assert handlers == [(signal.SIGTERM, kv._leave)]


def test_sigterm_while_serving_exits_0_at_once(env):
    with pytest.raises(SystemExit) as left:
        kv._leave(signal.SIGTERM, None)
    assert left.value.code == 0


class Gone(io.BytesIO):
    """A stdout whose reader went away (or a Ctrl-C) at the first write."""

    def __init__(self, error: BaseException) -> None:
        super().__init__()
        self.error = error

    def write(self, data):  # type: ignore[override]
        raise self.error


@pytest.mark.parametrize("error", [BrokenPipeError(32, "Broken pipe"), KeyboardInterrupt()],
                         ids=["broken-pipe", "keyboard-interrupt"])
def test_when_the_client_goes_away_main_exits_0_with_stdout_pointed_at_devnull(stdio, error):
    status, out, _ = stdio(line({"jsonrpc": "2.0", "id": 1, "method": "ping"}), buffer=Gone(error))
    assert status == 0
    # Python's exit-time flush of stdout now writes to /dev/null, not to the closed pipe.
    assert os.path.samestat(os.fstat(out.fileno()), os.stat(os.devnull))


@pytest.mark.parametrize("arguments", [[], "", 0, False, [["device_id", "d1"]]])
def test_arguments_that_are_not_an_object_even_empty_ones_are_refused(arguments):
    reply = rpc(make_server(), "tools/call", {"name": "list_isos", "arguments": arguments})
    assert reply["error"] == {"code": kv.INVALID_PARAMS,
                              "message": "tools/call needs a string name and an object of arguments"}
