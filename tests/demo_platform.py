#!/usr/bin/env python3
"""A loopback fake of the KVM Fleet platform, for end-to-end tests and demos.

It answers the REST API described in kvmfleet-api.md from seeded in-memory
data: devices, a hash-chained audit log, console sessions, JIT access grants
with 4-eyes approval, alerts, policies, ISOs and a NIS2 report. Timestamps
are relative to the moment this module was imported, so "open for 9 hours"
stays true whenever the tests run.

In tests:
    with DemoPlatform() as platform:        # binds 127.0.0.1 on a free port
        ...  # point KVMFLEET_API at platform.url; inspect platform.requests
    with DemoPlatform(devices=20_000, events=30_000, latency=0.05) as platform:
        ...  # a fleet of realistic size behind a 50 ms platform

By hand (try the MCP server without an account):
    python tests/demo_platform.py [--port 8765] [--verbose]
        [--devices N] [--events N] [--latency SECONDS]
It prints the base URL and four demo tokens to stderr, then serves until
Ctrl-C or SIGTERM. --devices and --events add that many generated devices
and audit events to the seeded ones (the same ones on every run: the
generator has a fixed seed); --latency sleeps before answering each request.

Every list that pages (devices, audit events, console sessions, access
grants, alerts) takes limit (1-500, default 50) and an opaque cursor. A
cursor is bound to the filters it was issued under, and to the records
that existed when the first page was served, so that paging through a
growing audit log visits each event exactly once.

SECURITY: this is a toy. The tokens are public, nothing is persisted, and it
should only ever listen on loopback. Stdlib only; Python 3.9+.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import heapq
import json
import random
import re
import signal
import sys
import threading
import time
from datetime import datetime
from datetime import timedelta
from datetime import timezone
from http.server import BaseHTTPRequestHandler
from http.server import ThreadingHTTPServer
from typing import Any
from typing import Dict
from typing import List
from typing import NamedTuple
from typing import Optional
from typing import Tuple
from urllib.parse import parse_qs
from urllib.parse import unquote

####
#### Constants
####

# token -> org role; token -> user name. Public on purpose: this is a demo.
TOKENS: dict[str, str] = {
    "kvmf_demo_viewer": "viewer",
    "kvmf_demo_operator": "operator",
    "kvmf_demo_operator2": "operator",
    "kvmf_demo_admin": "org_admin",
    "kvmf_demo_readonly": "operator",  # an operator's token created with scope "read"
}
USERS: dict[str, str] = {
    "kvmf_demo_viewer": "vic.viewer",
    "kvmf_demo_operator": "olga.operator",
    "kvmf_demo_operator2": "omar.operator",
    "kvmf_demo_admin": "ada.admin",
    "kvmf_demo_readonly": "olga.operator",
}
# Token scope (vendor roadmap: GET /v1/tokens/current); a read token may not write.
READ_ONLY_TOKENS = ("kvmf_demo_readonly",)
# MSP context (vendor roadmap: header x-kvmfleet-org-id): the orgs a token may act for.
OWN_ORG = "org_demo"
MANAGED_ORGS = ("org_demo", "org_customer_a")

START = datetime.now(timezone.utc).replace(microsecond=0)  # "now" for the seed
GENESIS_HASH = "0" * 64                  # prev_hash of the first audit event
WRITE_ROLES = ("operator", "org_admin")  # viewers may only read
POWER_ACTIONS = ("on", "off", "off_hard", "cycle", "reboot")
MAX_GRANT_MINUTES = 480                  # matches policy pol_jit_approval below
JSON_TYPE = "application/json; charset=utf-8"
DEFAULT_LIMIT = 50                       # page size when a list call names no limit
_LIMIT_MSG = "limit must be an integer from 1 to 500"
_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(\.\d+)?([Zz]|[+-]\d{2}:\d{2})")

# The route table: method, path pattern, handler suffix, audit action, the
# phrase a viewer is refused with (None = a read), and the JSON body fields
# the route accepts (None = no body read). "{id}" captures one decoded
# segment; "{id}:verb" splits that segment on its last ':'.
ROUTES: Tuple[Tuple[str, str, str, str, Optional[str], Optional[Tuple[str, ...]]], ...] = (
    ("GET", "v1/devices", "list_devices", "device.list", None, None),
    ("GET", "v1/devices/{id}", "get_device", "device.read", None, None),
    ("GET", "v1/audit/events", "list_events", "audit.query", None, None),
    ("GET", "v1/audit/integrity", "integrity", "audit.verify", None, None),
    ("GET", "v1/audit/head", "head", "audit.head", None, None),
    ("GET", "v1/console-sessions", "list_sessions", "console.list", None, None),
    ("GET", "v1/access-grants", "list_grants", "access.list", None, None),
    ("GET", "v1/alerts/history", "list_alerts", "alert.list", None, None),
    ("GET", "v1/policies", "list_policies", "policy.list", None, None),
    ("GET", "v1/isos", "list_isos", "iso.list", None, None),
    ("GET", "v1/tokens/current", "token", "token.read", None, None),
    ("POST", "v1/reports/{id}", "report", "report.generate", None, ("period",)),
    ("POST", "v1/devices/{id}/power", "power", "device.power",
     "run power actions", ("action",)),
    ("POST", "v1/devices/{id}/access-requests", "request_access", "access.request",
     "request access", ("reason", "duration_minutes", "ticket")),
    ("POST", "v1/access-grants/{id}:approve", "approve", "access.approve",
     "approve access requests", ("comment",)),
    ("POST", "v1/access-grants/{id}:deny", "deny", "access.deny",
     "deny access requests", ("reason",)),
    ("POST", "v1/access-grants/{id}:revoke", "revoke", "access.revoke",
     "revoke access grants", ("reason",)),
    ("POST", "v1/devices/{id}/iso:mount", "mount", "iso.mount", "mount ISOs", ("iso_id",)),
    ("POST", "v1/devices/{id}/iso:unmount", "unmount", "iso.unmount", "unmount ISOs", ()),
    ("POST", "v1/console-sessions/{id}:end", "end_session", "console.end",
     "end console sessions", ("reason",)),
    ("POST", "v1/alerts/history/{id}/acknowledge", "acknowledge", "alert.acknowledge",
     "acknowledge alerts", ("note",)),
    ("POST", "v1/alerts/history/{id}/resolve", "resolve", "alert.resolve",
     "resolve alerts", ("note",)),
)

# NIS2 Art. 21(2) measures plus Art. 23; 9 of 11 pass, so the score is 0.82.
_NIS2 = (
    ("NIS2-21.2.a", "Risk analysis and information system security policies", "pass", ""),
    ("NIS2-21.2.b", "Incident handling", "pass", ""),
    ("NIS2-21.2.c", "Business continuity, backup management and disaster recovery", "fail",
     "no restore test recorded in the period"),
    ("NIS2-21.2.d", "Supply chain security", "pass", ""),
    ("NIS2-21.2.e", "Security in acquisition, development and maintenance", "pass", ""),
    ("NIS2-21.2.f", "Assessing the effectiveness of risk-management measures", "pass", ""),
    ("NIS2-21.2.g", "Basic cyber hygiene practices and training", "pass", ""),
    ("NIS2-21.2.h", "Cryptography and encryption", "pass", ""),
    ("NIS2-21.2.i", "Human resources security, access control and asset management", "dropped",
     "console session cs_pdx3_9h open longer than 8 hours"),
    ("NIS2-21.2.j", "Multi-factor authentication and secured communications", "pass", ""),
    ("NIS2-23", "Reporting obligations for significant incidents", "pass", ""),
)

# The generated fleet (devices=N, events=M). Fixed seeds, so that every run
# and every reset() builds the same estate and tests can count on it.
DEVICE_SEED = 20_261_123
EVENT_SEED = 4_711
# 137 offline of 20,000: a healthy fleet, so that "which devices are down"
# is a needle in a haystack for the context benchmark.
OFFLINE_SHARE = 137 / 20_000
GENERATED_DAYS = 7                       # generated events fall in the week before START
# site, its tag; a device's name and host carry the tag, as the seeded ones do.
_GEN_SITES = (("nord-dc1", "nord"), ("pdx-colo", "pdx"), ("fra-dc2", "fra"), ("ams-pop", "ams"),
              ("Zürich-POP", "zrh"), ("lon-dc3", "lon"), ("nyc-colo", "nyc"), ("sin-dc1", "sin"),
              ("waw-pop", "waw"), ("pdx-lab", "lab"))
# role, weight; "pdu" devices are power strips, "edge" ones PiKVMs in a POP.
_GEN_ROLES = (("web", 30), ("app", 20), ("kube", 18), ("db", 8), ("cache", 6), ("stor", 6),
              ("edge", 6), ("gpu", 3), ("pdu", 3))
_GEN_KINDS = (("redfish", 60), ("ipmi", 25), ("pikvm", 15))  # servers' BMCs
_GEN_ENVS = (("prod", 65), ("staging", 20), ("lab", 10), ("dev", 5))
_FIRMWARE = {"redfish": ("iDRAC9 7.10.30.00", "iDRAC9 7.00.60.00", "iLO 6 1.58"),
             "ipmi": ("IPMI 2.0 / iDRAC9 6.10.30.00", "IPMI 2.0 / X13 BMC 1.02"),
             "pikvm": ("PiKVM kvmd 4.20", "PiKVM kvmd 4.12"), "pdu": ("PDU fw 3.2.1",)}
# People with accounts, the four seeded users first; they do all the work.
_GEN_STAFF = ("olga.operator", "omar.operator", "ada.admin", "vic.viewer", "lena.berg",
              "tom.ito", "ravi.nair", "mia.koch", "jan.novak", "sara.lind", "li.wei", "noah.diaz",
              "eva.ross", "ken.sato", "ana.silva", "max.weber", "zoe.park", "ian.moss", "nina.roy",
              "paul.kent", "amy.chen", "leo.marx", "ida.holm", "raj.das")
# Who fails to log in: password guessers' favourite names and staff who
# mistype, Zipf-weighted in this order, so a few actors have hundreds of
# failures and most have a handful (32 actors in all).
_GEN_FAILED_LOGINS = ("admin", "root", "tom.ito", "administrator", "test", "vic.viewer", "guest",
                      "oracle", "lena.berg", "ubuntu", "pi", "support", "ravi.nair", "user",
                      "backup", "postgres", "mia.koch", "deploy", "jenkins", "ansible", "ftp",
                      "jan.novak", "sara.lind", "li.wei", "noah.diaz", "eva.ross", "ken.sato",
                      "ana.silva", "max.weber", "zoe.park", "ian.moss", "nina.roy")
# action, weight, (outcome, weight)..., whether it names a device.
_GEN_ACTIONS: Tuple[Tuple[str, int, Tuple[Tuple[str, int], ...], bool], ...] = (
    ("auth.login", 30, (("success", 65), ("failure", 35)), False),
    ("device.list", 14, (("success", 1),), False),
    ("device.read", 10, (("success", 1),), True),
    ("console.start", 8, (("success", 92), ("denied", 8)), True),
    ("console.end", 7, (("success", 1),), True),
    ("device.power", 8, (("success", 85), ("denied", 10), ("failure", 5)), True),
    ("audit.query", 5, (("success", 1),), False),
    ("access.request", 4, (("success", 95), ("failure", 5)), True),
    ("access.approve", 3, (("success", 85), ("denied", 15)), True),
    ("access.deny", 1, (("success", 1),), True),
    ("iso.mount", 2, (("success", 90), ("failure", 10)), True),
    ("iso.unmount", 1, (("success", 1),), True),
    ("alert.acknowledge", 2, (("success", 1),), False),
    ("alert.resolve", 2, (("success", 1),), False),
    ("policy.list", 1, (("success", 1),), False),
)
AGENT_CLIENT = "kvmfleet-mcp/1.0.0 (claude-ai/0.1.0)"  # the client tag some generated rows carry

####
#### Errors and pure helpers
####


class ApiError(Exception):
    """An error answer: HTTP status plus the platform's error code and message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _bad(message: str) -> ApiError:
    """A 400 invalid_argument error."""
    return ApiError(400, "invalid_argument", message)


