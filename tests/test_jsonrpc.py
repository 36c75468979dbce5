"""The JSON-RPC envelope, both protocol eras and the error channels, through the dispatcher."""
from __future__ import annotations

import json

import pytest
import responses

import kvmfleet_mcp as kv
from conftest import API, INIT, MODERN_META, make_config, make_server, rpc, text_of, writes_sent


def test_initialize_echoes_each_supported_legacy_version():
    for version in kv.LEGACY_VERSIONS:
        reply = rpc(make_server(initialize=None), "initialize", dict(INIT, protocolVersion=version), id=0)
        assert reply["id"] == 0
        assert reply["result"] == {
            "protocolVersion": version,
            "capabilities": {"tools": {"listChanged": False}, "prompts": {"listChanged": False}},
            "serverInfo": {"name": "kvmfleet-mcp", "title": "KVM Fleet", "version": kv.__version__},
            "instructions": kv.INSTRUCTIONS,
        }


@pytest.mark.parametrize("asked", ["2026-07-28", "2024-01-01", "2099-12-31", "draft"])
def test_initialize_with_an_unknown_version_gets_the_newest_handshake_version(asked):
    reply = rpc(make_server(initialize=None), "initialize", dict(INIT, protocolVersion=asked))
    assert reply["result"]["protocolVersion"] == "2025-11-25"


def test_initialize_without_a_version_is_invalid_params():
    assert rpc(make_server(initialize=None), "initialize", {})["error"]["code"] == kv.INVALID_PARAMS


def test_second_initialize_is_refused():
    assert rpc(make_server(), "initialize", INIT)["error"]["code"] == kv.INVALID_REQUEST


@pytest.mark.parametrize("request_id", [0, -7, 2**53, "abc", "", "0"])
def test_ids_of_every_legal_shape_are_echoed(request_id):
    assert rpc(make_server(), "ping", {}, id=request_id) == {"jsonrpc": "2.0", "id": request_id, "result": {}}


@pytest.mark.parametrize("request_id", [None, True, 1.5, [1], {"a": 1}])
def test_an_unreadable_id_is_answered_with_null(request_id):
    reply = rpc(make_server(), "ping", {}, id=request_id)
    assert reply["id"] is None and reply["error"]["code"] == kv.INVALID_REQUEST


@pytest.mark.parametrize("raw", [b"not json", b"{", b'{"a": NaN}', b"\xff\xfe{}", b"[" * 100000, b'"\xed\xa0\x80"'])
def test_parse_errors_get_minus_32700_with_null_id(raw):
    reply = json.loads(make_server().handle_line(raw))
    assert reply["id"] is None and reply["error"]["code"] == kv.PARSE_ERROR


@pytest.mark.parametrize("message", [
    {"jsonrpc": "1.0", "id": 3, "method": "ping"},
    {"id": 3, "method": "ping"},
    {"jsonrpc": "2.0", "id": 3, "method": 5},
    {"jsonrpc": "2.0", "id": 3},
])
def test_malformed_requests_get_minus_32600_with_their_id(message):
    reply = json.loads(make_server().handle_line(json.dumps(message).encode()))
    assert reply == {"jsonrpc": "2.0", "id": 3, "error": reply["error"]} and reply["error"]["code"] == kv.INVALID_REQUEST


def test_a_message_that_is_not_an_object_is_invalid_request():
    assert json.loads(make_server().handle_line(b"42"))["error"]["code"] == kv.INVALID_REQUEST


def test_params_that_are_not_an_object_are_invalid_params():
    reply = json.loads(make_server().handle_line(b'{"jsonrpc":"2.0","id":1,"method":"tools/list","params":[1]}'))
    assert reply["error"]["code"] == kv.INVALID_PARAMS


def test_unknown_method_is_minus_32601():
    reply = rpc(make_server(), "resources/list", {})
    assert reply["error"] == {"code": kv.METHOD_NOT_FOUND, "message": "Method not found: resources/list"}


