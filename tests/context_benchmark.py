#!/usr/bin/env python3
"""Measure the context a model needs to answer the seed's seven read questions, two ways (not collected by pytest).

    python tests/context_benchmark.py [--sizes 50,20000] [--events 1000,30000] [--latency 0.05] [--json-only]

For each fleet size (--sizes counts devices in all, the demo platform's 9
seeded ones included; --events adds generated audit events to its 29 seeded
ones) it starts the loopback demo platform, which sleeps --latency seconds
before each answer, as a distant platform would. For each way it launches one
real server process over stdio, as an MCP client does (this interpreter, an
environment of PATH, KVMFLEET_API and the viewer token), sends initialize, one
warm-up call (list_isos, not counted), then every question's tools/call lines.

The new way makes the calls of the server's own prompts (read from
kvmfleet_mcp.PROMPTS, so this follows the server): count_by and fields;
question 4 has no prompt and lists open sessions with fields. The seed way is
what a model could do before those arguments: plain list calls, 500 items a
page, following every next_cursor, since counting needs every page. Both ways
read every page a call leaves (so both answers are exact), and where a page is
cut at the result cap (_truncated) both do what it says: the same call with
limit=items_shown, then that smaller page's next_cursor, keeping the smaller
limit. Questions 6 and 7 are the same calls both ways.

Per question, size and way: tool calls, platform requests (less the token
probe), the characters of every text block of every result, tokens estimated
as characters / 4 (no tokenizer is run), and milliseconds from the first
tools/call sent to the last result read. Prints a Markdown table a README can
include as is, then one JSON line with every figure and what each answer said.
Error results are listed under the table, never hidden. Stdlib only.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
import kvmfleet_mcp as kv  # noqa: E402
from demo_platform import DemoPlatform  # noqa: E402

TOKEN = "kvmf_demo_viewer"  # noqa: S105 - the demo platform's public viewer token
PAGE = 500                  # the most items the platform gives a page
CHARS_PER_TOKEN = 4         # a rough rate for JSON text; the table says "~tokens"
WAYS = ("seed", "new")
FIGURES = ("calls", "requests", "chars", "tokens", "ms")
INIT = {"protocolVersion": "2025-11-25", "capabilities": {},
        "clientInfo": {"name": "context-benchmark", "version": "1"}}

JSON = Dict[str, Any]
Call = Tuple[str, JSON]
# What an answer says, from its count_by result (or None), every listed item
# (once per id) and every other object it read, merged.
Facts = Callable[[Optional[JSON], List[JSON], JSON], JSON]


def _total(count: Optional[JSON], items: List[JSON]) -> int:
    return count["total"] if count else len(items)


def questions() -> List[Tuple[str, List[Call], List[Call], Facts]]:
    """The seven questions: (question, the new way's calls, the seed way's calls, its facts)."""
    prompts = {prompt.name: prompt for prompt in kv.PROMPTS}

    def steps(name: str, **given: str) -> List[Call]:
        return kv.prompt_steps(prompts[name], given)

    failed = {"action": "auth.login", "outcome": "failure", "since": "24h", "limit": PAGE}
    return [
        ("How many devices, which are offline?", steps("fleet_status"), [("list_devices", {"limit": PAGE})],
         # The new way lists offline devices only, so all its items are offline.
         lambda count, items, other: {"devices": _total(count, items), "offline": len(items) if count else
                                      sum(d.get("status") == "offline" for d in items)}),
        ("Who failed to log in in the last 24 h?", steps("failed_logins", window="24h"),
         [("query_audit_log", failed)],
         lambda count, items, other: {"failed_logins": _total(count, items), "actors": len(
             count["counts"]) if count else len({e.get("actor") for e in items})}),
        ("What approvals wait on me?", steps("approvals_waiting"),
         [("list_access_grants", {"awaiting_my_approval": True, "status": "pending", "limit": PAGE})],
         lambda count, items, other: {"pending": sorted(g["id"] for g in items)}),
        ("Which console sessions are open, and since when?",
         [("list_open_console_sessions", {"fields": ["user", "device_id", "started_at"], "limit": PAGE})],
         [("list_open_console_sessions", {"limit": PAGE})],
         lambda count, items, other: {"open": sorted((s["id"], s.get("started_at")) for s in items)}),
        ("What alerted overnight?", steps("overnight_alerts", window="12h"),
         [("list_alerts", {"since": "12h", "limit": PAGE})],
         lambda count, items, other: {"alerts": _total(count, items), "firing": count["counts"].get(
             "firing", 0) if count else sum(a.get("status") == "firing" for a in items)}),
        ("This month's NIS2 snapshot", steps("nis2_snapshot"), steps("nis2_snapshot"),
         lambda count, items, other: {"score": other.get("score"), "dropped": other.get("dropped_controls")}),
        ("Is the audit log intact, and when was it last anchored?", steps("audit_integrity"),
         steps("audit_integrity"),
         lambda count, items, other: {"intact": other.get("ok"), "last_anchored_at": other.get("last_anchored_at")}),
    ]


class StdioClient:
    """One server process, as an MCP client runs it: a JSON-RPC line out, a line back."""

    def __init__(self, url: str) -> None:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "KVMFLEET_API": url, "KVMFLEET_TOKEN": TOKEN}
        self.stderr = tempfile.TemporaryFile()  # read only if the server dies
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "kvmfleet_mcp.py")], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.stderr, env=env)
        self.next_id = 0
        self.request("initialize", INIT)
        # A server loads its validator and HTTP library, and connects, on its
        # first call: a cost paid once a session, whichever way, so question 1
        # is not charged for it.
        if self.request("tools/call", {"name": "list_isos", "arguments": {}}).get("isError"):
            raise RuntimeError("the warm-up call list_isos failed")

    def request(self, method: str, params: JSON) -> JSON:
        """One request and its reply's result; a protocol error or a dead server raises."""
        self.next_id += 1
        assert self.proc.stdin and self.proc.stdout
        message = {"jsonrpc": "2.0", "id": self.next_id, "method": method, "params": params}
        self.proc.stdin.write(json.dumps(message).encode() + b"\n")
        self.proc.stdin.flush()
        raw = self.proc.stdout.readline()
        if not raw:
            self.stderr.seek(0)
            raise RuntimeError("the server exited (%s):\n%s" % (self.proc.wait(), self.stderr.read().decode()))
        reply = json.loads(raw)
        if "error" in reply:
            raise RuntimeError("%s answered %s" % (method, reply["error"]))
        return dict(reply["result"])

    def close(self) -> None:
        assert self.proc.stdin
        self.proc.stdin.close()
        self.proc.wait(timeout=30)
        self.stderr.close()


