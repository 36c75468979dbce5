"""The security and robustness guards, each pinned by a test that a mutation of its line fails."""
from __future__ import annotations

import io
import json
import os
import re
import socket
import threading
import time
from email.utils import formatdate

import pytest
import requests
import responses

import kvmfleet_mcp as kv
from conftest import API, CANARY, INIT, call, make_config, make_server, rpc, text_of

HEX32 = re.compile(r"[0-9a-f]{32}")


def started(config: kv.Config) -> kv.Server:
    server = kv.Server(config)
    server.handle({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": INIT})
    return server


def fresh_token(length: int = 40) -> str:
    """A token no other test has used: redaction remembers every token this process has seen."""
    return os.urandom(length).hex()[:length]


# -- a platform on loopback, for what `responses` cannot fake: streaming, trickles, drops ---------


def head(length: int, status: str = "200 OK") -> bytes:
    return ("HTTP/1.1 %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
            % (status, length)).encode()


class Loopback:
    """An HTTP/1.1 platform on 127.0.0.1 that plays one scripted answer per connection.

    An answer is a generator of bytes to send and of numbers (seconds to pause); what each
    connection managed to send of its answer is in `sent`.
    """

    def __init__(self, *answers) -> None:
        self.answers = list(answers)
        self.sent: list = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = "http://127.0.0.1:%d" % self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            for answer in self.answers:
                conn, _ = self.listener.accept()
                with conn:
                    request = b""
                    while b"\r\n\r\n" not in request:
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        request += chunk
                    sent = 0
                    try:
                        for piece in answer:
                            if isinstance(piece, (int, float)):
                                threading.Event().wait(piece)  # not time.sleep, which `waits` replaces
                            else:
                                conn.sendall(piece)
                                sent += len(piece)
                    except OSError:  # the client hung up: that is what some tests want
                        pass
                    self.sent.append(sent)
        except OSError:  # the listener was closed
            pass

    def __enter__(self) -> Loopback:
        return self

    def __exit__(self, *exc) -> None:
        self.listener.close()
        self.thread.join(10)


def answer(body: bytes):
    yield head(len(body))
    yield body


def dropped():
    yield head(1000)
    yield b'{"items": ['  # then the connection closes, 989 bytes short


def loopback_server(url: str, **env: str) -> kv.Server:
    return started(make_config(KVMFLEET_API=url, **env))


# -- write gating --------------------------------------------------------------------------------


def test_the_tool_listing_offers_write_tools_only_when_writes_are_exactly_true(monkeypatch, capsys):
    monkeypatch.setenv("KVMFLEET_MCP_ALLOW_WRITES", "TRUE")
    assert kv.main(["--list-tools"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert [row.split()[0] for row in rows[:-1]] == [tool.name for tool in kv.TOOLS if not tool.write]
    assert rows[-1] == '(10 write tools hidden: KVMFLEET_MCP_ALLOW_WRITES is not exactly "true")'
    monkeypatch.setenv("KVMFLEET_MCP_ALLOW_WRITES", "true")
    assert kv.main(["--list-tools"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert [row.split()[0] for row in rows] == [tool.name for tool in kv.TOOLS]
    assert rows[11].split()[3:] == ["write,", "confirm", "when", "action", "is", "off|off_hard|cycle"]
    assert rows[0].split()[3:] == ["read"]


def test_an_unknown_tool_name_is_echoed_cut_to_100_characters():
    reply = rpc(make_server(), "tools/call", {"name": "x" * 300, "arguments": {}})
    assert reply["error"] == {"code": -32602,
                              "message": "Unknown tool: " + "x" * 100 + "\n[... 200 more characters not shown]"}


@responses.activate
def test_a_destructive_call_without_confirm_says_exactly_what_it_would_do_and_touch_and_writes_nothing():
    responses.add("GET", API + "/v1/devices/d1", json={"id": "d1", "name": "web-1", "status": "online",
                                                       "power_state": "on"})
    started = kv._utc(time.time() - 3700)  # open for 1 h 1 min (and 40 s)
    responses.add("GET", API + "/v1/console-sessions", json={"items": [
        {"id": "cs1", "user": "ann", "device_id": "d1", "started_at": started}], "next_cursor": "c2"})
    responses.add("GET", API + "/v1/access-grants", status=503, body="busy")
    result = call(make_server(writes=True), "power_action", device_id="d1", action="cycle")
    assert result["isError"] is True
    assert text_of(result) == (
        "Not done: power_action would send power action 'cycle' to device d1, interrupting everything running "
        "on it. No write was sent to KVM Fleet. Ask the user to approve this exact action; if they do, call "
        'power_action again with the same arguments and "confirm": true.\n'
        "What it would touch, read from KVM Fleet just now:\n"
        '- device "web-1" (d1): status "online", power "on"\n'
        '- console sessions open on it: "ann" on device "d1" since "%s", open for 1 h 1 min (and more)\n'
        '- could not read active access grants on it: HTTP 503 Service Unavailable "busy"' % started)
    assert [(c.request.method, c.request.url.split("?")[-1]) for c in responses.calls] == [
        ("GET", API + "/v1/devices/d1"), ("GET", "device_id=d1&open_only=true&limit=10"),
        ("GET", "device_id=d1&status=active&limit=10")]


# -- redirects -----------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [300, 301, 302, 303, 307, 308])
@responses.activate
def test_a_redirect_is_never_followed_even_to_the_same_host(status):
    responses.add("GET", API + "/v1/isos", status=status, headers={"Location": API + "/v1/isos?page=2"})
    responses.add("GET", API + "/v1/isos?page=2", json={"items": []})
    result = call(make_server(), "list_isos")
    assert result["isError"] is True
    assert text_of(result).startswith("KVM Fleet answered GET /v1/isos with HTTP %d " % status)
    assert "a redirect to kvmfleet.test. It was not followed" in text_of(result)
    assert len(responses.calls) == 1


@responses.activate
def test_a_redirect_without_a_location_is_reported_not_followed():
    responses.add("GET", API + "/v1/isos", status=307)
    text = text_of(call(make_server(), "list_isos"))
    assert text == ("KVM Fleet answered GET /v1/isos with HTTP 307 Temporary Redirect, a redirect to "
                    "(no Location header). It was not followed: the token is only ever sent to %s. "
                    "Check KVMFLEET_API." % API)


@responses.activate
def test_a_redirect_to_a_relative_location_names_it_and_a_long_one_is_cut():
    responses.add("GET", API + "/v1/isos", status=302, headers={"Location": "/login"})
    responses.add("GET", API + "/v1/policies", status=302, headers={"Location": "/" + "a" * 299})
    server = make_server()
    assert "a redirect to /login. It was not followed" in text_of(call(server, "list_isos"))
    assert ("a redirect to /" + "a" * 199 + "\n[... 100 more characters not shown]. It was not followed"
            in text_of(call(server, "list_policies")))


@responses.activate
def test_a_400_is_a_refusal_not_a_redirect_nor_a_success():
    responses.add("GET", API + "/v1/isos", json={"error": "bad request"}, status=400)
    result = call(make_server(), "list_isos")
    assert result["isError"] is True
    assert text_of(result) == 'KVM Fleet refused GET /v1/isos: HTTP 400 Bad Request\n{"error": "bad request"}'


# -- TLS and the API URL -------------------------------------------------------------------------


@pytest.mark.parametrize("api", ["http://kvmfleet.example.com", "http://10.1.2.3:8080", "http://[2001:db8::1]"])
def test_plain_http_to_a_host_that_is_not_loopback_is_refused(api):
    # Security: the bearer token would cross the network in clear text.
    with pytest.raises(kv.ConfigError) as refused:
        make_config(KVMFLEET_API=api)
    assert str(refused.value) == (
        "KVMFLEET_API=%s uses plain http to a host that is not loopback; the token would cross the network "
        "unencrypted. Use https:// (or, knowingly, set KVMFLEET_ALLOW_INSECURE_HTTP=true)." % api)


@pytest.mark.parametrize("opt_in", ["TRUE", "1", "yes", " true"])
def test_the_insecure_http_opt_in_is_exactly_true_and_nothing_else(opt_in):
    with pytest.raises(kv.ConfigError, match="plain http"):
        make_config(KVMFLEET_API="http://kvmfleet.example.com", KVMFLEET_ALLOW_INSECURE_HTTP=opt_in)


def test_the_insecure_http_opt_in_is_warned_about_on_every_start(capsys):
    config = make_config(KVMFLEET_API="http://kvmfleet.example.com", KVMFLEET_ALLOW_INSECURE_HTTP="true")
    assert config.api == "http://kvmfleet.example.com"
    assert capsys.readouterr().err == ("kvmfleet-mcp: warning: KVMFLEET_ALLOW_INSECURE_HTTP=true: the token is "
                                       "sent unencrypted to http://kvmfleet.example.com.\n")


@pytest.mark.parametrize("api", ["https://kvmf_secret@kvmfleet.example", "https://:kvmf_secret@kvmfleet.example",
                                 "https://u:p@kvmfleet.example", "https://kvmfleet.example/#x",
                                 "https://kvmfleet.example/?token=kvmf_secret", "https://kvmfleet.example?x"])
def test_credentials_or_a_query_in_the_api_url_are_refused_even_a_user_or_a_password_alone(api):
    with pytest.raises(kv.ConfigError) as refused:
        make_config(KVMFLEET_API=api)
    assert str(refused.value) == "KVMFLEET_API must be a plain base URL, without user, query or fragment."


def test_a_url_that_is_not_http_names_what_to_give():
    with pytest.raises(kv.ConfigError) as refused:
        make_config(KVMFLEET_API="ftp://kvmfleet.example")
    assert str(refused.value) == ("KVMFLEET_API=ftp://kvmfleet.example: give an https:// URL such as "
                                  "https://app.kvmfleet.io.")


@responses.activate
def test_tls_is_verified_against_the_system_store_or_the_given_ca_bundle_and_nothing_else(tmp_path):
    bundle = tmp_path / "ca.pem"
    bundle.write_text("-----BEGIN CERTIFICATE-----\n")
    responses.add("GET", API + "/v1/isos", json={})
    call(make_server(), "list_isos")
    call(started(make_config(KVMFLEET_CA_BUNDLE=str(bundle))), "list_isos")
    assert [c.request.req_kwargs["verify"] for c in responses.calls] == [True, str(bundle)]


def test_a_ca_bundle_that_is_not_a_file_stops_the_start(tmp_path):
    missing = str(tmp_path / "nope.pem")
    with pytest.raises(kv.ConfigError) as refused:
        make_config(KVMFLEET_CA_BUNDLE=missing)
    assert str(refused.value) == "KVMFLEET_CA_BUNDLE=%s is not a readable file." % missing


@responses.activate
def test_netrc_and_ca_variables_in_the_environment_cannot_replace_the_token_or_the_ca(tmp_path, monkeypatch):
    # Security: requests would otherwise let ~/.netrc overwrite Authorization and
    # REQUESTS_CA_BUNDLE swap the CA that vouches for the platform.
    netrc = tmp_path / "netrc"
    netrc.write_text("machine kvmfleet.test login evil password stolen\n")
    os.chmod(netrc, 0o600)
    bundle = tmp_path / "evil-ca.pem"
    bundle.write_text("-----BEGIN CERTIFICATE-----\n")
    monkeypatch.setenv("NETRC", str(netrc))
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(bundle))
    monkeypatch.setenv("CURL_CA_BUNDLE", str(bundle))
    responses.add("GET", API + "/v1/isos", json={})
    call(make_server(), "list_isos")
    sent = responses.calls[0].request
    assert sent.headers["Authorization"] == "Bearer " + CANARY
    assert sent.req_kwargs["verify"] is True


@responses.activate
def test_a_cookie_set_by_the_platform_or_a_proxy_is_never_sent_back():
    # Security: no cookie jar: a Set-Cookie planted by a proxy or a hostile
    # answer cannot ride along on the next call (each request is exactly ours).
    responses.add("GET", API + "/v1/isos", json={}, headers={"Set-Cookie": "session=planted; Path=/"})
    server = make_server()
    call(server, "list_isos")
    call(server, "list_isos")
    assert [c.request.headers.get("Cookie") for c in responses.calls] == [None, None]


@responses.activate
def test_every_request_has_a_connect_and_a_read_timeout():
    # A platform that accepts and never answers must not hang the server.
    responses.add("GET", API + "/v1/isos", json={})
    call(make_server(), "list_isos")
    call(started(make_config(KVMFLEET_CONNECT_TIMEOUT="2", KVMFLEET_READ_TIMEOUT="7")), "list_isos")
    assert [c.request.req_kwargs["timeout"] for c in responses.calls] == [(5.0, 30.0), (2.0, 7.0)]


# -- token handling ------------------------------------------------------------------------------


@responses.activate
def test_a_token_of_eight_characters_echoed_back_is_still_redacted():
    token = fresh_token(8)
    responses.add("GET", API + "/v1/isos", status=401, body="bad token " + token)
    text = text_of(call(started(make_config(KVMFLEET_TOKEN=token)), "list_isos"))
    assert token not in text and text.endswith("\nbad token [redacted]")


@responses.activate
def test_a_new_token_echoed_back_is_redacted_from_the_first_call():
    token = fresh_token()
    responses.add("GET", API + "/v1/isos", status=401, body='{"got":"Bearer %s"}' % token)
    text = text_of(call(started(make_config(KVMFLEET_TOKEN=token)), "list_isos"))
    assert token not in text and text.endswith('\n{"got":"Bearer [redacted]"}')


@responses.activate
def test_a_token_file_that_vanishes_or_empties_after_start_fails_the_call_and_sends_nothing(tmp_path):
    path = tmp_path / "token"
    path.write_text(fresh_token())
    os.chmod(path, 0o600)
    server = started(kv.Config.from_env({"KVMFLEET_API": API, "KVMFLEET_TOKEN_FILE": str(path)}))
    path.unlink()
    result = call(server, "list_isos")
    assert result["isError"] and text_of(result) == (
        "Could not read KVMFLEET_TOKEN_FILE=%s (FileNotFoundError)." % path)
    path.write_text("  \n")
    assert text_of(call(server, "list_isos")) == "KVMFLEET_TOKEN_FILE=%s is empty." % path
    assert len(responses.calls) == 0


def test_a_log_line_with_a_lone_surrogate_is_written_escaped_not_dropped(capsys):
    # A client's method name reaches the log on an internal error; it may hold "\ud800".
    kv.log("internal error on bad\ud800method")
    assert capsys.readouterr().err == "kvmfleet-mcp: internal error on bad\\ud800method\n"


@responses.activate
def test_client_info_in_the_header_is_cut_to_64_printable_characters_and_keeps_a_tilde():
    responses.add("GET", API + "/v1/isos", json={})
    server = kv.Server(make_config())
    server.handle({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "clientInfo": {"name": "n" * 100, "version": "1.0~rc1"}}})
    call(server, "list_isos")
    assert responses.calls[0].request.headers["x-kvmfleet-mcp-client"] == \
        "kvmfleet-mcp/%s (%s/1.0~rc1)" % (kv.__version__, "n" * 64)


# -- retries: reads again on a passing fault, writes never -------------------------------------


@responses.activate
def test_a_read_that_meets_passing_gateway_faults_is_tried_again_after_growing_waits(waits):
    responses.add("GET", API + "/v1/isos", status=503)
    responses.add("GET", API + "/v1/isos", status=502)
    responses.add("GET", API + "/v1/isos", json={"items": ["iso_1"]})
    assert json.loads(text_of(call(make_server(), "list_isos"))) == {"items": ["iso_1"]}
    assert len(responses.calls) == 3 and waits == [0.25, 0.5]


@responses.activate
def test_a_gateway_fault_on_every_try_is_passed_on_saying_how_often_it_was_tried(waits):
    responses.add("GET", API + "/v1/isos", status=503, body="busy")
    text = text_of(call(make_server(), "list_isos"))
    assert text == "KVM Fleet refused GET /v1/isos: HTTP 503 Service Unavailable (tried 3 times)\nbusy"
    assert len(responses.calls) == 3


@pytest.mark.parametrize("retry_after,wait", [("0", 0.0), ("1.5", 1.5), ("10", 10.0)])
@responses.activate
def test_retry_after_in_seconds_is_waited_out_up_to_ten(waits, retry_after, wait):
    responses.add("GET", API + "/v1/isos", status=429, headers={"Retry-After": retry_after})
    responses.add("GET", API + "/v1/isos", json={"items": []})
    assert json.loads(text_of(call(make_server(), "list_isos"))) == {"items": []}
    assert waits == [wait]


@responses.activate
def test_retry_after_as_an_http_date_is_passed_on_not_waited_for(waits):
    # A date is for a long wait, and parsing one is a risk (an absurd year once crashed a write): passed on.
    date = formatdate(time.time() + 3, usegmt=True)
    responses.add("GET", API + "/v1/isos", status=503, headers={"Retry-After": date})
    text = text_of(call(make_server(), "list_isos"))
    assert text.startswith("KVM Fleet refused GET /v1/isos: HTTP 503 Service Unavailable (Retry-After: %s, how long "
                           "it asks you to wait before trying again)" % date)
    assert waits == [] and len(responses.calls) == 1


@pytest.mark.parametrize("retry_after", ["10.5", "3600", "an HTTP date 2 minutes ahead"])
@responses.activate
def test_a_retry_after_over_ten_seconds_is_passed_on_not_waited_for(waits, retry_after):
    if retry_after.startswith("an HTTP date"):  # made now: a date made at collection may have passed
        retry_after = formatdate(time.time() + 120, usegmt=True)
    responses.add("GET", API + "/v1/isos", status=503, headers={"Retry-After": retry_after})
    responses.add("GET", API + "/v1/isos", json={"items": []})
    result = call(make_server(), "list_isos")
    assert result["isError"] and text_of(result).startswith("KVM Fleet refused GET /v1/isos: HTTP 503 Service Unavailable")
    assert "tried" not in text_of(result) and waits == [] and len(responses.calls) == 1


@responses.activate
def test_a_write_is_sent_once_even_on_a_gateway_fault_and_each_write_has_its_own_idempotency_key(waits):
    url = API + "/v1/devices/d1/iso:unmount"
    responses.add("POST", url, status=503)
    responses.add("POST", url, json={})
    responses.add("GET", API + "/v1/isos", json={})
    server = make_server(writes=True)
    result = call(server, "unmount_iso", device_id="d1")
    assert result["isError"] and text_of(result) == "KVM Fleet refused POST /v1/devices/d1/iso:unmount: HTTP 503 " \
                                                    "Service Unavailable\n"
    assert len(responses.calls) == 1 and waits == []
    call(server, "unmount_iso", device_id="d1")
    call(server, "list_isos")
    keys = [c.request.headers.get("Idempotency-Key") for c in responses.calls]
    assert keys[0] is not None and keys[1] is not None and keys[2] is None
    assert HEX32.fullmatch(keys[0]) and HEX32.fullmatch(keys[1]) and keys[0] != keys[1]


@responses.activate
def test_the_check_mode_read_is_tried_again_like_any_read_and_carries_no_idempotency_key(waits, capsys):
    responses.add("GET", API + "/v1/devices", status=503)
    responses.add("GET", API + "/v1/devices", json={"items": []})
    assert kv._check(make_config(), "") == 0
    assert "authenticated: yes" in capsys.readouterr().out
    reads = [c.request for c in responses.calls if c.request.url.startswith(API + "/v1/devices")]
    assert len(reads) == 2 and "Idempotency-Key" not in reads[0].headers


@responses.activate
def test_a_refused_connection_is_tried_again_and_then_named_with_method_and_path(waits):
    refused = requests.exceptions.ConnectionError("refused")
    responses.add("GET", API + "/v1/isos", body=refused)
    responses.add("GET", API + "/v1/isos", body=refused)
    responses.add("GET", API + "/v1/isos", json={"items": []})
    responses.add("GET", API + "/v1/policies", body=refused)
    server = make_server()
    assert json.loads(text_of(call(server, "list_isos"))) == {"items": []}
    assert waits == [0.25, 0.5]
    assert text_of(call(server, "list_policies")) == (
        "GET /v1/policies could not connect to KVM Fleet at %s (ConnectionError: refused). "
        "A read changes nothing; it is safe to retry." % API)
    assert len(responses.calls) == 6


@responses.activate
def test_no_answer_in_time_is_reported_once_with_method_and_path():
    responses.add("GET", API + "/v1/isos", body=requests.exceptions.ReadTimeout("slow"))
    assert text_of(call(make_server(), "list_isos")) == (
        "GET /v1/isos got no answer within 30 s from KVM Fleet at %s (ReadTimeout: slow). "
        "A read changes nothing; it is safe to retry." % API)
    assert len(responses.calls) == 1


def test_a_connection_dropped_mid_answer_is_tried_again_and_the_second_answer_used(waits):
    with Loopback(dropped(), answer(b'{"items": ["iso_1"]}')) as platform:
        text = text_of(call(loopback_server(platform.url), "list_isos"))
    assert text == '{"items": ["iso_1"]}' and waits == [0.25]


def test_a_connection_dropped_mid_answer_every_time_is_named_after_three_tries(waits):
    with Loopback(dropped(), dropped(), dropped()) as platform:
        text = text_of(call(loopback_server(platform.url), "list_isos"))
    assert text.startswith("GET /v1/isos lost the connection mid-answer from KVM Fleet at %s "
                           "(ChunkedEncodingError: " % platform.url)
    assert text.endswith("A read changes nothing; it is safe to retry.") and waits == [0.25, 0.5]


def test_an_answer_that_stalls_mid_body_is_reported_and_not_tried_again(waits):
    def stall():
        yield head(1000)
        yield b'{"items": ['
        yield 1.5

    with Loopback(stall(), answer(b"{}")) as platform:
        text = text_of(call(loopback_server(platform.url, KVMFLEET_READ_TIMEOUT="0.3"), "list_isos"))
    assert text == ("GET /v1/isos: KVM Fleet at %s stopped sending its answer for 0.3 s. "
                    "A read changes nothing; it is safe to retry." % platform.url)
    assert waits == []


# -- size caps -----------------------------------------------------------------------------------


def test_an_endless_answer_is_not_read_into_memory(monkeypatch):
    # Security: a platform (or whatever answers in its name) that never stops sending
    # must not be read to the end: only a little over the cap ever leaves its socket.
    monkeypatch.setattr(kv, "MAX_BODY_BYTES", 1 << 20)
    size = 256 << 20

    def endless():
        yield head(size)
        for _ in range(size >> 16):
            yield b" " * 65536

    with Loopback(endless()) as platform:
        text = text_of(call(loopback_server(platform.url), "list_isos"))
    assert text.startswith("KVM Fleet") and text.endswith(" 1 MiB; it was not read to the end. "
                                                           "Ask for fewer items with limit.")
    assert platform.sent[0] < 64 << 20


def test_a_trickling_answer_is_cut_at_the_total_read_deadline():
    # Security: pieces that each arrive within the read timeout must not keep the call open for ever.
    def trickle():
        yield head(20 * 65536)
        for _ in range(20):
            yield b" " * 65536
            yield 0.1

    with Loopback(trickle()) as platform:
        result = call(loopback_server(platform.url, KVMFLEET_READ_TIMEOUT="0.5"), "list_isos")
    assert result["isError"] and text_of(result) == (
        "GET /v1/isos: KVM Fleet's answer did not arrive in full within 0.5 s. A read changes nothing; it is safe "
        "to retry.")


@responses.activate
def test_the_size_cap_counts_the_whole_answer_not_each_piece(monkeypatch):
    # 200 000 bytes arrive in 64 KiB pieces, each under a 100 000-byte cap.
    monkeypatch.setattr(kv, "MAX_BODY_BYTES", 100_000)
    responses.add("GET", API + "/v1/isos", body=b" " * 200_000)
    result = call(make_server(), "list_isos")
    assert result["isError"] and "it was not read to the end" in text_of(result)


@responses.activate
def test_an_answer_exactly_at_the_size_cap_is_read_whole_and_one_byte_more_is_not(monkeypatch):
    monkeypatch.setattr(kv, "MAX_BODY_BYTES", 100_000)
    body = '{"blob":"%s"}' % ("b" * (100_000 - 11))
    assert len(body) == 100_000
    responses.add("GET", API + "/v1/isos", body=body)
    responses.add("GET", API + "/v1/policies", body=body + " ")
    server = started(make_config(KVMFLEET_MCP_MAX_RESULT_CHARS="200000"))
    assert text_of(call(server, "list_isos")) == body
    assert "it was not read to the end" in text_of(call(server, "list_policies"))


@responses.activate
def test_an_error_body_exactly_at_the_error_text_cap_is_shown_whole():
    body = "e" * kv.MAX_ERROR_TEXT
    responses.add("GET", API + "/v1/isos", body=body, status=500)
    assert text_of(call(make_server(), "list_isos")) == \
        "KVM Fleet refused GET /v1/isos: HTTP 500 Internal Server Error\n" + body


@responses.activate
def test_a_plain_answer_exactly_at_the_result_cap_is_passed_on_byte_for_byte():
    body = '{"blob": "%s"}' % ("c" * (2000 - 12))
    assert len(body) == 2000
    responses.add("GET", API + "/v1/isos", body=body)
    assert text_of(call(started(make_config(KVMFLEET_MCP_MAX_RESULT_CHARS="2000")), "list_isos")) == body


def test_data_exactly_at_the_cap_is_never_cut():
    for data in ({"items": [{"id": "d%d" % n} for n in range(50)]}, {"blob": "y" * 3000}):
        text = kv.compact(data)
        assert kv.fit(data, len(text)) == text


def test_a_cut_page_is_never_longer_than_the_cap_and_keeps_every_item_that_fits():
    items = ([{"id": "d0", "notes": "n" * 800}] + [{"id": "d%d" % n, "name": "x" * (n * 7 % 23)} for n in range(1, 15)]
             + [{"id": "d15", "notes": "n" * 400}])
    data = {"items": items, "next_cursor": "c16"}
    full = len(kv.compact(data))

    def page(kept, limit):
        return dict(data, items=items[:kept], _truncated={
            "items_shown": kept, "items_left_out": len(items) - kept,
            "why": "the result was longer than %d characters" % limit,
            "to_see_the_rest": "call again with the same filters and limit=%d, then follow next_cursor" % kept
                               if kept else "even the first item is longer than that: ask for fewer fields of each "
                                            "with fields"})

    shown = []
    for limit in range(1001, full):
        text = kv.fit(data, limit)
        kept = json.loads(text)["_truncated"]["items_shown"]
        shown.append(kept)
        assert json.loads(text) == page(kept, limit)
        assert len(text) <= limit
        assert kept == len(items) - 1 or len(kv.compact(page(kept + 1, limit))) > limit
    assert shown == sorted(shown) and shown[0] == 0 and 1 in shown and shown[-1] == len(items) - 1


@responses.activate
def test_one_object_over_the_cap_is_cut_with_a_note_that_says_how_much_is_missing():
    responses.add("GET", API + "/v1/devices/d1", json={"id": "d1", "blob": "y" * 5000})
    text = text_of(call(started(make_config(KVMFLEET_MCP_MAX_RESULT_CHARS="2000")), "get_device_health",
                        device_id="d1"))
    whole = kv.compact({"id": "d1", "blob": "y" * 5000})
    note = "\n[... cut here: %d more characters were not shown. Ask for less, e.g. with limit or fields.]"
    kept = 2000 - len(note % len(whole))
    assert text == whole[:kept] + note % (len(whole) - kept) and len(text) == 2000


@pytest.mark.parametrize("data", [{"items": [], "blob": "y" * 3000}, {"items": "not a list", "blob": "y" * 3000},
                                  ["y" * 100] * 30])
@responses.activate
def test_an_answer_over_the_cap_without_a_page_of_items_is_cut_with_a_note(data):
    responses.add("GET", API + "/v1/isos", json=data)
    text = text_of(call(started(make_config(KVMFLEET_MCP_MAX_RESULT_CHARS="2000")), "list_isos"))
    assert len(text) == 2000 and text.startswith(kv.compact(data)[:1900]) and "\n[... cut here: " in text


@pytest.mark.parametrize("data", [{"items": [{"name": "Küche-%d" % n} for n in range(20)], "next_cursor": None},
                                  [{"name": "Küche"}, "日本"]])
@responses.activate
def test_a_non_ascii_answer_under_the_cap_is_passed_whole(data):
    responses.add("GET", API + "/v1/isos", body=json.dumps(data, ensure_ascii=False).encode(),
                  content_type="application/json")
    assert text_of(call(make_server(), "list_isos")) == json.dumps(data, ensure_ascii=False)  # as sent


@responses.activate
def test_an_answer_that_is_not_utf8_is_shown_with_replacement_characters_not_a_crash():
    responses.add("GET", API + "/v1/isos", body=b"denied \xff\xfe here", status=403)
    assert text_of(call(make_server(), "list_isos")) == \
        "KVM Fleet refused GET /v1/isos: HTTP 403 Forbidden\ndenied \ufffd\ufffd here"


# -- hidden characters ---------------------------------------------------------------------------


@responses.activate
def test_control_characters_in_an_ascii_error_body_are_made_visible():
    # Security: an ASCII-only body is no proof of harmlessness: ESC can repaint a terminal.
    responses.add("GET", API + "/v1/isos", body=b"denied\x1b[2J\x00\x7f", status=403)
    assert text_of(call(make_server(), "list_isos")) == \
        "KVM Fleet refused GET /v1/isos: HTTP 403 Forbidden\ndenied\\u001b[2J\\u0000\\u007f"


@pytest.mark.parametrize("char,escaped", [("\U000e0041", "\\udb40\\udc41"), ("\U000e007f", "\\udb40\\udc7f"),
                                          ("\U0001d173", "\\ud834\\udd73"), ("\U000e0fff", "\\udb43\\udfff")])
@responses.activate
def test_hidden_characters_beyond_the_bmp_are_written_as_their_surrogate_pair(char, escaped):
    # Security: Unicode tag characters can spell instructions no person sees.
    responses.add("GET", API + "/v1/devices/d1", body=('{"name":"srv%sx"}' % char).encode(),
                  content_type="application/json")
    text = text_of(call(make_server(), "get_device_health", device_id="d1"))
    assert text == '{"name":"srv%sx"}' % escaped and json.loads(text) == {"name": "srv%sx" % char}


# -- the stdin line cap --------------------------------------------------------------------------


class EndlessLine:
    """A stdin whose first line goes on and on: any read of it that is not bounded fails the test."""

    def __init__(self, length: int, then: bytes) -> None:
        self.left = length
        self.rest = io.BytesIO(then)

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0 or size > 65536:
            raise AssertionError("an unbounded read of a line that never ends")
        if self.left:
            piece = min(size, self.left)
            self.left -= piece
            return b"a" * piece
        return self.rest.read(size)


def ping(request_id: int, width: int = 0) -> bytes:
    """A ping padded with spaces to width bytes, newline not counted."""
    raw = json.dumps({"jsonrpc": "2.0", "id": request_id, "method": "ping"}).encode()
    return raw + b" " * (width - len(raw))


def serve_lines(stdin) -> list:
    stdout = io.BytesIO()
    assert kv.serve(make_server(), stdin, stdout) == 0
    return [json.loads(raw) for raw in stdout.getvalue().splitlines()]


OVERLONG = {"jsonrpc": "2.0", "id": None,
            "error": {"code": -32600, "message": "Message longer than 100 bytes; it was discarded"}}


def test_a_line_that_never_ends_is_discarded_in_bounded_reads_and_the_next_one_served(monkeypatch):
    # Security: a client cannot make the server buffer without bound.
    monkeypatch.setattr(kv, "MAX_LINE_BYTES", 100)
    out = serve_lines(EndlessLine(10_000, b"\n" + ping(6) + b"\n"))
    assert out == [OVERLONG, {"jsonrpc": "2.0", "id": 6, "result": {}}]


def test_the_line_cap_is_exact_a_line_at_it_is_served_and_one_byte_over_is_not(monkeypatch):
    monkeypatch.setattr(kv, "MAX_LINE_BYTES", 100)
    stdin = io.BytesIO(ping(1, 100) + b"\n" + ping(2, 101) + b"\n\r\n" + ping(3) + b"\n" + ping(4, 100))
    assert serve_lines(stdin) == [{"jsonrpc": "2.0", "id": 1, "result": {}}, OVERLONG,
                                  {"jsonrpc": "2.0", "id": 3, "result": {}}, {"jsonrpc": "2.0", "id": 4, "result": {}}]
