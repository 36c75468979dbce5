"""Each tool's exact HTTP request, as the platform sees it (mocked with `responses`)."""
from __future__ import annotations

import json
import time

import pytest
import requests
import responses

import kvmfleet_mcp as kv
from conftest import API, CANARY, call, make_server, text_of

MONTH = time.strftime("%Y-%m", time.gmtime())

# tool, arguments -> method, path and query as sent, JSON body (None: no body)
CASES = [
    ("list_devices", {}, "GET", "/v1/devices", None),
    ("list_devices", {"status": "offline", "q": "pdx", "tag": "prod", "limit": 5, "cursor": "c2"},
     "GET", "/v1/devices?status=offline&q=pdx&tag=prod&limit=5&cursor=c2", None),
    ("get_device_health", {"device_id": "dev_1"}, "GET", "/v1/devices/dev_1", None),
    ("query_audit_log", {"since": "2026-11-22T08:00:00Z", "until": "2026-11-23T08:00:00+01:00",
                         "actor": "olga", "action": "auth.login", "outcome": "failure",
                         "device_id": "d1", "limit": 500, "cursor": "x"},
     "GET", "/v1/audit/events?since=2026-11-22T08%3A00%3A00Z&until=2026-11-23T08%3A00%3A00%2B01%3A00"
            "&actor=olga&action=auth.login&outcome=failure&device_id=d1&limit=500&cursor=x", None),
    ("verify_audit_integrity", {}, "GET", "/v1/audit/integrity", None),
    ("list_open_console_sessions", {"device_id": "d1", "user": "olga", "limit": 1},
     "GET", "/v1/console-sessions?open_only=true&device_id=d1&user=olga&limit=1", None),
    ("list_open_console_sessions", {}, "GET", "/v1/console-sessions?open_only=true", None),
    ("list_access_grants", {"status": "pending", "awaiting_my_approval": True},
     "GET", "/v1/access-grants?status=pending&awaiting_my_approval=true", None),
    ("list_access_grants", {"awaiting_my_approval": False}, "GET", "/v1/access-grants?awaiting_my_approval=false", None),
    ("list_alerts", {"since": "2026-11-23T00:00:00Z", "status": "firing", "severity": "critical", "device_id": "d"},
     "GET", "/v1/alerts/history?since=2026-11-23T00%3A00%3A00Z&status=firing&severity=critical&device_id=d", None),
    ("list_policies", {}, "GET", "/v1/policies", None),
    ("list_isos", {}, "GET", "/v1/isos", None),
    ("get_audit_chain_head", {}, "GET", "/v1/audit/head", None),
    ("get_compliance_score", {"framework": "nis2"}, "POST", "/v1/reports/nis2", {"period": MONTH}),
    ("get_compliance_score", {"framework": "nis2", "period": "2026-10"}, "POST", "/v1/reports/nis2", {"period": "2026-10"}),
    ("power_action", {"device_id": "dev_1", "action": "on"}, "POST", "/v1/devices/dev_1/power", {"action": "on"}),
    ("power_action", {"device_id": "dev_1", "action": "reboot"}, "POST", "/v1/devices/dev_1/power", {"action": "reboot"}),
    ("power_action", {"device_id": "dev_1", "action": "cycle", "confirm": True},
     "POST", "/v1/devices/dev_1/power", {"action": "cycle"}),
    ("power_action", {"device_id": "dev_1", "action": "off_hard", "confirm": True},
     "POST", "/v1/devices/dev_1/power", {"action": "off_hard"}),
    ("request_access", {"device_id": "dev_1", "reason": "kernel patching", "duration_minutes": 60, "ticket": "CHG-1"},
     "POST", "/v1/devices/dev_1/access-requests", {"reason": "kernel patching", "duration_minutes": 60, "ticket": "CHG-1"}),
    ("approve_access", {"grant_id": "gr_1", "comment": "ok"}, "POST", "/v1/access-grants/gr_1:approve", {"comment": "ok"}),
    ("approve_access", {"grant_id": "gr_1"}, "POST", "/v1/access-grants/gr_1:approve", {}),
    ("deny_access", {"grant_id": "gr_1", "reason": "no"}, "POST", "/v1/access-grants/gr_1:deny", {"reason": "no"}),
    ("revoke_access", {"grant_id": "gr_1", "confirm": True}, "POST", "/v1/access-grants/gr_1:revoke", {}),
    ("mount_iso", {"device_id": "dev_1", "iso_id": "iso_2", "confirm": True},
     "POST", "/v1/devices/dev_1/iso:mount", {"iso_id": "iso_2"}),
    ("unmount_iso", {"device_id": "dev_1"}, "POST", "/v1/devices/dev_1/iso:unmount", {}),
    ("end_console_session", {"session_id": "cs_1", "reason": "idle", "confirm": True},
     "POST", "/v1/console-sessions/cs_1:end", {"reason": "idle"}),
    ("acknowledge_alert", {"alert_id": "al_1", "note": "on it"}, "POST", "/v1/alerts/history/al_1/acknowledge", {"note": "on it"}),
    ("resolve_alert", {"alert_id": "al_1"}, "POST", "/v1/alerts/history/al_1/resolve", {}),
]


