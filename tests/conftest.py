"""Shared fixtures: a config, an in-process server, the demo platform, the real process."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import pytest
import responses

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import kvmfleet_mcp as kv  # noqa: E402
from demo_platform import DemoPlatform  # noqa: E402

SERVER = str(ROOT / "kvmfleet_mcp.py")
API = "https://kvmfleet.test"
# A canary: if this string shows up in anything the server writes, the token leaked.
CANARY = "kvmf_CANARY_5f0c1e_do_not_print"
INIT = {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "pytest", "version": "1.0"}}
MODERN_META = {
    "io.modelcontextprotocol/protocolVersion": "2026-07-28",
    "io.modelcontextprotocol/clientInfo": {"name": "pytest-modern", "version": "2.0"},
    "io.modelcontextprotocol/clientCapabilities": {},
}


def make_config(**overrides: Any) -> kv.Config:
    env = {"KVMFLEET_API": API, "KVMFLEET_TOKEN": CANARY}
    env.update(overrides)
    return kv.Config.from_env(env)


def make_server(writes: bool = False, initialize: Optional[str] = "2025-11-25", **env: str) -> kv.Server:
    """An in-process server; with writes, its tools are decided (token scope: write) before the test's mocks."""
    config = make_config(KVMFLEET_MCP_ALLOW_WRITES="true" if writes else "", **env)
    server = kv.Server(config)
    if initialize:
        reply = server.handle({"jsonrpc": "2.0", "id": 0, "method": "initialize",
                               "params": dict(INIT, protocolVersion=initialize)})
        assert reply is not None and "result" in reply
    if writes:
        with responses.RequestsMock() as mock:
            mock.add("GET", API + "/v1/tokens/current", json={"scope": "write", "role": "operator"})
            server.offered()
    return server


def rpc(server: kv.Server, method: str, params: Optional[Dict[str, Any]] = None, id: Any = 1) -> Dict[str, Any]:
    """Send one request through the dispatcher and return the decoded reply."""
    message: Dict[str, Any] = {"jsonrpc": "2.0", "id": id, "method": method}
    if params is not None:
        message["params"] = params
    out = server.handle_line(json.dumps(message).encode())
    assert out is not None and out.endswith(b"\n") and out.count(b"\n") == 1
    return json.loads(out)


def call(server: kv.Server, name: str, **arguments: Any) -> Dict[str, Any]:
    """tools/call through the dispatcher; returns the result object."""
    reply = rpc(server, "tools/call", {"name": name, "arguments": arguments})
    assert "result" in reply, reply
    return reply["result"]


def text_of(result: Dict[str, Any]) -> str:
    """The text of a result: one text block, plus the request-id block a write's result ends with."""
    blocks = result["content"]
    assert [block["type"] for block in blocks] == ["text"] * len(blocks)
    assert len(blocks) == 1 or len(blocks) == 2 and REQUEST_ID.fullmatch(blocks[1]["text"]), blocks
    return blocks[0]["text"]


REQUEST_ID = re.compile(r"Request id: ([0-9a-f]{32}) \(sent as its Idempotency-Key; quote it to find this call "
                        r"in KVM Fleet's audit log\)\.")


def writes_sent(calls: List[Any]) -> List[Any]:
    """The calls (responses' or the demo platform's) that were not reads."""
    return [c for c in calls if (c["method"] if isinstance(c, dict) else c.request.method) != "GET"]


@pytest.fixture(scope="session")
def demo() -> Iterator[DemoPlatform]:
    with DemoPlatform() as platform:
        yield platform


@pytest.fixture
def platform(demo: DemoPlatform) -> DemoPlatform:
    demo.reset()
    return demo


def server_env(api: str, token: str = CANARY, **extra: str) -> Dict[str, str]:
    """The tiny environment MCP clients give a server, plus its env block."""
    env = {key: os.environ[key] for key in ("HOME", "PATH", "USER", "SHELL", "TERM", "LOGNAME") if key in os.environ}
    env.update(KVMFLEET_API=api, KVMFLEET_TOKEN=token, **extra)
    return env


def run_server(lines: List[bytes], env: Dict[str, str], args: Optional[List[str]] = None,
               timeout: float = 30) -> subprocess.CompletedProcess:
    """Run the real process over stdio; asserts its token never shows in its output."""
    proc = subprocess.run([sys.executable, SERVER] + (args or []), input=b"".join(lines),
                          capture_output=True, env=env, timeout=timeout)
    token = env.get("KVMFLEET_TOKEN", "").encode()
    assert not token or token not in proc.stdout + proc.stderr
    return proc


def platform_calls(platform: DemoPlatform) -> List[Dict[str, Any]]:
    """What reached the demo platform, less the token-scope probe a write-mode server makes once."""
    return [r for r in platform.requests if r["path"] != "/v1/tokens/current"]


def line(message: Any) -> bytes:
    return json.dumps(message).encode() + b"\n"


def replies(stdout: bytes) -> List[Dict[str, Any]]:
    """Every stdout line, each of which must be one JSON-RPC 2.0 message."""
    out = []
    for raw in stdout.split(b"\n")[:-1]:
        message = json.loads(raw)
        assert message["jsonrpc"] == "2.0"
        out.append(message)
    assert stdout.endswith(b"\n") or not stdout
    return out


STRICT = os.environ.get("KVMFLEET_TESTS_STRICT") == "1"


def require(available: bool, what: str) -> None:
    """Skip when an optional test tool is missing; under CI (KVMFLEET_TESTS_STRICT=1) fail instead."""
    if available:
        return
    if STRICT:
        pytest.fail("%s is required when KVMFLEET_TESTS_STRICT=1" % what)
    pytest.skip("%s is not installed" % what, allow_module_level=True)


@pytest.fixture
def waits(monkeypatch):
    """Every back-off the server would sleep, recorded instead of slept."""
    slept: list = []
    monkeypatch.setattr(kv.time, "sleep", slept.append)
    return slept
