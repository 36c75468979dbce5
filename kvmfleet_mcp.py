#!/usr/bin/env python3
"""kvmfleet-mcp: a Model Context Protocol server for a KVM Fleet estate.

It lets an MCP client (Claude Desktop, Claude Code, Cursor, VS Code, ...)
read and, when allowed, act on IP-KVM/BMC devices, the audit log, access
grants, console sessions, alerts, policies, ISOs and compliance reports
through the KVM Fleet REST API. One file; needs `requests` and `jsonschema`.

Launch (from a client config, or by hand):

    python3 /opt/kvmfleet/kvmfleet_mcp.py            # serve MCP on stdio
    python3 kvmfleet_mcp.py --check | --list-tools | --version

Environment: KVMFLEET_API (the platform's base URL) and KVMFLEET_TOKEN, or
KVMFLEET_TOKEN_FILE, are required; KVMFLEET_MCP_ALLOW_WRITES=true offers the
write tools. Config.from_env reads every variable; the README's table says
what each does.

Stdio contract: newline-delimited JSON-RPC 2.0 in UTF-8, read from stdin
and written to stdout as bytes. Stdout carries protocol messages only;
logs go to stderr. Both protocol eras are served: the `initialize`
handshake (2024-11-05 ... 2025-11-25) and stateless 2026-07-28 requests
that carry their version in `_meta`. EOF on stdin or SIGTERM exits 0.

SECURITY: the server holds a token that can power-cycle production hosts,
so it trusts neither the model nor the data it reads. Write tools are not
even advertised unless KVMFLEET_MCP_ALLOW_WRITES is exactly "true", and at
most KVMFLEET_MCP_MAX_WRITES_PER_MINUTE writes are sent in any minute.
Destructive calls also need `confirm: true`, which is never sent on, or,
when the client can ask its user (elicitation), a person's click that shows
every character the call would send; with KVMFLEET_MCP_CONFIRM=human every
write needs the click. Before asking or refusing, reads show what the call
would touch. Every argument is checked against its schema, and ids are
percent-quoted so that they cannot leave their path segment. The token goes
only to KVMFLEET_API: redirects are not followed, TLS is always verified,
plain http is refused unless the host is loopback (or
KVMFLEET_ALLOW_INSECURE_HTTP=true), only HTTPS_PROXY may carry it (never for
plain http), and the environment's netrc and CA overrides are ignored. The
token is never written to stdout, stderr or a result, and is redacted,
before anything is cut, wherever the platform might echo it. Answers are
read within a size bound and a whole-answer deadline, results are capped,
and characters that could hide text from a person are shown as \\uXXXX. The
platform still enforces RBAC, policy, JIT, 4-eyes and its audit log; its
refusals reach the model verbatim. There is no eval, no subprocess, and
nothing listens on a port. The only file written is the optional record of
agent actions (never through a symlink, never a file of another user), which
holds no token and no request or response bodies.
"""
from __future__ import annotations

__version__ = "0.2.0"

import sys

# Python 3.7 and 3.8 can read this file, but not run it (typing.Final is 3.8+,
# much else 3.9+): one line instead of a traceback. (3.6, RHEL 8's python3,
# cannot even read it; the README says what to use there.)
if sys.version_info < (3, 9):
    sys.exit("kvmfleet-mcp needs Python 3.9 or newer; %s is %s." % (sys.executable, sys.version.split()[0]))

import argparse
import base64
import collections
import datetime
import errno
import functools
import hashlib
import hmac
import importlib.util
import ipaddress
import json
import math
import os
import queue
import re
import signal
import stat
import sysconfig
import threading
import time
import traceback
from typing import Any
from typing import Callable
from typing import Deque
from typing import Dict
from typing import Final
from typing import IO
from typing import List
from typing import NamedTuple
from typing import Optional
from typing import Tuple
from typing import Union
from urllib.parse import quote
from urllib.parse import urlsplit

# requests and jsonschema, the two heavy packages, are imported on first use,
# each in one place (_requests, _jsonschema): initialize and tools/list need neither.

###############################################################################
# Constants ###################################################################
###############################################################################

SERVER_NAME: Final = "kvmfleet-mcp"
# Versions that use the initialize handshake, oldest first.
LEGACY_VERSIONS: Final = ("2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25")
# Versions served statelessly, with the version in every request's _meta.
MODERN_VERSIONS: Final = ("2026-07-28",)
# What an initialize that asks for a version we do not know gets.
NEWEST_LEGACY: Final = LEGACY_VERSIONS[-1]
# JSON-RPC batches exist only in this revision (added, then removed after).
BATCH_VERSION: Final = "2025-03-26"
# What server/discover and -32022 name: every version, newest first.
SUPPORTED_VERSIONS: Final = MODERN_VERSIONS + LEGACY_VERSIONS[::-1]
# Methods of the handshake era that 2026-07-28 removed (see its changelog).
LEGACY_ONLY_METHODS: Final = ("initialize", "ping")

META_VERSION: Final = "io.modelcontextprotocol/protocolVersion"
META_CLIENT: Final = "io.modelcontextprotocol/clientInfo"
META_CAPABILITIES: Final = "io.modelcontextprotocol/clientCapabilities"
META_SERVER: Final = "io.modelcontextprotocol/serverInfo"

PARSE_ERROR: Final = -32700
INVALID_REQUEST: Final = -32600
METHOD_NOT_FOUND: Final = -32601
INVALID_PARAMS: Final = -32602
INTERNAL_ERROR: Final = -32603
UNSUPPORTED_VERSION: Final = -32022

# Security: a line longer than this is dropped as it arrives (answered with
# -32600), so a client cannot make the server buffer without bound.
MAX_LINE_BYTES: Final = 8 * 1024 * 1024
# How much of stdin one read takes, and how many such reads the reader
# thread (which exists only while a person is asked) may hold ahead.
READ_CHUNK: Final = 65536
READ_AHEAD_CHUNKS: Final = 4
# Security: a platform answer larger than this is not read to the end.
MAX_BODY_BYTES: Final = 16 * 1024 * 1024
# How much of a platform error body the model sees (it is verbatim up to here).
MAX_ERROR_TEXT: Final = 4000
# Reads are tried again on these answers and on connection faults; writes never.
RETRY_STATUSES: Final = (429, 502, 503, 504)
READ_RETRIES: Final = 2
RETRY_BACKOFF: Final = 0.25  # seconds, doubled each time, when no Retry-After
RETRY_AFTER_CAP: Final = 10.0  # a longer Retry-After is passed on, not waited for
# Security: a whole answer must arrive within the read timeout; the timer that
# enforces it waits this much longer, so that a plain stall is named as one.
DEADLINE_GRACE: Final = 0.5
# Security: writes sent in any window of this many seconds are counted.
WRITE_WINDOW: Final = 60.0
# Tool lists never change within a process; say so to 2026 clients' caches.
LIST_TTL_MS: Final = 3_600_000
# How long the token-scope question may delay the first tools/list.
SCOPE_TIMEOUT: Final = 2.0
# Each read that previews what a write would touch: one try, this bound.
PREVIEW_TIMEOUT: Final = 5.0
# Security: while a person is asked, other requests wait: at most this many
# lines and bytes of them (more are answered "busy").
MAX_WAITING_LINES: Final = 1000
MAX_WAITING_BYTES: Final = MAX_LINE_BYTES
# How many open sessions or active grants a preview names (and the page it reads).
PREVIEW_ITEMS: Final = 10
PREVIEW_PAGE: Final = 500
# count_by reads pages of this size and names at most this many values.
COUNT_PAGE: Final = 500
COUNT_MAX_VALUES: Final = 200
# Elicitation (asking the client's user) exists from this revision on.
ELICITATION_SINCE: Final = "2025-06-18"
# The key of our one input request (2026-07-28) and the field of its form.
ASK_KEY: Final = "confirm_action"
ASK_FIELD: Final = "approve"

# Ids are opaque to us, but the platform's are plain tokens. Starting with
# a letter or digit rules out "." and ".." (which URL libraries collapse).
# Every pattern ends in $(?!\n): Python's $ also matches before a final
# newline, so "d1\n" would pass; the look-ahead refuses that, and is a no-op
# in ECMA-262, whose $ is the end.
ID_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9._~:@-]{0,127}$(?!\n)"
FIELD_PATTERN: Final = r"^[A-Za-z_][A-Za-z0-9_]{0,63}$(?!\n)"
RFC3339_PATTERN: Final = (
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}"
    r"(\.[0-9]{1,9})?(Z|[+-][0-9]{2}:[0-9]{2})$(?!\n)"
)
# since/until: RFC 3339, or a duration back from now that the server resolves.
DURATION_PATTERN: Final = r"^[1-9][0-9]{0,3}[mhdw]$(?!\n)"
TIME_PATTERN: Final = "(%s)|(%s)" % (RFC3339_PATTERN, DURATION_PATTERN)
DURATION_SECONDS: Final = {"m": 60, "h": 3600, "d": 86400, "w": 604800}
# Security: a token is printable ASCII without spaces. Anything else (a
# second line, a pasted "Bearer ") would break the header, and requests would
# quote it back in an error.
TOKEN_PATTERN: Final = re.compile(r"[!-~]+")
# Security: characters that are invisible or reorder text, so platform data
# could hide instructions from the person reading what the model read: C0
# and C1 controls (not tab or newline), every Default_Ignorable_Code_Point
# of Unicode 15.0.0 (DerivedCoreProperties.txt) but the emoji variation
# selectors U+FE0E and U+FE0F, and also the line and paragraph separators
# and the interlinear annotation marks.
_HIDDEN: Final = ("\x00-\x08\x0b-\x1f\x7f-\x9f\xad\u034f\u061c\u115f\u1160\u17b4\u17b5"
                  "\u180b-\u180f\u200b-\u200f\u2028-\u202e\u2060-\u206f\u3164\ufe00-\ufe0d"
                  "\ufeff\uffa0\ufff0-\ufffb\U0001bca0-\U0001bca3\U0001d173-\U0001d17a"
                  "\U000e0000-\U000e0fff")
HIDDEN_IN_TEXT: Final = re.compile("[" + _HIDDEN + "]")
HIDDEN_IN_LOG: Final = re.compile("[\t\n" + _HIDDEN + "]")
ALWAYS: Final = "always"  # Tool.confirm value: every call needs confirm

JSON = Dict[str, Any]

###############################################################################
# Errors ######################################################################
###############################################################################


class McpError(Exception):
    """Base class of every error this module raises on purpose."""


class ConfigError(McpError):
    """The environment does not let the server start; exit status 2."""


class ProtocolError(McpError):
    """A request the server rejects with a JSON-RPC error object."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.data = data


class ToolError(McpError):
    """A tool call that failed in a way the model can read and act on."""

    cause: Optional[BaseException] = None  # the network fault behind it, if any (for --check)


class Abandoned(McpError):
    """The client cancelled the call while its user was being asked: no reply is sent."""


class Expired(BaseException):
    """An exchange with the platform passed its deadline (see Deadline); a BaseException, like
    KeyboardInterrupt, so that no library's "except Exception" swallows it on its way out."""


###############################################################################
# The tool table ##############################################################
###############################################################################


class Tool(NamedTuple):
    """One MCP tool, mapped onto one REST call."""

    name: str
    title: str
    description: str
    method: str  # GET or POST
    path: str  # template; each {placeholder} is a required argument
    properties: JSON  # JSON Schema of each argument, in wire order
    required: Tuple[str, ...] = ()
    read_only: bool = True
    destructive: bool = False
    idempotent: bool = True
    # False for every row: the tools reach one closed domain, the org's fleet.
    open_world: bool = False
    # None: never. ALWAYS: every call. (arg, values): when arg is one of values.
    confirm: Union[None, str, Tuple[str, Tuple[str, ...]]] = None
    effect: str = ""  # what a write does, formatted with its args, for the person asked
    fixed_query: Tuple[Tuple[str, str], ...] = ()
    defaults: Tuple[Tuple[str, Callable[[], str]], ...] = ()

    @property
    def write(self) -> bool:
        """Write tools are advertised only when writes are enabled."""
        return not self.read_only


def _id(what: str) -> JSON:
    return {"type": "string", "pattern": ID_PATTERN, "description": what}


def _text(what: str, max_length: int = 1000) -> JSON:
    return {"type": "string", "minLength": 1, "maxLength": max_length, "description": what}


def _enum(what: str, *values: str) -> JSON:
    return {"type": "string", "enum": list(values), "description": what}


def _current_month() -> str:
    return time.strftime("%Y-%m", time.gmtime())


DEVICE_ID: Final = _id("Device id (the `id` field from list_devices, not its name).")
SINCE: Final = {"type": "string", "pattern": TIME_PATTERN,
                "description": "Only items at or after this time: RFC 3339 (2026-11-23T08:00:00Z) "
                               "or a duration back from now (30m, 24h, 7d, 2w)."}
UNTIL: Final = {"type": "string", "pattern": TIME_PATTERN,
                "description": "Only items before this time: RFC 3339 or a duration back from now."}
CONFIRM: Final = {"type": "boolean",
                  "description": "true only after the user has approved this exact action."}
# Every list tool pages, and the server itself keeps only some fields of each
# item (fields) or counts every matching item (count_by): neither is sent on.
PAGE: Final = {
    "limit": {"type": "integer", "minimum": 1, "maximum": 500, "description": "Items per page, 1-500."},
    "cursor": {"type": "string", "minLength": 1, "maxLength": 1024,
               "description": "`next_cursor` from the previous page."},
    "fields": {"type": "array", "items": {"type": "string", "pattern": FIELD_PATTERN},
               "minItems": 1, "maxItems": 16, "uniqueItems": True,
               "description": "Keep only these fields of each item (and id)."},
    "count_by": {"type": "string", "pattern": FIELD_PATTERN,
                 "description": "Count all matching items by this field, reading every page; "
                                "answers counts, not a page."},
}