def test_every_tool_has_a_request_case():
    assert {case[0] for case in CASES} == set(kv.TOOLS_BY_NAME)


@pytest.mark.parametrize("name,args,method,path,body", CASES, ids=[c[0] for c in CASES])
@responses.activate
def test_tool_sends_exactly_this_request(name, args, method, path, body):
    responses.add(method, API + path.split("?")[0], json={"ok": True}, status=200)
    server = make_server(writes=True)
    result = call(server, name, **args)
    assert not result.get("isError"), result
    assert json.loads(text_of(result)) == {"ok": True}
    (sent,) = [c.request for c in responses.calls]
    assert sent.method == method
    assert sent.url == API + path
    assert sent.headers["Authorization"] == "Bearer " + CANARY
    assert sent.headers["Accept"] == "application/json"
    assert sent.headers["x-kvmfleet-mcp-client"] == "kvmfleet-mcp/%s (pytest/1.0)" % kv.__version__
    assert sent.headers["User-Agent"] == "kvmfleet-mcp/%s" % kv.__version__
    if body is None:
        assert sent.body is None
    else:
        assert sent.headers["Content-Type"] == "application/json"
        assert json.loads(sent.body) == body


@responses.activate
def test_the_base_url_may_end_with_a_slash():
    responses.add("GET", "https://kvmfleet.test/api/v1/isos", json={"items": []})
    server = kv.Server(kv.Config.from_env({"KVMFLEET_API": "https://kvmfleet.test/api/", "KVMFLEET_TOKEN": "t"}))
    server.handle({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {"protocolVersion": "2025-11-25"}})
    assert json.loads(text_of(call(server, "list_isos"))) == {"items": []}
    assert responses.calls[0].request.url == "https://kvmfleet.test/api/v1/isos"


@pytest.mark.parametrize("hostile", ["a/b", "../x", "a?b=1", "a#b", "a%2Fb", "a\nb", "a b", ".", "..", ""])
@responses.activate
def test_hostile_ids_are_refused_before_any_request(hostile):
    server = make_server(writes=True)
    result = call(server, "get_device_health", device_id=hostile)
    assert result["isError"] and "Invalid arguments for get_device_health" in text_of(result)
    assert len(responses.calls) == 0


@pytest.mark.parametrize("hostile,segment", [
    ("a/b", "a%2Fb"), ("../x", "..%2Fx"), ("a?b", "a%3Fb"), ("a#b", "a%23b"), ("a%2Fb", "a%252Fb"),
    ("a\nb", "a%0Ab"), ("gr_1:approve", "gr_1%3Aapprove"), ("a\x00b", "a%00b"),
])
def test_path_traversal_and_verb_forging_cannot_leave_the_id_segment(hostile, segment):
    # Security: the second guard behind the id pattern.
    assert kv.build_path("/v1/access-grants/{grant_id}:revoke", {"grant_id": hostile}) == \
        "/v1/access-grants/%s:revoke" % segment


@pytest.mark.parametrize("collapsing", ["", ".", ".."])
def test_ids_that_url_libraries_collapse_are_refused_even_past_the_schema(collapsing):
    # Security: requests would turn /v1/devices/.. into /v1/; the second guard refuses it.
    with pytest.raises(kv.ToolError, match="is not an id"):
        kv.build_path("/v1/devices/{device_id}/power", {"device_id": collapsing})


@responses.activate
def test_an_id_with_a_colon_cannot_forge_another_verb():
    responses.add("POST", API + "/v1/access-grants/gr_1%3Arevoke:approve", json={})
    server = make_server(writes=True)
    call(server, "approve_access", grant_id="gr_1:revoke")
    assert responses.calls[0].request.url == API + "/v1/access-grants/gr_1%3Arevoke:approve"