@pytest.mark.parametrize("method", ["notifications/initialized", "notifications/cancelled", "whatever/else"])
def test_notifications_get_no_reply(method):
    server = make_server()
    assert server.handle_line(json.dumps({"jsonrpc": "2.0", "method": method, "params": {"requestId": 1}}).encode()) is None


def test_a_response_from_the_client_gets_no_reply():
    assert make_server().handle_line(b'{"jsonrpc":"2.0","id":9,"result":{}}') is None


def test_requests_before_initialize_are_refused_at_once_except_ping():
    server = make_server(initialize=None)
    assert rpc(server, "ping")["result"] == {}
    for method in ("tools/list", "tools/call", "server/discover"):
        assert rpc(server, method, {})["error"]["code"] == kv.INVALID_REQUEST


def test_tools_list_is_in_table_order_and_hides_writes_by_default():
    names = [t["name"] for t in rpc(make_server(), "tools/list")["result"]["tools"]]
    assert names == [t.name for t in kv.TOOLS if not t.write] and len(names) == 11


def test_tools_list_offers_all_21_when_writes_are_enabled():
    names = [t["name"] for t in rpc(make_server(writes=True), "tools/list")["result"]["tools"]]
    assert names == [t.name for t in kv.TOOLS]


@pytest.mark.parametrize("value", ["1", "TRUE", "True", "yes", " true", "true ", ""])
def test_writes_stay_hidden_unless_the_variable_is_exactly_true(value):
    assert make_config(KVMFLEET_MCP_ALLOW_WRITES=value).allow_writes is False
    assert make_config(KVMFLEET_MCP_ALLOW_WRITES="true").allow_writes is True


def test_tools_list_accepts_a_null_cursor_but_no_cursor_it_never_issued():
    server = make_server()
    assert "tools" in rpc(server, "tools/list", {"cursor": None})["result"]
    assert rpc(server, "tools/list", {"cursor": "abc"})["error"]["code"] == kv.INVALID_PARAMS


@responses.activate
def test_calling_a_hidden_write_tool_is_an_unknown_tool_and_sends_nothing():
    # Security: the write gate stops a model that calls a tool it was never shown.
    reply = rpc(make_server(writes=False), "tools/call",
                {"name": "power_action", "arguments": {"device_id": "d1", "action": "on"}})
    assert reply["error"] == {"code": kv.INVALID_PARAMS, "message": "Unknown tool: power_action"}
    assert len(responses.calls) == 0


def test_unknown_tool_is_minus_32602():
    assert rpc(make_server(), "tools/call", {"name": "rm_rf"})["error"]["code"] == kv.INVALID_PARAMS


@pytest.mark.parametrize("params", [{"name": 5}, {}, {"name": "list_isos", "arguments": [1]}])
def test_malformed_tools_call_params_are_minus_32602(params):
    assert rpc(make_server(), "tools/call", params)["error"]["code"] == kv.INVALID_PARAMS


@pytest.mark.parametrize("args,fragment", [
    ({"status": "broken"}, "at status: 'broken' is not one of"),
    ({"limit": 0}, "at limit: 0 is less than the minimum of 1"),
    ({"limit": "5"}, "at limit: '5' is not of type 'integer'"),
    ({"limit": True}, "at limit: True is not of type 'integer'"),
    ({"colour": "red"}, "Additional properties are not allowed ('colour' was unexpected)"),
])
@responses.activate
def test_bad_arguments_are_a_tool_error_the_model_can_act_on(args, fragment):
    result = rpc(make_server(), "tools/call", {"name": "list_devices", "arguments": args})["result"]
    assert result["isError"] is True and fragment in text_of(result)
    assert text_of(result).startswith("Invalid arguments for list_devices")
    assert len(responses.calls) == 0


@pytest.mark.parametrize("args", [
    {"device_id": "d1", "action": "off"},
    {"device_id": "d1", "action": "off_hard"},
    {"device_id": "d1", "action": "cycle"},
    {"device_id": "d1", "action": "cycle", "confirm": False},
])
@responses.activate
def test_power_cycle_without_confirm_writes_nothing(args):
    result = rpc(make_server(writes=True), "tools/call", {"name": "power_action", "arguments": args})["result"]
    text = text_of(result)
    assert result["isError"] and text.startswith("Not done: power_action would send power action '%s' to device d1"
                                                  % args["action"])
    assert '"confirm": true' in text and "No write was sent" in text
    assert writes_sent(responses.calls) == [] and len(responses.calls) == 3  # the preview's reads


