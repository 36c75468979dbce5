"""The demo platform at fleet size: generated devices and events, opaque cursors bound to filters, exact counts."""
from __future__ import annotations

import base64
import json
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from datetime import datetime, timedelta, timezone
from typing import Any, Dict, Iterator, List, Tuple

import pytest

import demo_platform as dp
from demo_platform import DemoPlatform

VIEWER = "kvmf_demo_viewer"
DEVICES, EVENTS = 20_000, 30_000
SEEDED_DEVICES = ["dev_r7525_nord_1", "dev_r640_nord_2", "dev_srv_pdx_3", "dev_srv_pdx_4", "dev_db_fra_1",
                  "dev_pdu_fra_1", "dev_edge_ams_2", "dev_edge_zrh_1", "dev_lab_pikvm_1"]
LIMIT_ERROR = {"error": {"code": "invalid_argument", "message": "limit must be an integer from 1 to 500"}}


@pytest.fixture(scope="module")
def big() -> Iterator[DemoPlatform]:
    with DemoPlatform(devices=DEVICES, events=EVENTS) as platform:
        yield platform


def get(platform: DemoPlatform, path: str, token: str = VIEWER, **query: Any) -> Tuple[int, Any]:
    """GET path?query over real HTTP; (status, parsed JSON body), errors included."""
    url = platform.url + path + ("?" + urllib.parse.urlencode(query) if query else "")
    request = urllib.request.Request(url, headers={"Authorization": "Bearer " + token})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def post(platform: DemoPlatform, path: str, token: str, body: Dict[str, Any]) -> Tuple[int, Any]:
    """POST a JSON body over real HTTP; (status, parsed JSON body)."""
    request = urllib.request.Request(platform.url + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Authorization": "Bearer " + token,
                                              "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def walk(platform: DemoPlatform, path: str, token: str = VIEWER, **query: Any) -> List[Dict[str, Any]]:
    """Every page of a listing, following next_cursor with the same filters; the pages' item lists."""
    pages, cursor = [], None
    while True:
        status, body = get(platform, path, token, **query, **({"cursor": cursor} if cursor else {}))
        assert status == 200, body
        assert set(body) == {"items", "next_cursor"}
        pages.append(body["items"])
        cursor = body["next_cursor"]
        if cursor is None:
            return pages
        assert len(pages) < 1000, "the listing never ends"


def ids(pages: List[List[Dict[str, Any]]]) -> List[str]:
    return [item["id"] for page in pages for item in page]


def moment(text: str) -> datetime:
    """An RFC 3339 timestamp as aware UTC, parsed independently of the platform's code."""
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(timezone.utc)


def an_error(message: str) -> Dict[str, Any]:
    return {"error": {"code": "invalid_argument", "message": message}}


# -- paging devices ----------------------------------------------------------------

def test_paging_20000_devices_by_500_visits_every_device_once_in_order_and_ends_with_a_null_cursor(big):
    pages = walk(big, "/v1/devices", limit=500)
    assert len(pages) == 41  # 20,009 devices: the 9 seeded ones, then the generated ones
    assert [len(page) for page in pages] == [500] * 40 + [9]
    assert ids(pages) == list(big.devices)
    assert len(set(ids(pages))) == DEVICES + len(SEEDED_DEVICES)
    assert ids(pages)[:9] == SEEDED_DEVICES


def test_a_listing_without_limit_pages_by_50():
    with DemoPlatform(devices=120) as platform:
        pages = walk(platform, "/v1/devices")
        assert [len(page) for page in pages] == [50, 50, 29]
        assert ids(pages) == list(platform.devices)


def test_the_limit_may_change_between_pages_while_the_filters_stay():
    with DemoPlatform(devices=300) as platform:
        status, first = get(platform, "/v1/devices", limit=7, tag="prod")
        status, second = get(platform, "/v1/devices", limit=100, tag="prod", cursor=first["next_cursor"])
        assert status == 200
        prod = [d["id"] for d in platform.devices.values() if "prod" in d["tags"]]
        assert len(prod) > 107 and [d["id"] for d in first["items"] + second["items"]] == prod[:107]


@pytest.mark.parametrize("query", [
    {"status": "offline"},
    {"status": "online", "tag": "db"},
    {"q": "FRA"},  # case-insensitive: names are lower case, some upper case
    {"q": "r750-"},
    {"q": "10.20.3."},  # lab kit known by address only
    {"tag": "edge", "status": "offline"},
    {"tag": "no-such-tag"},
])
def test_device_filters_give_exactly_the_matching_devices_in_memory_on_every_page(big, query):
    text = query.get("q", "").lower()
    expected = [d["id"] for d in big.devices.values()
                if d["status"] == query.get("status", d["status"])
                and ("tag" not in query or query["tag"] in d["tags"])
                and (text in d["name"].lower() or text in d["host"].lower())]
    pages = walk(big, "/v1/devices", limit=40, **query)
    assert bool(expected) == (query != {"tag": "no-such-tag"})
    assert ids(pages) == expected
    assert len(pages) == max(1, -(-len(expected) // 40))
    for device in (d for page in pages for d in page):
        assert device == big.devices[device["id"]]


def test_137_of_the_20000_generated_devices_are_offline_and_the_listing_finds_all_139(big):
    generated = [d for d in big.devices.values() if d["id"].startswith("dev_gen_")]
    assert len(generated) == DEVICES
    assert sum(d["status"] == "offline" for d in generated) == 137
    offline = ids(walk(big, "/v1/devices", status="offline", limit=500))
    assert offline == [d["id"] for d in big.devices.values() if d["status"] == "offline"]
    assert len(offline) == 139 and offline[:2] == ["dev_pdu_fra_1", "dev_edge_ams_2"]


def test_generated_devices_have_the_seeded_shape_and_varied_values(big):
    seeded = big.devices["dev_r7525_nord_1"]
    generated = [d for d in big.devices.values() if d["id"].startswith("dev_gen_")]
    assert all(set(d) == set(seeded) for d in generated)
    assert [d["id"] for d in generated] == ["dev_gen_%06d" % n for n in range(1, DEVICES + 1)]
    assert len({d["name"] for d in generated}) == DEVICES
    assert {d["status"] for d in generated} == {"online", "offline"}
    assert {d["kind"] for d in generated} == {"redfish", "ipmi", "pikvm", "pdu"}
    assert {d["power_state"] for d in generated} == {"on", "off", "unknown"}
    assert all(d["power_state"] == "unknown" for d in generated if d["status"] == "offline")
    assert len({tuple(d["tags"]) for d in generated}) > 20
    assert len({d["site"] for d in generated}) >= 8
    assert any(d["jit_required"] for d in generated) and any(d["mounted_iso"] for d in generated)
    assert any(re.fullmatch(r"[\d.]+", d["host"]) for d in generated)
    status, device = get(big, "/v1/devices/dev_gen_000123")
    assert status == 200 and set(device["health"]) == set(big.health["dev_r7525_nord_1"])
    assert device == dict(big.devices["dev_gen_000123"], health=big.health["dev_gen_000123"])


# -- cursors --------------------------------------------------------------------------

def test_a_cursor_is_opaque_not_a_bare_offset(big):
    status, body = get(big, "/v1/devices", limit=500)
    cursor = body["next_cursor"]
    assert not re.fullmatch(r"\d+", cursor) and "500" != cursor
    assert re.fullmatch(r"[A-Za-z0-9_-]+", cursor)


@pytest.mark.parametrize("path,first,other", [
    ("/v1/devices", {"status": "online"}, {"status": "offline"}),
    ("/v1/devices", {"status": "online"}, {}),
    ("/v1/devices", {"q": "fra"}, {"q": "fra", "tag": "prod"}),
    ("/v1/audit/events", {"action": "auth.login"}, {"action": "auth.login", "outcome": "failure"}),
    ("/v1/audit/events", {"since": "2020-01-01T00:00:00Z"}, {"since": "2020-01-01T00:00:01Z"}),
    ("/v1/audit/events", {"actor": "admin"}, {"actor": "root"}),
])
def test_a_cursor_reused_under_other_filters_is_a_400(big, path, first, other):
    status, body = get(big, path, limit=2, **first)
    cursor = body["next_cursor"]
    assert status == 200 and cursor
    assert get(big, path, limit=2, cursor=cursor, **first)[0] == 200
    status, body = get(big, path, limit=2, cursor=cursor, **other)
    assert status == 400
    assert body == an_error("cursor '%s' was issued for other filters; repeat the filters of the first page, "
                            "or start again without a cursor" % cursor)


def test_a_cursor_from_one_listing_is_a_400_on_another(big):
    cursor = get(big, "/v1/devices", limit=1)[1]["next_cursor"]
    for path in ("/v1/audit/events", "/v1/console-sessions", "/v1/access-grants", "/v1/alerts/history"):
        status, body = get(big, path, cursor=cursor)
        assert status == 400 and "was issued for other filters" in body["error"]["message"], path


def b64(raw: str) -> str:
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


@pytest.mark.parametrize("cursor", [
    "garbage", "500", "0", "c2", "!!!!", "é", "eyJv", b64("[1, 2]"), b64('{"o": 1, "n": 2}'),
    b64('{"o": -1, "n": 2, "f": "x"}'), b64('{"o": 1.5, "n": 2, "f": "x"}'), b64('{"o": true, "n": 2, "f": "x"}'),
    b64('{"o": 1, "n": 2, "f": 3}'), b64('{"o": 1, "n": 2, "f": "x", "extra": 1}'), b64("not json"),
])
def test_a_cursor_that_does_not_decode_is_a_400_naming_it(big, cursor):
    for path in ("/v1/devices", "/v1/audit/events", "/v1/access-grants"):
        status, body = get(big, path, cursor=cursor)
        assert (status, body) == (400, an_error("cursor '%s' is not valid" % cursor)), path


@pytest.mark.parametrize("limit", ["0", "501", "-1", "1000", "abc", "1.5", " 5", "0500"])
@pytest.mark.parametrize("path", ["/v1/devices", "/v1/audit/events", "/v1/console-sessions",
                                  "/v1/access-grants", "/v1/alerts/history"])
def test_a_limit_outside_1_to_500_is_a_400(big, path, limit):
    assert get(big, path, limit=limit) == (400, LIMIT_ERROR)


@pytest.mark.parametrize("limit,pages", [("1", 9), ("500", 1), ("4", 3)])
def test_limits_1_and_500_are_accepted(limit, pages):
    with DemoPlatform() as platform:
        assert len(walk(platform, "/v1/devices", limit=limit)) == pages


# -- audit events -------------------------------------------------------------------

def test_30000_generated_events_page_fully_newest_first_each_exactly_once_while_the_log_grows(big):
    before = len(big.events)
    pages = walk(big, "/v1/audit/events", limit=500)
    # Each page request appended its own audit row, yet no row repeats or goes missing.
    assert len(big.events) == before + len(pages)
    assert ids(pages) == [e["id"] for e in reversed(big.events[:before])]
    assert len(set(ids(pages))) == before >= EVENTS + 29
    stamps = [e["ts"] for page in pages for e in page]
    assert stamps == sorted(stamps, reverse=True)


def test_generated_events_span_the_week_before_start_and_keep_the_seeded_ids(big):
    generated = [e for e in big.events if e["id"].startswith("ev_gen_")]
    assert len(generated) == EVENTS
    assert [e["id"] for e in big.events if re.fullmatch(r"ev_0000\d\d", e["id"])][:29] == [
        "ev_%06d" % n for n in range(1, 30)]
    oldest, newest = moment(generated[0]["ts"]), moment(generated[-1]["ts"])
    assert dp.START - timedelta(days=7) <= oldest < dp.START - timedelta(days=6, hours=23)
    assert dp.START - timedelta(minutes=30) < newest < dp.START
    assert {e["outcome"] for e in generated} == {"success", "failure", "denied"}
    assert len({e["action"] for e in generated}) >= 10
    assert all(set(e) - {"client"} == set(big.events[0]) - {"client"} for e in generated)


def test_failed_logins_come_from_a_few_dozen_actors_a_few_of_them_with_many(big):
    failures = Counter(e["actor"] for e in big.events if e["action"] == "auth.login" and e["outcome"] == "failure")
    assert 24 <= len(failures) <= 60
    ranked = [count for _, count in failures.most_common()]
    assert ranked[0] >= 500 and ranked[0] >= 10 * ranked[len(ranked) // 2]
    assert sum(failures.values()) > 2000


WEEK = dp.START - timedelta(days=7)


@pytest.mark.parametrize("query", [
    {"since": dp._ts(dp.START - timedelta(days=3)), "action": "auth.login", "outcome": "failure"},
    {"since": dp._ts(dp.START - timedelta(days=2, seconds=0.5)), "action": "auth.login", "outcome": "failure"},
    {"since": (dp.START - timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%S.250+02:00"), "action": "auth.login",
     "outcome": "failure"},
    {"since": dp._ts(WEEK + timedelta(days=1)), "until": dp._ts(WEEK + timedelta(days=2)), "actor": "root"},
    {"until": (WEEK + timedelta(days=3)).strftime("%Y-%m-%dT%H:%M:%S.999Z"), "outcome": "denied",
     "action": "device.power"},
    {"device_id": "dev_db_fra_1"},
    {"actor": "admin", "outcome": "failure", "since": dp._ts(dp.START - timedelta(hours=12))},
])
def test_audit_filters_give_exactly_the_matching_events_in_memory(big, query):
    seen = len(big.events)
    since = moment(query["since"]) if "since" in query else None
    until = moment(query["until"]) if "until" in query else None
    expected = [e["id"] for e in reversed(big.events[:seen])
                if all(e[k] == query[k] for k in ("actor", "action", "outcome", "device_id") if k in query)
                and (since is None or moment(e["ts"]) >= since) and (until is None or moment(e["ts"]) <= until)]
    assert 0 < len(expected) < seen // 4
    assert ids(walk(big, "/v1/audit/events", limit=100, **query)) == expected


def test_since_is_inclusive_to_the_second_at_an_event_boundary(big):
    event = big.events[len(big.events) // 2]
    at = ids(walk(big, "/v1/audit/events", limit=500, since=event["ts"], actor=event["actor"]))
    seen = len(big.events)
    later = [e["id"] for e in reversed(big.events[:seen]) if e["ts"] > event["ts"] and e["actor"] == event["actor"]]
    just_after = event["ts"].replace("Z", ".000001Z")
    after = ids(walk(big, "/v1/audit/events", limit=500, since=just_after, actor=event["actor"]))
    assert event["id"] in at and event["id"] not in after
    assert after == later and len(at) > len(after) > 0


def test_audit_integrity_holds_over_the_generated_chain(big):
    status, body = get(big, "/v1/audit/integrity")
    assert status == 200
    assert body["ok"] is True and body["first_bad_event"] is None
    assert body["checked"] == len(big.events) - 1  # the integrity call's own row comes after the walk
    assert big.events[0]["prev_hash"] == dp.GENESIS_HASH
    status, head = get(big, "/v1/audit/head")
    anchor = [e for e in big.events if moment(e["ts"]) <= dp.START - timedelta(hours=2)][-1]
    assert head["anchor"]["hash"] == anchor["hash"] and head["events"] == len(big.events) - 1


def test_a_corrupted_generated_event_breaks_the_chain_there():
    with DemoPlatform(events=500) as platform:
        platform.corrupt_audit_event("ev_gen_000250")
        status, body = get(platform, "/v1/audit/integrity")
        assert body["ok"] is False and body["first_bad_event"] == "ev_gen_000250"


# -- the smaller lists, and cursors that outlive a write -----------------------------

@pytest.mark.parametrize("path,query", [
    ("/v1/devices", {}), ("/v1/devices", {"q": "pdx"}),
    ("/v1/audit/events", {"action": "auth.login"}),
    ("/v1/console-sessions", {}), ("/v1/console-sessions", {"open_only": "true"}),
    ("/v1/console-sessions", {"user": "ada.admin"}), ("/v1/console-sessions", {"device_id": "dev_srv_pdx_3"}),
    ("/v1/access-grants", {}), ("/v1/access-grants", {"status": "pending"}),
    ("/v1/access-grants", {"device_id": "dev_db_fra_1"}), ("/v1/access-grants", {"awaiting_my_approval": "true"}),
    ("/v1/alerts/history", {}), ("/v1/alerts/history", {"status": "firing"}),
    ("/v1/alerts/history", {"severity": "warning", "since": "2000-01-01T00:00:00Z"}),
    ("/v1/alerts/history", {"device_id": "dev_r7525_nord_1"}),
])
def test_every_list_pages_one_by_one_to_the_same_items_as_one_big_page(path, query):
    with DemoPlatform() as platform:
        status, whole = get(platform, path, limit=500, **query)
        assert status == 200 and whole["next_cursor"] is None and whole["items"]
        pages = walk(platform, path, limit=1, **query)
        assert [item for page in pages for item in page] == whole["items"]
        assert len(pages) == len(whole["items"])


def test_a_grant_requested_between_pages_neither_repeats_nor_skips_a_grant():
    with DemoPlatform() as platform:
        status, first = get(platform, "/v1/access-grants", limit=2)
        assert [g["id"] for g in first["items"]] == ["gr_db_migration", "gr_kernel_patch"]
        status, grant = post(platform, "/v1/devices/dev_srv_pdx_3/access-requests", "kvmf_demo_operator",
                             {"reason": "disk cleanup", "duration_minutes": 30})
        assert status == 201
        status, second = get(platform, "/v1/access-grants", limit=2, cursor=first["next_cursor"])
        assert [g["id"] for g in second["items"]] == ["gr_bios_tweak", "gr_fw_update"]
        assert second["next_cursor"] is None
        assert get(platform, "/v1/access-grants", limit=1)[1]["items"] == [grant]


def test_an_awaiting_my_approval_cursor_is_bound_to_the_caller():
    with DemoPlatform() as platform:
        for token in ("kvmf_demo_operator", "kvmf_demo_operator2"):
            post(platform, "/v1/devices/dev_srv_pdx_3/access-requests", token,
                 {"reason": "disk cleanup", "duration_minutes": 30})
        status, first = get(platform, "/v1/access-grants", "kvmf_demo_admin", limit=1, awaiting_my_approval="true")
        assert status == 200 and first["next_cursor"]
        cursor = first["next_cursor"]
        assert get(platform, "/v1/access-grants", "kvmf_demo_admin", limit=1, awaiting_my_approval="true",
                   cursor=cursor)[0] == 200
        status, body = get(platform, "/v1/access-grants", "kvmf_demo_operator", limit=1,
                           awaiting_my_approval="true", cursor=cursor)
        assert status == 400 and "was issued for other filters" in body["error"]["message"]


# -- the seeded estate stays as it was --------------------------------------------

def test_the_default_platform_answers_for_the_seeded_data_as_before():
    with DemoPlatform() as platform:
        assert list(platform.devices) == SEEDED_DEVICES
        assert [e["id"] for e in platform.events] == ["ev_%06d" % n for n in range(1, 30)]
        status, devices = get(platform, "/v1/devices")
        assert devices == {"items": [platform.devices[d] for d in SEEDED_DEVICES], "next_cursor": None}
        offline = get(platform, "/v1/devices", status="offline")[1]
        assert [d["id"] for d in offline["items"]] == ["dev_pdu_fra_1", "dev_edge_ams_2"]
        failures = get(platform, "/v1/audit/events", action="auth.login", outcome="failure")[1]["items"]
        assert [(e["id"], e["actor"]) for e in failures] == [
            ("ev_000028", "admin"), ("ev_000018", "admin"), ("ev_000017", "admin"), ("ev_000016", "admin"),
            ("ev_000012", "vic.viewer"), ("ev_000011", "vic.viewer"), ("ev_000001", "root")]
        sessions = get(platform, "/v1/console-sessions", open_only="true")[1]["items"]
        assert [s["id"] for s in sessions] == ["cs_r640_20m", "cs_pdx3_9h"]
        grants = get(platform, "/v1/access-grants", awaiting_my_approval="true")[1]["items"]
        assert [g["id"] for g in grants] == ["gr_kernel_patch"]
        alerts = get(platform, "/v1/alerts/history", status="firing")[1]["items"]
        assert [a["id"] for a in alerts] == ["al_disk_full", "al_temp_nord", "al_ams2_down"]
        head = get(platform, "/v1/audit/head")[1]
        anchor = [e for e in platform.events if moment(e["ts"]) <= dp.START - timedelta(hours=2)][-1]
        assert anchor["id"] == "ev_000022" and head["anchor"]["hash"] == anchor["hash"]
        integrity = get(platform, "/v1/audit/integrity")[1]
        assert integrity["ok"] is True and integrity["checked"] == 29 + 7


def test_the_seeded_records_are_the_same_with_a_generated_fleet_around_them():
    plain = DemoPlatform()
    sized = DemoPlatform(devices=500, events=800)
    assert list(sized.devices)[:9] == SEEDED_DEVICES
    assert all(sized.devices[d] == plain.devices[d] and sized.health[d] == plain.health[d] for d in SEEDED_DEVICES)
    assert (sized.sessions, sized.grants, sized.alerts, sized.policies, sized.isos) == (
        plain.sessions, plain.grants, plain.alerts, plain.policies, plain.isos)
    by_id = {e["id"]: e for e in sized.events}
    for event in plain.events:
        own = {k: v for k, v in event.items() if k not in ("prev_hash", "hash")}
        assert {k: v for k, v in by_id[event["id"]].items() if k not in ("prev_hash", "hash")} == own


def test_the_generated_fleet_is_the_same_on_every_build_and_after_reset():
    one, two = DemoPlatform(devices=2000, events=3000), DemoPlatform(devices=2000, events=3000)
    assert (one.devices, one.health, one.events) == (two.devices, two.health, two.events)
    target = next(d["id"] for d in one.devices.values() if d["id"].startswith("dev_gen_") and d["kind"] != "pdu"
                  and d["status"] == "online" and d["mounted_iso"] is None)
    with one:
        status, body = post(one, "/v1/devices/%s/iso:mount" % target, "kvmf_demo_operator", {"iso_id": "iso_memtest"})
        assert status == 200 and one.devices != two.devices
        one.reset()
        assert (one.devices, one.health, one.events, one.requests) == (two.devices, two.health, two.events, [])


@pytest.mark.parametrize("options", [{"devices": -1}, {"events": -5}, {"latency": -0.1}, {"devices": 1.5},
                                     {"devices": True}, {"latency": "1"}, {"latency": float("nan")},
                                     {"latency": float("inf")}])
def test_size_options_must_be_numbers_of_at_least_zero(options):
    with pytest.raises(ValueError, match="must be"):
        DemoPlatform(**options)


def test_the_size_options_are_keyword_only():
    with pytest.raises(TypeError):
        DemoPlatform("127.0.0.1", 0, False, False, 10)  # type: ignore[misc]


# -- latency (how fast the fake is, is the context benchmark's business, not a test's) ----------

def test_latency_is_slept_before_each_answer(monkeypatch):
    import demo_platform

    slept: list = []
    monkeypatch.setattr(demo_platform.time, "sleep", slept.append)
    with DemoPlatform(latency=0.25) as platform:
        for _ in range(2):
            assert get(platform, "/v1/isos")[0] == 200
    assert slept == [0.25, 0.25]
    with DemoPlatform() as platform:
        get(platform, "/v1/isos")
    assert slept == [0.25, 0.25]


# -- the command line ----------------------------------------------------------------

def run_demo(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, dp.__file__, "--port", "0", *args], stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))


def banner(proc: subprocess.Popen) -> List[str]:
    """The lines printed before serving; then stop the process."""
    lines: List[str] = []
    assert proc.stderr is not None
    try:
        for line in proc.stderr:
            lines.append(line.rstrip("\n"))
            if line.startswith("Ctrl-C"):
                break
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
    return lines


def test_the_command_line_takes_devices_events_and_latency_and_says_the_fleet_size():
    lines = banner(run_demo("--devices", "250", "--events", "400", "--latency", "0.05"))
    url = re.fullmatch(r"KVM Fleet demo platform on (http://127\.0\.0\.1:\d+)", lines[0])
    assert url, lines
    assert "fleet: 259 devices, 429 audit events, 50 ms latency per request" in lines


def test_the_command_line_without_size_flags_says_nothing_about_the_fleet():
    lines = banner(run_demo())
    assert lines[0].startswith("KVM Fleet demo platform on ") and not any(x.startswith("fleet:") for x in lines)


@pytest.mark.parametrize("flag,value", [("--devices", "-1"), ("--devices", "many"), ("--events", "1.5"),
                                        ("--latency", "-0.5"), ("--latency", "nan")])
def test_the_command_line_refuses_a_negative_or_malformed_size(flag, value):
    proc = subprocess.run([sys.executable, dp.__file__, "--port", "0", flag, value], capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 2 and ("argument %s: invalid" % flag) in proc.stderr


def test_the_module_docstring_shows_the_new_flags():
    assert dp.__doc__ is not None
    assert "[--devices N] [--events N] [--latency SECONDS]" in dp.__doc__



def test_the_command_line_on_a_busy_port_says_so_in_one_line_not_a_traceback():
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        proc = subprocess.run([sys.executable, dp.__file__, "--port", str(port)],
                              capture_output=True, timeout=30)
    assert proc.returncode == 1 and proc.stdout == b""
    assert proc.stderr.decode() == (
        "demo platform: cannot listen on 127.0.0.1:%d (Address already in use); stop what uses it, or pick another "
        "port with --port (0: any free one).\n" % port)
