"""The exact words of every platform fault, and the exact bytes the platform receives.

What the model reads when KVM Fleet cannot be reached, refuses, redirects or
answers oddly is pinned here word for word, as are the headers, body bytes,
retries and waits the platform sees, and the configuration errors a person
reads at start. Everything goes through a real interface: the dispatcher
(rpc/call), Config.from_env, or HTTP as recorded by `responses`.
"""
from __future__ import annotations

import json

import pytest
import requests
import responses
import urllib3

import kvmfleet_mcp as kv
from conftest import API, REQUEST_ID, call, make_config, make_server, text_of


READ_SAFE = "A read changes nothing; it is safe to retry."
WRITE_UNKNOWN = "It is not known whether KVM Fleet acted on it: check with a read tool before retrying."
UNMOUNT = API + "/v1/devices/d1/iso:unmount"


def closed_before_answering() -> requests.exceptions.ConnectionError:
    """What requests raises when the platform took the request and closed the connection without answering."""
    return requests.exceptions.ConnectionError(
        urllib3.exceptions.ProtocolError("Connection aborted.", ConnectionResetError(104)))


# -- each kind of network fault, word for word ---------------------------------------------------


@responses.activate
def test_a_connect_timeout_on_a_read_is_tried_three_times_and_says_the_request_was_not_sent(waits):
    responses.add("GET", API + "/v1/isos", body=requests.exceptions.ConnectTimeout("no route"))
    text = text_of(call(make_server(), "list_isos"))
    assert text == ("GET /v1/isos timed out after 5 s connecting to KVM Fleet at %s (ConnectTimeout: no route). "
                    "The request was not sent." % API)
    assert len(responses.calls) == 3 and waits == [0.25, 0.5]


@responses.activate
def test_a_connect_timeout_on_a_write_is_sent_once_and_says_the_request_was_not_sent(waits):
    responses.add("POST", UNMOUNT, body=requests.exceptions.ConnectTimeout("no route"))
    result = call(make_server(writes=True, KVMFLEET_CONNECT_TIMEOUT="2.5"), "unmount_iso", device_id="d1")
    assert result["isError"] is True
    told, said = text_of(result).split("\n")
    assert told == ("POST /v1/devices/d1/iso:unmount timed out after 2.5 s connecting to KVM Fleet at %s "
                    "(ConnectTimeout: no route). The request was not sent." % API)
    assert REQUEST_ID.fullmatch(said)
    assert len(responses.calls) == 1 and waits == []


@responses.activate
def test_a_tls_failure_is_named_tried_once_and_says_the_request_was_not_sent(waits):
    responses.add("GET", API + "/v1/isos", body=requests.exceptions.SSLError("certificate verify failed"))
    text = text_of(call(make_server(), "list_isos"))
    assert text == ("GET /v1/isos could not verify TLS (set KVMFLEET_CA_BUNDLE for a private CA) of KVM Fleet at %s "
                    "(SSLError: certificate verify failed). The request was not sent." % API)
    assert len(responses.calls) == 1 and waits == []


@responses.activate
def test_a_connection_closed_before_an_answer_is_tried_again_for_a_read_and_named(waits):
    responses.add("GET", API + "/v1/isos", body=closed_before_answering())
    text = text_of(call(make_server(), "list_isos"))
    assert text.startswith("GET /v1/isos lost the connection before an answer from KVM Fleet at %s (ConnectionError: "
                           % API)
    assert text.endswith(READ_SAFE) and len(responses.calls) == 3 and waits == [0.25, 0.5]


@responses.activate
def test_a_write_whose_connection_closed_before_an_answer_may_have_acted_and_is_not_sent_again(waits):
    responses.add("POST", UNMOUNT, body=closed_before_answering())
    result = call(make_server(writes=True), "unmount_iso", device_id="d1")
    told, said = text_of(result).split("\n")
    assert told.startswith("POST /v1/devices/d1/iso:unmount lost the connection before an answer from KVM Fleet")
    assert told.endswith(WRITE_UNKNOWN) and REQUEST_ID.fullmatch(said)
    assert len(responses.calls) == 1 and waits == []


