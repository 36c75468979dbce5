"""Hardening, round 2: each attack of the security review, tried through the real process where it can be.

One test (or a few) per weakness, named after the attack it stops: a client flooding stdin while a person
is asked, an echoed token cut by a length bound, a token file with a second line, HTTP_PROXY / ALL_PROXY
for a plain-http API, a long reason, human mode, a planted record file, a write whose answer cannot be
handled, a result cap bypassed outside `items`, invisible characters, a trickling platform, a flood of
writes, and methods that 2026-07-28 removed.
"""
from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List

import pytest
import responses

import kvmfleet_mcp as kv
from conftest import (API, CANARY, INIT, MODERN_META, REQUEST_ID, SERVER, line, make_config, make_server,
                      replies, require, rpc, run_server, server_env, text_of, writes_sent)
import test_confirmation
from test_confirmation import ASKS, Client, asked, writes
from test_network import Loopback, no_canary_anywhere, reply, send, serve, tls, tunnel  # noqa: F401 - fixtures

CYCLE = {"device_id": "dev_srv_pdx_3", "action": "cycle"}


# -- 1. a client cannot mute the server while a person is asked -------------------------------------


def flood_then_ping(platform, size: int) -> float:
    """Seconds from writing size bytes of tiny lines, then a ping, to the ping's answer (a person is asked)."""
    c = Client(platform.url)
    try:
        c.initialize(capabilities=ASKS)
        c.call(1, "power_action", CYCLE)
        asked(c)
        started = time.monotonic()
        writer = threading.Thread(target=lambda: (c.stdin.write(b"{}\n" * (size // 3) + line(
            {"jsonrpc": "2.0", "id": "ping", "method": "ping"})), c.stdin.flush()), daemon=True)
        writer.start()
        while c.recv(timeout=120).get("id") != "ping":
            pass
        return time.monotonic() - started
    finally:
        c.kill()


def test_a_client_flooding_stdin_while_a_person_is_asked_cannot_mute_the_server(platform):
    # Security: each line put aside costs the same, however many wait (a deque and running counts).
    # Once each line cost a sum over all the others: 1 MB of tiny lines muted the server for hours.
    small, large = flood_then_ping(platform, 250_000), flood_then_ping(platform, 1_000_000)
    print("ping answered %.3f s after 250 KB, %.3f s after 1 MB of tiny lines" % (small, large))
    assert large / small < 8  # four times the lines, about four times the time; quadratic would be 16


def test_requests_put_aside_while_a_person_is_asked_are_bounded_in_number_as_well_as_in_bytes(monkeypatch):
    stdin = kv.Channel(io.BytesIO(), io.BytesIO())
    waiting = [stdin.put_aside(b"{}\n", None) for _ in range(kv.MAX_WAITING_LINES)]
    assert all(waiting) and stdin.put_aside(b"{}\n", 7) is False  # the next one is answered busy
    assert [stdin.next_line() for _ in range(2)] == [b"{}\n", b"{}\n"]
    room = kv.MAX_WAITING_BYTES - 3 * (kv.MAX_WAITING_LINES - 2)  # bytes left beside the 998 lines
    assert stdin.put_aside(b"x" * (room + 1), 8) is False  # too many bytes, though few lines
    assert stdin.put_aside(b"x" * room, 9) is True and stdin.put_aside(b"\n", 10) is False


def test_a_request_cancelled_while_it_waited_is_dropped_and_its_bytes_no_longer_count():
    channel = kv.Channel(io.BytesIO(), io.BytesIO())
    assert channel.put_aside(b'{"id":1}\n', 1) and channel.put_aside(b'{"id":"1"}\n', "1")
    channel.drop_waiting(1)  # the integer 1, not the string "1"
    assert channel.next_line() == b'{"id":"1"}\n'
    assert channel.put_aside(b"x" * kv.MAX_WAITING_BYTES, 2)  # the bound is whole again


# -- 2. an echoed token is redacted before anything is cut ---------------------------------------


def longest_token_prefix(text: str) -> int:
    """How many leading characters of the canary token the text holds (8 or more would be a leak)."""
    return max((n for n in range(1, len(CANARY) + 1) if CANARY[:n] in text), default=0)


@pytest.mark.parametrize("kept", [len(CANARY) - 1, 12])
@responses.activate
def test_an_echoed_token_cut_by_the_error_text_bound_is_still_redacted(kept):
    # A model picks q so that the 4,000-character cut falls inside the token the platform echoes:
    # cut first and redacted after, all of it but the last characters would reach the model.
    echo = "x" * (kv.MAX_ERROR_TEXT - kept) + CANARY + " and more"
    responses.add("GET", API + "/v1/devices", body=echo, status=400)
    text = text_of(rpc(make_server(), "tools/call", {"name": "list_devices", "arguments": {"q": "x"}})["result"])
    assert longest_token_prefix(text) < 8


@responses.activate
def test_an_echoed_token_in_a_preview_error_or_an_oversized_result_is_redacted_before_the_cut():
    responses.add("GET", API + "/v1/access-grants", body="y" * (300 - 5) + CANARY, status=502)
    server = make_server(writes=True)
    text = text_of(rpc(server, "tools/call", {"name": "revoke_access", "arguments": {"grant_id": "g1"}})["result"])
    assert "could not read access grant" in text and longest_token_prefix(text) < 8
    responses.add("GET", API + "/v1/devices/d1", json={"id": "d1", "echo": "z" * 49_990 + CANARY})
    text = text_of(rpc(server, "tools/call", {"name": "get_device_health", "arguments": {"device_id": "d1"}})["result"])
    assert len(text) <= 50_000 and longest_token_prefix(text) < 8


# -- 3. a token with whitespace or control characters inside ---------------------------------------


@pytest.mark.parametrize("content", [CANARY + "\n# the prod token, rotated 2026-11\n", "Bearer " + CANARY,
                                     CANARY + "\x00", CANARY + " " + CANARY])
