"""The command line, in-process: --version, --list-tools, --check, config errors, argparse.

tests/test_stdio.py runs these modes as a real process too; mutation testing cannot see
into a subprocess, so here main() is called directly and its exact output pinned.
Serving over stdio (main() with no arguments) is tested elsewhere, not here.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import socket
import sys
import time

import pytest
import responses

from conftest import API

import kvmfleet_mcp as kv

HIDDEN_LINE = '(10 write tools hidden: KVMFLEET_MCP_ALLOW_WRITES is not exactly "true")'
READ_ROWS = [
    "list_devices                GET  /v1/devices                                   read",
    "get_device_health           GET  /v1/devices/{device_id}                       read",
    "query_audit_log             GET  /v1/audit/events                              read",
    "verify_audit_integrity      GET  /v1/audit/integrity                           read",
    "list_open_console_sessions  GET  /v1/console-sessions?open_only=true           read",
    "list_access_grants          GET  /v1/access-grants                             read",
    "list_alerts                 GET  /v1/alerts/history                            read",
    "list_policies               GET  /v1/policies                                  read",
    "list_isos                   GET  /v1/isos                                      read",
    "get_audit_chain_head        GET  /v1/audit/head                                read",
    "get_compliance_score        POST /v1/reports/{framework}                       read",
]
WRITE_ROWS = [
    "power_action                POST /v1/devices/{device_id}/power                 "
    "write, confirm when action is off|off_hard|cycle",
    "request_access              POST /v1/devices/{device_id}/access-requests       write, confirm never",
    "approve_access              POST /v1/access-grants/{grant_id}:approve          write, confirm never",
    "deny_access                 POST /v1/access-grants/{grant_id}:deny             write, confirm never",
    "revoke_access               POST /v1/access-grants/{grant_id}:revoke           write, confirm always",
    "mount_iso                   POST /v1/devices/{device_id}/iso:mount             write, confirm always",
    "unmount_iso                 POST /v1/devices/{device_id}/iso:unmount           write, confirm never",
    "end_console_session         POST /v1/console-sessions/{session_id}:end         write, confirm always",
    "acknowledge_alert           POST /v1/alerts/history/{alert_id}/acknowledge     write, confirm never",
    "resolve_alert               POST /v1/alerts/history/{alert_id}/resolve         write, confirm never",
]
NO_ORG = "org: the token's own (KVMFLEET_ORG_ID not set)"
WRITES_OFF = "write mode: off (set KVMFLEET_MCP_ALLOW_WRITES=true to offer the write tools)"
WRITES_ON = "write mode: on (the write tools are offered)"
CHECK_CLIENT = "kvmfleet-mcp/%s (check/unknown)" % kv.__version__


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """No KVMFLEET_* or proxy variable of the developer's shell reaches these tests."""
    for name in list(os.environ):
        if name.startswith("KVMFLEET") or name.lower() in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
            monkeypatch.delenv(name)


def use(monkeypatch, api, bearer="kvmf_demo_viewer", **extra):
    monkeypatch.setenv("KVMFLEET_API", api)
    monkeypatch.setenv("KVMFLEET_TOKEN", bearer)
    for name, value in extra.items():
        monkeypatch.setenv(name, value)


