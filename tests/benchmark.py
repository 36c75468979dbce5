#!/usr/bin/env python3
"""Benchmark kvmfleet_mcp.py against the demo platform on loopback (not collected by pytest).

    python tests/benchmark.py [--python PY] [--rounds 3] [--compare ../shared/bench/lean_server.py [--floor]]

For each server (interleaved, --rounds times, a fresh demo platform each round):
cold start to the initialize answer and to the first tool result (median of
--spawns fresh processes), tools/list bytes and round trip, --calls sequential
tools/call of list_devices and get_device_health (calls/s, p50, p99), peak
RSS (VmHWM), and result bytes against the platform's body bytes; plus the
"limit": the same GETs made directly with one requests.Session in a child
process. Prints a table, the budgets of the performance issue as ratios to
--compare, and one JSON line. Use the real interpreter (not a pyenv shim,
not a venv with an editable install, whose start-up hook costs ~15 ms):
--python defaults to the one running this script. --floor adds a third
server, --compare with this file's code appended but never called: the
start-up and memory that the size of this file alone costs a script.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_platform import DemoPlatform  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "kvmf_demo_viewer"  # noqa: S105 - the demo platform's public viewer token
DEVICE = "dev_srv_pdx_3"
INIT = {"jsonrpc": "2.0", "id": 0, "method": "initialize",
        "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "bench", "version": "1"}}}
LIMIT_SCRIPT = """
import json, sys, time, requests
api, token, device, calls = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
s = requests.Session(); s.headers["Authorization"] = "Bearer " + token
out = {}
for name, path in (("list_devices", "/v1/devices"), ("get_device_health", "/v1/devices/" + device)):
    s.get(api + path).content
    started = time.perf_counter()
    for _ in range(calls):
        body = s.get(api + path).content
    out[name] = {"calls_per_s": calls / (time.perf_counter() - started), "body_bytes": len(body)}
print(json.dumps(out))
"""


class Process:
    """One server process spoken to over raw JSON-RPC lines."""

    def __init__(self, command: List[str], env: Dict[str, str]) -> None:
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, env=env, cwd=ROOT)
        self.next_id = 0

    def send(self, message: Dict[str, Any]) -> None:
        assert self.proc.stdin
        self.proc.stdin.write(json.dumps(message).encode() + b"\n")
        self.proc.stdin.flush()

    def request(self, method: str, params: Dict[str, Any]) -> bytes:
        self.next_id += 1
        self.send({"jsonrpc": "2.0", "id": self.next_id, "method": method, "params": params})
        assert self.proc.stdout
        return self.proc.stdout.readline()

    def peak_rss_mib(self) -> float:
        for row in Path("/proc/%d/status" % self.proc.pid).read_text().splitlines():
            if row.startswith("VmHWM:"):
                return int(row.split()[1]) / 1024
        return float("nan")

    def close(self) -> None:
        assert self.proc.stdin
        self.proc.stdin.close()
        self.proc.wait(timeout=10)


def cold_start(command: List[str], env: Dict[str, str], spawns: int) -> Dict[str, float]:
    init, first = [], []
    for _ in range(spawns):
        process = Process(command, env)
        process.send(INIT)
        assert process.proc.stdout and json.loads(process.proc.stdout.readline())["id"] == 0
        init.append(time.perf_counter() - process.started)
        process.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        reply = json.loads(process.request("tools/call", {"name": "list_devices", "arguments": {}}))
        assert not reply["result"].get("isError"), reply
        first.append(time.perf_counter() - process.started)
        process.close()
    return {"cold_init_ms": statistics.median(init) * 1000, "first_result_ms": statistics.median(first) * 1000}


def sustained(command: List[str], env: Dict[str, str], calls: int) -> Dict[str, Any]:
    process = Process(command, env)
    process.send(INIT)
    assert process.proc.stdout
    process.proc.stdout.readline()
    trips = []
    for _ in range(20):
        started = time.perf_counter()
        listing = process.request("tools/list", {})
        trips.append(time.perf_counter() - started)
    out: Dict[str, Any] = {"tools_list_bytes": len(listing) - 1, "tools_list_ms": statistics.median(trips) * 1000}
    for name, args in (("list_devices", {}), ("get_device_health", {"device_id": DEVICE})):
        params = {"name": name, "arguments": args}
        process.request("tools/call", params)  # warm: imports, connection
        times = []
        started = time.perf_counter()
        for _ in range(calls):
            t = time.perf_counter()
            raw = process.request("tools/call", params)
            times.append(time.perf_counter() - t)
        elapsed = time.perf_counter() - started
        times.sort()
        text = json.loads(raw)["result"]["content"][0]["text"]
        out[name] = {"calls_per_s": calls / elapsed, "p50_ms": times[len(times) // 2] * 1000,
                     "p99_ms": times[int(len(times) * 0.99)] * 1000, "result_text_bytes": len(text.encode())}
    out["peak_rss_mib"] = process.peak_rss_mib()
    process.close()
    return out


def measure(command: List[str], python: str, spawns: int, calls: int) -> Dict[str, Any]:
    with DemoPlatform(keep_alive=True) as platform:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/"),
               "KVMFLEET_API": platform.url, "KVMFLEET_TOKEN": TOKEN}
        result = cold_start(command, env, spawns)
        result.update(sustained(command, env, calls))
        limit = json.loads(subprocess.run([python, "-c", LIMIT_SCRIPT, platform.url, TOKEN, DEVICE, str(calls)],
                                          capture_output=True, check=True, env=env).stdout)
    for name in ("list_devices", "get_device_health"):
        result[name]["limit_calls_per_s"] = limit[name]["calls_per_s"]
        result[name]["platform_body_bytes"] = limit[name]["body_bytes"]
    return result


def median_of(rounds: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The median of every figure across rounds (nested one level)."""
    out: Dict[str, Any] = {}
    for key, value in rounds[0].items():
        if isinstance(value, dict):
            out[key] = median_of([r[key] for r in rounds])
        else:
            out[key] = statistics.median(r[key] for r in rounds)
    return out