@responses.activate
def test_a_connection_error_without_details_is_could_not_connect(waits):
    responses.add("GET", API + "/v1/isos", body=requests.exceptions.ConnectionError())
    assert text_of(call(make_server(), "list_isos")) == (
        "GET /v1/isos could not connect to KVM Fleet at %s (ConnectionError: ). %s" % (API, READ_SAFE))


@responses.activate
def test_a_fault_that_is_no_connection_error_is_failed_talking_to_and_not_tried_again(waits):
    responses.add("GET", API + "/v1/isos", body=requests.exceptions.InvalidHeader("bad header value"))
    assert text_of(call(make_server(), "list_isos")) == (
        "GET /v1/isos failed talking to KVM Fleet at %s (InvalidHeader: bad header value). %s" % (API, READ_SAFE))
    assert len(responses.calls) == 1 and waits == []



@responses.activate
@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "gzip, gzip"])
def test_an_answer_in_an_encoding_that_was_not_asked_for_names_it_and_is_not_tried_again(waits, encoding):
    responses.add("GET", API + "/v1/isos", body=b"\x1f\x8b...", headers={"Content-Encoding": encoding})
    text = text_of(call(make_server(), "list_isos"))
    assert text == ("GET /v1/isos: KVM Fleet answered with Content-Encoding %s, which was not asked for; it was not "
                    "read. %s" % (encoding, READ_SAFE))
    assert len(responses.calls) == 1 and waits == []
    assert responses.calls[0].request.headers["Accept-Encoding"] == "identity"

@responses.activate
def test_a_long_fault_description_is_cut_to_300_characters(waits):
    responses.add("GET", API + "/v1/isos", body=requests.exceptions.InvalidHeader("h" * 450))
    assert text_of(call(make_server(), "list_isos")) == (
        "GET /v1/isos failed talking to KVM Fleet at %s (InvalidHeader: %s\n[... 150 more characters not shown]). %s"
        % (API, "h" * 300, READ_SAFE))


@responses.activate
def test_a_read_timeout_names_the_configured_read_timeout(waits):
    responses.add("GET", API + "/v1/isos", body=requests.exceptions.ReadTimeout("slow"))
    server = make_server(KVMFLEET_READ_TIMEOUT="12.5", KVMFLEET_CONNECT_TIMEOUT="3")
    assert text_of(call(server, "list_isos")) == (
        "GET /v1/isos got no answer within 12.5 s from KVM Fleet at %s (ReadTimeout: slow). %s" % (API, READ_SAFE))


# -- what the platform answered, word for word ---------------------------------------------------


@responses.activate
def test_a_long_retry_after_is_passed_on_cut_to_40_characters(waits):
    responses.add("GET", API + "/v1/isos", status=429, body="later", headers={"Retry-After": "r" * 50})
    assert text_of(call(make_server(), "list_isos")) == (
        "KVM Fleet refused GET /v1/isos: HTTP 429 Too Many Requests (Retry-After: %s\n[... 10 more characters not "
        "shown], how long it asks you to wait before trying again)\nlater" % ("r" * 40))
    assert waits == [] and len(responses.calls) == 1


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
@responses.activate
def test_a_success_whose_body_holds_a_javascript_constant_is_not_json(constant):
    body = '{"temperature": %s}' % constant
    responses.add("GET", API + "/v1/devices/d1", body=body, content_type="application/json")
    result = call(make_server(), "get_device_health", device_id="d1")
    assert result["isError"] is True
    assert text_of(result) == "KVM Fleet answered GET /v1/devices/d1 with HTTP 200, but the body is not JSON:\n" + body


@responses.activate
def test_a_status_without_a_reason_phrase_is_shown_with_an_empty_reason():
    responses.add("GET", API + "/v1/isos", status=599, body="odd proxy")
    assert text_of(call(make_server(), "list_isos")) == "KVM Fleet refused GET /v1/isos: HTTP 599 \nodd proxy"


