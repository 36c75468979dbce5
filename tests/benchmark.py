#!/usr/bin/env python3
"""Benchmark kvmfleet_mcp.py against the demo platform on loopback (not collected by pytest).

    PY=$(python3 -c 'import sys; print(sys.executable)')   # the real interpreter, not a pyenv shim
    $PY tests/benchmark.py [--rounds 3] [--compare ../shared/bench/lean_server.py]

Method. For each server, interleaved (server A, server B, A, B, ...) --rounds
times, each round against a fresh demo platform on loopback with keep-alive:
cold start to the initialize answer and to the first tool result (the median
of --spawns fresh processes), tools/list bytes and round trip, --calls
sequential tools/call of list_devices and get_device_health (calls/s, p50,
p99), peak RSS (VmHWM), and result bytes against the platform's body bytes;
plus the "limit": the same GETs made directly with one requests.Session in a
child process. The servers get a client's tiny environment. Figures are the
medians of the rounds. The machine is shared and noisy, so compare ratios
measured in one run, never absolute times from two; and use the real
interpreter (a pyenv shim adds ~100 ms to every start, and a venv with an
editable install ~15 ms). It prints a table, the budgets of the
simplification issue as ratios to --compare, and one JSON line.
../shared/bench/mcp_bench.py measures the same against its own fake API and
is the cross-check the README's figures come from.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
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
    """The simplification issue's budgets, as ratios measured in this run."""
    checks = {
        "cold_init <= 0.6x": ours["cold_init_ms"] / lean["cold_init_ms"],
        "first_result <= 1.6x": ours["first_result_ms"] / lean["first_result_ms"],
        "peak_rss <= 1.35x": ours["peak_rss_mib"] / lean["peak_rss_mib"],
    }
    for name in ("list_devices", "get_device_health"):
        checks["%s calls/s >= 0.9x" % name] = ours[name]["calls_per_s"] / lean[name]["calls_per_s"]
        checks["%s p99 <= 1.3x" % name] = ours[name]["p99_ms"] / lean[name]["p99_ms"]
    out = {}
    for name, ratio in checks.items():
        bound = float(name.split()[-1].rstrip("x"))
        ok = ratio >= bound if ">=" in name else ratio <= bound
        out[name] = {"ratio": round(ratio, 3), "ok": ok}
        print("  %-34s %6.3f  %s" % (name, ratio, "ok" if ok else "OVER BUDGET"))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--python", default=sys.executable, help="interpreter that runs the servers")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--spawns", type=int, default=15)
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--compare", help="another stdio server script to measure in the same run, interleaved")
    options = parser.parse_args()
    servers = {"kvmfleet_mcp": [options.python, str(ROOT / "kvmfleet_mcp.py")]}
    if options.compare:
        servers["compare"] = [options.python, options.compare]
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
    print(json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