@pytest.mark.parametrize("name,args", [
    ("revoke_access", {"grant_id": "g1"}),
    ("mount_iso", {"device_id": "d1", "iso_id": "i1"}),
    ("end_console_session", {"session_id": "s1"}),
])
@responses.activate
def test_every_destructive_tool_without_confirm_writes_nothing(name, args):
    result = rpc(make_server(writes=True), "tools/call", {"name": name, "arguments": args})["result"]
    assert result["isError"] and text_of(result).startswith("Not done: %s would " % name)
    assert writes_sent(responses.calls) == [] and len(responses.calls) >= 1


def test_confirm_must_be_a_real_boolean():
    result = rpc(make_server(writes=True), "tools/call",
                 {"name": "revoke_access", "arguments": {"grant_id": "g1", "confirm": "true"}})["result"]
    assert result["isError"] and "'true' is not of type 'boolean'" in text_of(result)


@responses.activate
def test_confirm_is_never_sent_to_the_platform():
    responses.add("POST", API + "/v1/access-grants/g1:revoke", json={})
    rpc(make_server(writes=True), "tools/call", {"name": "revoke_access", "arguments": {"grant_id": "g1", "confirm": True}})
    assert json.loads(responses.calls[0].request.body) == {}


def test_an_internal_bug_is_minus_32603_with_the_traceback_on_stderr(monkeypatch, capsys):
    server = make_server()
    monkeypatch.setitem(server._methods, "ping", lambda params, modern: 1 / 0)
    reply = rpc(server, "ping", {}, id="bug")
    assert reply["id"] == "bug" and reply["error"]["code"] == kv.INTERNAL_ERROR
    err = capsys.readouterr().err
    assert "ZeroDivisionError" in err and "Traceback" in err


# -- batches -----------------------------------------------------------------

def test_batches_are_refused_unless_2025_03_26_was_negotiated():
    for version in ("2024-11-05", "2025-06-18", "2025-11-25"):
        out = make_server(initialize=version).handle_line(b'[{"jsonrpc":"2.0","id":1,"method":"ping"}]')
        reply = json.loads(out)
        assert reply["id"] is None and reply["error"]["code"] == kv.INVALID_REQUEST


def test_a_batch_under_2025_03_26_gets_an_array_of_replies_for_its_requests():
    server = make_server(initialize="2025-03-26")
    batch = [{"jsonrpc": "2.0", "id": 1, "method": "ping"},
             {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 1}},
             {"jsonrpc": "2.0", "id": "b", "method": "nope"}, 7]
    replies = json.loads(server.handle_line(json.dumps(batch).encode()))
    assert [r["id"] for r in replies] == [1, "b", None]
    assert replies[0]["result"] == {} and replies[1]["error"]["code"] == kv.METHOD_NOT_FOUND
    assert server.handle_line(b'[{"jsonrpc":"2.0","method":"notifications/initialized"}]') is None
    assert json.loads(server.handle_line(b"[]"))["error"]["code"] == kv.INVALID_REQUEST


# -- the 2026-07-28 era --------------------------------------------------------

def modern(params=None, **meta):
    return dict(params or {}, _meta=dict(MODERN_META, **meta))


def test_discover_answers_before_any_initialize():
    reply = rpc(make_server(initialize=None), "server/discover", modern(), id="discover-1")
    assert reply["result"] == {
        "supportedVersions": ["2026-07-28", "2025-11-25", "2025-06-18", "2025-03-26", "2024-11-05"],
        "capabilities": {"tools": {}, "prompts": {}},
        "instructions": kv.INSTRUCTIONS,
        "ttlMs": kv.LIST_TTL_MS, "cacheScope": "private", "resultType": "complete",
        "_meta": {"io.modelcontextprotocol/serverInfo": {"name": "kvmfleet-mcp", "title": "KVM Fleet",
                                                         "version": kv.__version__}},
    }