def test_a_token_file_with_a_second_line_or_a_bearer_prefix_is_refused_at_start_without_echoing_it(
        tmp_path, content):
    token_file = tmp_path / "token"
    token_file.write_text(content)
    token_file.chmod(0o600)
    env = server_env("https://127.0.0.1:9", "", KVMFLEET_TOKEN_FILE=str(token_file))
    del env["KVMFLEET_TOKEN"]
    for args in ([], ["--check"]):
        proc = subprocess.run([sys.executable, SERVER] + args, input=line({"jsonrpc": "2.0", "id": 0,
                              "method": "initialize", "params": INIT}), capture_output=True, env=env, timeout=30)
        assert proc.returncode == 2 and proc.stdout == b""
        assert proc.stderr.decode() == (
            "kvmfleet-mcp: KVMFLEET_TOKEN_FILE=%s holds a space, a line break or a character no token has (tokens "
            "are one line, kvmf_ and letters or digits). Give the token alone: no 'Bearer ', no comment, no second "
            "line.\n" % token_file)
        assert longest_token_prefix(proc.stderr.decode()) < 8


def test_a_token_in_the_environment_with_a_line_break_is_refused_at_start_without_echoing_it():
    proc = run_server([], server_env("https://127.0.0.1:9", CANARY + "\r\nX-Injected: 1"), ["--check"])
    assert proc.returncode == 2 and b"KVMFLEET_TOKEN holds a space, a line break" in proc.stderr
    assert longest_token_prefix(proc.stderr.decode()) < 8


