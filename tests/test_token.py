"""The token: from a file, rotated without a restart, and never written anywhere."""
from __future__ import annotations

import json
import os

import pytest
import responses

import kvmfleet_mcp as kv
from conftest import API, CANARY, INIT, call, line, make_config, replies, run_server, server_env, text_of


def file_server(path):
    server = kv.Server(kv.Config.from_env({"KVMFLEET_API": API, "KVMFLEET_TOKEN_FILE": str(path)}))
    server.handle({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": INIT})
    return server


@responses.activate
def test_the_token_file_is_read_on_every_call_so_rotation_needs_no_restart(tmp_path):
    path = tmp_path / "token"
    path.write_text("kvmf_first\n")
    os.chmod(path, 0o600)
    responses.add("GET", API + "/v1/isos", json={"items": []})
    server = file_server(path)
    call(server, "list_isos")
    path.write_text("kvmf_second")
    call(server, "list_isos")
    assert [c.request.headers["Authorization"] for c in responses.calls] == ["Bearer kvmf_first", "Bearer kvmf_second"]


def test_a_token_file_readable_by_others_draws_a_warning(tmp_path, capsys):
    path = tmp_path / "token"
    path.write_text("kvmf_file_token")
    os.chmod(path, 0o644)
    file_server(path)
    err = capsys.readouterr().err
    assert "readable by group or others" in err and "kvmf_file_token" not in err
    os.chmod(path, 0o600)
    file_server(path)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("content", [None, "", "  \n"])
def test_a_missing_or_empty_token_file_stops_the_start(tmp_path, content):
    path = tmp_path / "token"
    if content is not None:
        path.write_text(content)
    with pytest.raises(kv.ConfigError, match="KVMFLEET_TOKEN_FILE"):
        kv.Config.from_env({"KVMFLEET_API": API, "KVMFLEET_TOKEN_FILE": str(path)})


def test_token_and_token_file_together_are_refused(tmp_path):
    with pytest.raises(kv.ConfigError, match="not both"):
        kv.Config.from_env({"KVMFLEET_API": API, "KVMFLEET_TOKEN": "t", "KVMFLEET_TOKEN_FILE": str(tmp_path)})


@responses.activate
def test_a_platform_that_echoes_the_token_back_cannot_leak_it_to_the_model(capsys):
    # Security: a debug proxy reflecting the Authorization header must not hand the token to the model.
    responses.add("GET", API + "/v1/isos", status=401,
                  body='{"error":"bad token","got":"Authorization: Bearer %s"}' % CANARY)
    server = kv.Server(make_config())
    server.handle({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": INIT})
    text = text_of(call(server, "list_isos"))
    assert CANARY not in text and "Bearer [redacted]" in text
    kv.log("oops " + CANARY)
    assert CANARY not in capsys.readouterr().err


def test_the_token_from_a_file_is_redacted_like_one_from_the_environment(tmp_path, capsys):
    path = tmp_path / "token"
    path.write_text("kvmf_rotated_secret")
    os.chmod(path, 0o600)
    file_server(path)
    kv.log("kvmf_rotated_secret")
    assert capsys.readouterr().err == "kvmfleet-mcp: [redacted]\n"


def test_the_token_never_reaches_stdout_or_stderr_of_the_process_on_any_path(platform, tmp_path):
    # Every failure path the process has that involves the token: a 401, a refused write,
    # bad arguments, a refused confirm, an unknown tool, an internal parse error.
    calls = [
        ("list_devices", {}), ("get_device_health", {"device_id": "../" + CANARY}),
        ("power_action", {"device_id": "dev_srv_pdx_3", "action": "cycle"}), ("nope", {}),
    ]
    lines = [line({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": INIT}), b"{bad\n"]
    lines += [line({"jsonrpc": "2.0", "id": n + 1, "method": "tools/call", "params": {"name": name, "arguments": args}})
              for n, (name, args) in enumerate(calls)]
    env = server_env(platform.url, CANARY, KVMFLEET_MCP_ALLOW_WRITES="true")
    out = replies(run_server(lines, env).stdout)  # run_server asserts the token is absent
    assert len(out) == 6 and json.dumps(out).count(CANARY) == 0
    assert "HTTP 401" in out[2]["result"]["content"][0]["text"]
    path = tmp_path / "token"
    path.write_text(CANARY)
    os.chmod(path, 0o600)
    env = server_env(platform.url, "", KVMFLEET_TOKEN_FILE=str(path))
    proc = run_server(lines, env)
    assert CANARY.encode() not in proc.stdout + proc.stderr and len(replies(proc.stdout)) == 6
