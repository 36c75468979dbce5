"""Fleet-sized questions in a few kilobytes: fields and count_by, checked against the platform's own data.

The counts are compared with the demo platform's in-memory fleet (its truth), never with the server's
answer; bad fields or count_by never reach the platform; a count says when a bound stopped it.
"""
from __future__ import annotations

import json
import time
from collections import Counter
from typing import Any, Dict, Iterator, List

import pytest
import responses

import kvmfleet_mcp as kv
from conftest import API, INIT, line, make_server, replies, rpc, run_server, server_env, text_of
from demo_platform import DemoPlatform

VIEWER = "kvmf_demo_viewer"
PAGED = ["list_devices", "query_audit_log", "list_open_console_sessions", "list_access_grants", "list_alerts"]


@pytest.fixture(scope="module")
def fleet() -> Iterator[DemoPlatform]:
    with DemoPlatform(devices=20_000, events=30_000) as platform:
        yield platform


def ask(platform: DemoPlatform, *calls: Dict[str, Any], **env: str) -> List[Dict[str, Any]]:
    """The real process, over stdio: initialize, then these tools/call; their results in order."""
    lines = [line({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": INIT})]
    lines += [line({"jsonrpc": "2.0", "id": n, "method": "tools/call", "params": c}) for n, c in enumerate(calls, 1)]
    out = replies(run_server(lines, server_env(platform.url, VIEWER, **env), timeout=120).stdout)
    return [m["result"] for m in out[1:]]


def paging(platform: DemoPlatform) -> List[Dict[str, Any]]:
    """The list requests the platform has seen since the last reset, as (path, query)."""
    return [r for r in platform.requests if r["path"] != "/v1/tokens/current"]


# -- the seed's question at fleet size ------------------------------------------------------------


def test_how_many_devices_and_which_are_offline_takes_two_calls_and_under_12000_characters_at_20000(fleet):
    fleet.requests.clear()
    steps = kv.prompt_steps(kv.PROMPTS[0], {})
    assert kv.PROMPTS[0].name == "fleet_status" and len(steps) == 2
    counted, offline = ask(fleet, *[{"name": tool, "arguments": args} for tool, args in steps])
    texts = [text_of(counted), text_of(offline)]
    assert sum(map(len, texts)) < 12_000, [len(t) for t in texts]
    # The platform's own truth, not the server's answer.
    truth = Counter(device["status"] for device in fleet.devices.values())
    count = json.loads(texts[0])
    assert count == {"total": len(fleet.devices), "count_by": "status", "counts": dict(truth.most_common()),
                     "complete": True, "pages_read": (len(fleet.devices) + 499) // 500}
    listed = json.loads(texts[1])["items"]
    assert [(d["id"], d["name"]) for d in listed] == [
        (d["id"], d["name"]) for d in fleet.devices.values() if d["status"] == "offline"]
    assert all(set(d) == {"id", "name"} for d in listed)


def test_failed_logins_in_the_last_24_hours_counted_by_actor_are_exact_on_30000_events(fleet):
    now = time.time()
    [result] = ask(fleet, {"name": "query_audit_log", "arguments": {
        "action": "auth.login", "outcome": "failure", "since": "24h", "count_by": "actor"}})
    since = json.loads(result["content"][0]["text"])
    window = result["content"][1]["text"]
    start = window.split("since=")[1].split(" ")[0]
    assert start == time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now - 86400)) or abs(
        time.mktime(time.strptime(start, "%Y-%m-%dT%H:%M:%SZ")) - time.mktime(time.gmtime(now - 86400))) <= 5
    truth = Counter(e["actor"] for e in fleet.events
                    if e["action"] == "auth.login" and e["outcome"] == "failure" and e["ts"] >= start)
    assert sum(truth.values()) > 100 and len(truth) > 10
    assert since["complete"] is True and since["total"] == sum(truth.values()) and since["counts"] == dict(truth)
    assert list(since["counts"].values()) == sorted(truth.values(), reverse=True)  # most first


def test_every_page_of_a_count_carries_the_same_filters_and_the_previous_cursor(fleet):
    fleet.requests.clear()
    [result] = ask(fleet, {"name": "list_devices", "arguments": {"q": "fra", "status": "online", "count_by": "site"}})
    pages = paging(fleet)
    assert len(pages) == json.loads(text_of(result))["pages_read"] > 1
    for n, page in enumerate(pages):
        query = {k: v[0] if isinstance(v, list) else v for k, v in page["query"].items()}
        cursor = query.pop("cursor", None)
        assert query == {"q": "fra", "status": "online", "limit": "500"}
        assert (cursor is None) == (n == 0)
    truth = Counter(d["site"] for d in fleet.devices.values()
                    if d["status"] == "online" and ("fra" in d["name"].lower() or "fra" in d["host"].lower()))
    assert json.loads(text_of(result))["counts"] == dict(truth.most_common())


# -- fields ------------------------------------------------------------------------------------------


def test_fields_keep_only_the_named_fields_of_each_item_and_always_the_id(platform):
    [result] = ask(platform, {"name": "list_devices", "arguments": {"fields": ["name", "status"], "limit": 3}})
    page = json.loads(text_of(result))
    assert [set(item) for item in page["items"]] == [{"id", "name", "status"}] * 3
    assert page["next_cursor"]  # the rest of the page is kept as the platform sent it
    assert "fields" not in platform.requests[-1]["query"] and "count_by" not in platform.requests[-1]["query"]


def test_fields_are_applied_before_the_result_cap_so_500_names_fit_where_500_devices_do_not(fleet):
    full, named = ask(fleet, {"name": "list_devices", "arguments": {"limit": 500}},
                      {"name": "list_devices", "arguments": {"limit": 500, "fields": ["name"]}})
    assert json.loads(text_of(full))["_truncated"]["items_shown"] < 500
    page = json.loads(text_of(named))
    assert len(page["items"]) == 500 and "_truncated" not in page


@pytest.mark.parametrize("arguments,said", [
    ({"fields": "name"}, "'name' is not of type 'array'"),
    ({"fields": []}, "should be non-empty"),
    ({"fields": ["name", "name"]}, "has non-unique elements"),
    ({"fields": ["f%d" % n for n in range(17)]}, "is too long"),
    ({"fields": ["na-me"]}, "'na-me' is not in the accepted form"),
    ({"fields": ["x" * 65]}, "is not in the accepted form"),
    ({"count_by": ""}, "'' is not in the accepted form"),
    ({"count_by": ["status"]}, "is not of type 'string'"),
    ({"count_by": "status\n"}, "is not in the accepted form"),
    ({"count_by": "status", "cursor": "c1"}, "count_by reads every page itself; give no cursor"),
])
def test_bad_fields_or_count_by_are_refused_and_never_reach_the_platform(platform, arguments, said):
    for tool in PAGED:
        [result] = ask(platform, {"name": tool, "arguments": arguments})
        assert result["isError"] is True and text_of(result).startswith("Invalid arguments for " + tool), result
        assert said in text_of(result) or said.replace("should be non-empty", "is too short") in text_of(result)
    assert platform.requests == []


# -- count_by: what it counts, its bounds, its faults ----------------------------------------------------


@responses.activate
def test_a_string_counts_under_itself_and_anything_else_under_its_compact_json():
    responses.add("GET", API + "/v1/alerts/history", json={"items": [
        {"id": "a", "v": "x"}, {"id": "b", "v": 1}, {"id": "c", "v": True}, {"id": "d"}, {"id": "e", "v": None},
        {"id": "f", "v": {"k": [1, "ü"]}}, {"id": "g", "v": "1"}, "not an object"], "next_cursor": None})
    result = rpc(make_server(), "tools/call", {"name": "list_alerts", "arguments": {"count_by": "v"}})["result"]
    assert json.loads(text_of(result)) == {"total": 8, "count_by": "v", "counts": {
        "1": 2, "null": 3, "true": 1, "x": 1, '{"k":[1,"ü"]}': 1}, "complete": True, "pages_read": 1}
    assert responses.calls[0].request.params == {"limit": "500"}


def test_a_count_stopped_by_its_item_bound_says_so_how_many_it_counted_and_how_to_narrow(fleet):
    fleet.requests.clear()
    [result] = ask(fleet, {"name": "list_devices", "arguments": {"count_by": "status"}},
                   KVMFLEET_MCP_COUNT_MAX_ITEMS="1200")
    count = json.loads(text_of(result))
    assert count["complete"] is False and count["counted"] == 1200 and "total" not in count
    assert count["stopped_by"] == "KVMFLEET_MCP_COUNT_MAX_ITEMS=1200"
    assert count["to_count_all"] == "narrow the filters (e.g. status, since, device_id) and count again"
    assert [r["query"].get("limit") for r in paging(fleet)] in ([["500"], ["500"], ["200"]], ["500", "500", "200"])


@responses.activate
def test_a_count_stopped_by_the_read_timeout_says_so(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(kv.time, "monotonic", lambda: clock[0])

    def page(request: Any) -> Any:
        clock[0] += 4.0  # each page takes 4 s of a 10 s read timeout
        return 200, {}, json.dumps({"items": [{"id": "d", "status": "online"}] * 500, "next_cursor": "more"})

    responses.add_callback("GET", API + "/v1/devices", callback=page)
    result = rpc(make_server(KVMFLEET_READ_TIMEOUT="10"), "tools/call",
                 {"name": "list_devices", "arguments": {"count_by": "status"}})["result"]
    count = json.loads(text_of(result))
    assert count["complete"] is False and count["counted"] == 1500 and count["pages_read"] == 3
    assert count["stopped_by"] == "the read timeout of 10 s"


@responses.activate
def test_a_platform_error_on_a_later_page_is_verbatim_and_says_how_many_pages_were_read(waits):
    responses.add("GET", API + "/v1/devices", json={"items": [{"status": "online"}] * 500, "next_cursor": "p2"})
    responses.add("GET", API + "/v1/devices", json={"items": [{"status": "offline"}] * 500, "next_cursor": "p3"})
    responses.add("GET", API + "/v1/devices", status=403, json={"error": {"code": "policy_denied",
                                                                          "message": "outside business hours"}})
    result = rpc(make_server(), "tools/call", {"name": "list_devices", "arguments": {"count_by": "status"}})["result"]
    assert result["isError"] is True
    assert [block["text"] for block in result["content"]] == [
        'KVM Fleet refused GET /v1/devices: HTTP 403 Forbidden\n'
        '{"error": {"code": "policy_denied", "message": "outside business hours"}}',
        "Counting stopped at page 3: 2 pages (1000 items) were read before it."]
    assert [c.request.params.get("cursor") for c in responses.calls] == [None, "p2", "p3"]


@responses.activate
def test_counting_reads_are_retried_as_reads_are(waits):
    responses.add("GET", API + "/v1/devices", json={"items": [{"status": "online"}], "next_cursor": "p2"})
    responses.add("GET", API + "/v1/devices", status=503, body="busy")
    responses.add("GET", API + "/v1/devices", json={"items": [{"status": "offline"}], "next_cursor": None})
    result = rpc(make_server(), "tools/call", {"name": "list_devices", "arguments": {"count_by": "status"}})["result"]
    assert json.loads(text_of(result))["counts"] == {"offline": 1, "online": 1}
    assert waits == [kv.RETRY_BACKOFF] and len(responses.calls) == 3


@responses.activate
def test_a_count_names_at_most_200_values_and_says_how_many_more_there_were():
    responses.add("GET", API + "/v1/devices", json={"items": [{"id": "d%d" % n} for n in range(250)] + [{"id": "d0"}],
                                                    "next_cursor": None})
    result = rpc(make_server(), "tools/call", {"name": "list_devices", "arguments": {"count_by": "id"}})["result"]
    count = json.loads(text_of(result))
    assert count["total"] == 251 and len(count["counts"]) == 200 and count["values_not_shown"] == 50
    assert list(count["counts"].items())[0] == ("d0", 2)


@responses.activate
def test_in_process_fields_project_the_answer_and_a_count_keeps_every_filter_but_the_limit():
    # The same paths as the real-process tests above, in process (where mutation testing sees them).
    responses.add("GET", API + "/v1/devices", json={"items": [
        {"id": "d1", "name": "a", "site": "fra", "status": "offline"}], "next_cursor": None})
    server = make_server()
    named = rpc(server, "tools/call", {"name": "list_devices", "arguments": {"fields": ["name"], "status": "offline"}})
    assert json.loads(text_of(named["result"])) == {"items": [{"id": "d1", "name": "a"}], "next_cursor": None}
    counted = rpc(server, "tools/call", {"name": "list_devices", "arguments": {
        "count_by": "site", "status": "offline", "limit": 5}})
    assert json.loads(text_of(counted["result"]))["counts"] == {"fra": 1}
    assert [call.request.params for call in responses.calls] == [
        {"status": "offline"}, {"status": "offline", "limit": "500"}]
    cursor = rpc(server, "tools/call", {"name": "list_devices", "arguments": {"count_by": "site", "cursor": "c"}})
    assert text_of(cursor["result"]) == "Invalid arguments for list_devices: count_by reads every page itself; " \
                                        "give no cursor."


@responses.activate
@pytest.mark.parametrize("status,body", [
    (200, {"data": [{"status": "online"}]}), (403, {"items": [{"status": "x"}]}), (300, {"items": [{"status": "x"}]})])
def test_a_later_page_without_items_or_an_error_page_with_items_stops_the_count_and_is_never_counted(status, body):
    # A proxy's or a confused platform's answer is not a page: the count stops, says where, and counts nothing of it.
    responses.add("GET", API + "/v1/devices", json={"items": [{"status": "online"}], "next_cursor": "p2"})
    responses.add("GET", API + "/v1/devices", status=status, json=body)
    result = rpc(make_server(), "tools/call", {"name": "list_devices", "arguments": {"count_by": "status"}})["result"]
    assert result["isError"] is True
    assert result["content"][1:] == [
        {"type": "text", "text": "Counting stopped at page 2: 1 pages (1 items) were read before it."}]
    said = result["content"][0]["text"]
    assert result["content"][0]["type"] == "text" and (json.dumps(body) if status == 200 else "HTTP %d" % status) in said
    assert '"counts"' not in said
    assert {c.request.headers["x-kvmfleet-mcp-client"] for c in responses.calls} == {
        "kvmfleet-mcp/%s (pytest/1.0)" % kv.__version__}


@responses.activate
def test_in_process_a_count_stopped_by_its_item_bound_names_the_bound_and_how_to_narrow():
    responses.add("GET", API + "/v1/devices", json={"items": [{"status": "online"}] * 3, "next_cursor": "more"})
    result = rpc(make_server(KVMFLEET_MCP_COUNT_MAX_ITEMS="3"), "tools/call",
                 {"name": "list_devices", "arguments": {"count_by": "status"}})["result"]
    assert json.loads(text_of(result)) == {
        "counted": 3, "count_by": "status", "counts": {"online": 3}, "complete": False, "pages_read": 1,
        "stopped_by": "KVMFLEET_MCP_COUNT_MAX_ITEMS=3",
        "to_count_all": "narrow the filters (e.g. status, since, device_id) and count again"}


@responses.activate
def test_a_count_ranks_values_by_how_many_then_by_name_and_keeps_the_200_largest():
    many = [{"v": "v%03d" % n} for n in range(199) for _ in range(2)]
    ties = [{"v": "c"}] * 3 + [{"v": "b"}] * 3  # c comes first: only the ranking puts b before it
    responses.add("GET", API + "/v1/alerts/history", json={"items": ties + [{"v": "a"}] + many, "next_cursor": None})
    responses.add("GET", API + "/v1/alerts/history", json={"items": ties + many[:-2], "next_cursor": None})
    server = make_server()
    count = {"name": "list_alerts", "arguments": {"count_by": "v"}}
    kept = json.loads(text_of(rpc(server, "tools/call", count)["result"]))
    assert list(kept["counts"].items())[:3] == [("b", 3), ("c", 3), ("v000", 2)]
    assert len(kept["counts"]) == 200 and "a" not in kept["counts"] and kept["values_not_shown"] == 2
    exactly = json.loads(text_of(rpc(server, "tools/call", count, id=2)["result"]))
    assert len(exactly["counts"]) == 200 and "values_not_shown" not in exactly


@responses.activate
@pytest.mark.parametrize("body,kept", [
    ({"data": [{"id": "d1", "name": "a"}]}, {"data": [{"id": "d1", "name": "a"}]}),
    ({"items": None}, {"items": None}),
    (["not", "a", "page"], ["not", "a", "page"]),
    ({"items": [{"id": "d1", "name": "a", "site": "fra"}, "not an object", 7]},
     {"items": [{"id": "d1", "name": "a"}, "not an object", 7]}),
])
def test_fields_on_a_body_that_is_not_a_page_of_objects_pass_the_rest_on_as_it_came(body, kept):
    responses.add("GET", API + "/v1/devices", json=body)
    result = rpc(make_server(), "tools/call", {"name": "list_devices", "arguments": {"fields": ["name"]}})["result"]
    assert "isError" not in result and json.loads(text_of(result)) == kept


def test_a_bad_field_name_is_named_by_its_place_in_the_array():
    result = rpc(make_server(), "tools/call", {"name": "list_devices", "arguments": {"fields": ["name", "bad-name"]}})
    assert text_of(result["result"]).startswith(
        "Invalid arguments for list_devices at fields/1: 'bad-name' is not in the accepted form.")


def test_arguments_are_checked_under_draft_2020_12_where_the_installed_jsonschema_has_it():
    import jsonschema

    newest = getattr(jsonschema, "Draft202012Validator", None) or jsonschema.Draft7Validator
    assert type(kv._validator(kv.TOOLS[0])) is newest
