#!/usr/bin/env python3
"""Try kvmfleet-mcp without an account: the demo platform, the real server, real tool calls.

    python tests/demo.py      # reads as a viewer, then writes as two operators

It starts the loopback demo platform, launches kvmfleet_mcp.py over stdio the
way an MCP client does (a tiny environment plus the config's env block), and
asks the example questions from the README through tools/call, printing each
question, the call the model would make, and what came back. Stdlib only.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_platform import DemoPlatform  # noqa: E402

SERVER = Path(__file__).resolve().parent.parent / "kvmfleet_mcp.py"
DAY_AGO = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 86400))

READS: List[Tuple[str, str, Dict[str, Any]]] = [
    ("Which devices are offline?", "list_devices", {"status": "offline"}),
    ("Show me failed logins in the last 24 hours.", "query_audit_log",
     {"action": "auth.login", "outcome": "failure", "since": DAY_AGO}),
    ("What approvals are waiting on me?", "list_access_grants", {"awaiting_my_approval": True}),
    ("Generate this month's NIS2 snapshot.", "get_compliance_score", {"framework": "nis2"}),
    ("Verify my audit log integrity.", "verify_audit_integrity", {}),
]
CYCLE = {"device_id": "dev_r7525_nord_1", "action": "cycle"}
# (who, questions): olga.operator meets the confirm gate, JIT and 4-eyes;
# omar.operator approves her request; then her power-cycle goes through.
WRITES: List[Tuple[str, List[Tuple[str, str, Dict[str, Any]]]]] = [
    ("kvmf_demo_operator", [
        ("Power-cycle R7525-NORD-1.", "power_action", CYCLE),
        ("(the user says yes)", "power_action", dict(CYCLE, confirm=True)),
        ("Approve the access request for the kernel-patching ticket.", "approve_access",
         {"grant_id": "gr_kernel_patch"}),
    ]),
    ("kvmf_demo_operator2", [
        ("Approve the access request for the kernel-patching ticket.", "approve_access",
         {"grant_id": "gr_kernel_patch", "comment": "CHG-4711 checked"}),
    ]),
    ("kvmf_demo_operator", [
        ("Power-cycle R7525-NORD-1 (confirmed).", "power_action", dict(CYCLE, confirm=True)),
        ("Mount ubuntu-24.04.iso on srv-pdx-3.", "mount_iso",
         {"device_id": "dev_srv_pdx_3", "iso_id": "iso_ubuntu_2404", "confirm": True}),
        ("End the console session open for more than 8 hours on srv-pdx-3.", "end_console_session",
         {"session_id": "cs_pdx3_9h", "confirm": True}),
        ("Acknowledge the disk-full alert.", "acknowledge_alert",
         {"alert_id": "al_disk_full", "note": "cleaning /var"}),
    ]),
]


class StdioClient:
    """The smallest MCP client: one JSON-RPC line out, one line back."""

    def __init__(self, env: Dict[str, str]) -> None:
        self.proc = subprocess.Popen([sys.executable, str(SERVER)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, env=env)
        self.next_id = 0

    def request(self, method: str, params: Dict[str, Any]) -> Dict[str, Any]:
        self.next_id += 1
        message = {"jsonrpc": "2.0", "id": self.next_id, "method": method, "params": params}
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps(message).encode() + b"\n")
        self.proc.stdin.flush()
        reply = json.loads(self.proc.stdout.readline())
        if "error" in reply:
            raise RuntimeError(reply["error"]["message"])
        return reply["result"]

    def close(self) -> int:
        assert self.proc.stdin
        self.proc.stdin.close()
        return self.proc.wait(timeout=10)


def session(url: str, token: str, writes: bool, questions: List[Tuple[str, str, Dict[str, Any]]]) -> None:
    env = {"PATH": "/usr/bin:/bin", "KVMFLEET_API": url, "KVMFLEET_TOKEN": token,
           "KVMFLEET_MCP_ALLOW_WRITES": "true" if writes else ""}
    client = StdioClient(env)
    client.request("initialize", {"protocolVersion": "2025-11-25", "capabilities": {},
                                  "clientInfo": {"name": "kvmfleet-demo", "version": "1"}})
    tools = client.request("tools/list", {})["tools"]
    print("\n== %s: %d tools offered (writes %s)" % (token, len(tools), "on" if writes else "off"))
    for question, tool, args in questions:
        result = client.request("tools/call", {"name": tool, "arguments": args})
        text = result["content"][0]["text"]
        print("\n> %s\n  %s(%s)%s" % (question, tool, json.dumps(args), "  -> isError" if result.get("isError") else ""))
        print("  " + (text if len(text) <= 400 else text[:400] + " ...").replace("\n", "\n  "))
    client.close()


def main() -> int:
    with DemoPlatform() as platform:
        print("demo platform on %s" % platform.url)
        session(platform.url, "kvmf_demo_viewer", False, READS)
        for token, questions in WRITES:
            session(platform.url, token, True, questions)
    return 0


if __name__ == "__main__":
    sys.exit(main())