# The tools' contract with the platform is in this tuple: the endpoints and
# argument names follow the vendor's table; where it is silent (pagination,
# filters, bodies) the assumption is written here. (Impact previews,
# token_scope and --check name a few more paths, each where it is used.)
TOOLS: Final = (
    Tool("list_devices", "List devices",
         "List the fleet's IP-KVM/BMC devices with status and power state. Reads only.",
         "GET", "/v1/devices",
         {"status": _enum("Only devices in this state.", "online", "offline"),
          "q": _text("Search in device name or host.", 256),
          "tag": _text("Only devices with this tag.", 128), **PAGE}),
    Tool("get_device_health", "Get device health",
         "Get one device with its health: temperatures, fans, PSUs, firmware, uptime. Reads only.",
         "GET", "/v1/devices/{device_id}", {"device_id": DEVICE_ID}, ("device_id",)),
    Tool("query_audit_log", "Query audit log",
         "Search the hash-chained audit log (logins, power actions, approvals), newest first. Reads only.",
         "GET", "/v1/audit/events",
         {"since": SINCE, "until": UNTIL,
          "actor": _text("Only events by this user.", 256),
          "action": _text("Only this action, e.g. auth.login or device.power.", 128),
          "outcome": _enum("Only this outcome.", "success", "failure", "denied"),
          "device_id": DEVICE_ID, **PAGE}),
    Tool("verify_audit_integrity", "Verify audit integrity",
         "Ask the platform to re-walk the audit hash chain and report whether it is intact. Reads only.",
         "GET", "/v1/audit/integrity", {}),
    Tool("list_open_console_sessions", "List open console sessions",
         "List console sessions that are still open: who, on which device, since when. Reads only.",
         "GET", "/v1/console-sessions",
         {"device_id": DEVICE_ID, "user": _text("Only sessions of this user.", 256), **PAGE},
         fixed_query=(("open_only", "true"),)),
    Tool("list_access_grants", "List access grants",
         "List just-in-time access requests and grants, e.g. those awaiting your approval. Reads only.",
         "GET", "/v1/access-grants",
         {"status": _enum("Only grants in this state.",
                          "pending", "active", "expired", "denied", "revoked"),
          "awaiting_my_approval": {"type": "boolean",
                                   "description": "true: only requests you may approve."},
          "device_id": DEVICE_ID, **PAGE}),
    Tool("list_alerts", "List alerts",
         "List alert history: firing, acknowledged and resolved alerts. Reads only.",
         "GET", "/v1/alerts/history",
         {"since": SINCE,
          "status": _enum("Only alerts in this state.", "firing", "acknowledged", "resolved"),
          "severity": _enum("Only this severity.", "critical", "warning", "info"),
          "device_id": DEVICE_ID, **PAGE}),
    Tool("list_policies", "List policies",
         "List access policies (time of day, MFA, concurrent sessions, approval rules). Reads only.",
         "GET", "/v1/policies", {}),
    Tool("list_isos", "List ISOs",
         "List the ISO images that can be mounted as virtual media. Reads only.",
         "GET", "/v1/isos", {}),
    Tool("get_audit_chain_head", "Get audit chain head",
         "Get the audit chain's head hash and when it was last anchored to a witness. Reads only.",
         "GET", "/v1/audit/head", {}),
    Tool("get_compliance_score", "Get compliance score",
         "Generate a compliance snapshot (score and controls) for one month. Changes nothing.",
         "POST", "/v1/reports/{framework}",
         {"framework": {"type": "string", "pattern": r"^[a-z0-9][a-z0-9_-]{0,31}$(?!\n)",
                        "description": "Framework slug, e.g. nis2."},
          "period": {"type": "string", "pattern": r"^[0-9]{4}-(0[1-9]|1[0-2])$(?!\n)",
                     "description": "Month as YYYY-MM; default the current month (UTC)."}},
         ("framework",), defaults=(("period", _current_month),)),
    # Write tools: hidden unless KVMFLEET_MCP_ALLOW_WRITES is exactly "true".
    Tool("power_action", "Power action",
         "Power a device on, off, off_hard (cut power), cycle or reboot. "
         "off, off_hard and cycle need confirm: true.",
         "POST", "/v1/devices/{device_id}/power",
         {"device_id": DEVICE_ID,
          "action": _enum("What to do.", "on", "off", "off_hard", "cycle", "reboot"),
          "confirm": CONFIRM},
         ("device_id", "action"), read_only=False, destructive=True, idempotent=False,
         confirm=("action", ("off", "off_hard", "cycle")),
         effect="send power action '{action}' to device {device_id}, "
                "interrupting everything running on it"),
    Tool("request_access", "Request access",
         "Ask for just-in-time access to a device; another person must approve it.",
         "POST", "/v1/devices/{device_id}/access-requests",
         {"device_id": DEVICE_ID, "reason": _text("Why access is needed."),
          "duration_minutes": {"type": "integer", "minimum": 1, "maximum": 10080,
                               "description": "How long the grant should last, in minutes."},
          "ticket": _text("Change or incident ticket, e.g. CHG-4711.", 128)},
         ("device_id", "reason", "duration_minutes"), read_only=False, idempotent=False,
         effect="request {duration_minutes} minutes of access to device {device_id}"),
    Tool("approve_access", "Approve access",
         "Approve a pending access request (4-eyes: not your own).",
         "POST", "/v1/access-grants/{grant_id}:approve",
         {"grant_id": _id("Access grant id."), "comment": _text("Note for the audit log.")},
         ("grant_id",), read_only=False,
         effect="approve access request {grant_id} as its second pair of eyes (4-eyes)"),
    Tool("deny_access", "Deny access",
         "Deny a pending access request.",
         "POST", "/v1/access-grants/{grant_id}:deny",
         {"grant_id": _id("Access grant id."), "reason": _text("Why it is denied.")},
         ("grant_id",), read_only=False, effect="deny access request {grant_id}"),
    Tool("revoke_access", "Revoke access",
         "Revoke an active access grant at once. Needs confirm: true.",
         "POST", "/v1/access-grants/{grant_id}:revoke",
         {"grant_id": _id("Access grant id."), "reason": _text("Why it is revoked."),
          "confirm": CONFIRM},
         ("grant_id",), read_only=False, destructive=True, confirm=ALWAYS,
         effect="revoke access grant {grant_id} at once, cutting off its holder"),
    Tool("mount_iso", "Mount ISO",
         "Mount an ISO as virtual media on a device, which can change what it boots. "
         "Needs confirm: true.",
         "POST", "/v1/devices/{device_id}/iso:mount",
         {"device_id": DEVICE_ID, "iso_id": _id("ISO id from list_isos."), "confirm": CONFIRM},
         ("device_id", "iso_id"), read_only=False, destructive=True, confirm=ALWAYS,
         effect="mount ISO {iso_id} on device {device_id}, replacing its virtual media"),
    Tool("unmount_iso", "Unmount ISO",
         "Unmount the virtual media from a device.",
         "POST", "/v1/devices/{device_id}/iso:unmount", {"device_id": DEVICE_ID},
         ("device_id",), read_only=False, effect="unmount the virtual media of device {device_id}"),
    Tool("end_console_session", "End console session",
         "End an open console session, disconnecting its user. Needs confirm: true.",
         "POST", "/v1/console-sessions/{session_id}:end",
         {"session_id": _id("Console session id."), "reason": _text("Why it is ended."),
          "confirm": CONFIRM},
         ("session_id",), read_only=False, destructive=True, confirm=ALWAYS,
         effect="end console session {session_id}, disconnecting its user"),
    Tool("acknowledge_alert", "Acknowledge alert",
         "Acknowledge a firing alert.",
         "POST", "/v1/alerts/history/{alert_id}/acknowledge",
         {"alert_id": _id("Alert id."), "note": _text("Note for the alert.")},
         ("alert_id",), read_only=False, effect="acknowledge alert {alert_id}"),
    Tool("resolve_alert", "Resolve alert",
         "Mark an alert resolved.",
         "POST", "/v1/alerts/history/{alert_id}/resolve",
         {"alert_id": _id("Alert id."), "note": _text("Note for the alert.")},
         ("alert_id",), read_only=False, effect="mark alert {alert_id} resolved"),
)
TOOLS_BY_NAME: Final = {tool.name: tool for tool in TOOLS}

INSTRUCTIONS: Final = (
    "KVM Fleet: IP-KVM/BMC devices, audit log, access grants, console sessions, alerts. "
    "Tools take ids (the `id` field of list results), not names: find an id first, e.g. "
    "list_devices with q=<name>. Power off/off_hard/cycle, revoke_access, mount_iso and "
    "end_console_session are refused until the user approves that exact action and you call "
    "again with confirm: true. Lists are paged: pass next_cursor as cursor; a result cut to fit "
    "says so in _truncated. For how many, use count_by (exact, over every page); fields keeps "
    "pages small. since/until take RFC 3339 or 30m, 24h, 7d, 2w. The platform enforces roles, "
    "policy, JIT and 4-eyes; its refusals are quoted verbatim.")


class Prompt(NamedTuple):
    """One prompt: a question from the README answered in a few tool calls."""

    name: str
    title: str
    question: str
    steps: Tuple[Tuple[str, JSON], ...]  # (tool, arguments); "{arg}" is filled in
    arguments: Tuple[Tuple[str, str, str], ...] = ()  # (name, description, default)


PROMPTS: Final = (
    Prompt("fleet_status", "Fleet status", "How many devices are there, and which are offline?",
           (("list_devices", {"count_by": "status"}),
            ("list_devices", {"status": "offline", "fields": ["name"], "limit": 500}))),
    Prompt("failed_logins", "Failed logins", "Who failed to log in during the last {window}, and how often?",
           (("query_audit_log", {"action": "auth.login", "outcome": "failure", "since": "{window}",
                                 "count_by": "actor"}),),
           (("window", "How far back: 30m, 24h, 7d, 2w.", "24h"),)),
    Prompt("approvals_waiting", "Approvals waiting on me", "What access requests are waiting for my approval?",
           (("list_access_grants", {"awaiting_my_approval": True, "status": "pending"}),)),
    Prompt("nis2_snapshot", "NIS2 snapshot", "Generate the NIS2 snapshot for {period}, with its dropped controls.",
           (("get_compliance_score", {"framework": "nis2", "period": "{period}"}),),
           (("period", "Month as YYYY-MM; empty for the current month.", ""),)),
    Prompt("overnight_alerts", "Overnight alerts", "What alerted in the last {window}, and what still fires?",
           (("list_alerts", {"since": "{window}", "count_by": "status"}),
            ("list_alerts", {"since": "{window}", "fields": ["severity", "status", "message", "device_id"],
                             "limit": 100})),
           (("window", "How far back: e.g. 12h.", "12h"),)),
    Prompt("audit_integrity", "Audit integrity", "Is the audit log intact, and when was its chain last anchored?",
           (("verify_audit_integrity", {}), ("get_audit_chain_head", {}))),
)

###############################################################################
# Pure helpers ################################################################
###############################################################################


def input_schema(tool: Tool) -> JSON:
    """The JSON Schema of a tool's arguments (same meaning in draft 7 and 2020-12)."""
    schema: JSON = {"type": "object", "properties": tool.properties, "additionalProperties": False}
    if tool.required:
        schema["required"] = list(tool.required)
    return schema


def tool_listing(tool: Tool) -> JSON:
    """A tool as tools/list shows it, with all four annotation hints written out."""
    return {
        "name": tool.name,
        "description": tool.description,
        "inputSchema": input_schema(tool),
        "annotations": {
            "title": tool.title,
            "readOnlyHint": tool.read_only,
            "destructiveHint": tool.destructive,
            "idempotentHint": tool.idempotent,
            "openWorldHint": tool.open_world,
        },
    }


def advertised_tools(allow_writes: bool, only: Optional[Tuple[str, ...]] = None) -> Tuple[Tool, ...]:
    """The tools this process offers, in table order: writes only if allowed, and only those named."""
    return tuple(tool for tool in TOOLS if (allow_writes or not tool.write) and (only is None or tool.name in only))


def prompt_steps(prompt: Prompt, given: Dict[str, str]) -> List[Tuple[str, JSON]]:
    """The tool calls a prompt asks for, its arguments filled in (an empty one left out)."""
    values = {name: given.get(name) or default for name, _, default in prompt.arguments}
    steps = []
    for tool, template in prompt.steps:
        args = {key: value.format(**values) if isinstance(value, str) else value for key, value in template.items()}
        steps.append((tool, {key: value for key, value in args.items() if value != ""}))
    return steps


def prompt_text(prompt: Prompt, given: Dict[str, str]) -> str:
    """The user message of a prompt: the question and the exact calls that answer it."""
    values = {name: given.get(name) or default or "this month" for name, _, default in prompt.arguments}
    calls = ["%d. %s %s" % (n, tool, json.dumps(args)) for n, (tool, args) in
             enumerate(prompt_steps(prompt, given), 1)]
    return "%s\nAnswer it with these KVM Fleet tool calls, then summarise what they return:\n%s" % (
        prompt.question.format(**values), "\n".join(calls))


def needs_confirm(tool: Tool, args: JSON) -> bool:
    """Whether this call changes something the user must approve first."""
    if isinstance(tool.confirm, tuple):
        arg, values = tool.confirm
        return args.get(arg) in values
    return tool.confirm == ALWAYS


def build_path(template: str, args: JSON) -> str:
    """Fill a path template, consuming the arguments it names."""
    parts = template.split("{")
    path = parts[0]
    for part in parts[1:]:
        name, rest = part.split("}", 1)
        # Security: quote with no safe characters, so "/", "?", "#", "%",
        # ":" and control characters in an id cannot leave its segment or
        # turn "<id>:approve" into another verb; and refuse the segments
        # that URL libraries collapse (the id pattern already does).
        segment = quote(str(args.pop(name)), safe="")
        if segment in ("", ".", ".."):
            raise ToolError("%s=%r is not an id." % (name, segment))
        path += segment + rest
    return path


def query_value(value: Any) -> str:
    """A query-string value: JSON booleans as true/false, numbers as digits."""
    if value is True or value is False:
        return "true" if value else "false"
    return str(value)


def client_tag(client: Optional[JSON]) -> str:
    """The x-kvmfleet-mcp-client header: this server and the MCP client."""
    name = version = "unknown"
    if isinstance(client, dict):
        name = _header_safe(client.get("name")) or name
        version = _header_safe(client.get("version")) or version
    return "%s/%s (%s/%s)" % (SERVER_NAME, __version__, name, version)


def _header_safe(value: Any) -> str:
    # Security: clientInfo is whatever the client sent; keep printable
    # ASCII only, so it cannot inject a header line or break the request.
    if not isinstance(value, str):
        return ""
    return "".join(ch for ch in value[:64] if " " <= ch <= "~").strip()


