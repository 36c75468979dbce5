"""The real process over stdio, as an MCP client launches it."""
from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import threading
from pathlib import Path
import time

import pytest

import kvmfleet_mcp as kv
from conftest import CANARY, INIT, SERVER, line, replies, run_server, server_env

INITIALIZE = line({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": INIT})
INITIALIZED = line({"jsonrpc": "2.0", "method": "notifications/initialized"})


def unreachable_env(**extra):
    return server_env("https://127.0.0.1:9", **extra)


def test_initialize_then_a_garbage_line_gives_two_replies_and_nothing_else():
    proc = run_server([INITIALIZE, b"not json\n", INITIALIZED], unreachable_env())
    out = replies(proc.stdout)
    assert [m["id"] for m in out] == [0, None]
    assert out[0]["result"]["protocolVersion"] == "2025-11-25"
    assert out[1]["error"]["code"] == -32700
    assert proc.returncode == 0


def test_crlf_input_is_accepted_and_stdout_never_has_crlf():
    proc = run_server([INITIALIZE.replace(b"\n", b"\r\n"), b'{"jsonrpc":"2.0","id":1,"method":"ping"}\r\n', b"\r\n"],
                      unreachable_env())
    assert [m["id"] for m in replies(proc.stdout)] == [0, 1]
    assert b"\r" not in proc.stdout


def test_a_lone_surrogate_in_an_id_is_echoed_escaped():
    proc = run_server([INITIALIZE, b'{"jsonrpc":"2.0","id":"\\ud800x","method":"ping"}\n'], unreachable_env())
    assert replies(proc.stdout)[1]["id"] == "\ud800x"


def test_an_overlong_line_is_discarded_and_the_next_one_served():
    huge = b'{"jsonrpc":"2.0","id":5,"method":"ping","params":{"x":"' + b"a" * (kv.MAX_LINE_BYTES + 10) + b'"}}\n'
    proc = run_server([INITIALIZE, huge, b'{"jsonrpc":"2.0","id":6,"method":"ping"}\n'], unreachable_env())
    out = replies(proc.stdout)
    assert [m["id"] for m in out] == [0, None, 6]
    assert out[1]["error"]["code"] == -32600 and "longer than" in out[1]["error"]["message"]


def initialized_process():
    """A live server that has answered initialize."""
    proc = subprocess.Popen([sys.executable, SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=unreachable_env())
    proc.stdin.write(INITIALIZE)
    proc.stdin.flush()
    assert json.loads(proc.stdout.readline())["id"] == 0
    return proc


def test_eof_on_stdin_exits_0_promptly():
    proc = initialized_process()
    proc.stdin.close()
    assert proc.wait(timeout=10) == 0
    proc.stdout.close()
    proc.stderr.close()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_or_ctrl_c_exits_0_quietly_while_waiting_for_input(signum):
    proc = initialized_process()  # run as a script: it serves from a thread
    proc.send_signal(signum)
    assert proc.wait(timeout=10) == 0
    assert proc.stderr.read() == b""
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        stream.close()


@pytest.mark.parametrize("missing,hint", [("KVMFLEET_API", "KVMFLEET_API is not set"),
                                          ("KVMFLEET_TOKEN", "KVMFLEET_TOKEN is not set")])
def test_missing_configuration_exits_2_with_one_line_and_no_protocol_traffic(missing, hint):
    env = unreachable_env()
    env[missing] = ""
    proc = run_server([INITIALIZE], env)
    assert proc.returncode == 2 and proc.stdout == b""
    assert proc.stderr.count(b"\n") == 1 and hint.encode() in proc.stderr
    assert b"env block" in proc.stderr


def test_plain_http_to_a_remote_host_is_refused_at_start():
    # Security: the bearer token would cross the network in clear text.
    proc = run_server([INITIALIZE], server_env("http://kvmfleet.example.com"))
    assert proc.returncode == 2 and proc.stdout == b"" and b"plain http" in proc.stderr


@pytest.mark.parametrize("api", ["http://127.0.0.1:8080", "http://localhost:1", "http://[::1]:8080"])
def test_plain_http_to_loopback_is_allowed(api):
    assert kv.Config.from_env({"KVMFLEET_API": api, "KVMFLEET_TOKEN": "t"}).api == api


@pytest.mark.parametrize("api", ["https://user:pw@kvmfleet.example", "https://k.example/?x=1", "ftp://k.example",
                                 "kvmfleet.example", "https://"])
def test_odd_base_urls_are_refused(api):
    with pytest.raises(kv.ConfigError):
        kv.Config.from_env({"KVMFLEET_API": api, "KVMFLEET_TOKEN": "t"})


def test_a_missing_dependency_is_reported_at_start():
    # -S: no site-packages, so neither requests nor jsonschema can be found.
    proc = subprocess.run([sys.executable, "-S", SERVER], input=INITIALIZE, capture_output=True,
                          env=unreachable_env(), timeout=30)
    assert proc.returncode == 2 and proc.stdout == b""
    # Both are named at once, with the installer that fits this interpreter (pip: it is not the distro's).
    assert proc.stderr == (
        "kvmfleet-mcp: the Python packages 'requests' and 'jsonschema' are not installed for %s. Install them "
        "with '%s -m pip install requests jsonschema'.\n" % (sys.executable, sys.executable)).encode()


def test_version_prints_the_sha256_of_the_file_itself():
    proc = run_server([], {}, ["--version"])
    digest = hashlib.sha256(open(SERVER, "rb").read()).hexdigest()
    assert proc.returncode == 0
    assert proc.stdout.decode().split() == ["kvmfleet-mcp", kv.__version__, "sha256:" + digest, SERVER]


def test_list_tools_shows_what_this_environment_offers():
    reads = run_server([], {}, ["--list-tools"]).stdout.decode().splitlines()
    assert [row.split()[0] for row in reads[:-1]] == [t.name for t in kv.TOOLS if not t.write]
    assert reads[-1].startswith("(10 write tools hidden")
    writes = run_server([], {"KVMFLEET_MCP_ALLOW_WRITES": "true"}, ["--list-tools"]).stdout.decode().splitlines()
    assert len(writes) == 21
    assert writes[11].split() == ["power_action", "POST", "/v1/devices/{device_id}/power",
                                  "write,", "confirm", "when", "action", "is", "off|off_hard|cycle"]


def test_check_reports_reachable_authenticated_and_write_mode(platform):
    proc = run_server([], server_env(platform.url, "kvmf_demo_viewer"), ["--check"])
    out = proc.stdout.decode()
    assert proc.returncode == 0, out
    assert "reachable: yes" in out and "authenticated: yes" in out and "write mode: off" in out
    assert [(r["path"], r["query"]) for r in platform.requests] == [
        ("/v1/devices", {"limit": ["1"]}), ("/v1/tokens/current", {})]
    assert "token: role viewer, scope write" in out and "org: the token's own" in out


def test_check_with_a_bad_token_says_not_authenticated(platform):
    proc = run_server([], server_env(platform.url, CANARY), ["--check"])
    out = proc.stdout.decode()
    assert proc.returncode == 1 and "authenticated: no" in out and "HTTP 401" in out


def test_check_against_nothing_says_unreachable():
    proc = run_server([], unreachable_env(), ["--check"])
    assert proc.returncode == 1 and proc.stdout.decode().startswith("reachable: no")


def test_end_to_end_over_stdio_against_the_demo_platform(platform):
    calls = [
        {"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
        {"jsonrpc": "2.0", "id": 2, "method": "tools/call",
         "params": {"name": "list_devices", "arguments": {"status": "offline"}}},
        {"jsonrpc": "2.0", "id": "three", "method": "tools/call",
         "params": {"name": "get_device_health", "arguments": {"device_id": "dev_srv_pdx_3"}}},
    ]
    started = time.monotonic()
    proc = run_server([INITIALIZE, INITIALIZED] + [line(c) for c in calls], server_env(platform.url, "kvmf_demo_viewer"))
    assert time.monotonic() - started < 30
    out = {m["id"]: m for m in replies(proc.stdout)}
    assert len(out[1]["result"]["tools"]) == 11
    offline = json.loads(out[2]["result"]["content"][0]["text"])["items"]
    assert offline and {d["status"] for d in offline} == {"offline"}
    health = json.loads(out["three"]["result"]["content"][0]["text"])
    assert health["name"] == "srv-pdx-3" and "health" in health
    seen = platform.requests
    assert [(r["method"], r["path"]) for r in seen] == [("GET", "/v1/devices"), ("GET", "/v1/devices/dev_srv_pdx_3")]
    assert seen[0]["headers"]["x-kvmfleet-mcp-client"] == "kvmfleet-mcp/%s (pytest/1.0)" % kv.__version__
    assert proc.stderr == b""  # quiet on success: no per-call log lines


def test_it_also_runs_as_a_module_from_pythonpath_the_memory_lean_launch(tmp_path):
    env = server_env("https://kvmfleet.test", PYTHONPATH=str(Path(SERVER).parent))
    proc = subprocess.run([sys.executable, "-m", "kvmfleet_mcp"], input=line({"jsonrpc": "2.0", "id": 1,
                          "method": "initialize", "params": INIT}), capture_output=True, env=env, cwd=tmp_path,
                          timeout=30)
    assert proc.returncode == 0 and proc.stderr == b""
    assert replies(proc.stdout)[0]["result"]["serverInfo"]["name"] == "kvmfleet-mcp"


@pytest.mark.skipif(not hasattr(signal, "pthread_sigmask"), reason="POSIX signal masks")
def test_threads_never_take_sigterm_ctrl_c_or_the_deadline_timer_so_the_main_thread_always_handles_them():
    # Python runs handlers in the main thread only: a SIGTERM the kernel gave to
    # the stdin reader (blocked in a read) was once left waiting for ever.
    seen = []
    done = threading.Event()

    def record() -> None:
        seen.append(signal.pthread_sigmask(signal.SIG_BLOCK, set()))
        seen.append((threading.current_thread().name, threading.current_thread().daemon))
        done.set()

    before = signal.pthread_sigmask(signal.SIG_BLOCK, set())
    kv.start_thread(record, "probe")
    assert done.wait(10)
    assert {signal.SIGTERM, signal.SIGINT, signal.SIGALRM} <= seen[0] and seen[1] == ("probe", True)
    assert signal.pthread_sigmask(signal.SIG_BLOCK, set()) == before  # the caller's mask is as it was


def test_writes_set_but_not_exactly_true_draw_one_warning_at_start_that_names_the_value():
    proc = run_server([INITIALIZE], dict(unreachable_env(), KVMFLEET_MCP_ALLOW_WRITES="True"))
    assert proc.returncode == 0 and proc.stderr == (
        b'kvmfleet-mcp: warning: KVMFLEET_MCP_ALLOW_WRITES="True" is not exactly "true": the 10 write tools stay '
        b"hidden. Set it to true, in lower case, to offer them; remove it for read-only use.\n")


@pytest.mark.parametrize("version", [(3, 7, 17, "final", 0), (3, 8, 20, "final", 0)])
def test_a_python_that_can_read_the_file_but_not_run_it_gets_one_clear_line_not_a_traceback(version):
    # Run as Python 3.7 or 3.8 would: the check at the top is the first thing that runs.
    code = ("import sys; sys.version_info = %r; sys.version = '%d.%d.%d (old)'; "
            "exec(compile(open(%r).read(), %r, 'exec'), {'__name__': '__main__'})" % (
                version, version[0], version[1], version[2], SERVER, SERVER))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30, env=unreachable_env())
    assert proc.returncode == 1 and proc.stdout == b""
    assert proc.stderr == ("kvmfleet-mcp needs Python 3.9 or newer; %s is %d.%d.%d.\n" % (
        sys.executable, *version[:3])).encode()