def test_modern_tools_list_carries_result_type_and_cache_hints():
    result = rpc(make_server(initialize=None), "tools/list", modern())["result"]
    assert result["resultType"] == "complete" and result["ttlMs"] == kv.LIST_TTL_MS
    assert result["cacheScope"] == "private" and len(result["tools"]) == 11


@responses.activate
def test_modern_tools_call_is_stateless_and_tags_the_client_from_meta():
    responses.add("GET", API + "/v1/isos", json={"items": []})
    result = rpc(make_server(initialize=None), "tools/call", modern({"name": "list_isos"}))["result"]
    assert result["resultType"] == "complete" and json.loads(text_of(result)) == {"items": []}
    assert responses.calls[0].request.headers["x-kvmfleet-mcp-client"] == \
        "kvmfleet-mcp/%s (pytest-modern/2.0)" % kv.__version__


@pytest.mark.parametrize("version", ["1900-01-01", "2027-01-01", 2026, None])
def test_unsupported_modern_version_is_minus_32022_with_the_supported_list(version):
    reply = rpc(make_server(initialize=None), "tools/list", modern(**{"io.modelcontextprotocol/protocolVersion": version}))
    assert reply["error"]["code"] == kv.UNSUPPORTED_VERSION
    assert reply["error"]["data"]["supported"][0] == "2026-07-28"
    assert reply["error"]["data"]["requested"] == (version if isinstance(version, str) else repr(version))


def test_modern_request_without_client_capabilities_is_minus_32602():
    meta = {"io.modelcontextprotocol/protocolVersion": "2026-07-28"}
    assert rpc(make_server(initialize=None), "tools/list", {"_meta": meta})["error"]["code"] == kv.INVALID_PARAMS


def test_a_legacy_version_in_meta_asks_for_the_handshake():
    reply = rpc(make_server(initialize=None), "tools/list",
                modern(**{"io.modelcontextprotocol/protocolVersion": "2025-11-25"}))
    assert reply["error"]["code"] == kv.INVALID_REQUEST and "initialize" in reply["error"]["message"]


def test_initialize_after_modern_requests_selects_legacy_for_unstamped_requests_only():
    server = make_server(initialize=None)
    assert "result" in rpc(server, "server/discover", modern())
    assert rpc(server, "initialize", INIT)["result"]["protocolVersion"] == "2025-11-25"
    assert rpc(server, "server/discover", {})["error"]["code"] == kv.METHOD_NOT_FOUND
    assert "resultType" not in rpc(server, "tools/list", {})["result"]
    # A request stamped 2026-07-28 is still served by the 2026 rules alone.
    assert rpc(server, "server/discover", modern())["result"]["resultType"] == "complete"
    assert rpc(server, "tools/list", modern())["result"]["resultType"] == "complete"


@pytest.mark.parametrize("initialized", [None, "2025-11-25"])
def test_a_ping_stamped_2026_is_method_not_found_as_that_revision_removed_it(initialized):
    reply = rpc(make_server(initialize=initialized), "ping", modern())
    assert reply["error"] == {"code": kv.METHOD_NOT_FOUND, "message": "Method not found: ping"}


def test_an_initialize_stamped_2026_is_method_not_found_and_does_not_switch_the_process_to_legacy():
    server = make_server(initialize=None)
    reply = rpc(server, "initialize", dict(INIT, _meta=modern()["_meta"]))
    assert reply["error"] == {"code": kv.METHOD_NOT_FOUND, "message": "Method not found: initialize"}
    assert server.legacy_version is None
    assert rpc(server, "tools/list", {})["error"]["code"] == kv.INVALID_REQUEST  # still not initialized
    assert rpc(server, "tools/list", modern())["result"]["resultType"] == "complete"


def test_unstamped_ping_is_still_answered_before_and_after_initialize():
    server = make_server(initialize=None)
    assert rpc(server, "ping")["result"] == {}
    rpc(server, "initialize", INIT)
    assert rpc(server, "ping")["result"] == {}