def table(label: str, r: Dict[str, Any]) -> None:
    print("%s\n  cold start: initialize %.1f ms, first tool result %.1f ms; peak RSS %.1f MiB" % (
        label, r["cold_init_ms"], r["first_result_ms"], r["peak_rss_mib"]))
    print("  tools/list: %d bytes, %.2f ms round trip" % (r["tools_list_bytes"], r["tools_list_ms"]))
    for name in ("list_devices", "get_device_health"):
        t = r[name]
        print("  %-18s %6.0f calls/s (%.2f x limit %.0f/s)  p50 %.2f ms  p99 %.2f ms  result %d B / platform %d B" % (
            name, t["calls_per_s"], t["calls_per_s"] / t["limit_calls_per_s"], t["limit_calls_per_s"],
            t["p50_ms"], t["p99_ms"], t["result_text_bytes"], t["platform_body_bytes"]))


def budgets(ours: Dict[str, Any], lean: Dict[str, Any]) -> Dict[str, Any]:
    """The performance issue's budgets, as ratios measured in this run."""
    checks = {
        "cold_init <= 0.5x": ours["cold_init_ms"] / lean["cold_init_ms"],
        "first_result <= 1.1x": ours["first_result_ms"] / lean["first_result_ms"],
        "peak_rss <= 1.1x": ours["peak_rss_mib"] / lean["peak_rss_mib"],
    }
    for name in ("list_devices", "get_device_health"):
        checks["%s calls/s >= 1.0x" % name] = ours[name]["calls_per_s"] / lean[name]["calls_per_s"]
        checks["%s p99 <= 1.0x" % name] = ours[name]["p99_ms"] / lean[name]["p99_ms"]
    out = {}
    for name, ratio in checks.items():
        bound = float(name.split()[-1].rstrip("x"))
        ok = ratio >= bound if ">=" in name else ratio <= bound
        out[name] = {"ratio": round(ratio, 3), "ok": ok}
        print("  %-34s %6.3f  %s" % (name, ratio, "ok" if ok else "OVER BUDGET"))
    return out


def floor_server(compare: str, directory: str) -> str:
    """The compare server with this file's code appended as a function that is never called.

    Run as a script, it compiles as much code as kvmfleet_mcp.py (and holds
    its syntax tree) and does nothing else that compare does not: what any
    server of this size pays before its first line runs.
    """
    ours = (ROOT / "kvmfleet_mcp.py").read_text(encoding="utf-8")
    future = "from __future__ import annotations\n"
    body = ours[ours.index(future) + len(future):ours.index('\nif __name__ == "__main__":')]
    text = Path(compare).read_text(encoding="utf-8")
    if future not in text:
        text = future + text
    text += "\n\ndef _never_called() -> None:\n" + "".join(
        "    " + line if line.strip() else "\n" for line in body.splitlines(keepends=True))
    path = Path(directory) / "floor_server.py"
    path.write_text(text, encoding="utf-8")
    return str(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--python", default=sys.executable, help="interpreter that runs the servers")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--spawns", type=int, default=15)
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--compare", help="another stdio server script to measure in the same run, interleaved")
    parser.add_argument("--floor", action="store_true",
                        help="also measure --compare with this file's code added, never called (see floor_server)")
    options = parser.parse_args()
    if options.floor and not options.compare:
        parser.error("--floor needs --compare")
    scratch = tempfile.TemporaryDirectory()
    servers = {"kvmfleet_mcp": [options.python, str(ROOT / "kvmfleet_mcp.py")]}
    if options.compare:
        servers["compare"] = [options.python, options.compare]
    if options.floor:
        servers["floor"] = [options.python, floor_server(options.compare, scratch.name)]
    rounds: Dict[str, List[Dict[str, Any]]] = {name: [] for name in servers}
    for _ in range(options.rounds):
        for name, command in servers.items():
            rounds[name].append(measure(command, options.python, options.spawns, options.calls))
    results = {name: median_of(r) for name, r in rounds.items()}
    for name, result in results.items():
        table("%s (median of %d rounds)" % (name, options.rounds), result)
    summary: Dict[str, Any] = {"results": results}
    ours = results["kvmfleet_mcp"]
    print("  result text / platform body: list %.3f, one %.3f" % tuple(
        ours[n]["result_text_bytes"] / ours[n]["platform_body_bytes"] for n in ("list_devices", "get_device_health")))
    if options.compare:
        print("budgets against %s:" % options.compare)
        summary["budgets"] = budgets(ours, results["compare"])
    if options.floor:
        floor, lean = results["floor"], results["compare"]
        summary["floor"] = {key: round(floor[key] / lean[key], 3) for key in ("first_result_ms", "peak_rss_mib")}
        print("the floor, %s with this file's code added and never called: first tool result %.3fx, "
              "peak RSS %.3fx" % (options.compare, summary["floor"]["first_result_ms"], summary["floor"]["peak_rss_mib"]))
    scratch.cleanup()
    print(json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