def _not_found(kind: str, ident: str) -> ApiError:
    """A 404 for an unknown identifier, naming it as the platform received it."""
    return ApiError(404, "not_found", f"{kind} '{ident}' not found")


def _ts(moment: datetime) -> str:
    """Format an aware datetime as RFC 3339 UTC, e.g. 2026-11-23T08:00:00Z."""
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _ago(**delta: float) -> str:
    """The RFC 3339 timestamp `delta` (timedelta keywords) before START."""
    return _ts(START - timedelta(**delta))


def _utcnow() -> datetime:
    """The current time in UTC, to the second."""
    return datetime.now(timezone.utc).replace(microsecond=0)


def _parse_ts(text: str) -> datetime:
    """Parse an RFC 3339 timestamp (any offset) into aware UTC; ValueError if malformed."""
    m = _RFC3339.fullmatch(text)
    if not m:
        raise ValueError(text)
    y, mo, d, h, mi, s = (int(g) for g in m.groups()[:6])
    micro = int((m.group(7) or ".0")[1:7].ljust(6, "0"))
    zone = m.group(8)
    offset = timedelta(0)
    if zone not in ("Z", "z"):
        sign = -1 if zone[0] == "-" else 1
        offset = sign * timedelta(hours=int(zone[1:3]), minutes=int(zone[4:6]))
    moment = datetime(y, mo, d, h, mi, s, micro, tzinfo=timezone(offset))
    return moment.astimezone(timezone.utc)