def answer(client: StdioClient, calls: List[Call]) -> Tuple[List[Tuple[Call, JSON]], List[JSON]]:
    """Each call and every page it leaves, as a model wanting all of it makes them: (call, result)s, and pages read."""
    results, pages = [], []
    for tool, first in calls:
        args = dict(first)
        while True:
            result = client.request("tools/call", {"name": tool, "arguments": args})
            results.append(((tool, dict(args)), result))
            try:
                page = None if result.get("isError") else json.loads(result["content"][0]["text"])
            except ValueError:  # text cut short (kvmfleet_mcp.cut): nothing more to follow
                page = None
            if not isinstance(page, dict):
                break
            pages.append(page)
            # A duration names another window on each call: later pages keep the first page's, as it says.
            window = " ".join(block["text"] for block in result["content"][1:])
            args.update(re.findall(r"\b(since|until)=(\S+) \(", window))
            cut = page.get("_truncated")
            if cut and cut["items_shown"]:
                args["limit"] = cut["items_shown"]  # the same cursor again, for a page that fits
            elif page.get("next_cursor") and "count_by" not in args:
                args["cursor"] = page["next_cursor"]
            else:
                break
    return results, pages


def measure_way(platform: DemoPlatform, way: str) -> List[JSON]:
    """Every question answered one way ("seed" or "new") by one fresh server process: its figures."""
    client = StdioClient(platform.url)
    out = []
    for _, new, seed, facts in questions():
        before = len(platform.requests)
        started = time.perf_counter()
        results, pages = answer(client, new if way == "new" else seed)
        elapsed = time.perf_counter() - started
        chars = sum(len(block.get("text", "")) for _, result in results for block in result["content"])
        count = next((page for page in pages if "count_by" in page), None)
        # A cut page is read again in full, so its items are kept once, by id.
        items = {item["id"]: item for page in pages for item in page.get("items", [])}
        other: JSON = {}
        for page in pages:
            other.update(page if "items" not in page else {})
        out.append({
            "calls": len(results), "chars": chars, "tokens": round(chars / CHARS_PER_TOKEN),
            "requests": sum(r["path"] != "/v1/tokens/current" for r in platform.requests[before:]),
            "ms": round(elapsed * 1000, 1), "facts": facts(count, list(items.values()), other),
            "errors": [{"call": call, "text": "\n".join(block.get("text", "") for block in result["content"])}
                       for call, result in results if result.get("isError")]})
    client.close()
    return out