def closed_port_url():
    """A loopback URL where nothing listens: the port was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return "http://127.0.0.1:%d" % port


def check_lines(out, api, status):
    """Split --check output: its first line must say the API answered with this status."""
    lines = out.splitlines()
    assert re.fullmatch(r"reachable: yes \(%s answered HTTP %d in \d+ ms\)" % (re.escape(api), status),
                        lines[0]), lines[0]
    return lines[1:]


# -- --version -----------------------------------------------------------------------------------


def test_version_prints_name_version_the_files_sha256_and_its_real_path(capsys):
    path = os.path.realpath(kv.__file__)
    with open(path, "rb") as handle:
        digest = hashlib.sha256(handle.read()).hexdigest()
    assert kv.main(["--version"]) == 0
    out, err = capsys.readouterr()
    assert out == "kvmfleet-mcp %s sha256:%s %s\n" % (kv.__version__, digest, path)
    assert re.fullmatch(r"kvmfleet-mcp \d+\.\d+\.\d+\S* sha256:[0-9a-f]{64} /\S+\n", out)
    assert err == ""


def test_without_argv_main_reads_the_mode_from_sys_argv(monkeypatch, capsys):
    def never(*args, **kwargs):
        raise AssertionError("main() went on to serve instead of printing the version")

    monkeypatch.setattr(kv, "serve", never)
    monkeypatch.setattr(kv.signal, "signal", lambda *args: None)
    monkeypatch.setattr(sys, "argv", ["kvmfleet-mcp", "--version"])
    assert kv.main() == 0
    assert capsys.readouterr().out.startswith("kvmfleet-mcp %s sha256:" % kv.__version__)


def test_version_needs_no_configuration_and_no_dependency(monkeypatch, capsys):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None)
    assert kv.main(["--version"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("kvmfleet-mcp %s sha256:" % kv.__version__) and err == ""


def test_file_sha256_hashes_the_module_file_itself():
    with open(os.path.realpath(kv.__file__), "rb") as handle:
        assert kv._file_sha256() == hashlib.sha256(handle.read()).hexdigest()


def test_print_writes_one_line_to_stdout_and_nothing_to_stderr(capsys):
    kv._print("one\ntwo")
    assert capsys.readouterr() == ("one\ntwo\n", "")


# -- --list-tools --------------------------------------------------------------------------------


def test_list_tools_without_writes_shows_the_11_read_tools_and_says_10_write_tools_are_hidden(capsys):
    assert kv.main(["--list-tools"]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == READ_ROWS + [HIDDEN_LINE]
    assert out.endswith(HIDDEN_LINE + "\n") and err == ""


def test_list_tools_with_writes_exactly_true_shows_all_21_tools_and_no_hidden_line(monkeypatch, capsys):
    monkeypatch.setenv("KVMFLEET_MCP_ALLOW_WRITES", "true")
    assert kv.main(["--list-tools"]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == READ_ROWS + WRITE_ROWS
    assert "hidden" not in out and err == ""


@pytest.mark.parametrize("value", ["TRUE", "True", "1", "yes", "true ", " true", ""])
def test_list_tools_treats_anything_but_exactly_true_as_writes_off(monkeypatch, capsys, value):
    monkeypatch.setenv("KVMFLEET_MCP_ALLOW_WRITES", value)
    assert kv.main(["--list-tools"]) == 0
    assert capsys.readouterr().out.splitlines() == READ_ROWS + [HIDDEN_LINE]


def test_list_tools_needs_no_api_token_or_dependency(monkeypatch, capsys):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None)
    assert kv.main(["--list-tools"]) == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 12 and err == ""


def test_list_tools_with_an_allow_list_shows_only_those_tools_in_table_order(monkeypatch, capsys):
    monkeypatch.setenv("KVMFLEET_MCP_TOOLS", " list_isos , list_devices,,")
    assert kv.main(["--list-tools"]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == [READ_ROWS[0], READ_ROWS[8]] and err == ""  # no write tool was named


def test_list_tools_with_an_allow_list_and_writes_shows_the_named_write_tools_too(monkeypatch, capsys):
    monkeypatch.setenv("KVMFLEET_MCP_TOOLS", "revoke_access,power_action,list_alerts")
    monkeypatch.setenv("KVMFLEET_MCP_ALLOW_WRITES", "true")
    assert kv.main(["--list-tools"]) == 0
    assert capsys.readouterr().out.splitlines() == [READ_ROWS[6], WRITE_ROWS[0], WRITE_ROWS[4]]


def test_list_tools_with_an_allow_list_of_write_tools_but_writes_off_shows_only_the_hidden_line(monkeypatch, capsys):
    monkeypatch.setenv("KVMFLEET_MCP_TOOLS", "power_action,mount_iso")
    assert kv.main(["--list-tools"]) == 0
    assert capsys.readouterr().out.splitlines() == [HIDDEN_LINE.replace("10", "2")]


def test_list_tools_with_an_unknown_tool_name_exits_2_with_the_message_on_stderr_only(monkeypatch, capsys):
    monkeypatch.setenv("KVMFLEET_MCP_TOOLS", "list_devices,reboot_everything,nope")
    assert kv.main(["--list-tools"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == ("kvmfleet-mcp: KVMFLEET_MCP_TOOLS names unknown tools: reboot_everything, nope. "
                   "Known: %s.\n" % ", ".join(tool.name for tool in kv.TOOLS))
    assert err.startswith("kvmfleet-mcp: KVMFLEET_MCP_TOOLS names unknown tools: reboot_everything, nope. "
                          "Known: list_devices, get_device_health, query_audit_log, ")


# -- _confirm_rule -------------------------------------------------------------------------------


@pytest.mark.parametrize("name,rule", [
    ("list_devices", "never"),              # a read tool: confirm is None
    ("request_access", "never"),            # a write tool without a confirm gate
    ("revoke_access", "always"),            # confirm=ALWAYS
    ("mount_iso", "always"),
    ("end_console_session", "always"),
    ("power_action", "when action is off|off_hard|cycle"),  # confirm=(arg, values)
])
def test_confirm_rule_words_each_kind_of_tool_in_the_table(name, rule):
    assert kv._confirm_rule(kv.TOOLS_BY_NAME[name]) == rule


@pytest.mark.parametrize("confirm,rule", [
    (None, "never"),
    (kv.ALWAYS, "always"),
    (("mode", ("hard",)), "when mode is hard"),
    (("x", ("a", "b", "c")), "when x is a|b|c"),
    ("sometimes", "never"),  # any other string is not ALWAYS
])
def test_confirm_rule_words_each_kind_of_confirm_value(confirm, rule):
    tool = kv.Tool("t", "T", "d", "POST", "/v1/t", {}, read_only=False, confirm=confirm)
    assert kv._confirm_rule(tool) == rule


# -- --check against the demo platform -----------------------------------------------------------


def test_check_with_a_good_token_reports_reachable_authenticated_org_token_and_write_mode(platform, monkeypatch,
                                                                                          capsys):
    use(monkeypatch, platform.url)
    assert kv.main(["--check"]) == 0
    out, err = capsys.readouterr()
    assert check_lines(out, platform.url, 200) == [
        "authenticated: yes", NO_ORG, "token: role viewer, scope write", WRITES_OFF]
    assert out.endswith(WRITES_OFF + "\n") and err == ""
    assert [(r["method"], r["path"], r["query"]) for r in platform.requests] == [
        ("GET", "/v1/devices", {"limit": ["1"]}), ("GET", "/v1/tokens/current", {})]
    for request in platform.requests:
        assert request["headers"]["authorization"] == "Bearer kvmf_demo_viewer"
        assert request["headers"]["x-kvmfleet-mcp-client"] == CHECK_CLIENT
        assert "x-kvmfleet-org-id" not in request["headers"]
        assert "idempotency-key" not in request["headers"]


def test_check_says_how_long_the_api_took_in_whole_milliseconds(platform, monkeypatch, capsys):
    readings = iter([1000.0])

    class Clock:
        """time, except monotonic(): 1000.0 first, 0.9 s later ever after."""

        def monotonic(self):
            return next(readings, 1000.9)

        def __getattr__(self, name):
            return getattr(time, name)

    monkeypatch.setattr(kv, "time", Clock())
    use(monkeypatch, platform.url)
    assert kv.main(["--check"]) == 0
    # 1000.9 - 1000.0 is 899.99999... ms in floating point: rounded, not cut, to 900.
    assert capsys.readouterr().out.splitlines()[0] == "reachable: yes (%s answered HTTP 200 in 900 ms)" % platform.url


def test_check_with_a_bad_token_says_not_authenticated_with_the_platforms_words_and_exits_1(platform, monkeypatch,
                                                                                            capsys):
    use(monkeypatch, platform.url, bearer="kvmf_not_a_real_token")
    assert kv.main(["--check"]) == 1
    out, err = capsys.readouterr()
    assert check_lines(out, platform.url, 401) == [
        "authenticated: no",
        "KVM Fleet refused the token (HTTP 401): it is mistyped, revoked or expired. A token is shown once, when it "
        "is created: create a new one in the KVM Fleet web console.",
        "KVM Fleet refused GET /v1/devices: HTTP 401 Unauthorized",
        '{"error": {"code": "unauthenticated", "message": "missing or invalid bearer token"}}',
        NO_ORG,
        "token: GET /v1/tokens/current answered HTTP 401 without a token description",
        WRITES_OFF,
    ]
    assert err == "" and "kvmf_not_a_real_token" not in out


def test_check_against_an_unreachable_api_says_reachable_no_and_exits_1(monkeypatch, capsys, waits):
    api = closed_port_url()
    use(monkeypatch, api)
    assert kv.main(["--check"]) == 1
    out, err = capsys.readouterr()
    # One plain sentence, for a person: no urllib3 object, no advice meant for a model.
    assert out == ("reachable: no\nNothing takes connections at %s (connection refused): check the host and port in "
                   "KVMFLEET_API, and that KVM Fleet is up.\n" % api[len("http://"):])
    assert err == ""
    assert waits == [0.25, 0.5]  # a read: tried three times


def test_check_with_an_org_id_names_it_and_sends_it_on_both_requests(platform, monkeypatch, capsys):
    use(monkeypatch, platform.url, bearer="kvmf_demo_operator", KVMFLEET_ORG_ID="org_customer_a")
    assert kv.main(["--check"]) == 0
    out = capsys.readouterr().out
    assert check_lines(out, platform.url, 200) == [
        "authenticated: yes", "org: org_customer_a", "token: role operator, scope write", WRITES_OFF]
    assert [r["headers"].get("x-kvmfleet-org-id") for r in platform.requests] == ["org_customer_a"] * 2


def test_check_with_an_org_the_token_may_not_act_for_exits_1_with_the_platforms_refusal(platform, monkeypatch,
                                                                                        capsys):
    use(monkeypatch, platform.url, bearer="kvmf_demo_operator", KVMFLEET_ORG_ID="org_evil")
    assert kv.main(["--check"]) == 1
    assert check_lines(capsys.readouterr().out, platform.url, 403) == [
        "authenticated: unknown",
        "The token may not list devices (HTTP 403): check its role, and KVMFLEET_ORG_ID if it is set.",
        "KVM Fleet refused GET /v1/devices: HTTP 403 Forbidden",
        '{"error": {"code": "org_forbidden", "message": "this token may not act for org \'org_evil\'"}}',
        "org: org_evil",
        "token: GET /v1/tokens/current answered HTTP 403 without a token description",
        WRITES_OFF,
    ]


def test_check_with_writes_exactly_true_says_write_mode_is_on(platform, monkeypatch, capsys):
    use(monkeypatch, platform.url, bearer="kvmf_demo_operator", KVMFLEET_MCP_ALLOW_WRITES="true")
    assert kv.main(["--check"]) == 0
    assert check_lines(capsys.readouterr().out, platform.url, 200) == [
        "authenticated: yes", NO_ORG, "token: role operator, scope write", WRITES_ON]


@pytest.mark.parametrize("value", ["TRUE", "1", "True "])
def test_check_with_writes_not_exactly_true_names_the_value_it_got_and_says_write_mode_is_off(
        platform, monkeypatch, capsys, value):
    use(monkeypatch, platform.url, KVMFLEET_MCP_ALLOW_WRITES=value)
    assert kv.main(["--check"]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[-1] == 'write mode: off (KVMFLEET_MCP_ALLOW_WRITES="%s" is not exactly "true")' % value
    assert err == ('kvmfleet-mcp: warning: KVMFLEET_MCP_ALLOW_WRITES="%s" is not exactly "true": the 10 write tools '
                   "stay hidden. Set it to true, in lower case, to offer them; remove it for read-only use.\n" % value)


def test_check_with_a_read_only_token_and_writes_on_shows_the_read_scope(platform, monkeypatch, capsys):
    use(monkeypatch, platform.url, bearer="kvmf_demo_readonly", KVMFLEET_MCP_ALLOW_WRITES="true")
    assert kv.main(["--check"]) == 0
    assert check_lines(capsys.readouterr().out, platform.url, 200) == [
        "authenticated: yes", NO_ORG, "token: role operator, scope read",
        "write mode: off: the token is read-only (scope read), so the write tools stay hidden; use a token with "
        "scope write"]


def test_check_reports_a_redirect_and_does_not_follow_it(platform, monkeypatch, capsys):
    platform.fail_next(302, "", {"Location": "https://elsewhere.example/login"})
    use(monkeypatch, platform.url)
    assert kv.main(["--check"]) == 1
    assert check_lines(capsys.readouterr().out, platform.url, 302) == [
        "authenticated: unknown",
        "KVMFLEET_API redirects elsewhere: give the URL it names (the server never follows a redirect).",
        "KVM Fleet answered GET /v1/devices with HTTP 302 Found, a redirect to elsewhere.example. It was not "
        "followed: the token is only ever sent to %s. Check KVMFLEET_API." % platform.url,
        NO_ORG, "token: role viewer, scope write", WRITES_OFF]
    assert [r["path"] for r in platform.requests] == ["/v1/devices", "/v1/tokens/current"]


def test_check_when_the_token_scope_is_unknown_still_exits_0(platform, monkeypatch, capsys):
    use(monkeypatch, platform.url)
    platform.fail_next(200, '{"items": []}')
    platform.fail_next(404, '{"error": {"code": "not_found"}}')
    assert kv.main(["--check"]) == 0
    assert check_lines(capsys.readouterr().out, platform.url, 200) == [
        "authenticated: yes", NO_ORG, "token: GET /v1/tokens/current answered HTTP 404 without a token description",
        WRITES_OFF]


def test_check_with_writes_on_and_the_token_scope_unknown_says_so(platform, monkeypatch, capsys):
    use(monkeypatch, platform.url, bearer="kvmf_demo_operator", KVMFLEET_MCP_ALLOW_WRITES="true")
    platform.fail_next(200, '{"items": []}')
    platform.fail_next(404, '{"error": {"code": "not_found"}}')
    assert kv.main(["--check"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        "write mode: on (the write tools are offered; the token's scope could not be read)")


@pytest.mark.parametrize("api_path", ["/v1", "/api"])
def test_check_with_a_wrong_base_path_names_the_path_not_the_token(platform, monkeypatch, capsys, api_path):
    use(monkeypatch, platform.url + api_path)
    assert kv.main(["--check"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[1:3] == ["authenticated: unknown", "%s%s has no /v1/devices (HTTP 404): KVMFLEET_API must be KVM "
                          "Fleet's base URL, e.g. https://app.kvmfleet.io, without a path such as /v1." % (
                              platform.url, api_path)]


@pytest.mark.parametrize("status,said", [
    (500, "KVM Fleet had a fault (HTTP 500): try again later."),
    (200, "%s answered, but not as KVM Fleet does: check KVMFLEET_API."),
])
def test_check_with_a_fault_or_a_page_that_is_not_kvm_fleet_says_which(platform, monkeypatch, capsys, status, said,
                                                                       waits):
    for _ in range(3):
        platform.fail_next(status, "<html>welcome to nginx</html>")
    use(monkeypatch, platform.url)
    assert kv.main(["--check"]) == 1
    assert capsys.readouterr().out.splitlines()[2] == (said % platform.url if "%s" in said else said)


def test_check_against_a_host_that_does_not_exist_says_dns(monkeypatch, capsys, waits):
    use(monkeypatch, "https://kvmfleet.invalid")
    assert kv.main(["--check"]) == 1
    assert capsys.readouterr().out == ("reachable: no\nThe host kvmfleet.invalid was not found (DNS): check "
                                       "KVMFLEET_API.\n")


@responses.activate
@pytest.mark.parametrize("fault,said", [
    ("SSLError", "The TLS certificate of kvmfleet.test could not be verified: for a private CA, set KVMFLEET_CA_BUNDLE "
                 "to its PEM file; else check the host name in KVMFLEET_API."),
    ("ProxyError", "The proxy in HTTPS_PROXY could not take the request to kvmfleet.test: check HTTPS_PROXY, or name "
                   "kvmfleet.test in NO_PROXY."),
    ("ConnectTimeout", "Connecting to kvmfleet.test took longer than 5 s: check the host and port in KVMFLEET_API, "
                       "and any firewall between."),
    ("ReadTimeout", "kvmfleet.test took the request but did not answer within 30 s: check that KVMFLEET_API is KVM "
                    "Fleet."),
])
def test_check_names_a_tls_proxy_or_timeout_failure_in_one_plain_sentence(monkeypatch, capsys, waits, fault, said):
    import requests

    responses.add("GET", API + "/v1/devices", body=getattr(requests.exceptions, fault)("deep urllib3 detail"))
    use(monkeypatch, API, HTTPS_PROXY="http://proxy.test:3128")
    assert kv.main(["--check"]) == 1
    assert capsys.readouterr().out == "reachable: no\n%s\n" % said


@responses.activate
def test_check_shows_a_token_description_that_is_not_json_as_unknown(monkeypatch, capsys):
    responses.add("GET", API + "/v1/devices", json={"items": []})
    responses.add("GET", API + "/v1/tokens/current", body="<html>", status=200)
    use(monkeypatch, API, bearer="kvmf_demo_viewer")
    assert kv.main(["--check"]) == 0
    assert capsys.readouterr().out.splitlines()[1:] == [
        "authenticated: yes", NO_ORG, "token: GET /v1/tokens/current answered HTTP 200 without a token description",
        WRITES_OFF]


@responses.activate
def test_check_shows_hidden_characters_in_the_token_description_escaped(monkeypatch, capsys):
    responses.add("GET", API + "/v1/devices", json={"items": []})
    responses.add("GET", API + "/v1/tokens/current", json={"role": "op\x1b[2J", "scope": "write\u202e"})
    use(monkeypatch, API, bearer="kvmf_demo_viewer")
    assert kv.main(["--check"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\u202e" not in out and "role op\\u001b[2J, scope write\\u202e" in out


@responses.activate
def test_check_redacts_the_token_if_the_platform_echoes_it_in_the_token_description(monkeypatch, capsys):
    responses.add("GET", API + "/v1/devices", json={"items": []})
    responses.add("GET", API + "/v1/tokens/current", json={"role": "kvmf_echoed_token_1", "scope": "write"})
    use(monkeypatch, API, bearer="kvmf_echoed_token_1")
    assert kv.main(["--check"]) == 0
    out = capsys.readouterr().out
    assert "kvmf_echoed_token_1" not in out and "token: role [redacted], scope write" in out


# -- configuration errors: exit 2, the reason on stderr, nothing on stdout -----------------------


@pytest.mark.parametrize("env,message", [
    ({"KVMFLEET_TOKEN": "kvmf_demo_viewer"},
     "KVMFLEET_API is not set. Put your KVM Fleet URL, e.g. https://app.kvmfleet.io, "
     "in the env block of this server in your MCP client config."),
    ({"KVMFLEET_API": "   ", "KVMFLEET_TOKEN": "kvmf_demo_viewer"},
     "KVMFLEET_API is not set. Put your KVM Fleet URL, e.g. https://app.kvmfleet.io, "
     "in the env block of this server in your MCP client config."),
    ({"KVMFLEET_API": API},
     "KVMFLEET_TOKEN is not set. Create an API token (kvmf_...) in the KVM Fleet web console (it is shown once) "
     "and put it in the env block of this server in your MCP client config, or its path in KVMFLEET_TOKEN_FILE."),
    ({"KVMFLEET_API": API, "KVMFLEET_TOKEN": "kvmf_demo_viewer", "KVMFLEET_TOKEN_FILE": "/nonexistent/token"},
     "Set KVMFLEET_TOKEN or KVMFLEET_TOKEN_FILE, not both."),
    ({"KVMFLEET_API": API, "KVMFLEET_TOKEN": "kvmf_demo_viewer", "KVMFLEET_CONNECT_TIMEOUT": "soon"},
     "KVMFLEET_CONNECT_TIMEOUT=soon: give a number above 0 and at most 600."),
    ({"KVMFLEET_API": API, "KVMFLEET_TOKEN": "kvmf_demo_viewer", "KVMFLEET_READ_TIMEOUT": "0"},
     "KVMFLEET_READ_TIMEOUT=0: give a number above 0 and at most 600."),
    ({"KVMFLEET_API": API, "KVMFLEET_TOKEN": "kvmf_demo_viewer", "KVMFLEET_READ_TIMEOUT": "601"},
     "KVMFLEET_READ_TIMEOUT=601: give a number above 0 and at most 600."),
    ({"KVMFLEET_API": API, "KVMFLEET_TOKEN": "kvmf_demo_viewer", "KVMFLEET_MCP_TOOLS": "bogus"},
     "KVMFLEET_MCP_TOOLS names unknown tools: bogus. Known: %s." % ", ".join(kv.TOOLS_BY_NAME)),
    ({"KVMFLEET_API": "http://kvmfleet.example", "KVMFLEET_TOKEN": "kvmf_demo_viewer"},
     "KVMFLEET_API=http://kvmfleet.example uses plain http to a host that is not loopback; the token would "
     "cross the network unencrypted. Use https:// (or, knowingly, set KVMFLEET_ALLOW_INSECURE_HTTP=true)."),
], ids=["api-unset", "api-blank", "token-unset", "token-and-token-file", "connect-timeout-not-a-number",
        "read-timeout-zero", "read-timeout-too-long", "unknown-tool", "plain-http-off-loopback"])
def test_check_with_a_configuration_error_exits_2_with_the_message_on_stderr_and_nothing_on_stdout(
        monkeypatch, capsys, env, message):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert kv.main(["--check"]) == 2
    assert capsys.readouterr() == ("", "kvmfleet-mcp: %s\n" % message)


def test_check_with_a_missing_token_file_exits_2_naming_the_file(monkeypatch, capsys, tmp_path):
    missing = str(tmp_path / "no-such-token")
    monkeypatch.setenv("KVMFLEET_API", API)
    monkeypatch.setenv("KVMFLEET_TOKEN_FILE", missing)
    assert kv.main(["--check"]) == 2
    assert capsys.readouterr() == (
        "", "kvmfleet-mcp: Could not read KVMFLEET_TOKEN_FILE=%s (FileNotFoundError).\n" % missing)


def test_a_configuration_error_is_reported_before_a_missing_dependency(monkeypatch, capsys):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None)
    assert kv.main(["--check"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("kvmfleet-mcp: KVMFLEET_API is not set.") and "not installed" not in err


# -- missing dependencies ------------------------------------------------------------------------


def missing(monkeypatch, *absent):
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name in absent else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def test_a_missing_dependency_exits_2_naming_it_and_how_to_install_it_for_this_python(platform, monkeypatch, capsys):
    missing(monkeypatch, "jsonschema")
    use(monkeypatch, platform.url)
    monkeypatch.setattr(kv.sys, "base_prefix", "/elsewhere")  # as in a virtual environment: pip fits
    assert kv.main(["--check"]) == 2
    assert capsys.readouterr() == ("", (
        "kvmfleet-mcp: the Python package 'jsonschema' is not installed for %s. Install it with "
        "'%s -m pip install jsonschema'.\n" % (sys.executable, sys.executable)))
    assert platform.requests == []


def test_both_missing_dependencies_are_named_at_once_with_the_distros_packages_where_pip_is_refused(
        monkeypatch, tmp_path):
    missing(monkeypatch, "requests", "jsonschema")
    (tmp_path / "EXTERNALLY-MANAGED").write_text("[externally-managed]\n")
    monkeypatch.setattr(kv.sys, "base_prefix", kv.sys.prefix)  # not a virtual environment
    monkeypatch.setattr(kv.sysconfig, "get_path", lambda name: str(tmp_path))
    assert kv._missing_dependency() == (
        "the Python packages 'requests' and 'jsonschema' are not installed for %s. Install them with "
        "'sudo apt install python3-requests python3-jsonschema' (Debian, Ubuntu) or 'sudo dnf install "
        "python3-requests python3-jsonschema' (Fedora, RHEL), or make a virtual environment beside this file "
        "('python3 -m venv venv && venv/bin/pip install requests jsonschema') and run the file with "
        "venv/bin/python3." % sys.executable)


def test_a_python_of_its_own_without_pep_668_is_told_to_use_pip(monkeypatch, tmp_path):
    missing(monkeypatch, "requests")
    monkeypatch.setattr(kv.sys, "base_prefix", kv.sys.prefix)
    monkeypatch.setattr(kv.sysconfig, "get_path", lambda name: str(tmp_path))  # no EXTERNALLY-MANAGED here
    assert kv._missing_dependency().endswith("Install it with '%s -m pip install requests'." % sys.executable)


def test_with_both_dependencies_present_nothing_is_missing():
    assert kv._missing_dependency() is None


# -- argparse: --help and bad options exit through SystemExit ------------------------------------


def test_help_exits_0_and_describes_the_three_modes(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit) as exited:
        kv.main(["--help"])
    assert exited.value.code == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0] == "usage: kvmfleet-mcp [-h] [--version | --list-tools | --check]"
    assert "kvmfleet-mcp: a Model Context Protocol server for a KVM Fleet estate." in lines
    for row in ("  --version     print the version and this file's sha256",
                "  --list-tools  print the tools this environment offers",
                "  --check       make two reads (a device, the token's scope) and report"):
        assert row in lines
    assert err == ""


def test_help_without_the_module_docstring_as_under_python_oo_has_no_description(monkeypatch, capsys):
    monkeypatch.setattr(kv, "__doc__", None)
    with pytest.raises(SystemExit) as exited:
        kv.main(["--help"])
    assert exited.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == ["usage: kvmfleet-mcp [-h] [--version | --list-tools | --check]", ""]
    assert lines[2] in ("options:", "optional arguments:")  # straight on to the options (3.10+, 3.9)


@pytest.mark.parametrize("argv,complaint", [
    (["--frobnicate"], "unrecognized arguments: --frobnicate"),
    (["serve"], "unrecognized arguments: serve"),
    (["--version", "--check"], "argument --check: not allowed with argument --version"),
    (["--list-tools", "--version"], "argument --version: not allowed with argument --list-tools"),
])
def test_an_unknown_option_or_two_modes_exit_2_with_usage_on_stderr(monkeypatch, capsys, argv, complaint):
    with pytest.raises(SystemExit) as exited:
        kv.main(argv)
    assert exited.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("usage: kvmfleet-mcp ") and err.endswith("kvmfleet-mcp: error: %s\n" % complaint)


@pytest.mark.parametrize("argv,mode", [(["--version"], "version"), (["--list-tools"], "list-tools"),
                                       (["--check"], "check"), ([], "")])
def test_cli_mode_names_the_mode_argv_asks_for(argv, mode):
    assert kv._cli_mode(argv) == mode


# -- serving: in place, SIGTERM exits 0 -------------------------------------------------------------


def test_main_serves_in_place_and_returns_the_serving_status(monkeypatch):
    served = []
    use(monkeypatch, API)
    saved = kv.signal.getsignal(kv.signal.SIGTERM)
    monkeypatch.setattr(kv, "_serve_stdio", lambda server: served.append(server) or 7)
    try:
        assert kv.main([]) == 7
        assert kv.signal.getsignal(kv.signal.SIGTERM) is kv._leave
    finally:
        kv.signal.signal(kv.signal.SIGTERM, saved)
    assert len(served) == 1 and isinstance(served[0], kv.Server)


def test_sigterm_leaves_with_status_0():
    with pytest.raises(SystemExit) as left:
        kv._leave(kv.signal.SIGTERM, None)
    assert left.value.code == 0