def bounded(text: str, limit: int) -> str:
    """Text cut to limit characters, saying how much was left out; any token is redacted first."""
    # Security: redacted before the cut, so a cut inside an echoed token
    # cannot leave all of it but the last characters.
    text = redact(text)
    if len(text) <= limit:
        return text
    return text[:limit] + "\n[... %d more characters not shown]" % (len(text) - limit)


def cut(text: str, limit: int) -> str:
    """Text within limit characters, its end replaced by a note of how much is missing."""
    if len(text) <= limit:
        return text
    note = "\n[... cut here: %d more characters were not shown. Ask for less, e.g. with limit or fields.]"
    keep = max(limit - len(note % len(text)), 0)
    return (text[:keep] + note % (len(text) - keep))[:limit]


def _escape_hidden(match: Any) -> str:
    code = ord(match.group())
    if code > 0xFFFF:  # written as the JSON surrogate pair, e.g. \udb40\udc41
        code -= 0x10000
        return "\\u%04x\\u%04x" % (0xD800 + (code >> 10), 0xDC00 + (code & 0x3FF))
    return "\\u%04x" % code


def visible(text: str) -> str:
    """Text with hidden characters written as \\uXXXX, which JSON reads back as the same text."""
    # Printable ASCII, as platforms mostly send, hides nothing: a C-speed test
    # instead of the regex (~50 us on a 10 KB page, twice a call).
    return text if text.isascii() and text.isprintable() else HIDDEN_IN_TEXT.sub(_escape_hidden, text)


def compact(data: Any) -> str:
    """Compact JSON, non-ASCII kept as is, hidden characters made visible."""
    return visible(json.dumps(data, ensure_ascii=False, separators=(",", ":")))


def fit(data: Any, limit: int) -> str:
    """Compact JSON within limit characters: a page of items is cut at a whole item and says so."""
    text = redact(compact(data))
    items = data.get("items") if isinstance(data, dict) else None
    if len(text) <= limit or not isinstance(items, list) or not items:
        return cut(text, limit)

    def page(kept: int, shown: List[Any]) -> JSON:
        rest = ("call again with the same filters and limit=%d, then follow next_cursor" % kept if kept else
                "even the first item is longer than that: ask for fewer fields of each with fields")
        return dict(data, items=shown, _truncated={
            "items_shown": kept, "items_left_out": len(items) - kept,
            "why": "the result was longer than %d characters" % limit, "to_see_the_rest": rest})

    # The most items that fit, by bisection: "[a,b]" is "[]" plus each item
    # and a comma less one, so a page's length needs no re-serialising.
    sizes = [0]
    for item in items:
        sizes.append(sizes[-1] + len(compact(item)) + 1)
    low, high = 0, len(items) - 1
    while low < high:
        middle = (low + high + 1) // 2
        if len(compact(page(middle, []))) + sizes[middle] - 1 <= limit:
            low = middle
        else:
            high = middle - 1
    # Security: the cap holds even when the bulk of the answer is outside items.
    return cut(redact(compact(page(low, items[:low]))), limit)


def project(data: Any, fields: List[str]) -> Any:
    """A page whose items keep only the given fields, and always id."""
    keep = set(fields) | {"id"}
    if isinstance(data, dict) and isinstance(data.get("items"), list):
        data["items"] = [{key: value for key, value in item.items() if key in keep}
                         if isinstance(item, dict) else item for item in data["items"]]
    return data


def text_result(text: str, limit: int, is_error: bool = False) -> JSON:
    """A tools/call result with one text block: tokens redacted, hidden characters shown, within limit."""
    # Security: whatever produced the text, no result is longer than the cap.
    result: JSON = {"content": [{"type": "text", "text": cut(visible(redact(text)), limit)}]}
    if is_error:
        result["isError"] = True
    return result