@responses.activate
def test_platform_refusal_reaches_the_model_verbatim():
    body = {"error": {"code": "four_eyes", "message": "4-eyes policy: olga cannot approve their own request"}}
    responses.add("POST", API + "/v1/access-grants/gr_1:approve", json=body, status=403)
    result = call(make_server(writes=True), "approve_access", grant_id="gr_1")
    assert result["isError"] is True
    text = text_of(result)
    assert text.startswith("KVM Fleet refused POST /v1/access-grants/gr_1:approve: HTTP 403 Forbidden\n")
    assert json.loads(text.split("\n", 1)[1]) == body


@responses.activate
def test_a_long_error_body_is_cut_and_says_so():
    responses.add("GET", API + "/v1/isos", body="<html>" + "x" * 10000, status=502)
    text = text_of(call(make_server(), "list_isos"))
    assert "HTTP 502" in text and "<html>" in text
    assert text.endswith("[... %d more characters not shown]" % (10006 - kv.MAX_ERROR_TEXT))


@responses.activate
def test_redirect_is_not_followed_and_names_the_target_host():
    responses.add("GET", API + "/v1/devices", status=302, headers={"Location": "https://evil.example/steal"})
    responses.add("GET", "https://evil.example/steal", json={})
    result = call(make_server(), "list_devices")
    assert result["isError"]
    assert "redirect to evil.example" in text_of(result) and "not followed" in text_of(result)
    assert [c.request.url for c in responses.calls] == [API + "/v1/devices"]


@responses.activate
def test_success_with_a_body_that_is_not_json_is_a_tool_error():
    responses.add("GET", API + "/v1/policies", body="<html>login</html>", status=200)
    result = call(make_server(), "list_policies")
    assert result["isError"] and "body is not JSON" in text_of(result) and "<html>login" in text_of(result)


@responses.activate
def test_success_with_no_body_says_so():
    responses.add("POST", API + "/v1/devices/d1/iso:unmount", status=204)
    result = call(make_server(writes=True), "unmount_iso", device_id="d1")
    assert not result.get("isError") and json.loads(text_of(result)) == {"status": 204, "body": None}


@responses.activate
def test_results_keep_unicode_intact_and_are_made_compact_only_when_something_is_hidden():
    body = '{ "name" : "Küche-日本-🖥" ,\n "n": 1 }'
    responses.add("GET", API + "/v1/devices/d1", body=body, content_type="application/json")
    responses.add("GET", API + "/v1/devices/d2", body=body.replace("Küche", "K\u200bche"), content_type="application/json")
    assert text_of(call(make_server(), "get_device_health", device_id="d1")) == body
    assert text_of(call(make_server(), "get_device_health", device_id="d2")) == '{"name":"K\\u200bche-日本-🖥","n":1}'


@responses.activate
def test_connection_failure_is_a_tool_error_that_says_what_is_known():
    responses.add("GET", API + "/v1/isos", body=requests.exceptions.ConnectionError("refused"))
    responses.add("POST", API + "/v1/devices/d1/power", body=requests.exceptions.ReadTimeout("slow"))
    server = make_server(writes=True)
    text = text_of(call(server, "list_isos"))
    assert "could not connect to KVM Fleet at %s" % API in text and "safe to retry" in text
    text = text_of(call(server, "power_action", device_id="d1", action="on"))
    assert "got no answer within 30 s" in text and "not known whether KVM Fleet acted" in text


@responses.activate
def test_oversized_answer_is_not_read_to_the_end(monkeypatch):
    monkeypatch.setattr(kv, "MAX_BODY_BYTES", 1000)
    responses.add("GET", API + "/v1/isos", body="[" + "1," * 2000 + "1]")
    result = call(make_server(), "list_isos")
    assert result["isError"] and "with more than 0 MiB; it was not read to the end" in text_of(result)


@responses.activate
def test_client_info_cannot_inject_a_header():
    # Security: clientInfo is the client's word; it must not add header lines or break the request.
    responses.add("GET", API + "/v1/isos", json={})
    server = kv.Server(kv.Config.from_env({"KVMFLEET_API": API, "KVMFLEET_TOKEN": CANARY}))
    server.handle({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25",
        "clientInfo": {"name": "evil\r\nX-Injected: 1", "version": ["not", "a", "string"]}}})
    assert not call(server, "list_isos").get("isError")
    sent = responses.calls[0].request.headers
    assert sent["x-kvmfleet-mcp-client"] == "kvmfleet-mcp/%s (evilX-Injected: 1/unknown)" % kv.__version__
    assert "X-Injected" not in sent