@responses.activate
def test_the_platforms_own_truncated_field_is_replaced_by_ours_and_every_item_that_fits_is_kept():
    data = {"items": [{"id": "a"}, {"id": "b"}], "_truncated": "x" * 3000}
    responses.add("GET", API + "/v1/isos", json=data)
    server = make_server(KVMFLEET_MCP_MAX_RESULT_CHARS="1001")
    page = json.loads(text_of(call(server, "list_isos")))
    assert page == {"items": [{"id": "a"}], "_truncated": {
        "items_shown": 1, "items_left_out": 1, "why": "the result was longer than 1001 characters",
        "to_see_the_rest": "call again with the same filters and limit=1, then follow next_cursor"}}



@responses.activate
def test_an_oversized_answer_to_a_write_says_it_may_have_acted_not_to_ask_for_fewer_items(monkeypatch):
    monkeypatch.setattr(kv, "MAX_BODY_BYTES", 2 << 20)
    responses.add("POST", UNMOUNT, body=b" " * (3 << 20))
    told, said = text_of(call(make_server(writes=True), "unmount_iso", device_id="d1")).split("\n")
    assert told == "KVM Fleet answered HTTP 200 with more than 2 MiB; it was not read to the end. " + WRITE_UNKNOWN
    assert REQUEST_ID.fullmatch(said)


@pytest.mark.parametrize("collapsing", ["", ".", ".."])
def test_an_id_that_url_libraries_collapse_is_refused_in_these_words(collapsing):
    with pytest.raises(kv.ToolError) as refused:
        kv.build_path("/v1/devices/{device_id}/power", {"device_id": collapsing})
    assert str(refused.value) == "device_id=%r is not an id." % collapsing

# -- what a person reads on stderr at start ------------------------------------------------------


def test_a_token_file_readable_by_others_is_warned_about_in_exactly_these_words(tmp_path, capsys):
    path = tmp_path / "token"
    path.write_text("kvmf_" + "w" * 40)
    path.chmod(0o640)
    kv.Config.from_env({"KVMFLEET_API": API, "KVMFLEET_TOKEN_FILE": str(path)})
    assert capsys.readouterr().err == (
        "kvmfleet-mcp: warning: KVMFLEET_TOKEN_FILE=%s is readable by group or others; chmod 600 it.\n" % path)


def test_the_confirm_mode_model_is_accepted_and_anything_else_is_refused_in_these_words():
    assert make_config(KVMFLEET_MCP_CONFIRM=" model ").human_only is False
    assert make_config(KVMFLEET_MCP_CONFIRM="human").human_only is True
    with pytest.raises(kv.ConfigError) as refused:
        make_config(KVMFLEET_MCP_CONFIRM="h" * 45)
    assert str(refused.value) == ("KVMFLEET_MCP_CONFIRM=%s: give human (a person must confirm every write) or "
                                  "model (confirm: true is enough; the default)." % ("h" * 40))


@pytest.mark.parametrize("name,most", [("KVMFLEET_CONNECT_TIMEOUT", "600"), ("KVMFLEET_READ_TIMEOUT", "600"),
                                       ("KVMFLEET_MCP_CONFIRM_TIMEOUT", "3600")])
def test_a_timeout_may_be_exactly_its_maximum_and_not_one_more(name, most):
    field = {"KVMFLEET_CONNECT_TIMEOUT": "connect_timeout", "KVMFLEET_READ_TIMEOUT": "read_timeout",
             "KVMFLEET_MCP_CONFIRM_TIMEOUT": "confirm_timeout"}[name]
    assert getattr(make_config(**{name: most}), field) == float(most)
    over = str(int(most) + 1)
    with pytest.raises(kv.ConfigError) as refused:
        make_config(**{name: over})
    assert str(refused.value) == "%s=%s: give a number above 0 and at most %s." % (name, over, most)


def test_the_result_cap_runs_from_just_above_1000_to_exactly_ten_million():
    assert make_config(KVMFLEET_MCP_MAX_RESULT_CHARS="1001").max_result_chars == 1001
    assert make_config(KVMFLEET_MCP_MAX_RESULT_CHARS="10000000").max_result_chars == 10_000_000
    for outside in ("1000", "10000001"):
        with pytest.raises(kv.ConfigError) as refused:
            make_config(KVMFLEET_MCP_MAX_RESULT_CHARS=outside)
        assert str(refused.value) == ("KVMFLEET_MCP_MAX_RESULT_CHARS=%s: give a number above 1000 and at most 1e+07."
                                      % outside)