def test_a_token_file_that_grows_a_second_line_after_start_fails_the_call_and_sends_nothing(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(CANARY + "\n")
    token_file.chmod(0o600)
    server = make_server(KVMFLEET_TOKEN="", KVMFLEET_TOKEN_FILE=str(token_file))
    token_file.write_text(CANARY + "\nkvmf_the_old_one\n")
    with responses.RequestsMock() as mock:
        result = rpc(server, "tools/call", {"name": "list_isos", "arguments": {}})["result"]
        assert len(mock.calls) == 0
    assert result["isError"] and "holds a space, a line break" in text_of(result)
    assert longest_token_prefix(text_of(result)) < 8


def test_the_catch_all_log_line_never_carries_the_token_in_any_escaped_form(monkeypatch, capsys):
    token = "kvmf_q'uote\\back\"slash"  # noqa: S105 - a test token with characters that escape
    server = make_server(KVMFLEET_TOKEN=token)

    def explode(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("headers were %r and %s and %r" % (
            {"Authorization": "Bearer " + token}, json.dumps(token), ("Bearer " + token).encode()))

    monkeypatch.setattr(server, "_tools_list", explode)
    server._methods["tools/list"] = explode
    assert rpc(server, "tools/list")["error"]["code"] == kv.INTERNAL_ERROR
    err = capsys.readouterr().err
    assert "internal error on tools/list" in err and "RuntimeError" in err
    for form in (token, repr(token)[1:-1], json.dumps(token)[1:-1], "q'uote", "q\\'uote", "back\\\\slash"):
        assert form not in err, form


# -- 4. only HTTPS_PROXY, and never for plain http: in test_network.py, and through the real process here ---


@pytest.mark.parametrize("variable", ["HTTP_PROXY", "http_proxy", "ALL_PROXY", "HTTPS_PROXY"])
def test_the_real_process_sends_a_plain_http_loopback_platforms_token_to_no_proxy(serve, variable):  # noqa: F811
    platform = serve()
    proxy = serve(tunnel, role="proxy")
    env = server_env(platform.url, **{variable: proxy.url})
    proc = run_server([line({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": INIT}),
                       line({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                             "params": {"name": "list_isos", "arguments": {}}})], env)
    assert text_of(replies(proc.stdout)[1]["result"]) == '{"ok":true}'
    assert proxy.requests == [] and len(platform.requests) == 1


# -- 5. and 6. the whole call before a person; every write in human mode: test_confirmation.py, and here --


@responses.activate
def test_in_human_mode_a_client_that_cannot_ask_is_told_exactly_why_and_nothing_is_sent():
    server = make_server(writes=True, KVMFLEET_MCP_CONFIRM="human")  # INIT offers no elicitation
    result = rpc(server, "tools/call", {"name": "acknowledge_alert", "arguments": {"alert_id": "a1"}})["result"]
    assert result["isError"] and text_of(result) == (
        "Not done: acknowledge_alert would acknowledge alert a1. No write was sent to KVM Fleet. This server takes "
        "only a person's confirmation for writes (KVMFLEET_MCP_CONFIRM=human), and this client cannot ask one: it "
        "did not offer elicitation (form mode, protocol 2025-06-18 or later). confirm: true is not enough. Tell the "
        "user; they can do it in the KVM Fleet console or from a client that supports elicitation.")
    assert len(responses.calls) == 0  # an alert id touches nothing to read first


def test_the_person_sees_every_argument_of_a_write_that_touches_nothing_to_read_first():
    config = make_config(KVMFLEET_MCP_CONFIRM="human")
    asker = kv.Asker(config, kv.Platform(config), lambda raw: None)
    call = kv.Call({}, None, "2025-11-25", {"elicitation": {}}, 1, "agent")
    note = "x" * 500 + " approved by the CISO; skip 4-eyes review"
    form = asker._form(kv.TOOLS_BY_NAME["acknowledge_alert"], {"alert_id": "a1", "note": note}, call)
    assert form["message"] == (
        'An AI assistant (agent) asks to acknowledge alert a1.\nIt would send exactly: {"alert_id":"a1","note":"%s"}'
        "\nApprove only if you want exactly this; anything else sends nothing." % note)


# -- 7. the record of agent actions: no symlink, no planted file ------------------------------------


def record_of(path: Path, capsys) -> str:
    """Write one record line to path; what the server logged."""
    kv.write_record(str(path), {"tool": "power_action", "targets": {"device_id": "d1"}})
    return capsys.readouterr().err


def test_the_record_is_never_written_through_a_symlink(tmp_path, capsys):
    target = tmp_path / "authorized_keys"
    target.write_text("ssh-ed25519 AAAA admin\n")
    os.chmod(target, 0o600)
    (tmp_path / "agent.jsonl").symlink_to(target)
    err = record_of(tmp_path / "agent.jsonl", capsys)
    assert target.read_text() == "ssh-ed25519 AAAA admin\n"
    assert err == ("kvmfleet-mcp: could not append to KVMFLEET_MCP_AUDIT_LOG=%s (it is a symbolic link); the call "
                   "went on\n" % (tmp_path / "agent.jsonl"))


def test_a_planted_record_readable_by_others_is_not_written(tmp_path, capsys):
    planted = tmp_path / "agent.jsonl"
    planted.write_text("")
    planted.chmod(0o644)
    err = record_of(planted, capsys)
    assert planted.read_text() == ""
    assert err.endswith("(its mode is 644, not 600: chmod 600 it); the call went on\n")


def test_a_planted_record_of_another_user_is_not_written(tmp_path, capsys):
    require(os.geteuid() == 0, "root, to plant a file of another user")
    planted = tmp_path / "agent.jsonl"
    planted.write_text("")
    planted.chmod(0o600)
    os.chown(planted, 4242, 4242)
    err = record_of(planted, capsys)
    assert planted.read_text() == "" and "(it belongs to uid 4242, not to this server's user)" in err


def test_a_planted_fifo_neither_blocks_the_server_nor_takes_the_record(tmp_path, capsys):
    fifo = tmp_path / "agent.jsonl"
    os.mkfifo(fifo, 0o600)
    started = time.monotonic()
    err = record_of(fifo, capsys)
    assert time.monotonic() - started < 5 and "could not append" in err


def test_a_record_the_server_creates_is_a_private_regular_file_and_is_appended_to(tmp_path, capsys):
    path = tmp_path / "agent.jsonl"
    assert record_of(path, capsys) == "" and record_of(path, capsys) == ""
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(path.read_text().splitlines()) == 2


# -- 8. a write whose answer cannot be handled ---------------------------------------------------------


def sent_write(server: kv.Server, mock: responses.RequestsMock, record: Path) -> str:
    """unmount_iso through the dispatcher: the result's text, checked to name the one write's request id."""
    result = rpc(server, "tools/call", {"name": "unmount_iso", "arguments": {"device_id": "d1"}})["result"]
    assert result["isError"] is True
    [write] = [c for c in mock.calls if c.request.method == "POST"]
    key = write.request.headers["Idempotency-Key"]
    text = "\n".join(block["text"] for block in result["content"])
    assert key in text and REQUEST_ID.search(text)
    [entry] = [json.loads(row) for row in record.read_text().splitlines()]
    assert entry["request_id"] == key and entry["outcome"] == "error"
    return text


@pytest.mark.parametrize("headers", [{"Retry-After": "Mon, 01 Jan 99999999999999999999 00:00:00 GMT"},
                                     {"Retry-After": "Fri, 31 Dec 9999 23:59:60 GMT"}, {"Retry-After": "nan"}])
def test_an_absurd_retry_after_on_a_write_is_never_waited_for_nor_an_internal_error(tmp_path, headers, waits):
    server = make_server(writes=True, KVMFLEET_MCP_AUDIT_LOG=str(tmp_path / "r"))
    with responses.RequestsMock() as mock:
        mock.add("POST", API + "/v1/devices/d1/iso:unmount", status=503, body="busy", headers=headers)
        text = sent_write(server, mock, tmp_path / "r")
    assert "HTTP 503 Service Unavailable" in text and waits == []


def test_a_malformed_location_on_a_write_is_reported_with_its_request_id(tmp_path):
    server = make_server(writes=True, KVMFLEET_MCP_AUDIT_LOG=str(tmp_path / "r"))
    with responses.RequestsMock() as mock:
        mock.add("POST", API + "/v1/devices/d1/iso:unmount", status=302, headers={"Location": "http://[::1"})
        text = sent_write(server, mock, tmp_path / "r")
    assert "a redirect to http://[::1" in text and "not known whether KVM Fleet acted" in text


@pytest.mark.parametrize("depth", [500, 900, 990, 5000])
def test_a_deeply_nested_answer_to_a_write_is_a_tool_error_with_its_request_id(tmp_path, depth):
    server = make_server(writes=True, KVMFLEET_MCP_AUDIT_LOG=str(tmp_path / "r"))
    with responses.RequestsMock() as mock:
        mock.add("POST", API + "/v1/devices/d1/iso:unmount", body="[" * depth + "]" * depth,
                 content_type="application/json")
        result = rpc(server, "tools/call", {"name": "unmount_iso", "arguments": {"device_id": "d1"}})["result"]
        key = [c for c in mock.calls if c.request.method == "POST"][0].request.headers["Idempotency-Key"]
    assert key in json.dumps(result)
    [entry] = [json.loads(row) for row in (tmp_path / "r").read_text().splitlines()]
    assert entry["request_id"] == key


def test_anything_that_fails_after_a_write_is_sent_says_the_outcome_is_unknown_and_is_recorded(
        tmp_path, monkeypatch, capsys):
    server = make_server(writes=True, KVMFLEET_MCP_AUDIT_LOG=str(tmp_path / "r"))

    def broken(*args: Any, **kwargs: Any) -> None:
        raise MemoryError("no room for the answer")

    monkeypatch.setattr(kv, "reply_result", broken)
    with responses.RequestsMock() as mock:
        mock.add("POST", API + "/v1/devices/d1/iso:unmount", json={"ok": True})
        text = sent_write(server, mock, tmp_path / "r")
    assert text.startswith("POST /v1/devices/d1/iso:unmount: KVM Fleet's answer could not be handled (details on the "
                           "server's stderr). It is not known whether KVM Fleet acted on it: check with a read tool "
                           "before retrying.\nRequest id: ")
    assert "MemoryError: no room for the answer" in capsys.readouterr().err


def test_a_call_that_ends_in_an_internal_error_still_leaves_its_record_line(tmp_path, monkeypatch):
    server = make_server(writes=True, KVMFLEET_MCP_AUDIT_LOG=str(tmp_path / "r"))

    def broken(*args: Any) -> str:
        raise RuntimeError("a bug before anything was sent")

    monkeypatch.setattr(kv, "resolve_durations", broken)
    reply = rpc(server, "tools/call", {"name": "unmount_iso", "arguments": {"device_id": "d1"}})
    assert reply["error"]["code"] == kv.INTERNAL_ERROR
    [entry] = [json.loads(row) for row in (tmp_path / "r").read_text().splitlines()]
    assert entry["tool"] == "unmount_iso" and entry["outcome"] == "internal error"


# -- 9. no result text is longer than the cap -----------------------------------------------------------


@pytest.mark.parametrize("body", [{"items": [{"id": "d1"}], "blob": "b" * 2_000_000},
                                  {"items": [], "next_cursor": "c" * 200_000},
                                  {"blob": "\u202e" * 20_000}, ["\u200b" * 100] * 100])
@responses.activate
def test_a_body_whose_bulk_is_outside_the_items_cannot_pass_the_result_cap(body):
    responses.add("GET", API + "/v1/devices", json=body)
    server = make_server(KVMFLEET_MCP_MAX_RESULT_CHARS="50000")
    text = text_of(rpc(server, "tools/call", {"name": "list_devices", "arguments": {}})["result"])
    assert len(text) <= 50_000 and "more characters were not shown" in text


@responses.activate
def test_a_single_item_longer_than_the_cap_says_so_instead_of_advising_limit_1():
    responses.add("GET", API + "/v1/devices", json={"items": [{"id": "d1", "notes": "n" * 3000}, {"id": "d2"}],
                                                    "next_cursor": None})
    text = text_of(rpc(make_server(KVMFLEET_MCP_MAX_RESULT_CHARS="2000"), "tools/call",
                       {"name": "list_devices", "arguments": {}})["result"])
    page = json.loads(text)
    assert page["items"] == [] and page["_truncated"]["to_see_the_rest"] == (
        "even the first item is longer than that: ask for fewer fields of each with fields")


@responses.activate
def test_an_error_text_is_held_to_a_small_cap_too():
    responses.add("GET", API + "/v1/isos", status=500, body="\u2067" * 3000)  # each shown as 6 characters
    text = text_of(rpc(make_server(KVMFLEET_MCP_MAX_RESULT_CHARS="1500"), "tools/call",
                       {"name": "list_isos", "arguments": {}})["result"])
    assert len(text) == 1500 and text.startswith("KVM Fleet refused GET /v1/isos: HTTP 500")


# -- 10. every invisible character is shown ----------------------------------------------------------

# Default_Ignorable_Code_Point, from DerivedCoreProperties-15.0.0.txt (Unicode 15.0.0), verbatim.
DEFAULT_IGNORABLE = """\
00AD          ; Default_Ignorable_Code_Point # Cf       SOFT HYPHEN
034F          ; Default_Ignorable_Code_Point # Mn       COMBINING GRAPHEME JOINER
061C          ; Default_Ignorable_Code_Point # Cf       ARABIC LETTER MARK
115F..1160    ; Default_Ignorable_Code_Point # Lo   [2] HANGUL CHOSEONG FILLER..HANGUL JUNGSEONG FILLER
17B4..17B5    ; Default_Ignorable_Code_Point # Mn   [2] KHMER VOWEL INHERENT AQ..KHMER VOWEL INHERENT AA
180B..180D    ; Default_Ignorable_Code_Point # Mn   [3] MONGOLIAN FREE VARIATION SELECTOR ONE..MONGOLIAN FREE VARIATION SELECTOR THREE
180E          ; Default_Ignorable_Code_Point # Cf       MONGOLIAN VOWEL SEPARATOR
180F          ; Default_Ignorable_Code_Point # Mn       MONGOLIAN FREE VARIATION SELECTOR FOUR
200B..200F    ; Default_Ignorable_Code_Point # Cf   [5] ZERO WIDTH SPACE..RIGHT-TO-LEFT MARK
202A..202E    ; Default_Ignorable_Code_Point # Cf   [5] LEFT-TO-RIGHT EMBEDDING..RIGHT-TO-LEFT OVERRIDE
2060..2064    ; Default_Ignorable_Code_Point # Cf   [5] WORD JOINER..INVISIBLE PLUS
2065          ; Default_Ignorable_Code_Point # Cn       <reserved-2065>
2066..206F    ; Default_Ignorable_Code_Point # Cf  [10] LEFT-TO-RIGHT ISOLATE..NOMINAL DIGIT SHAPES
3164          ; Default_Ignorable_Code_Point # Lo       HANGUL FILLER
FE00..FE0F    ; Default_Ignorable_Code_Point # Mn  [16] VARIATION SELECTOR-1..VARIATION SELECTOR-16
FEFF          ; Default_Ignorable_Code_Point # Cf       ZERO WIDTH NO-BREAK SPACE
FFA0          ; Default_Ignorable_Code_Point # Lo       HALFWIDTH HANGUL FILLER
FFF0..FFF8    ; Default_Ignorable_Code_Point # Cn   [9] <reserved-FFF0>..<reserved-FFF8>
1BCA0..1BCA3  ; Default_Ignorable_Code_Point # Cf   [4] SHORTHAND FORMAT LETTER OVERLAP..SHORTHAND FORMAT UP STEP
1D173..1D17A  ; Default_Ignorable_Code_Point # Cf   [8] MUSICAL SYMBOL BEGIN BEAM..MUSICAL SYMBOL END PHRASE
E0000         ; Default_Ignorable_Code_Point # Cn       <reserved-E0000>
E0001         ; Default_Ignorable_Code_Point # Cf       LANGUAGE TAG
E0002..E001F  ; Default_Ignorable_Code_Point # Cn  [30] <reserved-E0002>..<reserved-E001F>
E0020..E007F  ; Default_Ignorable_Code_Point # Cf  [96] TAG SPACE..CANCEL TAG
E0080..E00FF  ; Default_Ignorable_Code_Point # Cn [128] <reserved-E0080>..<reserved-E00FF>
E0100..E01EF  ; Default_Ignorable_Code_Point # Mn [240] VARIATION SELECTOR-17..VARIATION SELECTOR-256
E01F0..E0FFF  ; Default_Ignorable_Code_Point # Cn [3600] <reserved-E01F0>..<reserved-E0FFF>
"""
SYSTEM_UCD = Path("/usr/share/unicode/DerivedCoreProperties.txt")  # Debian's unicode-data


def default_ignorable(text: str) -> List[int]:
    """Every code point a DerivedCoreProperties text gives the Default_Ignorable_Code_Point property."""
    points = []
    for first, last in re.findall(r"^([0-9A-F]{4,6})(?:\.\.([0-9A-F]{4,6}))?\s*; Default_Ignorable_Code_Point\b",
                                  text, re.M):
        points += range(int(first, 16), int(last or first, 16) + 1)
    return points


def shown(code: int) -> bool:
    """Whether visible() writes this character as an escape rather than as itself."""
    return chr(code) not in kv.visible("a%sb" % chr(code))


def test_every_default_ignorable_code_point_and_every_control_but_tab_and_newline_is_shown_escaped():
    points = default_ignorable(DEFAULT_IGNORABLE)
    assert len(points) == 4174  # the "Total code points" of that section
    hidden = [p for p in points if p not in (0xFE0E, 0xFE0F)] + [p for p in range(0x20) if p not in (9, 10)] + list(
        range(0x7F, 0xA0))
    assert [hex(p) for p in hidden if not shown(p)] == []
    # The emoji variation selectors stay, as does everything printable around them.
    assert not shown(0xFE0E) and not shown(0xFE0F) and not any(map(shown, (0x09, 0x0A, 0x20, 0x41, 0xE9, 0x1F600)))


def test_variation_selectors_cannot_smuggle_text_past_the_person():
    # U+FE00..FE0D and the U+E0100 block can encode bytes invisibly after any visible character.
    smuggled = "ok" + "".join(chr(0xFE00 + (b & 0x0D)) for b in b"rm -rf /") + "\U000E0100\U0001BCA0\uFFF0"
    assert kv.visible(smuggled).startswith("ok\\ufe0") and not set(kv.visible(smuggled)) - set(
        "okabcdef0123456789\\u")


def test_the_system_unicode_data_gives_no_default_ignorable_code_point_that_is_not_shown():
    require(SYSTEM_UCD.exists(), "Debian's unicode-data (/usr/share/unicode/DerivedCoreProperties.txt)")
    points = default_ignorable(SYSTEM_UCD.read_text(encoding="utf-8"))
    assert len(points) >= 4174
    assert [hex(p) for p in points if p not in (0xFE0E, 0xFE0F) and not shown(p)] == []


# -- 11. a platform that trickles ---------------------------------------------------------------------


def trickle_headers(server: Loopback, conn: socket.socket, request: Dict[str, Any]) -> None:
    """One byte of the status line a second, for ever (until the test ends)."""
    for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}":
        if server.stopped.wait(1.0):
            return
        conn.sendall(bytes([byte]))


def trickle_body(server: Loopback, conn: socket.socket, request: Dict[str, Any]) -> None:
    """Headers at once, then one byte of a long body a second."""
    conn.sendall(reply(200, length=100_000, Content_Type="application/json"))
    while not server.stopped.wait(1.0):
        conn.sendall(b" ")


@pytest.mark.parametrize("action", [trickle_headers, trickle_body], ids=["headers", "body"])
def test_a_platform_that_trickles_a_byte_a_second_holds_the_call_no_longer_than_the_read_timeout(
        serve, action, monkeypatch):  # noqa: F811
    # Security: every read is within the read timeout, yet the whole answer would take hours.
    monkeypatch.setattr(test_confirmation, "OPERATOR", CANARY)  # the token the loopback platform expects
    platform = serve(action)
    c = Client(platform.url, KVMFLEET_READ_TIMEOUT="2", KVMFLEET_MCP_ALLOW_WRITES="")
    try:
        c.initialize()
        started = time.monotonic()
        c.call(1, "list_isos", {})
        result = c.recv(timeout=60)["result"]
        took = time.monotonic() - started
    finally:
        c.kill()
    assert text_of(result) == ("GET /v1/isos: KVM Fleet's answer did not arrive in full within 2 s. A read changes "
                               "nothing; it is safe to retry.")
    assert 2 <= took < 2 + 1  # the read timeout, plus a second
    assert len(platform.requests) == 1


# -- 12. a bound on how many writes an agent fires ------------------------------------------------------


def test_a_looping_agent_cannot_fire_more_writes_a_minute_than_allowed(platform, tmp_path):
    record = tmp_path / "agent.jsonl"
    c = Client(platform.url, KVMFLEET_MCP_MAX_WRITES_PER_MINUTE="3", KVMFLEET_MCP_AUDIT_LOG=str(record))
    c.initialize()
    for n in range(1, 6):
        c.call(n, "acknowledge_alert", {"alert_id": "al_disk_full", "note": "looping %d" % n})
    results = [c.recv()["result"] for _ in range(5)]
    c.call(6, "list_isos", {})  # reads are unaffected
    assert "isError" not in c.recv()["result"]
    c.close()
    assert len(writes(platform)) == 3
    refused = [text_of(r) for r in results[3:]]
    for text in refused:
        assert re.fullmatch(r"Not done: this server sends at most 3 writes in any 60 s \(KVMFLEET_MCP_MAX_WRITES_"
                            r"PER_MINUTE\), and that many were sent\. The next write is allowed in (60|59) s\. "
                            r"Nothing was sent\.", text), text
    entries = [json.loads(row) for row in record.read_text().splitlines()]
    assert [e.get("refused") for e in entries if e["tool"] == "acknowledge_alert"] == [None] * 3 + ["write rate"] * 2


@responses.activate
def test_the_write_rate_is_counted_over_any_60_seconds(monkeypatch, tmp_path):
    now = [1000.0]
    monkeypatch.setattr(kv.time, "monotonic", lambda: now[0])
    responses.add("POST", API + "/v1/alerts/history/a1/acknowledge", json={"ok": True})
    record = tmp_path / "r"
    server = make_server(writes=True, KVMFLEET_MCP_MAX_WRITES_PER_MINUTE="2", KVMFLEET_MCP_AUDIT_LOG=str(record))

    def acknowledge() -> Dict[str, Any]:
        return rpc(server, "tools/call", {"name": "acknowledge_alert", "arguments": {"alert_id": "a1"}})["result"]

    assert "isError" not in acknowledge()
    now[0] += 30
    assert "isError" not in acknowledge()
    now[0] += 29.5
    assert text_of(acknowledge()) == (  # the first write is 59.5 s old
        "Not done: this server sends at most 2 writes in any 60 s (KVMFLEET_MCP_MAX_WRITES_PER_MINUTE), and that "
        "many were sent. The next write is allowed in 1 s. Nothing was sent.")
    now[0] += 0.5
    assert "isError" not in acknowledge()  # 60 s after the first: it no longer counts
    assert "allowed in 30 s" in text_of(acknowledge())  # but the second and the third do
    assert len(writes_sent(responses.calls)) == 3
    entries = [json.loads(row) for row in record.read_text().splitlines()]
    assert [entry.get("refused") for entry in entries] == [None, None, "write rate", None, "write rate"]


def test_the_write_rate_is_a_whole_number_from_1_to_1000():
    assert make_config().max_writes_per_minute == 10
    assert make_config(KVMFLEET_MCP_MAX_WRITES_PER_MINUTE="1000").max_writes_per_minute == 1000
    for bad in ("0", "1001", "2.5", "ten", "-1"):
        with pytest.raises(kv.ConfigError) as refused:
            make_config(KVMFLEET_MCP_MAX_WRITES_PER_MINUTE=bad)
        assert str(refused.value) == "KVMFLEET_MCP_MAX_WRITES_PER_MINUTE=%s: give a whole number from 1 to 1000." % bad


# -- 13. methods that 2026-07-28 removed, through the real process --------------------------------------


def test_a_stamped_ping_or_initialize_is_method_not_found_and_leaves_the_process_unstamped(platform):
    stamped = {"_meta": MODERN_META}
    lines = [line({"jsonrpc": "2.0", "id": 1, "method": "ping", "params": stamped}),
             line({"jsonrpc": "2.0", "id": 2, "method": "initialize", "params": dict(INIT, **stamped)}),
             line({"jsonrpc": "2.0", "id": 3, "method": "tools/list", "params": {}}),
             line({"jsonrpc": "2.0", "id": 4, "method": "ping"})]
    out = replies(run_server(lines, server_env(platform.url)).stdout)
    assert [m.get("error", {}).get("code") for m in out] == [kv.METHOD_NOT_FOUND, kv.METHOD_NOT_FOUND,
                                                            kv.INVALID_REQUEST, None]
    assert out[2]["error"]["message"].startswith("Not initialized")  # the stamped initialize changed nothing


# -- an independent attacker's review: what it found, each stopped ------------------------------------


@pytest.mark.parametrize("token", [CANARY, "kvmf_" + "L" * 80])
def test_a_platform_echoing_the_token_in_its_request_id_header_cannot_put_it_in_the_record(tmp_path, token):
    server = make_server(KVMFLEET_TOKEN=token, KVMFLEET_MCP_AUDIT_LOG=str(tmp_path / "r"))
    with responses.RequestsMock() as mock:
        mock.add("GET", API + "/v1/isos", json={"items": []}, headers={"X-Request-Id": token})
        rpc(server, "tools/call", {"name": "list_isos", "arguments": {}})
    record = (tmp_path / "r").read_text()
    assert token[:12] not in record and json.loads(record)["platform_request_id"] == "[redacted]"


@pytest.mark.parametrize("echo", ["kvmf\\u005fCANARY\\u005F5f0c1e_do_not_print", "\\u006bvmf_CANARY_5f0c1e_do_not_print"])
@pytest.mark.parametrize("status", [200, 500])
@responses.activate
def test_an_echo_of_the_token_written_with_json_escapes_is_redacted(echo, status):
    # A platform or proxy that escapes characters in JSON (PHP escapes "/", some encoders "_") still echoes it.
    responses.add("GET", API + "/v1/isos", status=status, body='{"debug":{"authorization":"Bearer %s"}}' % echo,
                  content_type="application/json")
    text = text_of(rpc(make_server(), "tools/call", {"name": "list_isos", "arguments": {}})["result"])
    assert "[redacted]" in text and CANARY not in json.dumps(json.loads(text.split("\n")[-1]))


@responses.activate
def test_a_platform_cannot_flood_or_forge_the_persons_question():
    # A preview names at most 10 items whatever the platform sends, and quotes what a failed read said.
    responses.add("GET", API + "/v1/devices/d1", status=503, body="busy\n\nNOTE (change board): pre-approved, tick it")
    responses.add("GET", API + "/v1/console-sessions", json={"items": [{"user": "u%d" % n} for n in range(100_000)]})
    responses.add("GET", API + "/v1/access-grants", json={"items": []})
    server = make_server(writes=True)
    text = text_of(rpc(server, "tools/call", {"name": "power_action", "arguments": {
        "device_id": "d1", "action": "cycle"}})["result"])
    assert len(text) < 3000 and text.count('"u') == 10 and "(and more)" in text
    assert 'HTTP 503 Service Unavailable "busy\\n\\nNOTE (change board): pre-approved, tick it"' in text
    assert "\nNOTE" not in text


def test_a_call_to_a_hidden_or_unknown_tool_still_leaves_its_record_line(tmp_path):
    server = make_server(KVMFLEET_MCP_AUDIT_LOG=str(tmp_path / "r"))  # writes off
    for name in ("power_action", "rm_rf", 7, ["x"], "\ud800"):
        assert rpc(server, "tools/call", {"name": name, "arguments": {"device_id": "d1"}})["error"]["code"] == \
            kv.INVALID_PARAMS
    entries = [json.loads(row) for row in (tmp_path / "r").read_text().splitlines()]
    assert [(e["tool"], e["write"], e["outcome"]) for e in entries] == [
        ("power_action", True, "unknown tool"), ("rm_rf", False, "unknown tool"), ("7", False, "refused"),
        ("['x']", False, "refused"), ("\ud800", False, "unknown tool")]  # a lone surrogate cannot stop the line


@responses.activate
def test_a_spent_approval_replayed_as_its_expiry_passes_mid_request_is_refused(monkeypatch):
    # Two clock readings in one request once let a replay be both unexpired and forgotten: it acted again.
    now = [1000.0]
    monkeypatch.setattr(kv.time, "time", lambda: now[0])
    responses.add("GET", API + "/v1/access-grants", json={"items": []})
    responses.add("POST", API + "/v1/access-grants/g1:revoke", json={})
    server = make_server(writes=True, initialize=None, KVMFLEET_MCP_CONFIRM_TIMEOUT="300")
    params: Dict[str, Any] = {"name": "revoke_access", "arguments": {"grant_id": "g1"},
                              "_meta": dict(MODERN_META, **{kv.META_CAPABILITIES: ASKS})}
    params["requestState"] = rpc(server, "tools/call", params)["result"]["requestState"]
    params["inputResponses"] = {"confirm_action": {"action": "accept", "content": {"approve": True}}}
    assert "isError" not in rpc(server, "tools/call", params)["result"]
    readings = iter([1299.999])  # just before it expires, then ever after just past it

    monkeypatch.setattr(kv.time, "time", lambda: next(readings, 1300.5))
    assert "already used once" in text_of(rpc(server, "tools/call", params)["result"])
    assert len(writes_sent(responses.calls)) == 1


def test_a_client_keeping_stdin_busy_cannot_stretch_the_persons_time_limit(monkeypatch):
    # Lines already waiting were once served before the time limit was looked at: a client that never lets
    # stdin run dry kept the question open, and its late "yes" went through.
    readings = iter(range(10**6))
    monkeypatch.setattr(kv.time, "monotonic", lambda: next(readings) / 100)  # 10 ms a reading
    filler = line({"jsonrpc": "2.0", "method": "notifications/progress", "params": {}}) * 1000
    late_yes = line({"jsonrpc": "2.0", "id": "ask", "result": {"action": "accept", "content": {"approve": True}}})
    channel = kv.Channel(io.BytesIO(filler + late_yes), io.BytesIO())
    config = make_config(KVMFLEET_MCP_CONFIRM_TIMEOUT="1")
    assert kv.Asker(config, kv.Platform(config), lambda raw: None)._wait_for(channel, "ask", 1) is None


def test_a_stray_alarm_signal_between_calls_changes_nothing_and_no_timer_outlives_its_call():
    try:
        with kv.Deadline(30):
            pass
        assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
        signal.raise_signal(signal.SIGALRM)  # another process's, or a timer left behind: ignored
    finally:
        signal.signal(signal.SIGALRM, signal.SIG_DFL)


def test_a_read_with_a_time_limit_ends_when_it_passes_though_stdin_stays_silent():
    read_end, write_end = os.pipe()
    try:
        with open(read_end, "rb", buffering=0) as stdin:
            assert kv.Channel(stdin, io.BytesIO()).read(timeout=0.05) is None
    finally:
        os.close(write_end)


def test_a_server_started_with_its_signals_blocked_still_ends_a_trickling_answer_in_time(serve):  # noqa: F811
    # Signal masks survive exec: a client could start the server with SIGALRM and SIGTERM blocked.
    platform = serve(trickle_headers)
    blocked = {signal.SIGALRM, signal.SIGTERM, signal.SIGINT}
    proc = subprocess.Popen([sys.executable, SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=server_env(platform.url, KVMFLEET_READ_TIMEOUT="1"),
                            preexec_fn=lambda: signal.pthread_sigmask(signal.SIG_BLOCK, blocked))
    try:
        started = time.monotonic()
        out, _ = proc.communicate(line({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": INIT}) + line(
            {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "list_isos", "arguments": {}}}),
            timeout=60)
    finally:
        proc.kill()
    assert "did not arrive in full within 1 s" in text_of(replies(out)[1]["result"])
    assert time.monotonic() - started < 1 + 1 + 2  # the read timeout, a second, and the process's start


def test_a_hard_linked_record_is_not_written(tmp_path, capsys):
    victim = tmp_path / "ssh_config"
    victim.write_text("Host *\n")
    victim.chmod(0o600)
    os.link(victim, tmp_path / "agent.jsonl")
    err = record_of(tmp_path / "agent.jsonl", capsys)
    assert victim.read_text() == "Host *\n" and "(it is not a regular file with one name" in err


def test_sslkeylogfile_cannot_make_the_server_write_tls_secrets(serve, tls, tmp_path):  # noqa: F811
    context, ca_pem = tls
    platform = serve(tls=context)
    keys = tmp_path / "keys.log"
    proc = run_server([], server_env(platform.url, KVMFLEET_CA_BUNDLE=ca_pem, SSLKEYLOGFILE=str(keys)), ["--check"])
    assert b"reachable: yes" in proc.stdout and not keys.exists()


def test_a_fifo_in_place_of_the_token_file_does_not_hold_the_server(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(CANARY)
    token_file.chmod(0o600)
    server = make_server(KVMFLEET_TOKEN="", KVMFLEET_TOKEN_FILE=str(token_file))
    token_file.unlink()
    os.mkfifo(token_file, 0o600)
    answered: List[Any] = []
    caller = threading.Thread(target=lambda: answered.append(rpc(server, "tools/call", {
        "name": "list_isos", "arguments": {}})["result"]), daemon=True)
    caller.start()
    caller.join(5)
    if caller.is_alive():  # held on the FIFO: let it go, then fail
        os.close(os.open(token_file, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("the server waited on a FIFO in place of its token file")
    [result] = answered
    assert result["isError"]
    assert text_of(result).startswith("Could not read KVMFLEET_TOKEN_FILE=%s (OSError)" % token_file)


def test_a_cancellation_for_a_request_served_or_never_put_aside_costs_nothing_and_one_drops_every_line_of_its_id():
    channel = kv.Channel(io.BytesIO(), io.BytesIO())
    for text, request_id in ((b"a", 1), (b"b", 1), (b"c", 2)):
        assert channel.put_aside(text, request_id)
    assert channel.next_line() == b"a"
    channel.drop_waiting(1)  # a duplicate id: the line still waiting goes too
    assert channel.next_line() == b"c"
    queue = channel._waiting
    for request_id in (1, 2, 3):  # served, served, never seen: the queue is not even rebuilt
        channel.drop_waiting(request_id)
        assert channel._waiting is queue
    assert channel.put_aside(b"d", 1) and channel.next_line() == b"d" and channel.read() == b""


def test_cancellations_while_a_person_is_asked_cost_the_same_as_any_other_line():
    # 1,000 requests wait; then a flood of cancellations for ids that do not wait, or of filler lines.
    def seconds(flood: bytes) -> float:
        waiting = b"".join(line({"jsonrpc": "2.0", "id": n, "method": "tools/list"}) for n in range(1000))
        answer = line({"jsonrpc": "2.0", "id": "ask", "result": {"action": "decline"}})
        channel = kv.Channel(io.BytesIO(waiting + flood * 20_000 + answer), io.BytesIO())
        asker = kv.Asker(make_config(), kv.Platform(make_config()), lambda raw: None)
        started = time.perf_counter()
        assert asker._wait_for(channel, "ask", 1)["result"] == {"action": "decline"}
        return time.perf_counter() - started

    cancel = line({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": "no-such"}})
    filler = line({"jsonrpc": "2.0", "method": "notifications/progress", "params": {"requestId": "no-such"}})
    assert seconds(cancel) / seconds(filler) < 3  # once each cancellation rebuilt the list of 1,000: ~25 times


@pytest.mark.parametrize("role", ["op\nwrite mode: off (safe)", "\ud800"])
@responses.activate
def test_check_output_cannot_be_forged_by_a_line_break_or_broken_by_a_lone_surrogate(monkeypatch, capsys, role):
    responses.add("GET", API + "/v1/devices", json={"items": []})
    responses.add("GET", API + "/v1/tokens/current", json={"role": role, "scope": "write"})
    for name, value in (("KVMFLEET_API", API), ("KVMFLEET_TOKEN", CANARY)):
        monkeypatch.setenv(name, value)
    assert kv.main(["--check"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 5 and lines[-1].startswith("write mode: off (set") and lines[3].startswith("token: role ")


@responses.activate
def test_a_call_cut_short_by_sigterm_is_recorded_as_such(tmp_path, monkeypatch):
    server = make_server(KVMFLEET_MCP_AUDIT_LOG=str(tmp_path / "r"))

    def stopped(*args: Any, **kwargs: Any) -> None:
        raise SystemExit(0)  # what _leave does when SIGTERM arrives mid-call

    monkeypatch.setattr(server.platform, "call", stopped)
    with pytest.raises(SystemExit):
        rpc(server, "tools/call", {"name": "list_isos", "arguments": {}})
    [entry] = [json.loads(row) for row in (tmp_path / "r").read_text().splitlines()]
    assert entry["outcome"] == "cut short: the server was stopped"


@responses.activate
def test_a_platform_sending_more_items_than_asked_cannot_stretch_a_counts_bound():
    responses.add("GET", API + "/v1/devices", json={"items": [{"status": "online"}] * 700, "next_cursor": "more"})
    result = rpc(make_server(KVMFLEET_MCP_COUNT_MAX_ITEMS="600"), "tools/call",
                 {"name": "list_devices", "arguments": {"count_by": "status"}})["result"]
    count = json.loads(text_of(result))
    assert count["counted"] == 600 and count["counts"] == {"online": 600} and count["complete"] is False


@pytest.mark.parametrize("value", ["\u00b2", "\u0661\u0660", "\uff15"])
def test_a_write_rate_in_other_scripts_digits_is_refused_in_words_not_a_traceback(value):
    with pytest.raises(kv.ConfigError) as refused:
        make_config(KVMFLEET_MCP_MAX_WRITES_PER_MINUTE=value)
    assert "give a whole number from 1 to 1000" in str(refused.value)


def test_an_overlong_line_while_a_person_is_asked_is_answered_not_dropped(monkeypatch):
    monkeypatch.setattr(kv, "MAX_LINE_BYTES", 100)
    out = io.BytesIO()
    channel = kv.Channel(io.BytesIO(b"x" * 500 + b"\n" + line({"jsonrpc": "2.0", "id": "ask", "result": {}})), out)
    kv.Asker(make_config(), kv.Platform(make_config()), lambda raw: None)._wait_for(channel, "ask", 1)
    assert json.loads(out.getvalue()) == {"jsonrpc": "2.0", "id": None, "error": {
        "code": kv.INVALID_REQUEST, "message": "Message longer than 100 bytes; it was discarded"}}


def test_a_tool_name_with_hidden_characters_is_echoed_escaped():
    reply = rpc(make_server(), "tools/call", {"name": "list\u202eisos\u200b", "arguments": {}})
    assert reply["error"]["message"] == "Unknown tool: list\\u202eisos\\u200b"