def measure(devices: int, events: int, latency: float) -> JSON:
    """One fleet size, both ways, the platform reset before each: every figure, and the platform's own counts."""
    seeded = len(DemoPlatform().devices)
    if devices < seeded:
        raise ValueError("a fleet has at least the %d seeded devices, not %d" % (seeded, devices))
    with DemoPlatform(devices=devices - seeded, events=events, latency=latency, keep_alive=True) as platform:
        fleet = {"devices": len(platform.devices), "events": len(platform.events),
                 "offline": sum(device["status"] == "offline" for device in platform.devices.values())}
        ways = {}
        for way in WAYS:
            platform.reset()  # both ways start from the same state
            ways[way] = measure_way(platform, way)
    rows = [{"question": question[0], "seed": seed, "new": new}
            for question, seed, new in zip(questions(), ways["seed"], ways["new"])]
    totals = {way: {key: round(sum(row[way][key] for row in rows), 1) for key in FIGURES} for way in WAYS}
    return {"devices": devices, "events": events, "latency_s": latency, "fleet": fleet,
            "questions": rows, "totals": totals}


def table(sizes: List[JSON]) -> str:
    """The Markdown table: a row per question and size, seed way beside new way, and a totals row per size."""
    names = ("calls", "requests", "characters", "~tokens", "ms")
    lines = ["| Question | Fleet | %s |" % " | ".join("%s %s" % (way, name) for name in names for way in ("Seed", "New")),
             "|---|---|" + "---:|" * 2 * len(FIGURES)]

    def cells(figures: JSON) -> str:
        return " | ".join("{:,.0f}".format(figures[way][key]) for key in FIGURES for way in WAYS)

    for size in sizes:
        fleet = "{:,} devices, {:,} events".format(size["devices"], size["events"])
        for n, row in enumerate(size["questions"], 1):
            failed = " (an error result: see below)" if row["seed"]["errors"] or row["new"]["errors"] else ""
            lines.append("| %d. %s%s | %s | %s |" % (n, row["question"], failed, fleet, cells(row)))
        lines.append("| **All seven** | %s | %s |" % (fleet, cells(size["totals"])))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="50,20000", help="devices in all, per size (the 9 seeded ones included)")
    parser.add_argument("--events", default="1000,30000", help="generated audit events, per size")
    parser.add_argument("--latency", type=float, default=0.05, help="seconds the platform waits before each answer")
    parser.add_argument("--json-only", action="store_true", help="print only the JSON line")
    options = parser.parse_args()
    sizes, events = ([int(n) for n in text.split(",")] for text in (options.sizes, options.events))
    if len(sizes) != len(events):
        parser.error("--sizes and --events need as many values each")
    results = [measure(devices, count, options.latency) for devices, count in zip(sizes, events)]
    if not options.json_only:
        print(table(results))
        print("\nPlatform latency %g ms a request; ~tokens = characters / %d. Seed way: plain list calls, %d a page, "
              "every page; new way: the server's prompts (count_by, fields)." % (
                  options.latency * 1000, CHARS_PER_TOKEN, PAGE))
        for size in results:
            for row in size["questions"]:
                for way in WAYS:
                    for error in row[way]["errors"]:
                        print("\nError result at %s devices, %s way, %r: %s\n%s" % (
                            size["devices"], way, row["question"], json.dumps(error["call"]), error["text"]))
    print(json.dumps({"sizes": results}, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