def encode(message: Any) -> bytes:
    """One JSON-RPC message as a compact UTF-8 line."""
    try:
        return json.dumps(message, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"
    except UnicodeEncodeError:
        # A lone surrogate (legal in JSON text, not in UTF-8) came in, e.g.
        # as an id: escape everything rather than fail the reply.
        return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def error_response(request_id: Any, code: int, message: str, data: Any = None) -> JSON:
    """A JSON-RPC error response."""
    error: JSON = {"code": code, "message": message}
    if data is not None:
        error["data"] = data
    return {"jsonrpc": "2.0", "id": request_id, "error": error}


def too_long() -> bytes:
    """The answer to a line over MAX_LINE_BYTES, which was dropped as it arrived."""
    return encode(error_response(None, INVALID_REQUEST, "Message longer than %d bytes; it was discarded"
                                 % MAX_LINE_BYTES))


def _reject_constant(name: str) -> None:
    raise ValueError("%s is not JSON" % name)


STRICT_JSON: Final = json.JSONDecoder(parse_constant=_reject_constant)  # NaN, Infinity: not JSON


def parse_line(line: bytes) -> Any:
    """Decode one stdin line as strict UTF-8 JSON (no NaN, no UTF-16 guessing)."""
    return STRICT_JSON.decode(line.decode("utf-8"))


def request_id_of(message: Any) -> Any:
    """The id of a request (a string or an integer, never a bool), or None."""
    found = message.get("id") if isinstance(message, dict) else None
    return found if isinstance(found, (str, int)) and not isinstance(found, bool) else None


def same_id(one: Any, other: Any) -> bool:
    """JSON-RPC ids compared as JSON does: 1 is not true, nor 1.0, nor "1"."""
    return type(one) is type(other) and one == other


_SECRETS: List[str] = []  # every token seen, as written and escaped: never in a log line or a result
_ESCAPED_SECRETS: List[str] = []  # regexes: each token as JSON may write it, any character as \\uXXXX (/ as \\/)


def _keep_secret(secret: str) -> None:
    # A string this short is no real token (they are kvmf_ and 40-odd
    # characters); redacting it would mangle ordinary words instead.
    if len(secret) < 8 or secret in _SECRETS:
        return
    # Security: also as a traceback (repr) or a JSON body would escape it.
    _SECRETS.extend(form for form in (secret, repr(secret)[1:-1], json.dumps(secret)[1:-1]) if form not in _SECRETS)
    _ESCAPED_SECRETS.append("".join("(?:%s|\\\\u(?i:%04x)%s)" % (  # compiled (and cached by re) when first needed
        re.escape(char), ord(char), "|\\\\/" if char == "/" else "") for char in secret))


def redact(text: str) -> str:
    """Text with every token this process has seen replaced by [redacted]."""
    # Security: a proxy or a debug page may echo the Authorization header
    # back; the token must not reach the model or the logs that way either.
    for secret in _SECRETS:
        text = text.replace(secret, "[redacted]")
    for pattern in _ESCAPED_SECRETS if "\\" in text else ():  # only text with an escape in it can hide one
        text = re.sub(pattern, "[redacted]", text)
    return text


def log(message: str) -> None:
    """One line on stderr, control characters escaped, secrets redacted."""
    line = "%s: %s\n" % (SERVER_NAME, HIDDEN_IN_LOG.sub(_escape_hidden, redact(message)))
    try:
        sys.stderr.buffer.write(line.encode("utf-8", "backslashreplace"))
        sys.stderr.buffer.flush()
    except (OSError, ValueError, AttributeError):
        pass  # no usable stderr: logging must never break the protocol


def resolve_durations(args: JSON, now: float) -> str:
    """Replace since/until durations (24h) with UTC RFC 3339 times; say what window that is."""
    said = []
    for name in ("since", "until"):
        value = args.get(name)
        if isinstance(value, str) and re.search(DURATION_PATTERN, value):
            if "cursor" in args:  # a later page must have the first page's window, not a new one
                raise ToolError("Invalid arguments: %s=%s is relative to now, so the next page would have other "
                                "filters; with cursor, give the RFC 3339 time that the first page's 'Time window "
                                "used' names." % (name, value))
            seconds = int(value[:-1]) * DURATION_SECONDS[value[-1]]
            args[name] = _utc(now - seconds)
            said.append("%s=%s (%s before now)" % (name, args[name], value))
    if not said:
        return ""
    return "Time window used: %s; now is %s. To follow next_cursor, give these times, not the durations." % (
        ", ".join(said), _utc(now))


def _utc(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def _digest(args: JSON) -> str:
    return hashlib.sha256(json.dumps(args, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _json_object(body: bytes) -> Optional[JSON]:
    """A body's JSON object, or None for anything else (including nesting too deep to parse)."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None

###############################################################################
# Configuration ###############################################################
###############################################################################


class Config(NamedTuple):
    """Everything the server takes from its environment, read once."""

    api: str
    token: str  # "" when the token is read from token_file instead
    token_file: Optional[str]
    allow_writes: bool
    ca_bundle: Optional[str]
    connect_timeout: float
    read_timeout: float
    max_result_chars: int
    tools: Optional[Tuple[str, ...]] = None  # KVMFLEET_MCP_TOOLS, None: all
    org_id: Optional[str] = None  # KVMFLEET_ORG_ID: every call is for this customer org
    human_only: bool = False  # KVMFLEET_MCP_CONFIRM=human: every write needs a person
    confirm_timeout: float = 300.0  # how long a person has to answer
    audit_log: Optional[str] = None  # KVMFLEET_MCP_AUDIT_LOG: the record of agent actions
    max_writes_per_minute: int = 10
    count_max_items: int = 100_000
    https_proxy: Optional[str] = None  # HTTPS_PROXY, for an https:// platform only
    no_proxy: str = ""  # NO_PROXY

    @classmethod
    def from_env(cls, env: Dict[str, str]) -> Config:
        """Read and check the environment; ConfigError says what to fix."""
        api, token, token_file = _required(env)
        confirm = env.get("KVMFLEET_MCP_CONFIRM", "").strip()
        if confirm not in ("", "model", "human"):
            raise ConfigError("KVMFLEET_MCP_CONFIRM=%s: give human (a person must confirm every write) "
                              "or model (confirm: true is enough; the default)." % confirm[:40])
        ca_bundle = env.get("KVMFLEET_CA_BUNDLE") or None
        if ca_bundle is not None and not os.path.isfile(ca_bundle):
            raise ConfigError("KVMFLEET_CA_BUNDLE=%s is not a readable file." % ca_bundle)
        config = cls(
            api=api, token=token, token_file=token_file,
            allow_writes=_allow_writes(env.get("KVMFLEET_MCP_ALLOW_WRITES", "")),
            ca_bundle=ca_bundle,
            connect_timeout=_number(env, "KVMFLEET_CONNECT_TIMEOUT", 5.0, 600),
            read_timeout=_number(env, "KVMFLEET_READ_TIMEOUT", 30.0, 600),
            max_result_chars=int(_number(env, "KVMFLEET_MCP_MAX_RESULT_CHARS", 50_000, 10_000_000, 1000)),
            tools=_tool_allow_list(env.get("KVMFLEET_MCP_TOOLS", "")),
            org_id=_org_id(env.get("KVMFLEET_ORG_ID", "").strip()),
            human_only=confirm == "human",
            confirm_timeout=_number(env, "KVMFLEET_MCP_CONFIRM_TIMEOUT", 300.0, 3600),
            audit_log=env.get("KVMFLEET_MCP_AUDIT_LOG", "").strip() or None,
            max_writes_per_minute=_whole(env, "KVMFLEET_MCP_MAX_WRITES_PER_MINUTE", 10, 1000),
            count_max_items=_whole(env, "KVMFLEET_MCP_COUNT_MAX_ITEMS", 100_000, 10_000_000),
            https_proxy=env.get("HTTPS_PROXY") or env.get("https_proxy") or None,
            no_proxy=env.get("NO_PROXY") or env.get("no_proxy") or "",
        )
        if token_file:
            try:
                config.bearer()
            except ToolError as exc:
                raise ConfigError(str(exc)) from None
            # Security: say so when others on this host can read the token.
            _warn_if_shared("KVMFLEET_TOKEN_FILE", token_file)
        if config.audit_log:
            # Security: others on this host should not read who did what either.
            _warn_if_shared("KVMFLEET_MCP_AUDIT_LOG", config.audit_log)
        return config

    def bearer(self) -> str:
        """The token; a token file is read on every call, so rotating it needs no restart."""
        if not self.token_file:
            return self.token
        try:
            # Security: never a FIFO or a device planted in its place, which would hold the server.
            handle = os.open(self.token_file, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
            try:
                if not stat.S_ISREG(os.fstat(handle).st_mode):
                    raise OSError(errno.EINVAL, "not a regular file")
                token = os.read(handle, 4096).decode("utf-8").strip()
            finally:
                os.close(handle)
        except (OSError, UnicodeDecodeError) as exc:
            raise ToolError("Could not read KVMFLEET_TOKEN_FILE=%s (%s)." % (
                self.token_file, type(exc).__name__)) from None
        if not token:
            raise ToolError("KVMFLEET_TOKEN_FILE=%s is empty." % self.token_file)
        _check_token(token, "KVMFLEET_TOKEN_FILE=%s" % self.token_file, ToolError)
        return token


def _required(env: Dict[str, str]) -> Tuple[str, str, Optional[str]]:
    """KVMFLEET_API, KVMFLEET_TOKEN and KVMFLEET_TOKEN_FILE, checked."""
    api = env.get("KVMFLEET_API", "").strip().rstrip("/")
    token = env.get("KVMFLEET_TOKEN", "").strip()
    token_file = env.get("KVMFLEET_TOKEN_FILE", "").strip() or None
    if not api:
        raise ConfigError(
            "KVMFLEET_API is not set. Put your KVM Fleet URL, e.g. https://app.kvmfleet.io, "
            "in the env block of this server in your MCP client config.")
    if not token and not token_file:
        raise ConfigError(
            "KVMFLEET_TOKEN is not set. Create an API token (kvmf_...) in the KVM Fleet "
            "web console (it is shown once) and put it in the env block of this server "
            "in your MCP client config, or its path in KVMFLEET_TOKEN_FILE.")
    if token and token_file:
        raise ConfigError("Set KVMFLEET_TOKEN or KVMFLEET_TOKEN_FILE, not both.")
    _check_api_url(api, env.get("KVMFLEET_ALLOW_INSECURE_HTTP") == "true")
    if token:
        _check_token(token, "KVMFLEET_TOKEN", ConfigError)
    return api, token, token_file


def _check_token(token: str, where: str, error: Callable[[str], McpError]) -> None:
    """Keep the token secret from here on; refuse one with spaces or control characters inside."""
    _keep_secret(token)
    if not TOKEN_PATTERN.fullmatch(token):
        # Security: the message never quotes the token, not even in part.
        raise error("%s holds a space, a line break or a character no token has (tokens are one "
                    "line, kvmf_ and letters or digits). Give the token alone: no 'Bearer ', no "
                    "comment, no second line." % where)


def _allow_writes(value: str) -> bool:
    """Exactly "true" offers the write tools; any other value but none is warned about."""
    if value not in ("", "true"):
        log('warning: KVMFLEET_MCP_ALLOW_WRITES=%s is not exactly "true": the 10 write tools stay hidden. '
            "Set it to true, in lower case, to offer them; remove it for read-only use." % json.dumps(value[:40]))
    return value == "true"


def _warn_if_shared(name: str, path: str) -> None:
    try:
        shared = os.name == "posix" and os.stat(path).st_mode & 0o077
    except OSError:
        return  # not there (yet): the audit log is created 0600 on first use
    if shared:
        log("warning: %s=%s is readable by group or others; chmod 600 it." % (name, path))


def _tool_allow_list(raw: str) -> Optional[Tuple[str, ...]]:
    names = tuple(name.strip() for name in raw.split(",") if name.strip())
    unknown = [name for name in names if name not in TOOLS_BY_NAME]
    if unknown:
        raise ConfigError("KVMFLEET_MCP_TOOLS names unknown tools: %s. Known: %s." % (
            ", ".join(unknown), ", ".join(TOOLS_BY_NAME)))
    return names or None


def _org_id(raw: str) -> Optional[str]:
    # Security: the org id goes into a header; an id pattern keeps it one clean line.
    if raw and not re.search(ID_PATTERN, raw):
        raise ConfigError("KVMFLEET_ORG_ID=%r is not an org id (letters, digits, ._~:@-)." % raw[:80])
    return raw or None


def _number(env: Dict[str, str], name: str, default: float, most: float, least: float = 0) -> float:
    raw = env.get(name)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not least < value <= most:
        raise ConfigError("%s=%s: give a number above %g and at most %g." % (name, raw, least, most))
    return value


def _whole(env: Dict[str, str], name: str, default: int, most: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    if not re.fullmatch(r"[0-9]{1,9}", raw) or not 1 <= int(raw) <= most:
        raise ConfigError("%s=%s: give a whole number from 1 to %d." % (name, raw[:40], most))
    return int(raw)


def _check_api_url(api: str, allow_insecure_http: bool) -> None:
    parts = urlsplit(api)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ConfigError("KVMFLEET_API=%s: give an https:// URL such as https://app.kvmfleet.io." % api)
    # Security: credentials in the URL would end up in logs and error text.
    if parts.username or parts.password or parts.query or parts.fragment:
        raise ConfigError("KVMFLEET_API must be a plain base URL, without user, query or fragment.")
    # Security: the token travels in a header, so plain http would expose
    # it to the network; allowed only where the network is this machine,
    # or where the operator opts in knowingly (and is warned on every start).
    if parts.scheme == "http" and not _is_loopback(parts.hostname):
        if not allow_insecure_http:
            raise ConfigError(
                "KVMFLEET_API=%s uses plain http to a host that is not loopback; the token would "
                "cross the network unencrypted. Use https:// (or, knowingly, set "
                "KVMFLEET_ALLOW_INSECURE_HTTP=true)." % api)
        log("warning: KVMFLEET_ALLOW_INSECURE_HTTP=true: the token is sent unencrypted to %s." % api)


def _is_loopback(host: Optional[str]) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host or "").is_loopback
    except ValueError:
        return False


###############################################################################
# The platform client: the only code that touches the network ##################
###############################################################################


def _requests() -> Any:
    """The requests package, imported on the first call to the platform (~60 ms at start-up otherwise)."""
    # Security: urllib3 writes TLS session secrets to the file SSLKEYLOGFILE
    # names, which with a capture would expose the token.
    os.environ.pop("SSLKEYLOGFILE", None)
    import requests

    return requests


class Reply(NamedTuple):
    """What the platform answered to one call."""

    status: int
    reason: str
    body: bytes
    location: str  # the Location header of a redirect, else ""
    retries: int = 0  # how many times a read was tried again before this answer
    retry_after: str = ""  # the platform's Retry-After header, passed on
    request_id: str = ""  # the platform's X-Request-Id header, for the record of agent actions


class Passing(Exception):
    """A connection fault that a read may meet again or not: worth another try."""


class Deadline:
    """Security: one exchange with the platform ends at its deadline, however slowly it answers."""

    # requests bounds each read from the socket, not a whole answer: a
    # platform or proxy that sends a byte a second, even in its headers,
    # would hold the server for hours. A timer signal (SIGALRM) interrupts
    # that read in the main thread, which alone calls the platform (the stdin
    # reader thread blocks the signal). Without a timer (Windows, or off the
    # main thread) only the per-read timeout and the check in _read_bounded hold.

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.timer = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()

    def __enter__(self) -> None:
        if self.timer:
            self.armed = True
            signal.signal(signal.SIGALRM, self._expire)
            signal.setitimer(signal.ITIMER_REAL, self.seconds)

    def __exit__(self, *exc: Any) -> None:
        self.armed = False  # first: a signal handled from here on changes nothing
        if self.timer:
            signal.setitimer(signal.ITIMER_REAL, 0)

    def _expire(self, signum: int, frame: Any) -> None:
        if self.armed:
            raise Expired()


class Platform:
    """Calls the KVM Fleet REST API through one requests connection pool."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._pool: Any = None  # a requests HTTPAdapter, made at the first call
        self._headers: Dict[str, str] = {}
        self._proxies: Dict[str, str] = {}
        self._writes: Deque[float] = collections.deque()  # when the writes of the last minute were sent

    def _adapter(self) -> Any:
        if self._pool is None:
            requests = _requests()
            # Security: requests' HTTPAdapter, not a Session: it sends the
            # request we prepare and nothing else. A Session would also follow
            # redirects, keep cookies the platform (or a proxy) sets and send
            # them back, honour HTTP_PROXY and ALL_PROXY, and let ~/.netrc replace
            # Authorization and REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE swap the CA.
            self._proxies = _proxies(self.config, requests)
            # Security: identity only: urllib3 1.x inflates a whole read before
            # the size bound sees it, so a 2 KB answer could take gigabytes.
            self._headers = dict(requests.utils.default_headers(), **{
                "Accept": "application/json", "Accept-Encoding": "identity",
                "User-Agent": "%s/%s" % (SERVER_NAME, __version__)})
            if self.config.org_id:
                # Security: set here, from the environment only; no tool
                # argument reaches this header, so the model cannot switch orgs.
                self._headers["x-kvmfleet-org-id"] = self.config.org_id
            self._pool = requests.adapters.HTTPAdapter()
        return self._pool

    def write_wait(self) -> float:
        """Seconds until another write may be sent (0.0: now)."""
        now = time.monotonic()
        while self._writes and self._writes[0] <= now - WRITE_WINDOW:
            self._writes.popleft()
        if len(self._writes) < self.config.max_writes_per_minute:
            return 0.0
        return self._writes[0] + WRITE_WINDOW - now

    def call(self, method: str, path: str, query: Optional[List[Tuple[str, str]]] = None,
             body: Optional[JSON] = None, client: str = "", key: str = "",
             quick: Optional[float] = None) -> Reply:
        """Make one call, trying a read again on a passing fault; ToolError if unreachable.

        key: a write's Idempotency-Key (a write is tried once). quick: a single
        try bounded to that many seconds (the token-scope probe, previews).
        """
        request = self._prepare(method, path, query, body, client, key)
        timeout = (quick, quick) if quick else (self.config.connect_timeout, self.config.read_timeout)
        tries = 1 if key or quick else 1 + READ_RETRIES  # Security: a write is sent once
        if key:
            self._writes.append(time.monotonic())
        for attempt in range(tries):
            last = attempt == tries - 1
            try:
                response, content = self._exchange(request, method, path, timeout)
            except Passing as exc:
                if last:
                    raise _network_failure(self.config, method, path, exc.args[0]) from None
                time.sleep(RETRY_BACKOFF * (1 << attempt))
                continue
            wait = None if last else _retry_delay(response, attempt)  # a write's one try is its last
            if wait is None:
                return Reply(response.status_code, response.reason or "", content,
                             response.headers.get("Location", ""), attempt, response.headers.get("Retry-After", ""),
                             _header_safe(redact(response.headers.get("X-Request-Id", ""))))
            time.sleep(wait)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _prepare(self, method: str, path: str, query: Optional[List[Tuple[str, str]]], body: Optional[JSON],
                 client: str, key: str) -> Any:
        requests = _requests()
        self._adapter()  # sets self._headers
        headers = dict(self._headers, Authorization="Bearer " + self.config.bearer())
        headers["x-kvmfleet-mcp-client"] = client or client_tag(None)
        data = None
        if body is not None:
            data = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
            headers["Content-Type"] = "application/json"
        if key:
            # Security: a write is sent once, never retried; the key lets
            # the platform drop a duplicate and a person find the audit row.
            headers["Idempotency-Key"] = key
        request = requests.PreparedRequest()
        try:
            request.prepare(method=method, url=self.config.api + path, headers=headers, data=data, params=query)
        except (ValueError, requests.RequestException) as exc:
            # Security: only the kind of error: its text may quote a header, the token's included.
            raise ToolError("%s %s could not be made into a request (%s); nothing was sent." % (
                method, path, type(exc).__name__)) from None
        return request

    def _exchange(self, request: Any, method: str, path: str, timeout: Tuple[float, float]) -> Tuple[Any, bytes]:
        """One try: the response and its whole body; Passing for a fault worth another try."""
        requests = _requests()
        try:
            with Deadline(timeout[1] + DEADLINE_GRACE):
                try:
                    # Security: an adapter follows no redirect: a 3xx is reported,
                    # so the token goes to KVMFLEET_API and nowhere else; TLS is verified.
                    response = self._adapter().send(request, stream=True, timeout=timeout,
                                                    verify=self.config.ca_bundle or True, proxies=self._proxies)
                except requests.exceptions.SSLError as exc:
                    raise _network_failure(self.config, method, path, exc) from None
                except requests.ConnectionError as exc:  # refused, reset, connect timeout
                    raise Passing(exc) from None
                except requests.RequestException as exc:  # no answer in time, and the like
                    raise _network_failure(self.config, method, path, exc) from None
                encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
                if encoding not in ("", "identity"):
                    response.close()
                    raise ToolError("%s %s: KVM Fleet answered with Content-Encoding %s, which was not asked for; "
                                    "it was not read. %s" % (method, path, bounded(encoding, 40), _outcome(method)))
                try:
                    with response:
                        # urllib3 1.x takes an answer cut short of its Content-Length as whole.
                        response.raw.enforce_content_length = True
                        return response, _read_bounded(response, timeout[1], method)
                except requests.exceptions.ChunkedEncodingError as exc:  # dropped mid-answer
                    raise Passing(exc) from None
                except requests.ConnectionError:  # how requests reports a stall mid-answer
                    raise ToolError("%s %s: KVM Fleet at %s stopped sending its answer for %g s. %s" % (
                        method, path, self.config.api, timeout[1], _outcome(method))) from None
                except requests.RequestException as exc:  # an answer that cannot be decoded
                    raise _network_failure(self.config, method, path, exc) from None
        except Expired:
            raise ToolError("%s %s: KVM Fleet's answer did not arrive in full within %g s. %s" % (
                method, path, timeout[1], _outcome(method))) from None


def _proxies(config: Config, requests: Any) -> Dict[str, str]:
    """Security: HTTPS_PROXY, unless NO_PROXY names the platform; for https:// only."""
    # HTTP_PROXY and ALL_PROXY are not honoured: through a plain-http proxy
    # the token would cross the network in clear. Keyed "https", the proxy is
    # never used for a plain-http platform.
    if not config.https_proxy or requests.utils.should_bypass_proxies(config.api, no_proxy=config.no_proxy):
        return {}
    return {"https": config.https_proxy}


def _retry_delay(response: Any, attempt: int) -> Optional[float]:
    """Seconds to wait before trying a read again, or None to answer now."""
    if response.status_code not in RETRY_STATUSES:
        return None
    retry_after = response.headers.get("Retry-After", "")
    if not retry_after:
        return RETRY_BACKOFF * (1 << attempt)
    try:
        wait = float(retry_after)
    except ValueError:  # an HTTP date: the answer is passed on, as for a long wait
        return None
    # A platform that asks for a longer wait gets its answer passed on instead.
    return max(wait, 0.0) if wait <= RETRY_AFTER_CAP else None


def _read_bounded(response: Any, seconds: float, method: str) -> bytes:
    deadline = time.monotonic() + seconds
    chunks = []
    size = 0
    for chunk in response.iter_content(READ_CHUNK):
        size += len(chunk)
        # Security: a huge or endless answer is not read to the end.
        if size > MAX_BODY_BYTES:
            raise ToolError("KVM Fleet answered HTTP %d with more than %d MiB; it was not read to the end. %s" % (
                response.status_code, MAX_BODY_BYTES // (1024 * 1024),
                "Ask for fewer items with limit." if method == "GET" else _outcome(method)))
        # Where Deadline has no timer, the whole-answer deadline is checked
        # as each chunk arrives.
        if time.monotonic() > deadline:
            raise Expired()
        chunks.append(chunk)
    return b"".join(chunks)


def _outcome(method: str) -> str:
    if method == "GET":
        return "A read changes nothing; it is safe to retry."
    return "It is not known whether KVM Fleet acted on it: check with a read tool before retrying."


def _network_failure(config: Config, method: str, path: str, exc: Exception) -> ToolError:
    requests = _requests()
    outcome = _outcome(method)
    kind = "could not connect to"
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        kind = "timed out after %g s connecting to" % config.connect_timeout
        outcome = "The request was not sent."
    elif isinstance(exc, requests.exceptions.ReadTimeout):
        kind = "got no answer within %g s from" % config.read_timeout
    elif isinstance(exc, requests.exceptions.SSLError):
        kind = "could not verify TLS (set KVMFLEET_CA_BUNDLE for a private CA) of"
        outcome = "The request was not sent."
    elif isinstance(exc, requests.exceptions.ChunkedEncodingError):
        kind = "lost the connection mid-answer from"
    elif exc.args and type(exc.args[0]).__name__ == "ProtocolError":  # urllib3's: sent, then cut
        kind = "lost the connection before an answer from"
    elif not isinstance(exc, requests.exceptions.ConnectionError):
        kind = "failed talking to"
    error = ToolError("%s %s %s KVM Fleet at %s (%s: %s). %s" % (
        method, path, kind, config.api, type(exc).__name__, bounded(str(exc), 300), outcome))
    error.cause = exc
    return error


def reply_result(method: str, path: str, reply: Reply, config: Config, fields: Optional[List[str]] = None) -> JSON:
    """Turn the platform's answer into a tools/call result, errors verbatim."""
    text = reply.body.decode("utf-8", "replace")
    where = "%s %s" % (method, path)
    limit = config.max_result_chars
    if 300 <= reply.status < 400:
        try:
            target = urlsplit(reply.location).netloc or reply.location or "(no Location header)"
        except ValueError:  # not even a URL
            target = reply.location
        return text_result(
            "KVM Fleet answered %s with HTTP %d %s, a redirect to %s. It was not followed: "
            "the token is only ever sent to %s. Check KVMFLEET_API.%s"
            % (where, reply.status, reply.reason, bounded(target, 200), config.api,
               "" if method == "GET" else " " + _outcome(method)), limit, True)
    if reply.status >= 400 or reply.status < 200:
        tries = " (tried %d times)" % (reply.retries + 1) if reply.retries else ""
        wait = " (Retry-After: %s, how long it asks you to wait before trying again)" % bounded(
            reply.retry_after, 40) if reply.retry_after else ""
        return text_result("KVM Fleet refused %s: HTTP %d %s%s%s\n%s" % (
            where, reply.status, reply.reason, tries, wait, bounded(text, MAX_ERROR_TEXT)), limit, True)
    if not reply.body.strip():
        return text_result('{"status":%d,"body":null}' % reply.status, limit)
    try:
        data = STRICT_JSON.decode(text)
    except (ValueError, RecursionError):
        return text_result("KVM Fleet answered %s with HTTP %d, but the body is not JSON:\n%s" % (
            where, reply.status, bounded(text, MAX_ERROR_TEXT)), limit, True)
    if fields:
        return text_result(fit(project(data, fields), limit), limit)
    if len(text) <= limit and visible(text) == text:
        # JSON with nothing hidden in it, as a platform normally sends: passed
        # on as it came, nothing to re-serialise.
        return text_result(text, limit)
    return text_result(fit(data, limit), limit)

###############################################################################
# Tool calls ##################################################################
###############################################################################

_VALIDATORS: Dict[str, Any] = {}  # tool name -> its jsonschema validator, built on first use


def _jsonschema() -> Any:
    """The jsonschema package, imported on the first tool call (~50 ms at start-up otherwise)."""
    import jsonschema

    return jsonschema


def _validator(tool: Tool) -> Any:
    """The jsonschema validator of a tool's arguments, built on first use."""
    if tool.name not in _VALIDATORS:
        jsonschema = _jsonschema()
        # 2020-12 where the installed jsonschema has it (4.x); distro 3.2 has
        # only draft 7, and our schemas mean the same under both.
        dialect = getattr(jsonschema, "Draft202012Validator", None) or jsonschema.Draft7Validator
        _VALIDATORS[tool.name] = dialect(input_schema(tool))
    return _VALIDATORS[tool.name]


def check_arguments(tool: Tool, args: JSON) -> None:
    """Raise ToolError, with the first problem in jsonschema's words, unless args fit the schema."""
    error = _jsonschema().exceptions.best_match(_validator(tool).iter_errors(args))
    if error is None:
        return
    where = "/".join(str(part) for part in error.absolute_path)
    message = error.message
    if error.validator == "pattern":  # the regex itself would only confuse
        message = "%s is not in the accepted form" % bounded(repr(error.instance), 100)
    prop = tool.properties.get(str(error.absolute_path[0])) if error.absolute_path else None
    raise ToolError("Invalid arguments for %s%s: %s.%s See the tool's inputSchema." % (
        tool.name, " at " + where if where else "", bounded(message, 300),
        " %s: %s" % (where, prop["description"]) if prop else ""))


# approve(tool, args, confirmed, entry): None when a write may go ahead,
# else the result that asks a person (it raises ToolError to refuse).
Approve = Callable[[Tool, JSON, bool, JSON], Optional[JSON]]


def call_tool(tool: Tool, args: JSON, platform: Platform, client: str, approve: Approve, entry: JSON) -> JSON:
    """Validate, gate and make the REST call behind a tool; entry collects the record of it."""
    args = _checked(tool, args)
    confirmed = args.pop("confirm", False) is True  # Security: never sent on
    fields, count_by = args.pop("fields", None), args.pop("count_by", None)
    if count_by is not None and "cursor" in args:
        raise ToolError("Invalid arguments for %s: count_by reads every page itself; give no cursor." % tool.name)
    if platform.config.audit_log:
        # The record names what was targeted, never free text (a reason, a search).
        entry["targets"] = {name: value for name, value in args.items() if not free_text(tool, name)}
    if tool.write:
        _within_write_rate(platform, entry)
        if platform.config.human_only or needs_confirm(tool, args):
            # Security: nothing is written until the call is confirmed as this
            # server's settings and the client's abilities demand.
            question = approve(tool, args, confirmed, entry)
            if question is not None:
                return question
    for name, make in tool.defaults:
        args.setdefault(name, make())
    window = resolve_durations(args, time.time())
    path = build_path(tool.path, args)
    query = list(tool.fixed_query) + [(name, query_value(args[name])) for name in tool.properties
                                      if name in args and tool.method == "GET"]
    if count_by is not None:
        result = count_items(platform, client, path, [(k, v) for k, v in query if k != "limit"], count_by)
    else:
        result = _send(tool, platform, client, path, query or None, None if tool.method == "GET" else args,
                       fields, entry)
    if window and not result.get("isError"):
        result["content"].insert(1, {"type": "text", "text": window})
    return result


def _checked(tool: Tool, args: JSON) -> JSON:
    """The arguments, checked against the tool's schema and as UTF-8; 5.0 given as an integer becomes 5."""
    check_arguments(tool, args)
    try:
        json.dumps(args, ensure_ascii=False).encode()
    except UnicodeEncodeError:  # JSON text may hold "\ud800"; UTF-8 cannot
        raise ToolError("Invalid arguments for %s: a string holds a lone surrogate, which is not "
                        "valid Unicode." % tool.name) from None
    return {name: int(value) if type(value) is float else value for name, value in args.items()}


def _within_write_rate(platform: Platform, entry: JSON) -> None:
    """Security: refuse a write beyond KVMFLEET_MCP_MAX_WRITES_PER_MINUTE, before anything is read or sent."""
    # The platform's rate limits are sized for people; a looping or steered
    # agent is not a person (MCP, server/tools: servers MUST rate limit).
    wait = platform.write_wait()
    if wait:
        entry["refused"] = "write rate"
        raise ToolError("Not done: this server sends at most %d writes in any 60 s "
                        "(KVMFLEET_MCP_MAX_WRITES_PER_MINUTE), and that many were sent. The next write is "
                        "allowed in %d s. Nothing was sent." % (platform.config.max_writes_per_minute,
                                                                  math.ceil(wait)))


def _send(tool: Tool, platform: Platform, client: str, path: str, query: Optional[List[Tuple[str, str]]],
          body: Optional[JSON], fields: Optional[List[str]], entry: JSON) -> JSON:
    """The one REST call of a tool and its result; a write's result names its request id."""
    key = os.urandom(16).hex() if tool.write else ""
    entry["request_id"] = key or None
    said = ("Request id: %s (sent as its Idempotency-Key; quote it to find this call in KVM Fleet's "
            "audit log)." % key) if key else ""
    try:
        reply = platform.call(tool.method, path, query, body, client, key)
        entry.update(status=reply.status, platform_request_id=reply.request_id or None)
        result = reply_result(tool.method, path, reply, platform.config, fields)
    except ToolError as exc:
        raise ToolError("%s\n%s" % (exc, said) if said else str(exc)) from None
    except Exception:  # noqa: BLE001 - whatever it is, the model must learn the outcome is unknown
        # Security: a sent write never ends as a bare "Internal error", without its request id.
        log("internal error handling %s %s:\n%s" % (tool.method, path, traceback.format_exc()))
        raise ToolError("%s %s: KVM Fleet's answer could not be handled (details on the server's stderr). "
                        "%s\n%s" % (tool.method, path, _outcome(tool.method), said)) from None
    if said:
        result["content"].append({"type": "text", "text": said})
    return result


def count_items(platform: Platform, client: str, path: str, query: List[Tuple[str, str]], field: str) -> JSON:
    """count_by: every matching item read page by page and counted by one field, within bounds."""
    config = platform.config
    counts: collections.Counter[str] = collections.Counter()
    total = pages = 0
    cursor: Any = None
    deadline = time.monotonic() + config.read_timeout
    while True:
        size = min(COUNT_PAGE, config.count_max_items - total)
        page_query = query + [("limit", str(size))] + ([("cursor", str(cursor))] if cursor else [])
        reply = platform.call("GET", path, page_query, None, client)
        page = (_json_object(reply.body) if 200 <= reply.status < 300 else None) or {}
        items = page.get("items")
        if not isinstance(items, list):
            result = reply_result("GET", path, reply, config)
            result["isError"] = True
            result["content"].append({"type": "text", "text": "Counting stopped at page %d: %d pages (%d items) "
                                      "were read before it." % (pages + 1, pages, total)})
            return result
        pages += 1
        items = items[:size]  # a platform that sends more than asked does not stretch the bound
        total += len(items)
        counts.update(value if isinstance(value, str) else compact(value)
                      for value in (item.get(field) if isinstance(item, dict) else None for item in items))
        cursor = page.get("next_cursor")
        if not cursor:
            stop = ""
        elif total >= config.count_max_items:
            stop = "KVMFLEET_MCP_COUNT_MAX_ITEMS=%d" % config.count_max_items
        elif time.monotonic() > deadline:
            stop = "the read timeout of %g s" % config.read_timeout
        else:
            continue
        return text_result(compact(_counted(field, counts, total, pages, stop)), config.max_result_chars)


def _counted(field: str, counts: collections.Counter[str], total: int, pages: int, stop: str) -> JSON:
    """The answer of a count: complete, or where it stopped and how to narrow it."""
    ranked = sorted(counts.items(), key=lambda pair: (-pair[1], pair[0]))
    result: JSON = {"total" if not stop else "counted": total, "count_by": field,
                    "counts": dict(ranked[:COUNT_MAX_VALUES]), "complete": not stop, "pages_read": pages}
    if len(ranked) > COUNT_MAX_VALUES:
        result["values_not_shown"] = len(ranked) - COUNT_MAX_VALUES
    if stop:
        result["stopped_by"] = stop
        result["to_count_all"] = "narrow the filters (e.g. status, since, device_id) and count again"
    return result


def impact(tool: Tool, args: JSON, platform: Platform, client: str) -> str:
    """What a write would touch, from reads made now; a failed read is said, not skipped."""
    lines = []
    if "device_id" in args:
        device_id = args["device_id"]
        device = _read(platform, client, "device %s" % device_id, "/v1/devices/" + quote(device_id, safe=""))
        if isinstance(device, dict):
            device = "device %s (%s): status %s, power %s" % (
                _shown(device.get("name")), device_id, _shown(device.get("status")), _shown(device.get("power_state")))
        lines.append(device)
        where = [("device_id", device_id)]
        lines.append(_listed(platform, client, "console sessions open on it", "/v1/console-sessions",
                             where + [("open_only", "true")], None, _session_line))
        lines.append(_listed(platform, client, "active access grants on it", "/v1/access-grants",
                             where + [("status", "active")], None, _grant_line))
    if "grant_id" in args:
        status = "active" if tool.destructive else "pending"  # revoked, or approved or denied
        lines.append(_listed(platform, client, "access grant", "/v1/access-grants",
                             [("status", status)], args["grant_id"], _grant_line, status + " grants"))
    if "session_id" in args:
        lines.append(_listed(platform, client, "console session", "/v1/console-sessions",
                             [("open_only", "true")], args["session_id"], _session_line, "open sessions"))
    if not lines:
        return ""
    return "What it would touch, read from KVM Fleet just now:\n" + "\n".join("- " + line for line in lines)


def _read(platform: Platform, client: str, what: str, path: str,
          query: Optional[List[Tuple[str, str]]] = None) -> Union[JSON, str]:
    """One preview read: the answer's JSON object, or a sentence saying why there is none."""
    try:
        reply = platform.call("GET", path, query, None, client, quick=PREVIEW_TIMEOUT)
    except ToolError as exc:
        return "could not read %s: %s" % (what, bounded(str(exc), 300))
    data = _json_object(reply.body) if 200 <= reply.status < 300 else None
    if data is None:
        return "could not read %s: HTTP %d %s %s" % (  # the body quoted: it may hold line breaks
            what, reply.status, reply.reason, json.dumps(bounded(reply.body.decode("utf-8", "replace"), 300),
                                                         ensure_ascii=False))
    return data


def free_text(tool: Tool, name: str) -> bool:
    """Whether an argument is free text (a reason, a search), not an id, a time or a choice."""
    return "pattern" not in tool.properties[name] and "enum" not in tool.properties[name]


def _listed(platform: Platform, client: str, what: str, path: str, query: List[Tuple[str, str]],
            wanted: Optional[str], describe: Callable[[JSON], str], among: str = "") -> str:
    """A line on the items of one list read: all of them (up to PREVIEW_ITEMS), or the one wanted."""
    page = _read(platform, client, what, path, query + [("limit", str(PREVIEW_PAGE if wanted else PREVIEW_ITEMS))])
    if isinstance(page, str):
        return page
    items = page.get("items")
    items = [item for item in items if isinstance(item, dict)] if isinstance(items, list) else []
    if wanted is not None:
        found = [item for item in items if item.get("id") == wanted]
        if not found:
            return "%s %s is not among the first %d %s KVM Fleet listed" % (what, wanted, PREVIEW_PAGE, among)
        return "%s %s: %s" % (what, wanted, describe(found[0]))
    more = " (and more)" if page.get("next_cursor") or len(items) > PREVIEW_ITEMS else ""
    return "%s: %s%s" % (what, "; ".join(describe(item) for item in items[:PREVIEW_ITEMS]) or "none", more)


def _session_line(session: JSON) -> str:
    return "%s on device %s since %s%s" % (_shown(session.get("user")), _shown(session.get("device_id")),
                                           _shown(session.get("started_at")), _age(session.get("started_at")))


def _grant_line(grant: JSON) -> str:
    return "%s's access to device %s until %s (%s)" % (
        _shown(grant.get("requester")), _shown(grant.get("device_id")), _shown(grant.get("expires_at")),
        _shown(grant.get("id")))


def _shown(value: Any) -> str:
    """Platform data in a sentence: bounded, quoted when it is text (it may hold anything)."""
    if isinstance(value, str):
        return json.dumps(bounded(value, 80), ensure_ascii=False)
    return "unknown" if value is None else bounded(str(value), 80)


def _age(stamp: Any) -> str:
    """', open for 9 h 3 min' from an RFC 3339 UTC time, or '' when it cannot be read."""
    try:
        started = datetime.datetime.strptime(str(stamp)[:19], "%Y-%m-%dT%H:%M:%S")
    except ValueError:
        return ""
    seconds = time.time() - started.replace(tzinfo=datetime.timezone.utc).timestamp()
    return ", open for %d h %d min" % (seconds // 3600, seconds % 3600 // 60) if seconds >= 0 else ""


def record_line(client: Any, entry: JSON, outcome: str, started: float) -> JSON:
    """One line of the record: when, which client, what the call targeted and how it ended."""
    name, version = (client.get("name"), client.get("version")) if isinstance(client, dict) else ("", "")
    return dict({"time": _utc(time.time()), "client": {"name": _header_safe(name), "version": _header_safe(version)}},
                **entry, outcome=outcome, duration_ms=round((time.monotonic() - started) * 1000, 1))


def write_record(path: str, entry: JSON) -> None:
    """Append one line to the record of agent actions; a failure is logged and the call goes on."""
    line = redact(compact(entry)).encode("utf-8", "backslashreplace")  # Security: whatever the platform echoed
    try:
        # Security: created 0600 and only ever appended to; never opened
        # through a symlink (O_NOFOLLOW), nor blocked on a planted FIFO
        # (O_NONBLOCK), and written only into a private regular file of ours.
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
        handle = os.open(path, flags, 0o600)
        try:
            refused = _not_ours(os.fstat(handle))
            if not refused:
                os.write(handle, line + b"\n")
        finally:
            os.close(handle)
    except OSError as exc:
        refused = "it is a symbolic link" if exc.errno == errno.ELOOP else exc.strerror or str(exc)
    if refused:
        log("could not append to KVMFLEET_MCP_AUDIT_LOG=%s (%s); the call went on" % (path, refused))


def _not_ours(info: os.stat_result) -> str:
    """Why a record file must not be written ('' when it is a regular file of ours, mode 0600)."""
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        return "it is not a regular file with one name (a link can lead anywhere)"
    if os.name == "posix" and info.st_uid != os.geteuid():
        return "it belongs to uid %d, not to this server's user" % info.st_uid
    if os.name == "posix" and stat.S_IMODE(info.st_mode) != 0o600:
        return "its mode is %o, not 600: chmod 600 it" % stat.S_IMODE(info.st_mode)
    return ""


def token_scope(platform: Platform, client: str) -> Tuple[Optional[JSON], str]:
    """Ask GET /v1/tokens/current, bounded to a short wait: its answer (or None) and what it said."""
    try:
        reply = platform.call("GET", "/v1/tokens/current", None, None, client, quick=SCOPE_TIMEOUT)
    except ToolError as exc:
        return None, "no answer from GET /v1/tokens/current (%s)" % bounded(str(exc), 200)
    data = _json_object(reply.body) if reply.status == 200 else None
    if data is None:
        return None, "GET /v1/tokens/current answered HTTP %d without a token description" % reply.status
    # json.dumps escapes a line break or a lone surrogate that would forge or break the output.
    return data, "role %s, scope %s" % tuple(json.dumps(bounded(str(data.get(key)), 40))[1:-1]
                                             for key in ("role", "scope"))

###############################################################################
# Asking a person #############################################################
###############################################################################


class Call(NamedTuple):
    """What asking a person about one tools/call needs to know of it."""

    params: JSON  # the tools/call params, with a 2026 retry's answers
    modern: Optional[str]  # the call's 2026 protocol version, or None for the handshake era
    legacy_version: Optional[str]  # the version the handshake negotiated
    capabilities: Any  # the client's
    call_id: Any  # the JSON-RPC id of the tools/call
    client: str  # the client tag, named in the question


def asks_forms(capabilities: Any) -> bool:
    """Whether client capabilities offer form elicitation ({} counts as form, as the spec says)."""
    ask = capabilities.get("elicitation") if isinstance(capabilities, dict) else None
    return isinstance(ask, dict) and (not ask or isinstance(ask.get("form"), dict))


def verdict(answer: Any) -> Tuple[str, str]:
    """What a person's elicitation answer means: ("", "accept") only for accept with the box ticked."""
    action = answer.get("action") if isinstance(answer, dict) else None
    content = answer.get("content") if isinstance(answer, dict) else None
    if action == "accept" and isinstance(content, dict) and content.get(ASK_FIELD) is True:
        return "", "accept"
    if action == "accept":
        return "accepted without ticking the box", "accept unticked"
    if action in ("decline", "cancel"):
        return ("declined" if action == "decline" else "dismissed the question"), str(action)
    return "gave an answer this server does not understand", "malformed"


def _not_approved(what: str, why: str) -> ToolError:
    return ToolError("Not done: %s, and the user %s. No write was sent to KVM Fleet. Do not try again "
                     "unless the user asks you to." % (what, why))


class Asker:
    """Puts a write to the client's user: elicitation mid-call (handshake era) or input_required (2026)."""

    def __init__(self, config: Config, platform: Platform, answer: Callable[[bytes], Optional[bytes]]) -> None:
        self.config = config
        self.platform = platform
        self.answer = answer  # how the server answers a ping that comes while a person is asked
        self.channel: Optional[Channel] = None  # set by serve(): how a person is asked mid-call
        # Security: requestState is signed with this secret of the process
        # (and the token), so a client cannot forge or alter a person's "yes";
        # each "yes" is spent once (nonce -> expiry).
        self._key = os.urandom(32)
        self._spent: Dict[str, float] = {}

    def approve(self, tool: Tool, args: JSON, confirmed: bool, entry: JSON, call: Call) -> Optional[JSON]:
        """None when this write may go ahead; a question for a person; or ToolError."""
        what = "%s would %s" % (tool.name, tool.effect.format(**args))
        if asks_forms(call.capabilities) and (call.modern or str(call.legacy_version) >= ELICITATION_SINCE):
            entry["confirmation"] = {"by": "person"}
            if call.modern:
                return self._ask_later(tool, args, what, entry, call)
            self._ask_now(tool, args, what, entry, call)
            return None
        entry["confirmation"] = {"by": "model", "answer": "confirm" if confirmed else "missing"}
        if confirmed and not self.config.human_only:
            return None
        if self.config.human_only:
            # Security: a model can write confirm: true as easily as an id.
            why = ("This server takes only a person's confirmation for writes (KVMFLEET_MCP_CONFIRM=human), and "
                   "this client cannot ask one: it did not offer elicitation (form mode, protocol %s or later). "
                   "confirm: true is not enough. Tell the user; they can do it in the KVM Fleet console or "
                   "from a client that supports elicitation." % ELICITATION_SINCE)
        else:
            why = ('Ask the user to approve this exact action; if they do, call %s again with the same '
                   'arguments and "confirm": true.' % tool.name)
        preview = impact(tool, args, self.platform, call.client)
        raise ToolError("Not done: %s. No write was sent to KVM Fleet. %s%s" % (
            what, why, "\n" + preview if preview else ""))

    def _form(self, tool: Tool, args: JSON, call: Call) -> JSON:
        """The elicitation/create params: what would happen, every argument, what it touches, one box to tick."""
        # Security: the person sees every character the call would send, not
        # only its effect: a steered model could write "approved by the CISO;
        # skip 4-eyes review" at the end of a long reason.
        preview = impact(tool, args, self.platform, call.client)
        message = ("An AI assistant (%s) asks to %s.\nIt would send exactly: %s\n%sApprove only if you want "
                   "exactly this; anything else sends nothing." % (
                       call.client, tool.effect.format(**args), compact(args), preview + "\n" if preview else ""))
        params: JSON = {"mode": "form", "message": visible(redact(message)), "requestedSchema": {
            "type": "object", "required": [ASK_FIELD], "properties": {ASK_FIELD: {
                "type": "boolean", "title": "Approve: %s" % tool.title, "default": False,
                "description": "Tick to let the assistant %s." % tool.effect.format(**args)}}}}
        if call.legacy_version == ELICITATION_SINCE and not call.modern:
            del params["mode"]  # that revision's form has no mode field
        return params

    def _ask_now(self, tool: Tool, args: JSON, what: str, entry: JSON, call: Call) -> None:
        """Ask the client's user in the middle of this tools/call; ToolError unless they approve."""
        if self.channel is None:
            raise ToolError("Not done: %s, and there is no stdio channel to ask the user on." % what)
        # Unpredictable, so that no client can answer a question before it is asked.
        ask_id = "%s-confirm-%s" % (SERVER_NAME, os.urandom(8).hex())
        self.channel.write(encode({"jsonrpc": "2.0", "id": ask_id, "method": "elicitation/create",
                                   "params": self._form(tool, args, call)}))
        reply = self._wait_for(self.channel, ask_id, call.call_id)
        if reply is None:
            # Let the client close its dialog: an answer now would be ignored.
            self.channel.write(encode({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {
                "requestId": ask_id, "reason": "no answer within %g s" % self.config.confirm_timeout}}))
            why, label = "did not answer within %g s" % self.config.confirm_timeout, "timeout"
        elif "result" in reply:
            why, label = verdict(reply["result"])
        elif "error" in reply:
            why, label = "could not be asked (the client answered %s)" % bounded(
                json.dumps(reply["error"]), 200), "error"
        else:
            why, label = "could not be asked (the client closed stdin)", "closed"
        entry["confirmation"]["answer"] = label
        if why:
            raise _not_approved(what, why)

    def _wait_for(self, channel: Channel, ask_id: str, call_id: Any) -> Optional[JSON]:
        """The client's response to our request ask_id, serving pings meanwhile; {} at EOF, None on timeout."""
        deadline = time.monotonic() + self.config.confirm_timeout
        while True:
            left = deadline - time.monotonic()
            line = channel.read(left) if left > 0 else None  # Security: a busy stdin does not stretch it
            if line is None:
                return None
            if not line:
                return {}
            try:
                message = parse_line(line)
            except (ValueError, RecursionError):
                message = None
            method = message.get("method") if isinstance(message, dict) else None
            params = message.get("params") if isinstance(message, dict) else None
            request_id = request_id_of(message)
            if isinstance(message, dict) and method is None and message.get("id") == ask_id:
                return message
            if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
                channel.write(too_long())
            elif method == "ping" and request_id is not None:
                channel.write(self.answer(line) or b"")
            elif method == "notifications/cancelled" and isinstance(params, dict):
                if same_id(params.get("requestId"), call_id):
                    channel.write(encode({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {
                        "requestId": ask_id, "reason": "the call was cancelled"}}))
                    raise Abandoned()
                # Security: a request cancelled while it waited is dropped, never run later.
                channel.drop_waiting(params.get("requestId"))
            elif not channel.put_aside(line, request_id) and request_id is not None:
                channel.write(encode(error_response(request_id, INVALID_REQUEST, (
                    "Busy: the user is being asked to confirm another call; send this again after it"))))

    def _ask_later(self, tool: Tool, args: JSON, what: str, entry: JSON, call: Call) -> Optional[JSON]:
        """2026-07-28: ask with an input_required result; go ahead on the retry that carries a yes."""
        answers = call.params.get("inputResponses")
        answer = answers.get(ASK_KEY) if isinstance(answers, dict) else None
        if answer is None:
            entry["confirmation"]["answer"] = "asked"
            return {"resultType": "input_required", "requestState": self._seal(tool, args),
                    "inputRequests": {ASK_KEY: {"method": "elicitation/create",
                                                "params": self._form(tool, args, call)}}}
        now = time.time()  # Security: one reading, so that no yes is both unexpired and forgotten
        nonce, until = self._unseal(call.params.get("requestState"), tool, args, what, now)
        why, label = verdict(answer)
        entry["confirmation"]["answer"] = label
        if why:
            raise _not_approved(what, why)
        # Security: one person's yes makes one call; a replayed retry is refused.
        if nonce in self._spent:
            raise ToolError("Not done: %s. This approval was already used once; ask again." % what)
        self._spent = {spent: end for spent, end in self._spent.items() if end >= now}
        self._spent[nonce] = until
        return None

    def _seal(self, tool: Tool, args: JSON) -> str:
        """requestState: which call a question is for and until when, signed."""
        payload = json.dumps({"tool": tool.name, "args": _digest(args), "nonce": os.urandom(12).hex(),
                              "until": time.time() + self.config.confirm_timeout}, separators=(",", ":"))
        return base64.urlsafe_b64encode(payload.encode()).decode() + "." + self._mac(payload)

    def _mac(self, payload: str) -> str:
        # Security: keyed with this process's secret and bound to its token,
        # so state from another process or principal fails verification.
        return hmac.new(self._key, (payload + "\n" + self.config.bearer()).encode(), "sha256").hexdigest()

    def _unseal(self, state: Any, tool: Tool, args: JSON, what: str, now: float) -> Tuple[str, float]:
        """The nonce and expiry of a requestState we signed for exactly this call; else ToolError."""
        # Security: requestState comes back through the client, so it is
        # attacker-controlled: verified before a byte of it is believed.
        try:
            encoded, mac = str(state).split(".")
            payload = base64.urlsafe_b64decode(encoded.encode("ascii")).decode()
            signed = hmac.compare_digest(mac.encode("ascii"), self._mac(payload).encode())
            fields = json.loads(payload) if signed else None
        except ValueError:  # includes bad base64, non-ASCII and undecodable bytes
            fields = None
        if not isinstance(fields, dict) or fields["tool"] != tool.name or fields["args"] != _digest(args):
            raise ToolError("Not done: %s. The answer came with a requestState that this server did not "
                            "issue for this tool and these arguments. No write was sent." % what)
        if fields["until"] < now:
            raise ToolError("Not done: %s. The user's answer came after %g s; ask again." % (
                what, self.config.confirm_timeout))
        return str(fields["nonce"]), float(fields["until"])

###############################################################################
# JSON-RPC dispatch ###########################################################
###############################################################################


class Server:
    """The MCP protocol state machine: message in, message out."""

    def __init__(self, config: Config, platform: Optional[Platform] = None) -> None:
        self.config = config
        self.platform = platform or Platform(config)
        self.asker = Asker(config, self.platform, self.handle_line)
        self.legacy_version: Optional[str] = None  # set by initialize
        self.client_info: Optional[JSON] = None
        self._tag = client_tag(None)  # x-kvmfleet-mcp-client for the initialized session
        self.client_capabilities: JSON = {}
        self._request_id: Any = None  # of the request being handled
        self._tools: Optional[Dict[str, Tool]] = None  # decided once: see offered()
        self._listing: Optional[List[JSON]] = None
        self._methods: Dict[str, Callable[[JSON, Optional[str]], JSON]] = {
            "initialize": self._initialize,
            "ping": self._ping,
            "server/discover": self._discover,
            "tools/list": self._tools_list,
            "tools/call": self._tools_call,
            "prompts/list": self._prompts_list,
            "prompts/get": self._prompts_get,
        }

    def offered(self) -> Dict[str, Tool]:
        """The tools of this process, by name: decided before the first list or call, then fixed."""
        if self._tools is None:
            writes = self.config.allow_writes
            if writes:
                # Security: a read-only token hides the write tools, whatever the
                # environment says. Asked once, here, bounded; never in initialize.
                info, said = token_scope(self.platform, self._tag)
                if info is None:
                    log("token scope unknown (%s); write tools follow KVMFLEET_MCP_ALLOW_WRITES" % said)
                elif info.get("scope") == "read":
                    writes = False
                    log("the token is read-only (%s): write tools stay hidden for this process" % said)
            self._tools = {tool.name: tool for tool in advertised_tools(writes, self.config.tools)}
        return self._tools

    def prompts(self) -> Dict[str, Prompt]:
        """The prompts whose every tool this process offers."""
        return {prompt.name: prompt for prompt in PROMPTS
                if all(tool in self.offered() for tool, _ in prompt.steps)}

    # -- framing ----------------------------------------------------------

    def handle_line(self, line: bytes) -> Optional[bytes]:
        """One stdin line in, one stdout line (or nothing) out."""
        try:
            message = parse_line(line)
        except RecursionError:
            return encode(error_response(None, PARSE_ERROR, "Parse error: nested too deeply"))
        except ValueError as exc:  # includes invalid UTF-8
            return encode(error_response(None, PARSE_ERROR, "Parse error: %s" % bounded(str(exc), 200)))
        if isinstance(message, list):
            if self.legacy_version != BATCH_VERSION:
                return encode(error_response(None, INVALID_REQUEST,
                                             "Batches are only allowed under protocol %s" % BATCH_VERSION))
            if not message:
                return encode(error_response(None, INVALID_REQUEST, "Empty batch"))
            replies = [reply for reply in map(self.handle, message) if reply is not None]
            return encode(replies) if replies else None
        reply = self.handle(message)
        return None if reply is None else encode(reply)

    def handle(self, message: Any) -> Optional[JSON]:
        """One decoded message in; its response, or None for a notification."""
        if not isinstance(message, dict):
            return error_response(None, INVALID_REQUEST, "A message must be a JSON object")
        if "id" not in message or "method" not in message and ("result" in message or "error" in message):
            return None  # a notification (initialized, cancelled, ...), or a response: we sent no request
        request_id = message["id"]
        if request_id_of(message) is None:  # ids are strings or integers; bool is an int in Python, not in JSON
            return error_response(None, INVALID_REQUEST, "id must be a string or an integer")
        method = message.get("method")
        if message.get("jsonrpc") != "2.0" or not isinstance(method, str):
            return error_response(request_id, INVALID_REQUEST,
                                  'Invalid request: need "jsonrpc": "2.0" and a string "method"')
        params = message.get("params", {})
        if not isinstance(params, dict):
            return error_response(request_id, INVALID_PARAMS, "params must be an object")
        try:
            modern = self._era(method, params)
            handler = self._methods.get(method)
            if handler is None or modern and method in LEGACY_ONLY_METHODS:
                raise ProtocolError(METHOD_NOT_FOUND, "Method not found: %s" % bounded(method, 100))
            self._request_id = request_id
            result = handler(params, modern)
            if modern is not None:
                result.setdefault("resultType", "complete")
                result.setdefault("_meta", {})[META_SERVER] = self._server_info()
            return {"jsonrpc": "2.0", "id": request_id, "result": result}
        except ProtocolError as exc:  # its text may quote a client's or the platform's characters
            return error_response(request_id, exc.code, visible(str(exc)), exc.data)
        except Abandoned:
            return None  # the client cancelled it: a cancelled request gets no reply
        except Exception:  # noqa: BLE001 - the one catch-all, at the boundary
            log("internal error on %s:\n%s" % (bounded(method, 100), traceback.format_exc()))
            return error_response(request_id, INTERNAL_ERROR, "Internal error (details on the server's stderr)")

    def _era(self, method: str, params: JSON) -> Optional[str]:
        """The request's 2026 protocol version, or None for the handshake era."""
        meta: JSON = params["_meta"] if isinstance(params.get("_meta"), dict) else {}
        version = meta.get(META_VERSION)
        # A request stamped with a 2026 version is served by the 2026 rules
        # alone, in either era (where initialize and ping do not exist).
        if version not in MODERN_VERSIONS and (self.legacy_version is not None or META_VERSION not in meta):
            if self.legacy_version is not None and method == "initialize":
                raise ProtocolError(INVALID_REQUEST, "Already initialized")
            if self.legacy_version is not None or method in LEGACY_ONLY_METHODS:
                return None
            raise ProtocolError(INVALID_REQUEST, (
                "Not initialized: send initialize first, or a %s request with _meta.%s"
                % (MODERN_VERSIONS[-1], META_VERSION)))
        if version in LEGACY_VERSIONS:
            raise ProtocolError(INVALID_REQUEST, "Protocol %s needs the initialize handshake first" % version)
        if version not in MODERN_VERSIONS:
            raise ProtocolError(UNSUPPORTED_VERSION, "Unsupported protocol version", {
                "supported": list(SUPPORTED_VERSIONS),
                "requested": version if isinstance(version, str) else bounded(repr(version), 100)})
        if not isinstance(meta.get(META_CAPABILITIES), dict):
            raise ProtocolError(INVALID_PARAMS, "_meta.%s is required" % META_CAPABILITIES)
        return str(version)

    # -- methods -------------------------------------------------------------

    def _server_info(self) -> JSON:
        return {"name": SERVER_NAME, "title": "KVM Fleet", "version": __version__}

    def _initialize(self, params: JSON, modern: Optional[str]) -> JSON:
        requested = params.get("protocolVersion")
        if not isinstance(requested, str):
            raise ProtocolError(INVALID_PARAMS, "initialize needs a string protocolVersion")
        self.legacy_version = requested if requested in LEGACY_VERSIONS else NEWEST_LEGACY
        client = params.get("clientInfo")
        self.client_info = client if isinstance(client, dict) else None
        self._tag = client_tag(self.client_info)
        capabilities = params.get("capabilities")
        self.client_capabilities = capabilities if isinstance(capabilities, dict) else {}
        return {
            "protocolVersion": self.legacy_version,
            "capabilities": {"tools": {"listChanged": False}, "prompts": {"listChanged": False}},
            "serverInfo": self._server_info(),
            "instructions": INSTRUCTIONS,
        }

    def _ping(self, params: JSON, modern: Optional[str]) -> JSON:
        return {}

    def _discover(self, params: JSON, modern: Optional[str]) -> JSON:
        if modern is None:
            raise ProtocolError(METHOD_NOT_FOUND, (
                "server/discover is a %s method; this process was initialized with protocol %s"
                % (MODERN_VERSIONS[-1], self.legacy_version)))
        return {
            "supportedVersions": list(SUPPORTED_VERSIONS),
            "capabilities": {"tools": {}, "prompts": {}},
            "instructions": INSTRUCTIONS,
            "ttlMs": LIST_TTL_MS,
            "cacheScope": "private",
        }

    def _one_page(self, key: str, items: List[JSON], params: JSON, modern: Optional[str]) -> JSON:
        if params.get("cursor") is not None:
            raise ProtocolError(INVALID_PARAMS, "Invalid cursor: this server lists everything on one page")
        result: JSON = {key: items}
        if modern is not None:
            # The lists depend on this deployment's settings and token: private.
            result.update(ttlMs=LIST_TTL_MS, cacheScope="private")
        return result

    def _tools_list(self, params: JSON, modern: Optional[str]) -> JSON:
        if self._listing is None:
            self._listing = [tool_listing(tool) for tool in self.offered().values()]
        return self._one_page("tools", self._listing, params, modern)

    def _prompts_list(self, params: JSON, modern: Optional[str]) -> JSON:
        listing = [{"name": prompt.name, "title": prompt.title, "description": prompt_text(prompt, {}),
                    "arguments": [{"name": name, "description": text, "required": False}
                                  for name, text, _ in prompt.arguments]}
                   for prompt in self.prompts().values()]
        return self._one_page("prompts", listing, params, modern)

    def _prompts_get(self, params: JSON, modern: Optional[str]) -> JSON:
        name = params.get("name")
        prompt = self.prompts().get(name) if isinstance(name, str) else None
        given = params.get("arguments") or {}
        if prompt is None:
            raise ProtocolError(INVALID_PARAMS, "Unknown prompt: %s" % bounded(str(params.get("name")), 100))
        known = {name for name, _, _ in prompt.arguments}
        if not isinstance(given, dict) or not all(name in known and isinstance(value, str)
                                                  for name, value in given.items()):
            raise ProtocolError(INVALID_PARAMS, "%s takes only these string arguments: %s" % (
                prompt.name, ", ".join(sorted(known)) or "none"))
        for tool, args in prompt_steps(prompt, given):  # a bad argument fails as its tool would
            try:
                check_arguments(TOOLS_BY_NAME[tool], args)
            except ToolError as exc:
                raise ProtocolError(INVALID_PARAMS, str(exc)) from None
        return {"description": prompt.title,
                "messages": [{"role": "user", "content": {"type": "text", "text": prompt_text(prompt, given)}}]}

    def _tools_call(self, params: JSON, modern: Optional[str]) -> JSON:
        name, args = params.get("name"), params.get("arguments")
        args = {} if args is None else args
        client = self.client_info if modern is None else params["_meta"].get(META_CLIENT)
        call = Call(params, modern, self.legacy_version,
                    self.client_capabilities if modern is None else params["_meta"].get(META_CAPABILITIES),
                    self._request_id, self._tag if modern is None else client_tag(client))
        known = TOOLS_BY_NAME.get(name) if isinstance(name, str) else None
        entry: JSON = {"tool": bounded(str(name), 100), "write": known is not None and known.write}
        started, outcome = time.monotonic(), "internal error"
        try:
            if not isinstance(name, str) or not isinstance(args, dict):
                outcome = "refused"
                raise ProtocolError(INVALID_PARAMS, "tools/call needs a string name and an object of arguments")
            # Security: a write tool that is not advertised is refused exactly
            # like a tool that does not exist, before anything is sent.
            tool = self.offered().get(name)
            if tool is None:
                outcome = "unknown tool"
                raise ProtocolError(INVALID_PARAMS, "Unknown tool: %s" % bounded(name, 100))
            try:
                result = call_tool(tool, args, self.platform, call.client,
                                   functools.partial(self.asker.approve, call=call), entry)
            except ToolError as exc:
                result = text_result(str(exc), self.config.max_result_chars, is_error=True)
            outcome = ("asked a person" if result.get("resultType") == "input_required"
                       else "error" if result.get("isError") else "done")
            return result
        except Abandoned:
            outcome = "cancelled by the client"
            raise
        except (SystemExit, KeyboardInterrupt):
            outcome = "cut short: the server was stopped"
            raise
        finally:
            # Security: every call leaves its line in the record, however it ends.
            if self.config.audit_log:
                write_record(self.config.audit_log, record_line(client, entry, outcome, started))


###############################################################################
# The stdio loop: the only code that touches stdout ###########################
###############################################################################


class Channel:
    """Stdin as lines, stdout as messages; lines put aside while a person is asked."""

    def __init__(self, stdin: Any, stdout: IO[bytes]) -> None:
        # An unbuffered stdin (sys.stdin.buffer.raw): read(n) returns what has
        # arrived. read1 where there is one, so a buffered stream works too.
        self._read = getattr(stdin, "read1", None) or stdin.read
        self._out = stdout
        self._buffer = bytearray()
        self._scanned = 0  # the buffer holds no newline before this offset
        self._dropping = False  # the rest of an overlong line is being read and dropped
        # Stdin's chunks from a reader thread, once a read needed a time limit.
        self._chunks: Optional[queue.Queue[bytes]] = None
        self._ended = False
        # Security: constant work per line put aside, or cancelled: a deque, and running counts.
        self._waiting: Deque[Tuple[Any, bytes]] = collections.deque()  # (the request's id key, line)
        self._waiting_ids: collections.Counter[Any] = collections.Counter()  # how many wait, per id key
        self._waiting_bytes = 0

    def write(self, data: bytes) -> None:
        self._out.write(data)
        self._out.flush()

    def next_line(self) -> bytes:
        """The next line to serve (b"" at the end): lines put aside first."""
        if self._waiting:
            key, line = self._waiting.popleft()
            self._waiting_ids[key] -= 1
            self._waiting_bytes -= len(line)
            return line
        return self.read() or b""

    def put_aside(self, line: bytes, request_id: Any) -> bool:
        """Keep a line to serve after the question; False when the bound is reached."""
        if len(self._waiting) >= MAX_WAITING_LINES or self._waiting_bytes + len(line) > MAX_WAITING_BYTES:
            return False
        key = (type(request_id), request_id)  # ids as JSON tells them apart: 1 is not "1" nor true
        self._waiting.append((key, line))
        self._waiting_ids[key] += 1
        self._waiting_bytes += len(line)
        return True

    def drop_waiting(self, request_id: Any) -> None:
        """Forget the put-aside requests with this id (they were cancelled)."""
        key = (type(request_id), request_id)
        if isinstance(request_id, (str, int)) and self._waiting_ids[key]:  # an id a request can have
            self._waiting = collections.deque(entry for entry in self._waiting if entry[0] != key)
            self._waiting_ids[key] = 0
            self._waiting_bytes = sum(len(line) for _, line in self._waiting)

    def read(self, timeout: Optional[float] = None) -> Optional[bytes]:
        """The next stdin line (b"" at the end), or None when timeout seconds pass first.

        A line over MAX_LINE_BYTES comes back cut there (without its newline),
        and the rest of it is read and dropped as it arrives.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            end = self._buffer.find(b"\n", self._scanned)
            if self._dropping:  # the rest of an overlong line, dropped as it arrives
                del self._buffer[:end + 1 if end >= 0 else len(self._buffer)]
                self._dropping, self._scanned = end < 0, 0
                if end >= 0:
                    continue
            elif end > MAX_LINE_BYTES or end < 0 and len(self._buffer) > MAX_LINE_BYTES:
                # Security: a client cannot make the server buffer without bound.
                self._dropping = True
                return bytes(self._buffer[:MAX_LINE_BYTES + 1])
            elif end >= 0 or self._ended:
                line = bytes(self._buffer[:end + 1] if end >= 0 else self._buffer)
                del self._buffer[:len(line)]
                self._scanned = 0
                return line
            self._scanned = len(self._buffer)
            if self._ended:
                return b""
            chunk = self._next_chunk(deadline)
            if chunk is None:
                return None
            self._ended = not chunk
            self._buffer += chunk

    def _next_chunk(self, deadline: Optional[float]) -> Optional[bytes]:
        """What stdin has next (b"" at its end), or None when the deadline passes first."""
        if self._chunks is None and deadline is None:
            return self._read(READ_CHUNK) or b""  # None, from a non-blocking stdin, counts as the end
        if self._chunks is None:
            # Waiting for a person's answer needs a read with a time limit;
            # from then on a thread reads stdin and this takes its chunks.
            chunks: queue.Queue[bytes] = queue.Queue(READ_AHEAD_CHUNKS)
            start_thread(lambda: self._pump(chunks), "stdin")
            self._chunks = chunks
        try:
            return self._chunks.get(timeout=None if deadline is None else max(deadline - time.monotonic(), 0.0))
        except queue.Empty:
            return None

    def _pump(self, chunks: queue.Queue[bytes]) -> None:
        chunk = b"x"
        try:
            while chunk:
                chunk = self._read(READ_CHUNK) or b""
                chunks.put(chunk)
        except OSError as exc:
            log("reading stdin failed (%s); taken as its end" % exc)
        finally:
            if chunk:  # stdin failed: the loop sees its end rather than wait forever
                chunks.put(b"")


def start_thread(target: Callable[[], None], name: str) -> None:
    """Start a daemon thread that never takes SIGTERM, SIGINT or SIGALRM, so that they reach the main thread."""
    # A signal is handled by the main thread only; one the kernel gives to a
    # thread blocked in a read would wait until the main thread next wakes,
    # which may be never (seen: 1 SIGTERM in 16 ignored). Blocked here, the
    # new thread inherits the block; the caller's own mask is put back.
    sigmask = getattr(signal, "pthread_sigmask", None)  # POSIX only
    blocked = {signal.SIGTERM, signal.SIGINT} | ({signal.SIGALRM} if hasattr(signal, "SIGALRM") else set())
    before = sigmask(signal.SIG_BLOCK, blocked) if sigmask else None
    try:
        threading.Thread(target=target, name=name, daemon=True).start()
    finally:
        if sigmask:
            sigmask(signal.SIG_SETMASK, before)


def serve(server: Server, stdin: Any, stdout: IO[bytes]) -> int:
    """Answer stdin line by line until its end; the exit status."""
    channel = server.asker.channel = Channel(stdin, stdout)
    while True:
        line = channel.next_line()
        if not line:
            return 0
        if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
            out: Optional[bytes] = too_long()
        elif not line.strip():
            continue
        else:
            out = server.handle_line(line)
        if out is not None:
            channel.write(out)


###############################################################################
# Command line ################################################################
###############################################################################


def _leave(signum: int, frame: Any) -> None:
    # SIGTERM (a client closing us): exit 0 at once. Nothing is lost: every
    # message is flushed as it is written, and the record is appended a whole
    # line at a time.
    raise SystemExit(0)


def _missing_dependency() -> Optional[str]:
    """None, or what to install for this interpreter: every missing package at once."""
    missing = [name for name in ("requests", "jsonschema") if importlib.util.find_spec(name) is None]
    if not missing:
        return None
    names = " ".join(missing)
    said = "the Python package%s %s %s not installed for %s. " % (
        "s" if len(missing) > 1 else "", " and ".join(map(repr, missing)), "are" if len(missing) > 1 else "is",
        sys.executable)
    # A distribution's own Python refuses pip (PEP 668): its packages, or a virtual environment.
    if sys.prefix == sys.base_prefix and os.path.exists(os.path.join(sysconfig.get_path("stdlib"),
                                                                     "EXTERNALLY-MANAGED")):
        distro = " ".join("python3-" + name for name in missing)
        return said + ("Install %s with 'sudo apt install %s' (Debian, Ubuntu) or 'sudo dnf install %s' (Fedora, "
                       "RHEL), or make a virtual environment beside this file ('python3 -m venv venv && "
                       "venv/bin/pip install %s') and run the file with venv/bin/python3."
                       % ("them" if len(missing) > 1 else "it", distro, distro, names))
    return said + "Install %s with '%s -m pip install %s'." % (
        "them" if len(missing) > 1 else "it", sys.executable, names)


def _file_sha256() -> str:
    with open(os.path.realpath(__file__), "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def _print(text: str) -> None:
    # CLI modes only (--version, --list-tools, --check): never while serving.
    # Security: --check prints what the platform said; a terminal shows
    # escape sequences, and the token must not show up echoed either.
    sys.stdout.write(visible(redact(text)) + "\n")


def _confirm_rule(tool: Tool) -> str:
    if isinstance(tool.confirm, tuple):
        arg, values = tool.confirm
        return "when %s is %s" % (arg, "|".join(values))
    return "always" if tool.confirm == ALWAYS else "never"


def _list_tools(allow_writes: bool, only: Optional[Tuple[str, ...]]) -> None:
    for tool in advertised_tools(allow_writes, only):
        gate = "write, confirm %s" % _confirm_rule(tool) if tool.write else "read"
        path = tool.path + "".join("?%s=%s" % pair for pair in tool.fixed_query)
        _print("%-27s %-4s %-45s %s" % (tool.name, tool.method, path, gate))
    hidden = 0 if allow_writes else sum(1 for tool in advertised_tools(True, only) if tool.write)
    if hidden:
        _print("(%d write tools hidden: KVMFLEET_MCP_ALLOW_WRITES is not exactly \"true\")" % hidden)


def _check(config: Config, writes: str) -> int:
    """--check: two reads (a device, the token's scope); each problem named in a plain sentence."""
    platform, client, started = Platform(config), client_tag({"name": "check"}), time.monotonic()
    try:
        reply = platform.call("GET", "/v1/devices", [("limit", "1")], None, client)
    except ToolError as exc:
        _print("reachable: no\n%s" % _unreachable(config, exc))
        return 1
    _print("reachable: yes (%s answered HTTP %d in %.0f ms)" % (
        config.api, reply.status, (time.monotonic() - started) * 1000))
    problem = _refusal(config, reply)
    _print("authenticated: " + ("yes" if not problem else ("no\n" if reply.status == 401 else "unknown\n") + problem))
    _print("org: %s" % (config.org_id or "the token's own (KVMFLEET_ORG_ID not set)"))
    info, said = token_scope(platform, client)
    _print("token: %s" % said)
    if not config.allow_writes:
        mode = ('off (KVMFLEET_MCP_ALLOW_WRITES=%s is not exactly "true")' % json.dumps(writes) if writes else
                "off (set KVMFLEET_MCP_ALLOW_WRITES=true to offer the write tools)")
    elif info is not None and info.get("scope") == "read":
        mode = "off: the token is read-only (scope read), so the write tools stay hidden; use a token with scope write"
    else:
        mode = "on (the write tools are offered%s)" % ("" if info else "; the token's scope could not be read")
    _print("write mode: " + mode)
    return 1 if problem else 0


# --check's plain sentences for a platform it cannot reach: (what the fault's class name
# or text holds, what to tell a person), first match first.
UNREACHABLE: Final = (
    ("ProxyError", "The proxy in HTTPS_PROXY could not take the request to {host}: check HTTPS_PROXY, "
                   "or name {name} in NO_PROXY."),
    ("SSLError", "The TLS certificate of {host} could not be verified: for a private CA, set "
                 "KVMFLEET_CA_BUNDLE to its PEM file; else check the host name in KVMFLEET_API."),
    ("ConnectTimeout", "Connecting to {host} took longer than {connect:g} s: check the host and port in "
                       "KVMFLEET_API, and any firewall between."),
    ("ReadTimeout", "{host} took the request but did not answer within {read:g} s: check that KVMFLEET_API is "
                    "KVM Fleet."),
    ("not known|nodename nor servname|getaddrinfo|NameResolution|No address",
     "The host {name} was not found (DNS): check KVMFLEET_API."),
    ("[Rr]efused", "Nothing takes connections at {host} (connection refused): check the host and port in "
                   "KVMFLEET_API, and that KVM Fleet is up."),
)


def _unreachable(config: Config, error: ToolError) -> str:
    """Why KVMFLEET_API could not be reached, and what to change, in one sentence."""
    fault = "%s %s" % (type(error.cause).__name__, error.cause and error.cause.args and error.cause.args[0])
    host = urlsplit(config.api)
    for sign, sentence in UNREACHABLE:
        if re.search(sign, fault):
            return sentence.format(host=host.netloc, name=host.hostname, connect=config.connect_timeout,
                                   read=config.read_timeout)
    return "%s could not be reached: %s" % (host.netloc, error)


def _refusal(config: Config, reply: Reply) -> str:
    """'' when the device list came back; else what is wrong, what to change, and the platform's words."""
    if 200 <= reply.status < 300 and _json_object(reply.body) is not None:
        return ""
    said = {401: "KVM Fleet refused the token (HTTP 401): it is mistyped, revoked or expired. A token is shown "
                 "once, when it is created: create a new one in the KVM Fleet web console.",
            403: "The token may not list devices (HTTP 403): check its role, and KVMFLEET_ORG_ID if it is set.",
            404: "%s has no /v1/devices (HTTP 404): KVMFLEET_API must be KVM Fleet's base URL, e.g. "
                 "https://app.kvmfleet.io, without a path such as /v1." % config.api}.get(reply.status)
    if said is None:
        said = ("KVMFLEET_API redirects elsewhere: give the URL it names (the server never follows a redirect)."
                if 300 <= reply.status < 400 else "KVM Fleet had a fault (HTTP %d): try again later." % reply.status
                if reply.status >= 500 else "%s answered, but not as KVM Fleet does: check KVMFLEET_API." % config.api)
    return said + "\n" + str(reply_result("GET", "/v1/devices", reply, config)["content"][0]["text"])


def _cli_mode(argv: List[str]) -> str:
    """Which CLI mode argv asks for ("" to serve); argparse exits on --help or a bad option."""
    parser = argparse.ArgumentParser(prog=SERVER_NAME, description=(__doc__ or "").split("\n")[0], epilog=(
        "Without an option it serves MCP on stdio, as an MCP client launches it. It needs KVMFLEET_API (the "
        "platform's base URL) and KVMFLEET_TOKEN (or KVMFLEET_TOKEN_FILE); README.md lists every variable."))
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument("--version", action="store_const", dest="mode", const="version",
                       help="print the version and this file's sha256")
    modes.add_argument("--list-tools", action="store_const", dest="mode", const="list-tools",
                       help="print the tools this environment offers")
    modes.add_argument("--check", action="store_const", dest="mode", const="check",
                       help="make two reads (a device, the token's scope) and report")
    return str(parser.parse_args(argv).mode or "")


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point: serve MCP on stdio, or run one of the CLI modes."""
    argv = sys.argv[1:] if argv is None else argv
    mode = _cli_mode(argv) if argv else ""
    if mode == "version":
        _print("%s %s sha256:%s %s" % (SERVER_NAME, __version__, _file_sha256(), os.path.realpath(__file__)))
        return 0
    if mode == "list-tools":
        try:
            only = _tool_allow_list(os.environ.get("KVMFLEET_MCP_TOOLS", ""))
        except ConfigError as exc:
            log(str(exc))
            return 2
        _list_tools(os.environ.get("KVMFLEET_MCP_ALLOW_WRITES") == "true", only)
        return 0
    try:
        config = Config.from_env(dict(os.environ))
    except ConfigError as exc:
        log(str(exc))
        return 2
    missing = _missing_dependency()
    if missing:
        log(missing)
        return 2
    if mode == "check":
        return _check(config, os.environ.get("KVMFLEET_MCP_ALLOW_WRITES", ""))
    signal.signal(signal.SIGTERM, _leave)
    if hasattr(signal, "pthread_sigmask"):  # Security: a mask inherited from the client would mute them
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGALRM})
    return _serve_stdio(Server(config))


def _serve_stdio(server: Server) -> int:
    try:
        # The raw stdin: a thread may read it while a person is asked, and
        # a thread blocked in a buffered read would hold its lock at exit.
        return serve(server, getattr(sys.stdin.buffer, "raw", sys.stdin.buffer), sys.stdout.buffer)
    except (BrokenPipeError, KeyboardInterrupt):
        # The client went away: leave quietly, and keep Python's exit-time
        # flush of stdout from complaining about the closed pipe.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