def test_an_org_id_that_is_not_one_is_refused_showing_at_most_80_characters():
    with pytest.raises(kv.ConfigError) as refused:
        make_config(KVMFLEET_ORG_ID="org\r\nX-Evil: 1")
    assert str(refused.value) == "KVMFLEET_ORG_ID='org\\r\\nX-Evil: 1' is not an org id (letters, digits, ._~:@-)."
    with pytest.raises(kv.ConfigError) as refused:
        make_config(KVMFLEET_ORG_ID="/" * 100)
    assert str(refused.value) == "KVMFLEET_ORG_ID=%r is not an org id (letters, digits, ._~:@-)." % ("/" * 80)


def test_a_token_file_that_is_not_utf8_stops_the_start_naming_the_file(tmp_path):
    path = tmp_path / "token"
    path.write_bytes(b"kvmf_\xff\xfe_not_utf8")
    path.chmod(0o600)
    with pytest.raises(kv.ConfigError) as refused:
        kv.Config.from_env({"KVMFLEET_API": API, "KVMFLEET_TOKEN_FILE": str(path)})
    assert str(refused.value) == "Could not read KVMFLEET_TOKEN_FILE=%s (UnicodeDecodeError)." % path


@responses.activate
def test_a_token_shorter_than_8_characters_is_not_redacted_so_ordinary_words_stay_readable():
    responses.add("GET", API + "/v1/isos", status=401, body="Bearer q7z is too short for a token; q7z rejected")
    short = "q7z"
    text = text_of(call(make_server(KVMFLEET_TOKEN=short), "list_isos"))
    assert text.endswith("\nBearer q7z is too short for a token; q7z rejected")
    assert responses.calls[0].request.headers["Authorization"] == "Bearer q7z"


# -- what the platform receives, byte for byte ---------------------------------------------------


@responses.activate
def test_a_write_body_is_compact_utf8_json_with_non_ascii_kept_as_is():
    responses.add("POST", API + "/v1/devices/d1/access-requests", json={"id": "gr_9"})
    call(make_server(writes=True), "request_access", device_id="d1", reason="Küche – patch 日本",
         duration_minutes=60, ticket="CHG-1")
    sent = responses.calls[0].request
    assert sent.body == '{"reason":"Küche – patch 日本","duration_minutes":60,"ticket":"CHG-1"}'.encode()
    assert sent.headers["Content-Type"] == "application/json"


@responses.activate
def test_the_platforms_request_id_goes_into_the_record_cut_to_64_printable_characters(tmp_path):
    path = tmp_path / "agent.jsonl"
    responses.add("GET", API + "/v1/isos", json={}, headers={"X-Request-Id": " ev_" + "7" * 100})
    responses.add("GET", API + "/v1/policies", json={})
    server = make_server(KVMFLEET_MCP_AUDIT_LOG=str(path))
    call(server, "list_isos")
    call(server, "list_policies")
    first, second = [json.loads(row) for row in path.read_text().splitlines()]
    assert first["platform_request_id"] == "ev_" + "7" * 60 and second["platform_request_id"] is None


# -- what the client reads on stdout, byte for byte -----------------------------------------------


@responses.activate
def test_a_reply_line_is_compact_utf8_json_with_non_ascii_kept_as_is():
    responses.add("GET", API + "/v1/devices/d1", body='{"name": "Küche 日本"}', content_type="application/json")
    server = make_server()
    line = server.handle_line(json.dumps({"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {
        "name": "get_device_health", "arguments": {"device_id": "d1"}}}).encode())
    assert line == ('{"jsonrpc":"2.0","id":7,"result":{"content":[{"type":"text","text":"{\\"name\\": '
                    '\\"Küche 日本\\"}"}]}}\n').encode()


def test_a_reply_to_an_id_with_a_lone_surrogate_is_compact_escaped_json():
    line = make_server().handle_line(b'{"jsonrpc": "2.0", "id": "\\ud800x", "method": "ping"}')
    assert line == b'{"jsonrpc":"2.0","id":"\\ud800x","result":{}}\n'