def _chain_hash(prev_hash: str, event: dict) -> str:
    """sha256 over the previous hash + the canonical JSON of the event's own fields."""
    own = {k: v for k, v in event.items() if k not in ("hash", "prev_hash")}
    canonical = json.dumps(own, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256((prev_hash + canonical).encode("utf-8")).hexdigest()


def _arg(query: Dict[str, list], name: str) -> Optional[str]:
    """The first value of a query parameter, or None when absent or blank."""
    values = query.get(name)
    return values[0] if values else None


def _bool_arg(query: Dict[str, list], name: str) -> bool:
    """A boolean query parameter: true/false/1/0, absent means false."""
    raw = _arg(query, name)
    if raw is None or raw.lower() in ("false", "0"):
        return False
    if raw.lower() in ("true", "1"):
        return True
    raise _bad(f"{name} must be true or false")


def _ts_arg(query: Dict[str, list], name: str) -> Optional[datetime]:
    """An RFC 3339 query parameter, or None when absent."""
    raw = _arg(query, name)
    if raw is None:
        return None
    try:
        return _parse_ts(raw)
    except ValueError:
        raise _bad(f"{name} must be an RFC 3339 timestamp such as 2026-01-31T23:59:59Z") from None


def _ts_key(moment: datetime, round_up: bool) -> str:
    """A UTC bound as the string that event timestamps compare against, to the whole second."""
    # Events carry whole seconds, so `ts >= since` holds exactly when `ts >=
    # since rounded up`, and `ts <= until` when `ts <= until rounded down`:
    # comparing strings then saves parsing 30,000 timestamps per request.
    if round_up and moment.microsecond:
        try:
            moment += timedelta(seconds=1)
        except OverflowError:  # later than 9999-12-31T23:59:59Z, so later than every event
            return "~"
    return (f"{moment.year:04d}-{moment.month:02d}-{moment.day:02d}T"
            f"{moment.hour:02d}:{moment.minute:02d}:{moment.second:02d}Z")


class _Window(NamedTuple):
    """One list request's page: size, start, how many records it sees, and its filters' digest."""

    limit: int
    offset: int
    seen: Optional[int]  # records that existed at the first page; None on a first page
    scope: str           # digest of the resource and filters the cursor is bound to


def _scope(resource: str, filters: Dict[str, Any]) -> str:
    """A short digest of a list's resource and its parsed filters."""
    canonical = json.dumps([resource, filters], sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def _encode_cursor(offset: int, seen: int, scope: str) -> str:
    """An opaque cursor: URL-safe base64 of a small JSON object, unpadded."""
    raw = json.dumps({"o": offset, "n": seen, "f": scope}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode("ascii")).decode("ascii").rstrip("=")


def _window(query: Dict[str, list], resource: str, filters: Dict[str, Any]) -> _Window:
    """Read limit and cursor; a cursor must decode and carry these very filters."""
    raw_limit, raw_cursor = _arg(query, "limit"), _arg(query, "cursor")
    limit = DEFAULT_LIMIT
    if raw_limit is not None:
        if not re.fullmatch(r"[0-9]{1,3}", raw_limit) or not 1 <= int(raw_limit) <= 500:
            raise _bad(_LIMIT_MSG)
        limit = int(raw_limit)
    scope = _scope(resource, filters)
    if raw_cursor is None:
        return _Window(limit, 0, None, scope)
    try:
        data = json.loads(base64.b64decode(raw_cursor + "=" * (-len(raw_cursor) % 4),
                                           altchars=b"-_", validate=True))
    except ValueError:  # not ASCII, not base64, not UTF-8 or not JSON
        data = None
    if (not isinstance(data, dict) or sorted(data) != ["f", "n", "o"]
            or not all(type(data[k]) is int and data[k] >= 0 for k in ("o", "n"))
            or not isinstance(data["f"], str)):
        raise _bad(f"cursor '{raw_cursor}' is not valid")
    if data["f"] != scope:
        # A real platform's cursors are tied to their query; this is how the
        # tests prove that every page of a listing carries the same filters.
        raise _bad(f"cursor '{raw_cursor}' was issued for other filters; "
                   "repeat the filters of the first page, or start again without a cursor")
    return _Window(limit, data["o"], data["n"], scope)


def _seen(records: list, window: _Window) -> Tuple[list, int]:
    """The records (oldest first) that existed at the listing's first page, and how many that was."""
    # Bounding later pages to those records keeps offsets stable while the
    # audit log grows by one row per request, newest first.
    seen = len(records) if window.seen is None else window.seen
    return records[:seen], seen


def _page(items: list, window: _Window, seen: int) -> dict:
    """One page of the filtered, ordered items; `seen` is the record count to bind the next cursor to."""
    end = window.offset + window.limit
    more = end < len(items)
    return {"items": items[window.offset:end],
            "next_cursor": _encode_cursor(end, seen, window.scope) if more else None}


def _str_field(body: dict, name: str, required: bool = False) -> Optional[str]:
    """A string body field; optional ones may be absent or null."""
    value = body.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or (required and not value.strip()):
        raise _bad(f"field '{name}' must be a non-empty string" if required
                   else f"field '{name}' must be a string")
    return value


def _json_object(raw: bytes, allowed: Tuple[str, ...]) -> dict:
    """Parse a write's body: a JSON object with no field outside `allowed`."""
    try:
        body = json.loads(raw.decode("utf-8")) if raw.strip() else None
    except (ValueError, UnicodeDecodeError):
        body = None
    if not isinstance(body, dict):
        raise _bad("request body must be a JSON object")
    for key in body:
        if key not in allowed:
            # This is how the tests prove the MCP server never forwards `confirm`.
            raise _bad(f"unknown field '{key}'")
    return body


def _match(pattern: str, segments: list) -> Optional[Dict[str, str]]:
    """Match decoded path segments against a ROUTES pattern; the captures or None."""
    parts = pattern.split("/")
    if len(parts) != len(segments):
        return None
    params: Dict[str, str] = {}
    for part, seg in zip(parts, segments):
        if part.startswith("{"):
            name, _, verb = part[1:].partition("}")
            if verb:  # "{id}:approve": the verb follows the segment's last ':'
                seg, colon, tail = seg.rpartition(":")
                if not colon or ":" + tail != verb:
                    return None
            if not seg:
                return None
            params[name] = seg
        elif part != seg:
            return None
    return params


def _device(did: str, name: str, host: str, kind: str, status: str, power: str,
            tags: list, site: str, seen_minutes: float, jit: bool = False,
            iso: Optional[str] = None) -> dict:
    """One seeded device record."""
    return {"id": did, "name": name, "host": host, "kind": kind, "status": status,
            "power_state": power, "tags": tags, "site": site,
            "last_seen": _ago(minutes=seen_minutes), "jit_required": jit, "mounted_iso": iso}


def _grant(gid: str, device_id: str, requester: str, reason: str, ticket: Optional[str],
           minutes: int, status: str, requested: timedelta) -> dict:
    """One seeded access grant, requested `requested` before START and not yet decided."""
    return {"id": gid, "device_id": device_id, "requester": requester, "reason": reason,
            "ticket": ticket, "duration_minutes": minutes, "status": status,
            "requested_at": _ts(START - requested), "decided_by": None, "decided_at": None,
            "decision_note": None, "expires_at": None, "revoked_by": None, "revoked_at": None}


def _alert(aid: str, severity: str, status: str, message: str, device_id: Optional[str],
           fired_at: datetime) -> dict:
    """One seeded alert, not yet acknowledged or resolved."""
    return {"id": aid, "severity": severity, "status": status, "message": message,
            "device_id": device_id, "fired_at": _ts(fired_at), "acknowledged_at": None,
            "acknowledged_by": None, "resolved_at": None, "resolved_by": None, "note": None}


class _Ctx:
    """Who is calling, and which device the audit row should name."""

    def __init__(self, user: str, role: Optional[str], client: Optional[str], ip: str) -> None:
        self.user, self.role, self.client, self.ip = user, role, client, ip
        self.device_id: Optional[str] = None
        self.read_only = False  # the token's scope is read


####
#### The platform
####


class DemoPlatform:
    """The in-memory KVM Fleet platform, served over loopback HTTP from a daemon thread."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, verbose: bool = False,
                 keep_alive: bool = False, *, devices: int = 0, events: int = 0,
                 latency: float = 0.0) -> None:
        for name, value, what in (("devices", devices, "an integer"), ("events", events, "an integer"),
                                  ("latency", latency, "a number of seconds")):
            kinds = int if name != "latency" else (int, float)
            if isinstance(value, bool) or not isinstance(value, kinds) or not 0 <= value < float("inf"):
                raise ValueError(f"{name} must be {what} >= 0, not {value!r}")
        self.host, self.port, self.verbose = host, port, verbose
        # How many generated devices and audit events join the seeded ones.
        # The ground truth for tests is the state itself: self.devices (id ->
        # record, seeded first, then dev_gen_000001...), self.health and
        # self.events (the hash chain, oldest first, newest last).
        self.extra_devices, self.extra_events = devices, events
        self.latency = float(latency)  # seconds slept before answering each request
        # HTTP/1.1 keep-alive, as a real platform would, for the benchmark;
        # the tests keep HTTP/1.0 so that stop() really cuts clients off.
        self.keep_alive = keep_alive
        self.url = ""
        self.requests: list[dict] = []
        self._lock = threading.RLock()  # guards self.requests and all state
        self._faults: list = []         # queued (status, body, headers) from fail_next()
        self._server: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None
        self._seed()

    # -- lifecycle --------------------------------------------------------

    def start(self) -> str:
        """Bind, serve from a daemon thread, and return the base URL."""
        handler = type("_BoundHandler", (_Handler,), {
            "platform": self, "protocol_version": "HTTP/1.1" if self.keep_alive else "HTTP/1.0"})
        self._server = ThreadingHTTPServer((self.host, self.port), handler)
        self._server.daemon_threads = True
        self.url = f"http://{self.host}:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.1},
                                        name="demo-platform", daemon=True)
        self._thread.start()
        return self.url

    def stop(self) -> None:
        """Stop serving and release the port (safe to call twice)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> "DemoPlatform":
        """Start on entering a with block."""
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        """Stop on leaving a with block."""
        self.stop()

    def reset(self) -> None:
        """Restore the seeded state, clear the request log and any queued faults."""
        with self._lock:
            self._seed()
            self.requests.clear()
            self._faults.clear()

    # -- test hooks -------------------------------------------------------

    def fail_next(self, status: int, body: str, headers: Optional[dict] = None) -> None:
        """Answer the next request (calls queue up) with this raw status, body and headers."""
        with self._lock:
            self._faults.append((status, body, dict(headers or {})))

    def corrupt_audit_event(self, event_id: str) -> None:
        """Flip one audit event's outcome without re-hashing, to break the chain."""
        with self._lock:
            for event in self.events:
                if event["id"] == event_id:
                    event["outcome"] = "success" if event["outcome"] != "success" else "failure"
                    return
        raise KeyError(event_id)

    # -- seed -------------------------------------------------------------

    def _seed(self) -> None:
        """Build the seeded state, then the generated fleet; every timestamp is relative to START."""
        self._seq = 0
        self.devices = {d["id"]: d for d in (
            _device("dev_r7525_nord_1", "R7525-NORD-1", "r7525-nord-1.bmc.nord.example.net",
                    "redfish", "online", "on", ["prod", "nord"], "nord-dc1", 0.5, jit=True),
            _device("dev_r640_nord_2", "R640-NORD-2", "r640-nord-2.bmc.nord.example.net",
                    "ipmi", "online", "on", ["prod", "nord"], "nord-dc1", 1),
            _device("dev_srv_pdx_3", "srv-pdx-3", "pikvm-pdx-3.pdx.example.net",
                    "pikvm", "online", "on", ["prod", "pdx"], "pdx-colo", 0.5),
            _device("dev_srv_pdx_4", "srv-pdx-4", "srv-pdx-4.bmc.pdx.example.net",
                    "redfish", "online", "off", ["staging", "pdx"], "pdx-colo", 2,
                    iso="iso_debian_12"),
            _device("dev_db_fra_1", "db-fra-1", "db-fra-1.bmc.fra.example.net",
                    "redfish", "online", "on", ["prod", "fra", "db"], "fra-dc2", 1, jit=True),
            _device("dev_pdu_fra_1", "pdu-fra-1", "pdu-fra-1.mgmt.fra.example.net",
                    "pdu", "offline", "unknown", ["fra", "power"], "fra-dc2", 7 * 60),
            _device("dev_edge_ams_2", "edge-ams-2", "edge-ams-2.pikvm.example.net",
                    "pikvm", "offline", "unknown", ["edge", "ams"], "ams-pop", 31 * 60),
            _device("dev_edge_zrh_1", "edge-zrh-1", "edge-zrh-1.pikvm.example.net",
                    "pikvm", "online", "on", ["edge", "zrh"], "Zürich-POP", 1),
            _device("dev_lab_pikvm_1", "lab-pikvm-1", "10.20.9.41",
                    "pikvm", "online", "off", ["lab"], "pdx-lab", 3),
        )}
        # temperature_c, fans_ok, psu_ok, bmc_firmware, uptime_s (None when unknown)
        health = {
            "dev_r7525_nord_1": (31.5, True, False, "iDRAC9 7.00.60.00", 3_888_000),
            "dev_r640_nord_2": (27.0, True, True, "IPMI 2.0 / iDRAC9 6.10.30.00", 1_209_600),
            "dev_srv_pdx_3": (44.0, True, True, "PiKVM kvmd 4.20", 777_600),
            "dev_srv_pdx_4": (24.5, True, True, "iLO 6 1.58", 0),
            "dev_db_fra_1": (29.0, True, True, "iDRAC9 7.10.30.00", 5_184_000),
            "dev_pdu_fra_1": (None, None, None, "PDU fw 3.2.1", None),
            "dev_edge_ams_2": (None, None, None, "PiKVM kvmd 4.12", None),
            "dev_edge_zrh_1": (36.0, True, True, "PiKVM kvmd 4.20", 432_000),
            "dev_lab_pikvm_1": (22.0, True, True, "PiKVM kvmd 4.20", 0),
        }
        health.update(self._generate_devices())
        self.health = {did: {"temperature_c": t, "fans_ok": f, "psu_ok": p, "bmc_firmware": fw,
                             "uptime_s": up, "last_check": self.devices[did]["last_seen"]}
                       for did, (t, f, p, fw, up) in health.items()}

        self.sessions = {s["id"]: s for s in (
            {"id": "cs_pdx3_9h", "device_id": "dev_srv_pdx_3", "user": "olga.operator",
             "started_at": _ago(hours=9), "ended_at": None, "ended_by": None,
             "end_reason": None, "source_ip": "10.20.0.11"},
            {"id": "cs_r640_20m", "device_id": "dev_r640_nord_2", "user": "omar.operator",
             "started_at": _ago(minutes=20), "ended_at": None, "ended_by": None,
             "end_reason": None, "source_ip": "10.20.0.12"},
            {"id": "cs_lab_closed", "device_id": "dev_lab_pikvm_1", "user": "ada.admin",
             "started_at": _ago(hours=5), "ended_at": _ago(hours=4, minutes=30),
             "ended_by": "ada.admin", "end_reason": "user logout", "source_ip": "10.20.0.5"},
        )}

        pending = _grant("gr_kernel_patch", "dev_r7525_nord_1", "olga.operator",
                         "kernel patching", "CHG-4711", 120, "pending", timedelta(hours=2))
        active = _grant("gr_db_migration", "dev_db_fra_1", "omar.operator",
                        "billing schema migration", "CHG-4702", 240, "active",
                        timedelta(hours=1, minutes=25))
        active.update(decided_by="ada.admin", decided_at=_ago(hours=1),
                      expires_at=_ts(START + timedelta(hours=3)))
        expired = _grant("gr_fw_update", "dev_r7525_nord_1", "omar.operator",
                         "iDRAC firmware update", "CHG-4650", 60, "expired", timedelta(days=3))
        expired.update(decided_by="ada.admin", decided_at=_ago(days=3, minutes=-10),
                       expires_at=_ago(days=3, minutes=-70))
        denied = _grant("gr_bios_tweak", "dev_db_fra_1", "omar.operator",
                        "tweak BIOS power profile", None, 30, "denied", timedelta(hours=25))
        denied.update(decided_by="ada.admin", decided_at=_ago(hours=24, minutes=30),
                      decision_note="needs a change ticket")
        self.grants = {g["id"]: g for g in (expired, denied, active, pending)}

        # "Overnight": the last 02:30 UTC at least an hour before START.
        night = START.replace(hour=2, minute=30, second=0)
        if night > START - timedelta(hours=1):
            night -= timedelta(days=1)
        self.alerts = {a["id"]: a for a in (
            _alert("al_disk_full", "critical", "firing", "Disk /var 98% full on srv-pdx-3",
                   "dev_srv_pdx_3", START - timedelta(hours=3)),
            _alert("al_temp_nord", "warning", "firing",
                   "Inlet temperature 38 °C on R7525-NORD-1 (threshold 35 °C)",
                   "dev_r7525_nord_1", night),
            _alert("al_ams2_down", "warning", "firing", "edge-ams-2 has not reported for 30 min",
                   "dev_edge_ams_2", START - timedelta(hours=30, minutes=30)),
            _alert("al_psu_nord", "warning", "acknowledged", "PSU 2 redundancy lost on R7525-NORD-1",
                   "dev_r7525_nord_1", START - timedelta(hours=40)),
            _alert("al_fw_info", "info", "resolved", "BMC firmware 7.10.30.00 available for db-fra-1",
                   "dev_db_fra_1", START - timedelta(days=2)),
        )}
        self.alerts["al_psu_nord"].update(acknowledged_at=_ago(hours=39), acknowledged_by="ada.admin",
                                          note="replacement PSU ordered")
        self.alerts["al_fw_info"].update(resolved_at=_ago(hours=26), resolved_by="ada.admin",
                                         note="updated during CHG-4650 follow-up")

        self.policies = [
            {"id": "pol_business_hours", "name": "Prod changes in business hours",
             "type": "time_of_day", "enabled": True, "scope": {"tags": ["prod"]},
             "settings": {"days": "mon-fri", "from": "07:00", "to": "19:00",
                          "timezone": "Europe/Berlin"}},
            {"id": "pol_require_mfa", "name": "MFA for console and power", "type": "require_mfa",
             "enabled": True, "scope": {"actions": ["console.start", "device.power"]},
             "settings": {"max_age_minutes": 720}},
            {"id": "pol_max_sessions", "name": "At most 2 consoles per user",
             "type": "max_concurrent_sessions", "enabled": True, "scope": {"users": "*"},
             "settings": {"max": 2}},
            {"id": "pol_jit_approval", "name": "JIT devices need an approved grant",
             "type": "approval_required", "enabled": True, "scope": {"jit_required": True},
             "settings": {"four_eyes": True, "max_duration_minutes": MAX_GRANT_MINUTES}},
        ]
        self.isos = {i["id"]: i for i in (
            {"id": iid, "name": name, "size_bytes": size, "uploaded_by": "ada.admin",
             "uploaded_at": _ago(days=days),
             "sha256": hashlib.sha256(("demo:" + name).encode()).hexdigest()}
            for iid, name, size, days in (
                ("iso_ubuntu_2404", "ubuntu-24.04.iso", 2_754_981_888, 40),
                ("iso_debian_12", "debian-12.7.0-amd64-netinst.iso", 661_651_456, 60),
                ("iso_memtest", "memtest86+-7.00.iso", 2_437_120, 90)))}

        ips = {"olga.operator": "10.20.0.11", "omar.operator": "10.20.0.12",
               "ada.admin": "10.20.0.5", "vic.viewer": "10.20.0.31",
               "admin": "203.0.113.66", "root": "198.51.100.23"}
        r7525, fra, pdx3 = "dev_r7525_nord_1", "dev_db_fra_1", "dev_srv_pdx_3"
        seeded = [(_ago(minutes=minutes_ago), actor, action, outcome, device_id, ips[actor], None)
                  for minutes_ago, actor, action, outcome, device_id in (
            (4 * 1440, "root", "auth.login", "failure", None),  # older than 3 days
            (3 * 1440 + 5, "omar.operator", "auth.login", "success", None),
            (3 * 1440, "omar.operator", "access.request", "success", r7525),
            (3 * 1440 - 10, "ada.admin", "access.approve", "success", r7525),
            (3 * 1440 - 25, "omar.operator", "device.power", "success", r7525),
            (2 * 1440, "ada.admin", "auth.login", "success", None),
            (2 * 1440 - 5, "ada.admin", "iso.mount", "success", "dev_srv_pdx_4"),
            (26 * 60, "olga.operator", "device.power", "success", pdx3),
            (25 * 60, "omar.operator", "access.request", "success", fra),
            (24 * 60 + 30, "ada.admin", "access.deny", "success", fra),
            (14 * 60, "vic.viewer", "auth.login", "failure", None),
            (14 * 60 - 1, "vic.viewer", "auth.login", "failure", None),
            (14 * 60 - 3, "vic.viewer", "auth.login", "success", None),
            (9 * 60 + 10, "olga.operator", "auth.login", "success", None),
            (9 * 60, "olga.operator", "console.start", "success", pdx3),
            (6 * 60, "admin", "auth.login", "failure", None),
            (6 * 60 - 0.5, "admin", "auth.login", "failure", None),
            (6 * 60 - 1, "admin", "auth.login", "failure", None),
            (5 * 60 + 2, "ada.admin", "auth.login", "success", None),
            (5 * 60, "ada.admin", "console.start", "success", "dev_lab_pikvm_1"),
            (4 * 60 + 30, "ada.admin", "console.end", "success", "dev_lab_pikvm_1"),
            (120, "olga.operator", "access.request", "success", r7525),
            (115, "olga.operator", "access.approve", "denied", r7525),  # 4-eyes
            (110, "olga.operator", "device.power", "denied", r7525),    # JIT
            (90, "omar.operator", "auth.login", "success", None),
            (85, "omar.operator", "access.request", "success", fra),
            (60, "ada.admin", "access.approve", "success", fra),
            (40, "admin", "auth.login", "failure", None),
            (20, "omar.operator", "console.start", "success", "dev_r640_nord_2"),
        )]
        # One chain in time order: generated rows interleave with the seeded
        # ones (which keep their ids ev_000001...), so newest-first paging,
        # since/until and the witness anchor all see one consistent log.
        self.events: list[dict] = []
        numbered = heapq.merge(
            ((row, f"ev_{n:06d}") for n, row in enumerate(seeded, 1)),
            ((row, f"ev_gen_{n:06d}") for n, row in enumerate(self._generate_events(ips), 1)),
            key=lambda pair: pair[0][0])  # ties: seeded rows first
        for (ts, actor, action, outcome, device_id, ip, client), event_id in numbered:
            self._link(event_id, ts, actor, action, outcome, device_id, ip, client, None)

    def _generate_devices(self) -> Dict[str, tuple]:
        """Add self.extra_devices generated devices; their health rows, as the seed writes them."""
        rng = random.Random(DEVICE_SEED)
        count = self.extra_devices
        offline = set(rng.sample(range(count), round(count * OFFLINE_SHARE)))
        roles, role_weights = [r for r, _ in _GEN_ROLES], [w for _, w in _GEN_ROLES]
        kinds, kind_weights = [k for k, _ in _GEN_KINDS], [w for _, w in _GEN_KINDS]
        envs, env_weights = [e for e, _ in _GEN_ENVS], [w for _, w in _GEN_ENVS]
        isos = ("iso_ubuntu_2404", "iso_debian_12", "iso_memtest")
        health: Dict[str, tuple] = {}
        for n, role in enumerate(rng.choices(roles, role_weights, k=count)):
            site, where = _GEN_SITES[rng.randrange(len(_GEN_SITES))]
            kind = "pdu" if role == "pdu" else "pikvm" if role == "edge" else rng.choices(
                kinds, kind_weights)[0]
            number = f"{n + 1:05d}"
            if role == "pdu":
                name, host, tags = f"pdu-{where}-{number}", f"mgmt.{where}.example.net", [where, "power"]
            elif role == "edge":
                name, host, tags = f"edge-{where}-{number}", "pikvm.example.net", ["edge", where]
            else:
                env = "lab" if where == "lab" else rng.choices(envs, env_weights)[0]
                tags = [env, where] + ([role] if role in ("db", "stor", "gpu") else [])
                if kind == "redfish" and rng.random() < 0.3:  # vendor-style upper-case names
                    name = f"R{rng.choice(('640', '650', '750', '7525'))}-{where.upper()}-{number}"
                else:
                    name = f"{role}-{where}-{number}"
                host = f"pikvm.{where}.example.net" if kind == "pikvm" else f"bmc.{where}.example.net"
            host = f"{name.lower()}.{host}"
            if where == "lab" and rng.random() < 0.5:  # lab kit is often known by address only
                host = f"10.20.{(n // 250) % 256}.{n % 250 + 2}"
            down = n in offline
            power = "unknown" if down else "off" if rng.random() < 0.06 else "on"
            seen = 60 + rng.random() * 3 * 1440 if down else 0.5 + rng.random() * 4.5
            jit = ("prod" in tags and role in ("db", "stor")) or rng.random() < 0.03
            iso = (rng.choice(isos) if not down and kind != "pdu" and rng.random() < 0.004
                   else None)
            did = f"dev_gen_{n + 1:06d}"
            self.devices[did] = _device(did, name, host, kind, "offline" if down else "online",
                                        power, tags, site, seen, jit=jit, iso=iso)
            firmware = rng.choice(_FIRMWARE[kind])
            if down:
                health[did] = (None, None, None, firmware, None)
            else:
                uptime = 0 if power == "off" else rng.randrange(3600, 120 * 86400)
                temperature = None if kind == "pdu" else round(20 + rng.random() * 24, 1)
                fans = None if kind == "pdu" else rng.random() > 0.004
                health[did] = (temperature, fans, rng.random() > 0.01, firmware, uptime)
        return health

    def _generate_events(self, ips: Dict[str, str]) -> List[tuple]:
        """self.extra_events audit rows over the week before START, oldest first, not yet chained."""
        rng = random.Random(EVENT_SEED)
        count = self.extra_events
        staff_ips = dict(ips)
        for n, user in enumerate(_GEN_STAFF):
            staff_ips.setdefault(user, f"10.20.{1 + n // 200}.{10 + n % 200}")
        # Documentation ranges (RFC 5737): the internet's password guessers.
        outside = [f"{net}.{rng.randrange(1, 255)}" for net in ("203.0.113", "198.51.100", "192.0.2")
                   for _ in range(8)]
        guess_weights = [1 / (rank + 1) ** 1.2 for rank in range(len(_GEN_FAILED_LOGINS))]
        devices = list(self.devices)
        rows = []
        for action, _, outcomes, on_device in rng.choices(
                _GEN_ACTIONS, [a[1] for a in _GEN_ACTIONS], k=count):
            outcome = outcomes[0][0] if len(outcomes) == 1 else rng.choices(
                [o for o, _ in outcomes], [w for _, w in outcomes])[0]
            client = None
            if action == "auth.login" and outcome == "failure":
                actor = rng.choices(_GEN_FAILED_LOGINS, guess_weights)[0]
                ip = staff_ips.get(actor) or rng.choice(outside)
            else:
                actor = rng.choice(_GEN_STAFF)
                ip = staff_ips[actor]
                if action != "auth.login" and rng.random() < 0.08:
                    client = AGENT_CLIENT
            device_id = rng.choice(devices) if on_device else None
            rows.append((rng.randrange(60, GENERATED_DAYS * 86400), actor, action, outcome,
                         device_id, ip, client))
        rows.sort(key=lambda row: -row[0])  # oldest first, as the chain runs
        return [(_ts(START - timedelta(seconds=row[0])),) + row[1:] for row in rows]

    # -- state helpers ----------------------------------------------------

    def _next_id(self, prefix: str) -> str:
        """A fresh identifier such as gr_0001."""
        self._seq += 1
        return f"{prefix}_{self._seq:04d}"

    def _append_event(self, ts: str, actor: str, action: str, outcome: str,
                      device_id: Optional[str], ip: str, client: Optional[str],
                      request_id: Optional[str] = None) -> None:
        """Append one audit event to the hash chain; request_id is the caller's Idempotency-Key."""
        self._link(f"ev_{len(self.events) + 1:06d}", ts, actor, action, outcome, device_id, ip,
                   client, request_id)

    def _link(self, event_id: str, ts: str, actor: str, action: str, outcome: str,
              device_id: Optional[str], ip: str, client: Optional[str],
              request_id: Optional[str]) -> None:
        """Append one audit event with this id to the hash chain."""
        prev = self.events[-1]["hash"] if self.events else GENESIS_HASH
        event: Dict[str, Any] = {"id": event_id, "ts": ts,
                                 "actor": actor, "action": action, "outcome": outcome,
                                 "device_id": device_id, "ip": ip}
        if client is not None:
            event["client"] = client
        if request_id is not None:
            event["request_id"] = request_id
        event["prev_hash"] = prev
        event["hash"] = _chain_hash(prev, event)
        self.events.append(event)

    def _lookup(self, table: dict, kind: str, ident: str, ctx: _Ctx) -> dict:
        """Find a record by id (404 if unknown) and note its device for the audit row."""
        record = table.get(ident)
        if record is None:
            raise _not_found(kind, ident)
        ctx.device_id = record["id"] if table is self.devices else record.get("device_id")
        return record

    def _expire_grants(self) -> None:
        """Turn active grants whose time is up into expired ones."""
        now = _utcnow()
        for grant in self.grants.values():
            if grant["status"] == "active" and _parse_ts(grant["expires_at"]) <= now:
                grant["status"] = "expired"

    # -- HTTP entry point -------------------------------------------------

    def _handle(self, method: str, target: str, headers: Dict[str, str], raw: bytes,
                ip: str) -> Tuple[int, bytes, Dict[str, str]]:
        """Record one request and compute (status, body bytes, headers) for it."""
        if self.latency:
            # Outside the lock, so that concurrent requests wait side by side
            # as they would on a distant platform.
            time.sleep(self.latency)
        # Route on the raw target: percent-escapes are decoded per segment later.
        raw_path, _, raw_query = target.partition("?")
        query = parse_qs(raw_query)
        text = raw.decode("utf-8", errors="replace")
        try:
            parsed: Any = json.loads(text) if text.strip() else None
        except ValueError:
            parsed = text
        with self._lock:
            self.requests.append({"method": method, "path": raw_path, "query": query,
                                  "headers": headers, "body": parsed})
            if self._faults:
                # An injected fault stands for a proxy in front: no audit row.
                status, body, extra = self._faults.pop(0)
                out = {} if any(k.lower() == "content-type" for k in extra) else {
                    "Content-Type": JSON_TYPE if body.startswith("{") else "text/html; charset=utf-8"}
                out.update(extra)
                return status, body.encode("utf-8"), out
            status, payload = self._dispatch(method, raw_path, query, headers, raw, ip)
            data = json.dumps(payload, ensure_ascii=False).encode("utf-8")
            # The audit row's id, as a real platform's X-Request-Id would lead to it.
            return status, data, {"Content-Type": JSON_TYPE, "X-Request-Id": self.events[-1]["id"]}

    def _dispatch(self, method: str, raw_path: str, query: Dict[str, list],
                  headers: Dict[str, str], raw: bytes, ip: str) -> Tuple[int, Any]:
        """Authenticate, route, authorize, run one handler, and audit the outcome."""
        self._expire_grants()
        scheme, _, token = headers.get("authorization", "").partition(" ")
        token = token.strip() if scheme.lower() == "bearer" else ""
        ctx = _Ctx(USERS.get(token, "anonymous"), TOKENS.get(token),
                   headers.get("x-kvmfleet-mcp-client"), ip)
        ctx.read_only = token in READ_ONLY_TOKENS
        action = "auth.token"
        try:
            if ctx.role is None:
                raise ApiError(401, "unauthenticated", "missing or invalid bearer token")
            org = headers.get("x-kvmfleet-org-id", OWN_ORG)
            if org not in MANAGED_ORGS:
                raise ApiError(403, "org_forbidden", f"this token may not act for org {org!r}")
            action = "http.not_found"
            route, params = self._route(method, raw_path)
            if route is None:
                raise ApiError(404, "not_found", f"no route for {method} {raw_path}")
            _, _, name, action, refusal, fields = route
            if refusal is not None and ctx.role not in WRITE_ROLES:
                raise ApiError(403, "forbidden", f"role {ctx.role} may not {refusal}")
            if refusal is not None and ctx.read_only:
                raise ApiError(403, "forbidden", f"this token's scope is read; it may not {refusal}")
            body = _json_object(raw, fields) if fields is not None else {}
            status, payload = getattr(self, "_h_" + name)(ctx, params, query, body)
        except ApiError as err:
            status, payload = err.status, {"error": {"code": err.code, "message": err.message}}
        except Exception as exc:  # a bug in this fake: say so instead of hanging up
            status, payload = 500, {"error": {"code": "internal", "message": repr(exc)}}
        outcome = "success" if status < 300 else "denied" if status == 403 else "failure"
        self._append_event(_ts(_utcnow()), ctx.user, action, outcome, ctx.device_id, ctx.ip,
                           ctx.client, headers.get("idempotency-key"))
        return status, payload

    def _route(self, method: str, raw_path: str) -> Tuple[Optional[tuple], Dict[str, str]]:
        """Find the ROUTES row for a raw path: split on '/' first, then unquote each segment."""
        if not raw_path.startswith("/"):
            return None, {}
        segments = [unquote(seg) for seg in raw_path[1:].split("/")]
        for route in ROUTES:
            if route[0] == method:
                params = _match(route[1], segments)
                if params is not None:
                    return route, params
        return None, {}

    # -- read handlers: (ctx, path params, query, body) -> (status, payload) --

    def _h_list_devices(self, ctx: _Ctx, p: dict, q: dict, body: dict) -> Tuple[int, Any]:
        """GET /v1/devices: status, tag, q (case-insensitive name/host substring)."""
        status, tag, text = _arg(q, "status"), _arg(q, "tag"), (_arg(q, "q") or "").lower()
        window = _window(q, "devices", {"status": status, "tag": tag, "q": text})
        items, seen = _seen(list(self.devices.values()), window)
        # One cheap pass per filter given: a few ms at 20,000 devices.
        if status is not None:
            items = [d for d in items if d["status"] == status]
        if tag is not None:
            items = [d for d in items if tag in d["tags"]]
        if text:
            items = [d for d in items if text in d["name"].lower() or text in d["host"].lower()]
        return 200, _page(items, window, seen)

    def _h_get_device(self, ctx: _Ctx, p: dict, q: dict, body: dict) -> Tuple[int, Any]:
        """GET /v1/devices/{id}: the device plus its health block."""
        device = self._lookup(self.devices, "device", p["id"], ctx)
        return 200, dict(device, health=self.health[device["id"]])

    def _h_list_events(self, ctx: _Ctx, p: dict, q: dict, body: dict) -> Tuple[int, Any]:
        """GET /v1/audit/events, newest first; since/until are inclusive."""
        since, until = _ts_arg(q, "since"), _ts_arg(q, "until")
        exact = {k: _arg(q, k) for k in ("actor", "action", "outcome", "device_id")}
        window = _window(q, "audit-events", dict(exact, since=since, until=until))
        items, seen = _seen(self.events, window)
        items = items[::-1]
        for key, value in exact.items():
            if value is not None:
                items = [e for e in items if e[key] == value]
        if since is not None:
            after = _ts_key(since, round_up=True)
            items = [e for e in items if e["ts"] >= after]
        if until is not None:
            before = _ts_key(until, round_up=False)
            items = [e for e in items if e["ts"] <= before]
        return 200, _page(items, window, seen)

    def _h_integrity(self, ctx: _Ctx, p: dict, q: dict, body: dict) -> Tuple[int, Any]:
        """GET /v1/audit/integrity: re-walk the whole chain."""
        prev, checked, bad = GENESIS_HASH, 0, None
        for event in self.events:
            checked += 1
            if event["prev_hash"] != prev or _chain_hash(prev, event) != event["hash"]:
                bad = event["id"]
                break
            prev = event["hash"]
        return 200, {"ok": bad is None, "checked": checked,
                     "head_hash": self.events[-1]["hash"], "first_bad_event": bad}

    def _h_head(self, ctx: _Ctx, p: dict, q: dict, body: dict) -> Tuple[int, Any]:
        """GET /v1/audit/head: the head hash and the last witness anchor (2 h before START)."""
        anchored = START - timedelta(hours=2)
        # The chain runs in time order, so the newest event at or before the anchor time.
        cutoff = _ts(anchored)
        anchor = next(e for e in reversed(self.events) if e["ts"] <= cutoff)
        return 200, {"head_hash": self.events[-1]["hash"], "events": len(self.events),
                     "last_anchored_at": _ts(anchored),
                     "anchor": {"witness": "rfc3161:demo-tsa", "hash": anchor["hash"]}}

    def _h_list_sessions(self, ctx: _Ctx, p: dict, q: dict, body: dict) -> Tuple[int, Any]:
        """GET /v1/console-sessions, newest first: open_only, device_id, user."""
        open_only, device_id, user = _bool_arg(q, "open_only"), _arg(q, "device_id"), _arg(q, "user")
        window = _window(q, "console-sessions",
                         {"open_only": open_only, "device_id": device_id, "user": user})
        known, seen = _seen(list(self.sessions.values()), window)
        items = [s for s in sorted(known, key=lambda s: s["started_at"], reverse=True)
                 if (not open_only or s["ended_at"] is None)
                 and (device_id is None or s["device_id"] == device_id)
                 and (user is None or s["user"] == user)]
        return 200, _page(items, window, seen)

    def _h_list_grants(self, ctx: _Ctx, p: dict, q: dict, body: dict) -> Tuple[int, Any]:
        """GET /v1/access-grants, newest first: status, device_id, awaiting_my_approval."""
        status, device_id = _arg(q, "status"), _arg(q, "device_id")
        mine = _bool_arg(q, "awaiting_my_approval")
        # "Mine" depends on who asks, so such a cursor is bound to the caller too.
        window = _window(q, "access-grants", {"status": status, "device_id": device_id,
                                              "awaiting_my_approval": ctx.user if mine else None})
        known, seen = _seen(list(self.grants.values()), window)
        ordered = sorted(known, key=lambda g: g["requested_at"])[::-1]
        items = [g for g in ordered
                 if (status is None or g["status"] == status)
                 and (device_id is None or g["device_id"] == device_id)
                 and (not mine or (g["status"] == "pending" and g["requester"] != ctx.user))]
        return 200, _page(items, window, seen)

    def _h_list_alerts(self, ctx: _Ctx, p: dict, q: dict, body: dict) -> Tuple[int, Any]:
        """GET /v1/alerts/history, newest first: since (on fired_at), status, severity, device_id."""
        since = _ts_arg(q, "since")
        exact = {k: _arg(q, k) for k in ("status", "severity", "device_id")}
        window = _window(q, "alerts", dict(exact, since=since))
        known, seen = _seen(list(self.alerts.values()), window)
        items = [a for a in sorted(known, key=lambda a: a["fired_at"], reverse=True)
                 if all(v is None or a[k] == v for k, v in exact.items())
                 and (since is None or _parse_ts(a["fired_at"]) >= since)]
        return 200, _page(items, window, seen)

    def _h_list_policies(self, ctx: _Ctx, p: dict, q: dict, body: dict) -> Tuple[int, Any]:
        """GET /v1/policies: all of them, one page."""
        return 200, {"items": self.policies, "next_cursor": None}

    def _h_token(self, ctx: _Ctx, p: dict, q: dict, body: dict) -> Tuple[int, Any]:
        return 200, {"scope": "read" if ctx.read_only else "write", "role": ctx.role,
                     "user": ctx.user, "org_id": OWN_ORG}

    def _h_list_isos(self, ctx: _Ctx, p: dict, q: dict, body: dict) -> Tuple[int, Any]:
        """GET /v1/isos: all of them, one page."""
        return 200, {"items": list(self.isos.values()), "next_cursor": None}

    def _h_report(self, ctx: _Ctx, p: dict, q: dict, body: dict) -> Tuple[int, Any]:
        """POST /v1/reports/{framework}: a canned NIS2 report for any valid month."""
        if p["id"] != "nis2":
            raise _not_found("framework", p["id"])
        period = body.get("period")
        if not isinstance(period, str) or not re.fullmatch(r"\d{4}-(0[1-9]|1[0-2])", period):
            raise _bad("field 'period' must be a month such as 2026-11")
        controls = [{"id": cid, "title": title, "status": status,
                     "previous_status": "fail" if status == "fail" else "pass",
                     "evidence": evidence or "automated check passed"}
                    for cid, title, status, evidence in _NIS2]
        return 200, {"framework": "nis2", "period": period, "score": 0.82, "controls": controls,
                     "dropped_controls": [c["id"] for c in controls if c["status"] == "dropped"],
                     "generated_at": _ts(_utcnow())}

    # -- write handlers (the role gate already ran in _dispatch) ----------

    def _h_power(self, ctx: _Ctx, p: dict, q: dict, body: dict) -> Tuple[int, Any]:
        """POST /v1/devices/{id}/power: JIT-checked, even for org_admin."""
        device = self._lookup(self.devices, "device", p["id"], ctx)
        action = body.get("action")
        if action not in POWER_ACTIONS:
            raise _bad("field 'action' must be one of " + ", ".join(POWER_ACTIONS))
        if device["jit_required"] and not any(
                g["status"] == "active" and g["requester"] == ctx.user
                and g["device_id"] == device["id"] for g in self.grants.values()):
            raise ApiError(403, "jit_required", f"no active access grant for {ctx.user} on "
                                                f"{device['name']}; request access first")
        if device["status"] != "online":
            raise ApiError(409, "conflict", f"device {device['name']} is offline")
        device["power_state"] = "off" if action in ("off", "off_hard") else "on"
        self.health[device["id"]]["uptime_s"] = 0
        return 202, {"request_id": self._next_id("pw"), "device_id": device["id"],
                     "action": action, "status": "accepted"}

    def _h_request_access(self, ctx: _Ctx, p: dict, q: dict, body: dict) -> Tuple[int, Any]:
        """POST /v1/devices/{id}/access-requests: a pending grant for the caller."""
        device = self._lookup(self.devices, "device", p["id"], ctx)
        reason = _str_field(body, "reason", required=True)
        minutes = body.get("duration_minutes")
        if (not isinstance(minutes, int) or isinstance(minutes, bool)
                or not 1 <= minutes <= MAX_GRANT_MINUTES):
            raise _bad(f"field 'duration_minutes' must be an integer from 1 to {MAX_GRANT_MINUTES}")
        ticket = _str_field(body, "ticket")
        grant = _grant(self._next_id("gr"), device["id"], ctx.user, str(reason), ticket,
                       minutes, "pending", timedelta(0))
        grant["requested_at"] = _ts(_utcnow())
        self.grants[grant["id"]] = grant
        return 201, grant

    def _decide(self, ctx: _Ctx, grant_id: str, verb: str, note: Optional[str]) -> dict:
        """Approve or deny a pending grant, enforcing 4-eyes."""
        grant = self._lookup(self.grants, "grant", grant_id, ctx)
        if grant["status"] != "pending":
            raise ApiError(409, "conflict", f"grant {grant['id']} is {grant['status']}, not pending")
        if grant["requester"] == ctx.user:
            raise ApiError(403, "four_eyes",
                           f"4-eyes policy: {ctx.user} cannot {verb} their own request")
        now = _utcnow()
        grant.update(decided_by=ctx.user, decided_at=_ts(now), decision_note=note)
        if verb == "approve":
            grant.update(status="active",
                         expires_at=_ts(now + timedelta(minutes=grant["duration_minutes"])))
        else:
            grant["status"] = "denied"
        return grant

    def _h_approve(self, ctx: _Ctx, p: dict, q: dict, body: dict) -> Tuple[int, Any]:
        """POST /v1/access-grants/{id}:approve."""
        return 200, self._decide(ctx, p["id"], "approve", _str_field(body, "comment"))

    def _h_deny(self, ctx: _Ctx, p: dict, q: dict, body: dict) -> Tuple[int, Any]:
        """POST /v1/access-grants/{id}:deny."""
        return 200, self._decide(ctx, p["id"], "deny", _str_field(body, "reason"))

    def _h_revoke(self, ctx: _Ctx, p: dict, q: dict, body: dict) -> Tuple[int, Any]:
        """POST /v1/access-grants/{id}:revoke: only an active grant can be revoked."""
        grant = self._lookup(self.grants, "grant", p["id"], ctx)
        reason = _str_field(body, "reason")
        if grant["status"] != "active":
            raise ApiError(409, "conflict", f"grant {grant['id']} is {grant['status']}, not active")
        grant.update(status="revoked", revoked_by=ctx.user, revoked_at=_ts(_utcnow()),
                     decision_note=reason or grant["decision_note"])
        return 200, grant

    def _h_mount(self, ctx: _Ctx, p: dict, q: dict, body: dict) -> Tuple[int, Any]:
        """POST /v1/devices/{id}/iso:mount: replaces whatever was mounted."""
        device = self._lookup(self.devices, "device", p["id"], ctx)
        iso_id = _str_field(body, "iso_id", required=True)
        if iso_id not in self.isos:
            raise _not_found("iso", str(iso_id))
        if device["kind"] == "pdu" or device["status"] != "online":
            raise ApiError(409, "conflict", f"device {device['name']} cannot mount ISOs now "
                                            f"({device['kind']}, {device['status']})")
        device["mounted_iso"] = iso_id
        return 200, device

    def _h_unmount(self, ctx: _Ctx, p: dict, q: dict, body: dict) -> Tuple[int, Any]:
        """POST /v1/devices/{id}/iso:unmount: idempotent."""
        device = self._lookup(self.devices, "device", p["id"], ctx)
        device["mounted_iso"] = None
        return 200, device

    def _h_end_session(self, ctx: _Ctx, p: dict, q: dict, body: dict) -> Tuple[int, Any]:
        """POST /v1/console-sessions/{id}:end."""
        session = self._lookup(self.sessions, "console session", p["id"], ctx)
        reason = _str_field(body, "reason")
        if session["ended_at"] is not None:
            raise ApiError(409, "conflict",
                           f"console session {session['id']} already ended at {session['ended_at']}")
        session.update(ended_at=_ts(_utcnow()), ended_by=ctx.user,
                       end_reason=reason or "ended via API")
        return 200, session

    def _alert_change(self, ctx: _Ctx, alert_id: str, body: dict, to: str,
                      allowed_from: Tuple[str, ...]) -> Tuple[int, Any]:
        """Move an alert to `to` (acknowledged/resolved) from one of `allowed_from`."""
        alert = self._lookup(self.alerts, "alert", alert_id, ctx)
        note = _str_field(body, "note")
        if alert["status"] not in allowed_from:
            raise ApiError(409, "conflict", f"alert {alert['id']} is already {alert['status']}")
        stamp = "acknowledged" if to == "acknowledged" else "resolved"
        alert.update({"status": to, stamp + "_at": _ts(_utcnow()), stamp + "_by": ctx.user})
        if note is not None:
            alert["note"] = note
        return 200, alert

    def _h_acknowledge(self, ctx: _Ctx, p: dict, q: dict, body: dict) -> Tuple[int, Any]:
        """POST /v1/alerts/history/{id}/acknowledge: firing -> acknowledged."""
        return self._alert_change(ctx, p["id"], body, "acknowledged", ("firing",))

    def _h_resolve(self, ctx: _Ctx, p: dict, q: dict, body: dict) -> Tuple[int, Any]:
        """POST /v1/alerts/history/{id}/resolve: firing or acknowledged -> resolved."""
        return self._alert_change(ctx, p["id"], body, "resolved", ("firing", "acknowledged"))


####
#### HTTP glue
####


class _Handler(BaseHTTPRequestHandler):
    """Hands every request to DemoPlatform._handle; HTTP/1.0 unless the platform keeps connections alive."""

    platform: DemoPlatform  # set on a per-platform subclass in DemoPlatform.start()
    server_version = "kvmfleet-demo/1.0"
    # One send per answer (headers and body buffered, flushed by http.server),
    # and no Nagle: otherwise a keep-alive client waits 40 ms for delayed ACKs.
    wbufsize = -1
    disable_nagle_algorithm = True

    def _serve(self) -> None:
        """Read the body, ask the platform, write the answer."""
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = 0
        raw = self.rfile.read(length) if length > 0 else b""
        headers = {k.lower(): v for k, v in self.headers.items()}
        status, body, extra = self.platform._handle(self.command, self.path, headers, raw,
                                                    self.client_address[0])
        self.send_response(status)
        for name, value in extra.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _serve  # unknown ones get 404 JSON

    def log_message(self, format: str, *args: Any) -> None:
        """Silent unless --verbose; then one line on stderr with control characters escaped."""
        if self.platform.verbose:
            line = format % args
            sys.stderr.write("%s %s\n" % (self.address_string(),
                                          line.encode("unicode_escape").decode("ascii")))


def _count(text: str) -> int:
    """An argparse type: an integer >= 0."""
    value = int(text)
    if value < 0:
        raise ValueError(text)
    return value


def _seconds(text: str) -> float:
    """An argparse type: a finite number of seconds >= 0."""
    value = float(text)
    if not 0 <= value < float("inf"):  # also refuses nan
        raise ValueError(text)
    return value


def _main(argv: Optional[list] = None) -> int:
    """Run the demo platform until Ctrl-C or SIGTERM."""
    parser = argparse.ArgumentParser(description="KVM Fleet demo platform (loopback fake).")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (keep it loopback)")
    parser.add_argument("--port", type=int, default=8765, help="0 picks a free port")
    parser.add_argument("--verbose", action="store_true", help="log each request to stderr")
    parser.add_argument("--devices", type=_count, default=0, metavar="N",
                        help="add N generated devices to the seeded ones")
    parser.add_argument("--events", type=_count, default=0, metavar="N",
                        help="add N generated audit events (the week before start) to the seeded ones")
    parser.add_argument("--latency", type=_seconds, default=0.0, metavar="SECONDS",
                        help="sleep this long before answering each request, e.g. 0.05")
    args = parser.parse_args(argv)
    demo = DemoPlatform(args.host, args.port, verbose=args.verbose, devices=args.devices,
                        events=args.events, latency=args.latency)
    try:
        url = demo.start()
    except OSError as exc:  # most often: the port is taken, e.g. by a demo platform already running
        sys.stderr.write(f"demo platform: cannot listen on {args.host}:{args.port} ({exc.strerror or exc}); "
                         f"stop what uses it, or pick another port with --port (0: any free one).\n")
        return 1
    stop = threading.Event()

    def _on_signal(signum: int, frame: object) -> None:
        """Turn Ctrl-C or SIGTERM into a clean exit."""
        stop.set()

    # Handle SIGINT ourselves too: a shell that backgrounds us may have it ignored.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _on_signal)
    lines = [f"KVM Fleet demo platform on {url}", "tokens (Authorization: Bearer <token>):"]
    lines += [f"  {tok:<22} role {TOKENS[tok]:<10} user {USERS[tok]}" for tok in TOKENS]
    if args.devices or args.events or args.latency:
        lines.append(f"fleet: {len(demo.devices)} devices, {len(demo.events)} audit events, "
                     f"{args.latency * 1000:g} ms latency per request")
    lines += [f"try: KVMFLEET_API={url} KVMFLEET_TOKEN=kvmf_demo_operator "
              f"KVMFLEET_MCP_ALLOW_WRITES=true", "Ctrl-C to stop."]
    sys.stderr.write("\n".join(lines) + "\n")
    sys.stderr.flush()
    while not stop.wait(0.5):  # a timed wait keeps signals responsive everywhere
        pass
    demo.stop()
    return 0


if __name__ == "__main__":
    sys.exit(_main())
