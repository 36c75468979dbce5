#!/usr/bin/env python3
"""kvmfleet-mcp: a Model Context Protocol server for a KVM Fleet estate.

It lets an MCP client (Claude Desktop, Claude Code, Cursor, VS Code, ...)
read and, when allowed, act on IP-KVM/BMC devices, the audit log, access
grants, console sessions, alerts, policies, ISOs and compliance reports
through the KVM Fleet REST API. One file; needs `requests` and `jsonschema`.

Launch (from a client config, or by hand):

    python3 /opt/kvmfleet/kvmfleet_mcp.py            # serve MCP on stdio
    python3 kvmfleet_mcp.py --check | --list-tools | --version

Environment:
    KVMFLEET_API                base URL, e.g. https://app.kvmfleet.io (required)
    KVMFLEET_TOKEN              API token, kvmf_... (this or the next is required)
    KVMFLEET_TOKEN_FILE         file holding the token, read on every call
    KVMFLEET_MCP_ALLOW_WRITES   exactly "true" to offer the 10 write tools
    KVMFLEET_CA_BUNDLE          PEM file of a private CA for the API's TLS
    KVMFLEET_CONNECT_TIMEOUT    seconds to connect (default 5)
    KVMFLEET_READ_TIMEOUT       seconds to wait for an answer (default 30)
    KVMFLEET_MCP_MAX_RESULT_CHARS  cap on a result's text (default 50000)
    KVMFLEET_ALLOW_INSECURE_HTTP   exactly "true" to allow http:// off loopback
    KVMFLEET_MCP_TOOLS          comma-separated allow-list of tools to offer
    KVMFLEET_ORG_ID             MSP: the one managed customer org every call is for
    KVMFLEET_MCP_CONFIRM        "human": destructive calls need a person's click (elicitation)
    KVMFLEET_MCP_CONFIRM_TIMEOUT  seconds a person has to answer (default 300)
    KVMFLEET_MCP_AUDIT_LOG      JSONL file: one line per tool call (mode 0600, appended)
    HTTPS_PROXY, NO_PROXY       honoured if the client config passes them

Stdio contract: newline-delimited JSON-RPC 2.0 in UTF-8, read from stdin
and written to stdout as bytes. Stdout carries protocol messages only;
logs go to stderr. Both protocol eras are served: the `initialize`
handshake (2024-11-05 ... 2025-11-25) and stateless 2026-07-28 requests
that carry their version in `_meta`. EOF on stdin or SIGTERM exits 0.

SECURITY: the server holds a token that can power-cycle production hosts,
so it trusts neither the model nor the data it reads. Write tools are not
even advertised unless KVMFLEET_MCP_ALLOW_WRITES is exactly "true";
destructive calls also need `confirm: true`, which is never sent on, or,
when the client can ask its user (elicitation), a person's click; with
KVMFLEET_MCP_CONFIRM=human only the click counts. Before asking or refusing,
reads show what the call would touch. Every
argument is checked against its schema, and ids are percent-quoted so that
they cannot leave their path segment. The token goes only to KVMFLEET_API:
redirects are not followed, TLS is always verified, plain http is refused
unless the host is loopback (or KVMFLEET_ALLOW_INSECURE_HTTP=true), and the
environment's netrc and CA overrides are ignored. The token is never
written to stdout, stderr or a result, and is redacted wherever the
platform might echo it. Answers are read within a size and time bound,
results are capped (cut at whole items, saying so), and characters that
could hide text from a person are shown as \\uXXXX. The platform still
enforces RBAC, policy, JIT, 4-eyes and its audit log; its refusals reach
the model verbatim. There is no eval, no subprocess, and nothing listens on
a port. The only file written is the optional record of agent actions,
which holds no token and no request or response bodies.
"""
from __future__ import annotations

__version__ = "0.1.0"

import json
import os
import re
import signal
import sys
import time
from typing import Any
from typing import Callable
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

# requests and jsonschema are imported on first use (Platform._adapter,
# _validator): answering initialize and tools/list needs neither, and
# together they cost more start-up time than everything else here.

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
# Security: a platform answer larger than this is not read to the end.
MAX_BODY_BYTES: Final = 16 * 1024 * 1024
# How much of a platform error body the model sees (it is verbatim up to here).
MAX_ERROR_TEXT: Final = 4000
# Reads are tried again on these answers and on connection faults; writes never.
RETRY_STATUSES: Final = (429, 502, 503, 504)
READ_RETRIES: Final = 2
RETRY_BACKOFF: Final = 0.25  # seconds, doubled each time, when no Retry-After
RETRY_AFTER_CAP: Final = 10.0  # a longer Retry-After is passed on, not waited for
# Tool lists never change within a process; say so to 2026 clients' caches.
LIST_TTL_MS: Final = 3_600_000
# How long the token-scope question may delay the first tools/list.
SCOPE_TIMEOUT: Final = 2.0
# Each read that previews what a destructive call would touch: one try, this bound.
PREVIEW_TIMEOUT: Final = 5.0
# Security: while a person is asked, other requests wait; at most this many
# bytes of them (more are answered "busy"), and few lines read ahead.
MAX_WAITING_BYTES: Final = MAX_LINE_BYTES
READ_AHEAD_LINES: Final = 4
# How many open sessions or active grants a preview names (and the page it reads).
PREVIEW_ITEMS: Final = 10
PREVIEW_PAGE: Final = 500
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
RFC3339_PATTERN: Final = (
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}"
    r"(\.[0-9]{1,9})?(Z|[+-][0-9]{2}:[0-9]{2})$(?!\n)"
)
# since/until: RFC 3339, or a duration back from now that the server resolves.
DURATION_PATTERN: Final = r"^[1-9][0-9]{0,3}[mhdw]$(?!\n)"
TIME_PATTERN: Final = "(%s)|(%s)" % (RFC3339_PATTERN, DURATION_PATTERN)
DURATION_SECONDS: Final = {"m": 60, "h": 3600, "d": 86400, "w": 604800}
# Security: characters that are invisible or reorder text, so platform data
# could hide instructions from the person reading what the model read:
# C0/C1 controls (not tab or newline), soft hyphen, zero-width and
# direction marks, bidi embeddings, overrides and isolates, word joiners,
# Hangul and Mongolian fillers, BOM, interlinear annotations, the musical
# formatting marks, and the Unicode tag characters (U+E0000 block).
# Emoji variation selectors (U+FE0E, U+FE0F) are left alone.
_HIDDEN: Final = ("\x00-\x08\x0b-\x1f\x7f-\x9f\xad\u034f\u061c\u115f\u1160\u17b4\u17b5"
                  "\u180b-\u180f\u200b-\u200f\u2028-\u202e\u2060-\u206f\u3164\uffa0"
                  "\ufeff\ufff9-\ufffb\U0001d173-\U0001d17a\U000e0000-\U000e0fff")
HIDDEN_IN_TEXT: Final = re.compile("[" + _HIDDEN + "]")
HIDDEN_IN_LOG: Final = re.compile("[\t\n" + _HIDDEN + "]")
_PRINTABLE_ASCII: Final = bytes(range(0x20, 0x7F))
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


class Abandoned(McpError):
    """The client cancelled the call while its user was being asked: no reply is sent."""


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
    effect: str = ""  # what a confirm-gated call does, formatted with its args
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
LIMIT: Final = {"type": "integer", "minimum": 1, "maximum": 500, "description": "Items per page, 1-500."}
CURSOR: Final = {"type": "string", "minLength": 1, "maxLength": 1024,
                 "description": "`next_cursor` from the previous page."}
SINCE: Final = {"type": "string", "pattern": TIME_PATTERN,
                "description": "Only items at or after this time: RFC 3339 (2026-11-23T08:00:00Z) "
                               "or a duration back from now (30m, 24h, 7d, 2w)."}
UNTIL: Final = {"type": "string", "pattern": TIME_PATTERN,
                "description": "Only items before this time: RFC 3339 or a duration back from now."}
CONFIRM: Final = {"type": "boolean",
                  "description": "true only after the user has approved this exact action."}
PAGE: Final = {"limit": LIMIT, "cursor": CURSOR}

# The whole contract with the platform is in this tuple: the endpoints and
# argument names follow the vendor's table; where it is silent (pagination,
# filters, bodies) the assumption is written here and nowhere else.
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
         ("device_id", "reason", "duration_minutes"), read_only=False, idempotent=False),
    Tool("approve_access", "Approve access",
         "Approve a pending access request (4-eyes: not your own).",
         "POST", "/v1/access-grants/{grant_id}:approve",
         {"grant_id": _id("Access grant id."), "comment": _text("Note for the audit log.")},
         ("grant_id",), read_only=False),
    Tool("deny_access", "Deny access",
         "Deny a pending access request.",
         "POST", "/v1/access-grants/{grant_id}:deny",
         {"grant_id": _id("Access grant id."), "reason": _text("Why it is denied.")},
         ("grant_id",), read_only=False),
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
         ("device_id",), read_only=False),
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
         ("alert_id",), read_only=False),
    Tool("resolve_alert", "Resolve alert",
         "Mark an alert resolved.",
         "POST", "/v1/alerts/history/{alert_id}/resolve",
         {"alert_id": _id("Alert id."), "note": _text("Note for the alert.")},
         ("alert_id",), read_only=False),
)
TOOLS_BY_NAME: Final = {tool.name: tool for tool in TOOLS}

INSTRUCTIONS: Final = (
    "KVM Fleet: IP-KVM/BMC devices, audit log, access grants, console sessions, alerts. "
    "Tools take ids (the `id` field of list results), not names: find an id first, e.g. "
    "list_devices with q=<name>. Power off/off_hard/cycle, revoke_access, mount_iso and "
    "end_console_session are refused until the user approves that exact action and you call "
    "again with confirm: true. Lists are paged: pass next_cursor as cursor; a result cut to fit "
    "says so in _truncated. since/until take RFC 3339 or 30m, 24h, 7d, 2w. The platform "
    "enforces roles, policy, JIT and 4-eyes; its refusals are quoted verbatim.")


class Prompt(NamedTuple):
    """One prompt: a question from the README answered in one or two tool calls."""

    name: str
    title: str
    question: str
    steps: Tuple[Tuple[str, JSON], ...]  # (tool, arguments); "{arg}" is filled in
    arguments: Tuple[Tuple[str, str, str], ...] = ()  # (name, description, default)


PROMPTS: Final = (
    Prompt("fleet_status", "Fleet status", "Which devices are offline, and what is firing?",
           (("list_devices", {"status": "offline"}), ("list_alerts", {"status": "firing"}))),
    Prompt("failed_logins", "Failed logins", "Show me failed logins in the last {window}.",
           (("query_audit_log", {"action": "auth.login", "outcome": "failure", "since": "{window}"}),),
           (("window", "How far back: 30m, 24h, 7d, 2w.", "24h"),)),
    Prompt("approvals_waiting", "Approvals waiting on me", "What access requests are waiting for my approval?",
           (("list_access_grants", {"awaiting_my_approval": True, "status": "pending"}),)),
    Prompt("nis2_snapshot", "NIS2 snapshot", "Generate the NIS2 snapshot for {period}, with its dropped controls.",
           (("get_compliance_score", {"framework": "nis2", "period": "{period}"}),),
           (("period", "Month as YYYY-MM; empty for the current month.", ""),)),
    Prompt("overnight_alerts", "Overnight alerts", "What alerted in the last {window}?",
           (("list_alerts", {"since": "{window}"}),), (("window", "How far back: e.g. 12h.", "12h"),)),
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
    """Text cut to limit characters, saying how much was left out."""
    if len(text) <= limit:
        return text
    return text[:limit] + "\n[... %d more characters not shown]" % (len(text) - limit)


def _escape_hidden(match: Any) -> str:
    code = ord(match.group())
    if code > 0xFFFF:  # written as the JSON surrogate pair, e.g. \udb40\udc41
        code -= 0x10000
        return "\\u%04x\\u%04x" % (0xD800 + (code >> 10), 0xDC00 + (code & 0x3FF))
    return "\\u%04x" % code


def plain(text: str) -> bool:
    """Whether text is printable ASCII only, so nothing can hide in it."""
    # Two C-speed passes: ~8 us on 10 KB, where the regex below takes ~100.
    return text.isascii() and not text.encode().translate(None, _PRINTABLE_ASCII)


def visible(text: str) -> str:
    """Text with hidden characters written as \\uXXXX, which JSON reads back as the same text."""
    return text if plain(text) else HIDDEN_IN_TEXT.sub(_escape_hidden, text)


def compact(data: Any) -> str:
    """Compact JSON, non-ASCII kept as is, hidden characters made visible."""
    return visible(json.dumps(data, ensure_ascii=False, separators=(",", ":")))


def fit(data: Any, limit: int) -> str:
    """Compact JSON within limit characters: a page of items is cut at a whole item, and says so."""
    text = compact(data)
    items = data.get("items") if isinstance(data, dict) else None
    if len(text) <= limit or not isinstance(items, list) or not items:
        return text if len(text) <= limit else text[:limit] + (
            "\n[... cut here: %d more characters were not shown, so this is not valid JSON. "
            "Ask for less, e.g. with limit.]" % (len(text) - limit))

    def page(kept: int, shown: List[Any]) -> JSON:
        return dict(data, items=shown, _truncated={
            "items_shown": kept, "items_left_out": len(items) - kept,
            "why": "the result was longer than %d characters" % limit,
            "to_see_the_rest": "call again with the same filters and limit=%d, then follow next_cursor"
                               % max(kept, 1)})

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
    return compact(page(low, items[:low]))


def text_result(text: str, is_error: bool = False) -> JSON:
    """A tools/call result with one text block: tokens redacted, hidden characters made visible."""
    result: JSON = {"content": [{"type": "text", "text": visible(redact(text))}]}
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


def _reject_constant(name: str) -> None:
    raise ValueError("%s is not JSON" % name)


def parse_line(line: bytes) -> Any:
    """Decode one stdin line as strict UTF-8 JSON (no NaN, no UTF-16 guessing)."""
    return json.loads(line.decode("utf-8"), parse_constant=_reject_constant)


_SECRETS: List[str] = []  # every token seen: never in a log line or a result


def _keep_secret(secret: str) -> None:
    # A string this short is no real token (they are kvmf_ and 40-odd
    # characters); redacting it would mangle ordinary words instead.
    if len(secret) >= 8 and secret not in _SECRETS:
        _SECRETS.append(secret)


def redact(text: str) -> str:
    """Text with every token this process has seen replaced by [redacted]."""
    # Security: a proxy or a debug page may echo the Authorization header
    # back; the token must not reach the model or the logs that way either.
    for secret in _SECRETS:
        text = text.replace(secret, "[redacted]")
    return text


def log(message: str) -> None:
    """One line on stderr, control characters escaped, secrets redacted."""
    line = "%s: %s\n" % (SERVER_NAME, HIDDEN_IN_LOG.sub(_escape_hidden, redact(message)))
    try:
        sys.stderr.buffer.write(line.encode("utf-8", "backslashreplace"))
        sys.stderr.buffer.flush()
    except (OSError, ValueError, AttributeError):
        pass  # no usable stderr: logging must never break the protocol


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
    human_only: bool = False  # KVMFLEET_MCP_CONFIRM=human: confirm: true alone is not enough
    confirm_timeout: float = 300.0  # how long a person has to answer
    audit_log: Optional[str] = None  # KVMFLEET_MCP_AUDIT_LOG: the record of agent actions

    @classmethod
    def from_env(cls, env: Dict[str, str]) -> Config:
        """Read and check the environment; ConfigError says what to fix."""
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
        ca_bundle = env.get("KVMFLEET_CA_BUNDLE") or None
        confirm = env.get("KVMFLEET_MCP_CONFIRM", "").strip()
        if confirm not in ("", "model", "human"):
            raise ConfigError("KVMFLEET_MCP_CONFIRM=%s: give human (a person must confirm destructive "
                              "calls) or model (confirm: true is enough; the default)." % confirm[:40])
        if ca_bundle is not None and not os.path.isfile(ca_bundle):
            raise ConfigError("KVMFLEET_CA_BUNDLE=%s is not a readable file." % ca_bundle)
        config = cls(
            api=api,
            token=token,
            token_file=token_file,
            allow_writes=env.get("KVMFLEET_MCP_ALLOW_WRITES") == "true",
            ca_bundle=ca_bundle,
            connect_timeout=_number(env, "KVMFLEET_CONNECT_TIMEOUT", 5.0, 600),
            read_timeout=_number(env, "KVMFLEET_READ_TIMEOUT", 30.0, 600),
            max_result_chars=int(_number(env, "KVMFLEET_MCP_MAX_RESULT_CHARS", 50_000, 10_000_000, 1000)),
            tools=_tool_allow_list(env.get("KVMFLEET_MCP_TOOLS", "")),
            org_id=_org_id(env.get("KVMFLEET_ORG_ID", "").strip()),
            human_only=confirm == "human",
            confirm_timeout=_number(env, "KVMFLEET_MCP_CONFIRM_TIMEOUT", 300.0, 3600),
            audit_log=env.get("KVMFLEET_MCP_AUDIT_LOG", "").strip() or None,
        )
        if token:
            _keep_secret(token)
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
            with open(self.token_file, encoding="utf-8") as handle:
                token = handle.read().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ToolError("Could not read KVMFLEET_TOKEN_FILE=%s (%s)." % (
                self.token_file, type(exc).__name__)) from None
        if not token:
            raise ToolError("KVMFLEET_TOKEN_FILE=%s is empty." % self.token_file)
        _keep_secret(token)
        return token


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


def _is_loopback(host: str) -> bool:
    import ipaddress  # only needed here, once

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


###############################################################################
# The platform client: the only code that touches the network ##################
###############################################################################


class Reply(NamedTuple):
    """What the platform answered to one call."""

    status: int
    reason: str
    body: bytes
    location: str  # the Location header of a redirect, else ""
    retries: int = 0  # how many times a read was tried again before this answer
    retry_after: str = ""  # the platform's Retry-After header, passed on
    request_id: str = ""  # the platform's X-Request-Id header, for the record of agent actions


class Platform:
    """Calls the KVM Fleet REST API through one requests connection pool."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._pool: Any = None  # a requests HTTPAdapter, made at the first call
        self._headers: Dict[str, str] = {}
        self._proxies: Dict[str, str] = {}

    def _adapter(self) -> Any:
        if self._pool is None:
            import requests  # deferred: see the note at the imports

            # Security: requests' HTTPAdapter, not a Session: it sends the
            # request we prepare and nothing else. A Session would also follow
            # redirects, keep cookies the platform (or a proxy) sets and send
            # them back, and let ~/.netrc replace Authorization and
            # REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE swap the CA. Proxies are still
            # honoured: resolved once, for our one host, from HTTPS_PROXY / NO_PROXY.
            # (It is also ~150 us a call cheaper than Session.request.)
            self._proxies = requests.utils.get_environ_proxies(self.config.api)
            self._headers = dict(requests.utils.default_headers(), **{
                "Accept": "application/json", "User-Agent": "%s/%s" % (SERVER_NAME, __version__)})
            if self.config.org_id:
                # Security: set here, from the environment only; no tool
                # argument reaches this header, so the model cannot switch orgs.
                self._headers["x-kvmfleet-org-id"] = self.config.org_id
            self._pool = requests.adapters.HTTPAdapter()
        return self._pool

    def call(self, method: str, path: str, query: Optional[List[Tuple[str, str]]] = None,
             body: Optional[JSON] = None, client: str = "", key: str = "",
             quick: Optional[float] = None) -> Reply:
        """Make one call, trying a read again on a passing fault; ToolError if unreachable.

        key: a write's Idempotency-Key (a write is tried once). quick: a single
        try bounded to that many seconds (the token-scope probe, previews).
        """
        import requests  # loaded by _adapter(); this only binds the name

        pool = self._adapter()
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
        request.prepare(method=method, url=self.config.api + path, headers=headers, data=data, params=query)
        timeout = (quick, quick) if quick else (self.config.connect_timeout, self.config.read_timeout)
        for attempt in range(1 if key or quick else 1 + READ_RETRIES):
            last = bool(key or quick) or attempt == READ_RETRIES
            try:
                # Security: an adapter follows no redirect: a 3xx is reported,
                # so the token goes to KVMFLEET_API and nowhere else; TLS is verified.
                response = pool.send(request, stream=True, timeout=timeout,
                                     verify=self.config.ca_bundle or True, proxies=self._proxies)
            except requests.ConnectionError as exc:  # refused, reset, connect timeout, TLS
                if last or isinstance(exc, requests.exceptions.SSLError):
                    raise ToolError(_network_failure(self.config, method, path, exc)) from None
                time.sleep(RETRY_BACKOFF * (1 << attempt))
                continue
            except requests.RequestException as exc:  # no answer in time, and the like
                raise ToolError(_network_failure(self.config, method, path, exc)) from None
            try:
                with response:
                    # urllib3 1.x takes an answer cut short of its Content-Length as whole.
                    response.raw.enforce_content_length = True
                    content = _read_bounded(response, timeout[1], method)
            except requests.exceptions.ChunkedEncodingError as exc:  # dropped mid-answer
                if last:
                    raise ToolError(_network_failure(self.config, method, path, exc)) from None
                time.sleep(RETRY_BACKOFF * (1 << attempt))
                continue
            except requests.ConnectionError:  # how requests reports a stall mid-answer
                raise ToolError("%s %s: KVM Fleet at %s stopped sending its answer for %g s. %s" % (
                    method, path, self.config.api, timeout[1], _outcome(method))) from None
            except requests.RequestException as exc:  # an answer that cannot be decoded
                raise ToolError(_network_failure(self.config, method, path, exc)) from None
            wait = _retry_delay(response, attempt)
            if last or wait is None:
                return Reply(response.status_code, response.reason or "", content,
                             response.headers.get("Location", ""), attempt, response.headers.get("Retry-After", ""),
                             _header_safe(response.headers.get("X-Request-Id")))
            time.sleep(wait)
        raise AssertionError("unreachable: the last attempt returns or raises")


def _retry_delay(response: Any, attempt: int) -> Optional[float]:
    """Seconds to wait before trying a read again, or None to answer now."""
    if response.status_code not in RETRY_STATUSES:
        return None
    retry_after = response.headers.get("Retry-After", "")
    if not retry_after:
        return RETRY_BACKOFF * (1 << attempt)
    try:
        wait = float(retry_after)
    except ValueError:
        from email.utils import parsedate_to_datetime

        try:
            wait = parsedate_to_datetime(retry_after).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    # A platform that asks for a longer wait gets its answer passed on instead.
    return max(wait, 0.0) if wait <= RETRY_AFTER_CAP else None


def _read_bounded(response: Any, seconds: float, method: str) -> bytes:
    deadline = time.monotonic() + seconds
    chunks = []
    size = 0
    for chunk in response.iter_content(65536):
        size += len(chunk)
        # Security: a huge or endless answer is not read to the end.
        if size > MAX_BODY_BYTES:
            raise ToolError("KVM Fleet answered HTTP %d with more than %d MiB; it was not read to the end. %s" % (
                response.status_code, MAX_BODY_BYTES // (1024 * 1024),
                "Ask for fewer items with limit." if method == "GET" else _outcome(method)))
        # Security: nor one that trickles in: each read has the read timeout,
        # and the whole answer this deadline, checked as each chunk arrives
        # (so a platform that trickles is cut at its next 64 KiB).
        if time.monotonic() > deadline:
            raise ToolError("KVM Fleet's answer did not arrive in full within %g s." % seconds)
        chunks.append(chunk)
    return b"".join(chunks)


def _outcome(method: str) -> str:
    if method == "GET":
        return "A read changes nothing; it is safe to retry."
    return "It is not known whether KVM Fleet acted on it: check with a read tool before retrying."


def _network_failure(config: Config, method: str, path: str, exc: Exception) -> str:
    import requests  # already loaded: only Platform raises what gets here

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
    return "%s %s %s KVM Fleet at %s (%s: %s). %s" % (
        method, path, kind, config.api, type(exc).__name__, bounded(str(exc), 300), outcome)


def reply_result(method: str, path: str, reply: Reply, config: Config) -> JSON:
    """Turn the platform's answer into a tools/call result, errors verbatim."""
    text = reply.body.decode("utf-8", "replace")
    where = "%s %s" % (method, path)
    if 300 <= reply.status < 400:
        target = urlsplit(reply.location).netloc or reply.location or "(no Location header)"
        return text_result(
            "KVM Fleet answered %s with HTTP %d %s, a redirect to %s. It was not followed: "
            "the token is only ever sent to %s. Check KVMFLEET_API."
            % (where, reply.status, reply.reason, bounded(target, 200), config.api), True)
    if reply.status >= 400 or reply.status < 200:
        tries = " (tried %d times)" % (reply.retries + 1) if reply.retries else ""
        wait = " (Retry-After: %s, how long it asks you to wait before trying again)" % bounded(
            reply.retry_after, 40) if reply.retry_after else ""
        return text_result("KVM Fleet refused %s: HTTP %d %s%s%s\n%s" % (
            where, reply.status, reply.reason, tries, wait, bounded(text, MAX_ERROR_TEXT)), True)
    if not reply.body.strip():
        return text_result('{"status":%d,"body":null}' % reply.status)
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        return text_result("KVM Fleet answered %s with HTTP %d, but the body is not JSON:\n%s" % (
            where, reply.status, bounded(text, MAX_ERROR_TEXT)), True)
    if len(text) <= config.max_result_chars and (plain(text) or not HIDDEN_IN_TEXT.search(text)):
        # JSON with nothing hidden in it, as a platform normally sends: passed
        # on as it came, nothing to re-serialise (plain() is the fast test).
        return text_result(text)
    return text_result(fit(data, config.max_result_chars))


###############################################################################
# Tool calls ##################################################################
###############################################################################

# Why a checker of our own on the hot path: importing jsonschema costs about
# 100 ms and 5 MiB, more than the whole server otherwise, and validating with
# it costs ~15 us a call. The schemas in TOOLS use nine keywords only (the
# table's tests refuse any other), all checked here exactly as JSON Schema
# defines them; tests/test_validation.py proves the verdicts equal those of
# jsonschema's draft 2020-12 and draft 7 validators on generated arguments.
# jsonschema still words every rejection, and overrules nothing: where the
# two disagree the call is refused.
_PATTERNS: Dict[str, Any] = {}


def _fits(schema: JSON, value: Any) -> bool:
    """Whether value satisfies one property schema (type, enum, pattern, lengths, bounds)."""
    kind = schema["type"]
    if kind == "integer":
        # JSON Schema counts 5.0 as an integer, and a bool as none.
        if isinstance(value, bool) or not (isinstance(value, int) or
                                           isinstance(value, float) and value.is_integer()):
            return False
        return bool(schema.get("minimum", value) <= value <= schema.get("maximum", value))
    if kind == "boolean":
        return type(value) is bool
    if type(value) is not str:
        return False
    if "enum" in schema and value not in schema["enum"]:
        return False
    if not schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", len(value)):
        return False
    if "pattern" in schema:
        pattern = _PATTERNS.get(schema["pattern"])
        if pattern is None:
            pattern = _PATTERNS[schema["pattern"]] = re.compile(schema["pattern"])
        return pattern.search(value) is not None
    return True


def arguments_fit(tool: Tool, args: JSON) -> bool:
    """Whether args satisfy the tool's input schema: required, no extras, each property."""
    properties = tool.properties
    return (all(name in args for name in tool.required) and
            all(name in properties and _fits(properties[name], value) for name, value in args.items()))


def check_arguments(tool: Tool, args: JSON) -> None:
    """Raise ToolError, with the first problem in jsonschema's words, unless args fit the schema."""
    if arguments_fit(tool, args):
        return
    import jsonschema  # deferred: needed only to word a rejection

    # 2020-12 where the installed jsonschema has it (4.x); distro 3.2 has
    # only draft 7, and our schemas mean the same under both.
    validator = getattr(jsonschema, "Draft202012Validator", None) or jsonschema.Draft7Validator
    error = jsonschema.exceptions.best_match(validator(input_schema(tool)).iter_errors(args))
    if error is None:  # never seen; refuse all the same (fail closed)
        log("bug: %s's arguments were refused, yet jsonschema accepts them" % tool.name)
        raise ToolError("Invalid arguments for %s. See the tool's inputSchema." % tool.name)
    where = "/".join(str(part) for part in error.absolute_path)
    message = error.message
    if error.validator == "pattern":  # the regex itself would only confuse
        message = "%s is not in the accepted form" % bounded(repr(error.instance), 100)
    prop = tool.properties.get(where)
    raise ToolError("Invalid arguments for %s%s: %s.%s See the tool's inputSchema." % (
        tool.name, " at " + where if where else "", bounded(message, 300),
        " %s: %s" % (where, prop["description"]) if prop else ""))


# approve(tool, args, confirmed, entry): None when a destructive call may go
# ahead, else the result that asks a person (it raises ToolError to refuse).
Approve = Callable[[Tool, JSON, bool, JSON], Optional[JSON]]


def call_tool(tool: Tool, args: JSON, platform: Platform, client: str, approve: Approve, entry: JSON) -> JSON:
    """Validate, gate and make the one REST call behind a tool; entry collects the record of it."""
    check_arguments(tool, args)
    try:
        json.dumps(args, ensure_ascii=False).encode()
    except UnicodeEncodeError:  # JSON text may hold "\ud800"; UTF-8 cannot
        raise ToolError("Invalid arguments for %s: a string holds a lone surrogate, which is not "
                        "valid Unicode." % tool.name) from None
    # 5.0 passed as an integer; the platform gets 5.
    args = {name: int(value) if type(value) is float else value for name, value in args.items()}
    confirmed = args.pop("confirm", False) is True  # Security: never sent on
    if platform.config.audit_log:
        # The record names what was targeted, never free text (a reason, a search).
        entry["targets"] = {name: value for name, value in args.items() if not free_text(tool, name)}
    if needs_confirm(tool, args):
        # Security: nothing is written until the call is confirmed as this
        # server's settings and the client's abilities demand.
        question = approve(tool, args, confirmed, entry)
        if question is not None:
            return question
    for name, make in tool.defaults:
        args.setdefault(name, make())
    window = resolve_durations(args, time.time())
    path = build_path(tool.path, args)
    query = list(tool.fixed_query)
    body = None
    if tool.method == "GET":
        query += [(name, query_value(args[name])) for name in tool.properties if name in args]
    else:
        body = args
    key = os.urandom(16).hex() if tool.write else ""
    entry["request_id"] = key or None
    said = ("Request id: %s (sent as its Idempotency-Key; quote it to find this call in KVM Fleet's "
            "audit log)." % key) if key else ""
    try:
        reply = platform.call(tool.method, path, query or None, body, client, key)
    except ToolError as exc:
        raise ToolError("%s\n%s" % (exc, said) if said else str(exc)) from None
    entry.update(status=reply.status, platform_request_id=reply.request_id or None)
    result = reply_result(tool.method, path, reply, platform.config)
    if window and not result.get("isError"):
        result["content"].append({"type": "text", "text": window})
    if said:
        result["content"].append({"type": "text", "text": said})
    return result


def impact(args: JSON, platform: Platform, client: str) -> str:
    """What a destructive call would touch, from reads made now; a failed read is said, not skipped."""
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
        lines.append(_listed(platform, client, "access grant", "/v1/access-grants",
                             [("status", "active")], args["grant_id"], _grant_line, "active grants"))
    if "session_id" in args:
        lines.append(_listed(platform, client, "console session", "/v1/console-sessions",
                             [("open_only", "true")], args["session_id"], _session_line, "open sessions"))
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
        return "could not read %s: HTTP %d %s %s" % (
            what, reply.status, reply.reason, bounded(reply.body.decode("utf-8", "replace"), 300))
    return data


def free_text(tool: Tool, name: str) -> bool:
    """Whether an argument is free text (a reason, a search), not an id, a time or a choice."""
    return "pattern" not in tool.properties[name] and "enum" not in tool.properties[name]


def _json_object(body: bytes) -> Optional[JSON]:
    """A body's JSON object, or None for anything else (including nesting too deep to parse)."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


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
    more = " (and more)" if page.get("next_cursor") else ""
    return "%s: %s%s" % (what, "; ".join(describe(item) for item in items) or "none", more)


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
    import calendar

    try:
        seconds = time.time() - calendar.timegm(time.strptime(str(stamp)[:19], "%Y-%m-%dT%H:%M:%S"))
    except ValueError:
        return ""
    return ", open for %d h %d min" % (seconds // 3600, seconds % 3600 // 60) if seconds >= 0 else ""


def write_record(path: str, entry: JSON) -> None:
    """Append one line to the record of agent actions; a failure is logged and the call goes on."""
    line = compact(entry).encode("utf-8", "backslashreplace")
    try:
        # Security: created 0600 and only ever appended to; it holds no
        # token and no bodies, only who called which tool on what, and how.
        handle = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(handle, line + b"\n")
        finally:
            os.close(handle)
    except OSError as exc:
        log("could not append to KVMFLEET_MCP_AUDIT_LOG=%s (%s); the call went on" % (path, exc.strerror))


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


def _id_of(line: bytes) -> Any:
    """The id of the request on a line, or None."""
    try:
        message = parse_line(line)
    except (ValueError, RecursionError):
        return None
    return message.get("id") if isinstance(message, dict) else None


def same_id(one: Any, other: Any) -> bool:
    """JSON-RPC ids compared as JSON does: 1 is not true, nor 1.0, nor "1"."""
    return type(one) is type(other) and one == other


def _not_approved(what: str, why: str) -> ToolError:
    return ToolError("Not done: %s, and the user %s. No write was sent to KVM Fleet. Do not try again "
                     "unless the user asks you to." % (what, why))


def _digest(args: JSON) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(args, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def resolve_durations(args: JSON, now: float) -> str:
    """Replace since/until durations (24h) with UTC RFC 3339 times; say what window that is."""
    said = []
    for name in ("since", "until"):
        value = args.get(name)
        if isinstance(value, str) and re.search(DURATION_PATTERN, value):
            seconds = int(value[:-1]) * DURATION_SECONDS[value[-1]]
            args[name] = _utc(now - seconds)
            said.append("%s=%s (%s before now)" % (name, args[name], value))
    if not said:
        return ""
    return "Time window used: %s; now is %s." % (", ".join(said), _utc(now))


def _utc(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def token_scope(platform: Platform, client: str) -> Tuple[Optional[JSON], str]:
    """Ask GET /v1/tokens/current, bounded to a short wait: its answer (or None) and what it said."""
    try:
        reply = platform.call("GET", "/v1/tokens/current", None, None, client, quick=SCOPE_TIMEOUT)
    except ToolError as exc:
        return None, "no answer from GET /v1/tokens/current (%s)" % bounded(str(exc), 200)
    data = _json_object(reply.body) if reply.status == 200 else None
    if data is None:
        return None, "GET /v1/tokens/current answered HTTP %d without a token description" % reply.status
    return data, "role %s, scope %s" % (bounded(str(data.get("role")), 40), bounded(str(data.get("scope")), 40))


###############################################################################
# JSON-RPC dispatch ###########################################################
###############################################################################


class Server:
    """The MCP protocol state machine: message in, message out."""

    def __init__(self, config: Config, platform: Optional[Platform] = None) -> None:
        self.config = config
        self.platform = platform or Platform(config)
        self.legacy_version: Optional[str] = None  # set by initialize
        self.client_info: Optional[JSON] = None
        self._tag = client_tag(None)  # x-kvmfleet-mcp-client for the initialized session
        self.client_capabilities: JSON = {}
        self.channel: Optional[Channel] = None  # set by serve(): how a person is asked mid-call
        self._request_id: Any = None  # of the request being handled
        self._asked = 0  # elicitation requests sent, for their ids
        # Security: requestState is signed with this secret of the process
        # (and the token), so a client cannot forge or alter a person's "yes";
        # each "yes" is spent once (nonce -> expiry).
        self._key = os.urandom(32)
        self._spent: Dict[str, float] = {}
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
        # Ids are strings or integers; bool is an int in Python but not in JSON.
        if isinstance(request_id, bool) or not isinstance(request_id, (str, int)):
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
            if handler is None:
                raise ProtocolError(METHOD_NOT_FOUND, "Method not found: %s" % bounded(method, 100))
            self._request_id = request_id
            result = handler(params, modern)
            if modern is not None:
                result.setdefault("resultType", "complete")
                result.setdefault("_meta", {})[META_SERVER] = self._server_info()
            return {"jsonrpc": "2.0", "id": request_id, "result": result}
        except ProtocolError as exc:
            return error_response(request_id, exc.code, str(exc), exc.data)
        except Abandoned:
            return None  # the client cancelled it: a cancelled request gets no reply
        except Exception:  # noqa: BLE001 - the one catch-all, at the boundary
            import traceback  # only ever needed here

            log("internal error on %s:\n%s" % (bounded(method, 100), traceback.format_exc()))
            return error_response(request_id, INTERNAL_ERROR, "Internal error (details on the server's stderr)")

    def _era(self, method: str, params: JSON) -> Optional[str]:
        """The request's modern protocol version, or None for the legacy session."""
        if self.legacy_version is not None:
            # An initialize selected the legacy era for the life of the process.
            if method == "initialize":
                raise ProtocolError(INVALID_REQUEST, "Already initialized")
            return None
        meta = params.get("_meta")
        if method == "initialize" or not isinstance(meta, dict) or META_VERSION not in meta:
            if method in ("initialize", "ping"):
                return None
            raise ProtocolError(INVALID_REQUEST, (
                "Not initialized: send initialize first, or a %s request with _meta.%s"
                % (MODERN_VERSIONS[-1], META_VERSION)))
        version = meta[META_VERSION]
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
        name = params.get("name")
        args = params.get("arguments", {})
        if args is None:
            args = {}
        if not isinstance(name, str) or not isinstance(args, dict):
            raise ProtocolError(INVALID_PARAMS, "tools/call needs a string name and an object of arguments")
        # Security: a write tool that is not advertised is refused exactly
        # like a tool that does not exist, before anything is sent.
        tool = self.offered().get(name)
        if tool is None:
            raise ProtocolError(INVALID_PARAMS, "Unknown tool: %s" % bounded(name, 100))
        client = self.client_info if modern is None else params["_meta"].get(META_CLIENT)
        tag = self._tag if modern is None else client_tag(client)
        call_id, started, entry = self._request_id, time.monotonic(), {"tool": tool.name, "write": tool.write}

        def approve(tool: Tool, args: JSON, confirmed: bool, entry: JSON) -> Optional[JSON]:
            return self._approve(tool, args, confirmed, entry, params, modern, call_id, tag)

        try:
            try:
                result = call_tool(tool, args, self.platform, tag, approve, entry)
            except ToolError as exc:
                result = text_result(str(exc), is_error=True)
        except Abandoned:
            self._record(entry, client, started, "cancelled by the client")
            raise
        self._record(entry, client, started, "asked a person" if result.get("resultType") == "input_required"
                     else "error" if result.get("isError") else "done")
        return result

    def _record(self, entry: JSON, client: Any, started: float, outcome: str) -> None:
        if self.config.audit_log:
            write_record(self.config.audit_log, dict(
                {"time": _utc(time.time()), "client": {
                    "name": _header_safe(client.get("name")) if isinstance(client, dict) else "",
                    "version": _header_safe(client.get("version")) if isinstance(client, dict) else ""}},
                **entry, outcome=outcome, duration_ms=round((time.monotonic() - started) * 1000, 1)))

    # -- confirmation by a person ---------------------------------------------

    def _approve(self, tool: Tool, args: JSON, confirmed: bool, entry: JSON, params: JSON,
                 modern: Optional[str], call_id: Any, client: str) -> Optional[JSON]:
        """None when this destructive call may go ahead; a question for a person; or ToolError."""
        what = "%s would %s" % (tool.name, tool.effect.format(**args))
        capabilities = params["_meta"].get(META_CAPABILITIES) if modern else self.client_capabilities
        if asks_forms(capabilities) and (modern or str(self.legacy_version) >= ELICITATION_SINCE):
            entry["confirmation"] = {"by": "person"}
            if modern:
                return self._ask_later(tool, args, params, what, entry, client)
            self._ask_now(tool, args, what, entry, call_id, client)
            return None
        entry["confirmation"] = {"by": "model", "answer": "confirm" if confirmed else "missing"}
        if confirmed and not self.config.human_only:
            return None
        if self.config.human_only:
            # Security: a model can write confirm: true as easily as an id.
            why = ("This server takes only a person's confirmation for it (KVMFLEET_MCP_CONFIRM=human), and "
                   "this client cannot ask one: it did not offer elicitation (form mode, protocol %s or later). "
                   "confirm: true is not enough. Tell the user; they can do it in the KVM Fleet console or "
                   "from a client that supports elicitation." % ELICITATION_SINCE)
        else:
            why = ('Ask the user to approve this exact action; if they do, call %s again with the same '
                   'arguments and "confirm": true.' % tool.name)
        raise ToolError("Not done: %s. No write was sent to KVM Fleet. %s\n%s" % (
            what, why, impact(args, self.platform, client)))

    def _form(self, tool: Tool, args: JSON, client: str) -> JSON:
        """The elicitation/create params: what would happen, what it touches, one box to tick."""
        # Security: the person sees every word the call would send, not only
        # its effect: a steered model could write "approved by the CISO" in a reason.
        text = ["%s %s" % (name, _shown(value)) for name, value in args.items() if free_text(tool, name)]
        message = ("An AI assistant (%s) asks to %s.%s\n%s\nApprove only if you want exactly this; "
                   "anything else sends nothing." % (
                       client, tool.effect.format(**args), " With " + ", ".join(text) + "." if text else "",
                       impact(args, self.platform, client)))
        params: JSON = {"mode": "form", "message": visible(redact(message)), "requestedSchema": {
            "type": "object", "required": [ASK_FIELD], "properties": {ASK_FIELD: {
                "type": "boolean", "title": "Approve: %s" % tool.title, "default": False,
                "description": "Tick to let the assistant %s." % tool.effect.format(**args)}}}}
        if self.legacy_version == ELICITATION_SINCE:
            del params["mode"]  # that revision's form has no mode field
        return params

    def _ask_now(self, tool: Tool, args: JSON, what: str, entry: JSON, call_id: Any, client: str) -> None:
        """Ask the client's user in the middle of this tools/call; ToolError unless they approve."""
        if self.channel is None:
            raise ToolError("Not done: %s, and there is no stdio channel to ask the user on." % what)
        self._asked += 1
        ask_id = "%s-confirm-%d" % (SERVER_NAME, self._asked)
        self.channel.write(encode({"jsonrpc": "2.0", "id": ask_id, "method": "elicitation/create",
                                   "params": self._form(tool, args, client)}))
        reply = self._wait_for(self.channel, ask_id, call_id)
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
            line = channel.read(max(deadline - time.monotonic(), 0.0))
            if line is None:
                return None
            if not line:
                return {}
            try:
                message = parse_line(line)
            except (ValueError, RecursionError):
                message = None
            if isinstance(message, dict):
                method, params = message.get("method"), message.get("params")
                if message.get("id") == ask_id and method is None:
                    return message
                if method == "ping" and "id" in message:
                    channel.write(self.handle_line(line) or b"")
                    continue
                if method == "notifications/cancelled" and isinstance(params, dict):
                    if same_id(params.get("requestId"), call_id):
                        channel.write(encode({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {
                            "requestId": ask_id, "reason": "the call was cancelled"}}))
                        raise Abandoned()
                    # Security: a request cancelled while it waited is dropped, never run later.
                    channel.later = [waiting for waiting in channel.later
                                     if not same_id(_id_of(waiting), params.get("requestId"))]
                    continue
            # Anything else waits its turn: answered in order, after this call.
            request_id = _id_of(line)
            if sum(map(len, channel.later)) + len(line) <= MAX_WAITING_BYTES:
                channel.later.append(line)
            elif isinstance(request_id, (str, int)) and not isinstance(request_id, bool):
                channel.write(encode(error_response(request_id, INVALID_REQUEST, (
                    "Busy: the user is being asked to confirm another call; send this again after it"))))

    def _ask_later(self, tool: Tool, args: JSON, params: JSON, what: str, entry: JSON,
                   client: str) -> Optional[JSON]:
        """2026-07-28: ask with an input_required result; go ahead on the retry that carries a yes."""
        answers = params.get("inputResponses")
        answer = answers.get(ASK_KEY) if isinstance(answers, dict) else None
        if answer is None:
            entry["confirmation"]["answer"] = "asked"
            return {"resultType": "input_required", "requestState": self._seal(tool, args),
                    "inputRequests": {ASK_KEY: {"method": "elicitation/create",
                                                "params": self._form(tool, args, client)}}}
        nonce, until = self._unseal(params.get("requestState"), tool, args, what)
        why, label = verdict(answer)
        entry["confirmation"]["answer"] = label
        if why:
            raise _not_approved(what, why)
        now = time.time()
        self._spent = {spent: end for spent, end in self._spent.items() if end >= now}
        # Security: one person's yes makes one call; a replayed retry is refused.
        if nonce in self._spent:
            raise ToolError("Not done: %s. This approval was already used once; ask again." % what)
        self._spent[nonce] = until
        return None

    def _seal(self, tool: Tool, args: JSON) -> str:
        """requestState: which call a question is for and until when, signed."""
        import base64

        payload = json.dumps({"tool": tool.name, "args": _digest(args), "nonce": os.urandom(12).hex(),
                              "until": time.time() + self.config.confirm_timeout}, separators=(",", ":"))
        return base64.urlsafe_b64encode(payload.encode()).decode() + "." + self._mac(payload)

    def _mac(self, payload: str) -> str:
        import hmac

        # Security: keyed with this process's secret and bound to its token,
        # so state from another process or principal fails verification.
        return hmac.new(self._key, (payload + "\n" + self.config.bearer()).encode(), "sha256").hexdigest()

    def _unseal(self, state: Any, tool: Tool, args: JSON, what: str) -> Tuple[str, float]:
        """The nonce and expiry of a requestState we signed for exactly this call; else ToolError."""
        import base64
        import hmac

        # Security: requestState comes back through the client, so it is
        # attacker-controlled: verified before a byte of it is believed.
        fields: Any = None
        try:
            encoded, mac = str(state).split(".")
            payload = base64.urlsafe_b64decode(encoded.encode("ascii")).decode()
            if hmac.compare_digest(mac.encode("ascii"), self._mac(payload).encode()):
                fields = json.loads(payload)
        except ValueError:  # includes bad base64, non-ASCII and undecodable bytes
            fields = None
        if not isinstance(fields, dict) or fields["tool"] != tool.name or fields["args"] != _digest(args):
            raise ToolError("Not done: %s. The answer came with a requestState that this server did not "
                            "issue for this tool and these arguments. No write was sent." % what)
        if fields["until"] < time.time():
            raise ToolError("Not done: %s. The user's answer came after %g s; ask again." % (
                what, self.config.confirm_timeout))
        return str(fields["nonce"]), float(fields["until"])


###############################################################################
# The stdio loop: the only code that touches stdout ###########################
###############################################################################


class Channel:
    """Stdin as lines, stdout as messages."""

    def __init__(self, stdin: Any, stdout: IO[bytes]) -> None:
        # An unbuffered stdin (sys.stdin.buffer.raw): read(n) returns what has
        # arrived. read1 where there is one, so a buffered stream works too.
        self._read = getattr(stdin, "read1", None) or stdin.read
        self._out = stdout
        self._buffer = bytearray()
        self._queue: Any = None  # lines from a reader thread, once a read needed a time limit
        self._ended = False
        self.later: List[bytes] = []  # lines put aside while a person was asked; served next

    def write(self, data: bytes) -> None:
        self._out.write(data)
        self._out.flush()

    def next_line(self) -> bytes:
        """The next line to serve (b"" at the end): put-aside lines first."""
        return self.later.pop(0) if self.later else self.read() or b""

    def read(self, timeout: Optional[float] = None) -> Optional[bytes]:
        """The next stdin line (b"" at the end), or None when timeout seconds pass first."""
        if self._ended:
            return b""
        if self._queue is None and timeout is None:
            line = self._read_line()
        else:
            import queue

            if self._queue is None:
                # Waiting for a person's answer needs a read with a time limit;
                # from then on a thread reads stdin and this takes its lines.
                self._queue = queue.Queue(READ_AHEAD_LINES)
                start_thread(self._pump, "stdin", daemon=True)
            try:
                line = self._queue.get(timeout=timeout)
            except queue.Empty:
                return None
        self._ended = not line
        return line

    def _pump(self) -> None:
        line = b"x"
        try:
            while line:
                line = self._read_line()
                self._queue.put(line)
        except OSError as exc:
            log("reading stdin failed (%s); taken as its end" % exc)
        finally:
            if line:  # stdin failed: the loop sees its end rather than wait forever
                self._queue.put(b"")

    def _read_line(self) -> bytes:
        """One line; a line over MAX_LINE_BYTES comes back cut there, its rest read and dropped."""
        start = 0
        while True:
            end = self._buffer.find(b"\n", start)
            # Security: a client cannot make the server buffer without bound.
            if end > MAX_LINE_BYTES or end < 0 and len(self._buffer) > MAX_LINE_BYTES:
                line = bytes(self._buffer[:MAX_LINE_BYTES + 1])
                while end < 0:  # drop the rest as it arrives, 64 KiB at a time
                    self._buffer[:] = self._read(65536) or b""
                    if not self._buffer:
                        break
                    end = self._buffer.find(b"\n")
                del self._buffer[:end + 1]
                return line
            if end >= 0:
                line = bytes(self._buffer[:end + 1])
                del self._buffer[:end + 1]
                return line
            start = len(self._buffer)
            chunk = self._read(65536)
            if not chunk:  # the end (or None: no data from a non-blocking stdin); a last line counts
                line = bytes(self._buffer)
                self._buffer.clear()
                return line
            self._buffer += chunk


def start_thread(target: Callable[[], None], name: str, daemon: bool) -> None:
    """Start a thread that never takes SIGTERM or SIGINT, so that they reach the main thread."""
    import threading

    # A signal is handled by the main thread only; one the kernel gives to a
    # thread blocked in a read would wait until the main thread next wakes,
    # which may be never (seen: 1 SIGTERM in 16 ignored). Blocked here, the
    # new thread inherits the block; the caller's own mask is put back.
    sigmask = getattr(signal, "pthread_sigmask", None)  # POSIX only
    before = sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT}) if sigmask else None
    try:
        threading.Thread(target=target, name=name, daemon=daemon).start()
    finally:
        if sigmask:
            sigmask(signal.SIG_SETMASK, before)


def serve(server: Server, stdin: Any, stdout: IO[bytes]) -> int:
    """Answer stdin line by line until its end; the exit status."""
    channel = server.channel = Channel(stdin, stdout)
    while True:
        line = channel.next_line()
        if not line:
            return 0
        if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
            out: Optional[bytes] = encode(error_response(
                None, INVALID_REQUEST, "Message longer than %d bytes; it was discarded" % MAX_LINE_BYTES))
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
    # SIGTERM (a client closing us; SIGINT too when serving from a thread):
    # exit 0 at once. Nothing is lost: every message is flushed as it is
    # written, and the record is appended a whole line at a time.
    os._exit(0)


def _missing_dependency() -> Optional[str]:
    from importlib.util import find_spec

    for name, apt in (("requests", "python3-requests"), ("jsonschema", "python3-jsonschema")):
        if find_spec(name) is None:
            return ("the Python package %r is not installed for %s. Install it with "
                    "'%s -m pip install %s' or 'apt install %s'." % (name, sys.executable, sys.executable, name, apt))
    return None


def _file_sha256() -> str:
    import hashlib

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
        _print("%-27s %-4s %-45s %s" % (tool.name, tool.method, tool.path, gate))
    hidden = 0 if allow_writes else sum(1 for tool in advertised_tools(True, only) if tool.write)
    if hidden:
        _print("(%d write tools hidden: KVMFLEET_MCP_ALLOW_WRITES is not exactly \"true\")" % hidden)


def _check(config: Config) -> int:
    started = time.monotonic()
    try:
        reply = Platform(config).call("GET", "/v1/devices", [("limit", "1")], None, client_tag({"name": "check"}))
    except ToolError as exc:
        _print("reachable: no\n%s" % exc)
        return 1
    _print("reachable: yes (%s answered HTTP %d in %.0f ms)" % (
        config.api, reply.status, (time.monotonic() - started) * 1000))
    result = reply_result("GET", "/v1/devices", reply, config)
    _print("authenticated: " + ("no\n" + result["content"][0]["text"] if result.get("isError") else "yes"))
    _print("org: %s" % (config.org_id or "the token's own (KVMFLEET_ORG_ID not set)"))
    _print("token: %s" % token_scope(Platform(config), client_tag({"name": "check"}))[1])
    _print("write mode: " + ("on, unless the token is read-only" if config.allow_writes else
                             "off (set KVMFLEET_MCP_ALLOW_WRITES=true to offer write tools)"))
    return 1 if result.get("isError") else 0


def _cli_mode(argv: List[str]) -> str:
    """Which CLI mode argv asks for ("" to serve); argparse exits on --help or a bad option."""
    import argparse  # ~10 ms: paid only by the CLI modes, never by a client's launch

    parser = argparse.ArgumentParser(prog=SERVER_NAME, description=(__doc__ or "").split("\n")[0])
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument("--version", action="store_const", dest="mode", const="version",
                       help="print the version and this file's sha256")
    modes.add_argument("--list-tools", action="store_const", dest="mode", const="list-tools",
                       help="print the tools this environment offers")
    modes.add_argument("--check", action="store_const", dest="mode", const="check",
                       help="make one authenticated read and report")
    return str(parser.parse_args(argv).mode or "")


def main(argv: Optional[List[str]] = None, background: bool = False) -> int:
    """Entry point: serve MCP on stdio, or run one of the CLI modes.

    background: serve from a thread and return 0 at once; the thread ends
    the process with the serving status (see the end of this file).
    """
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
        return _check(config)
    signal.signal(signal.SIGTERM, _leave)
    server = Server(config)
    if not background:
        return _serve_stdio(server)
    signal.signal(signal.SIGINT, _leave)  # this thread only waits: see _leave

    def run() -> None:
        status = 1
        try:
            status = _serve_stdio(server)
        except Exception:  # noqa: BLE001 - nothing should get here; if it does, say what
            import traceback

            log("internal error:\n%s" % traceback.format_exc())
        finally:
            sys.stderr.flush()
            os._exit(status)

    start_thread(run, "serve", daemon=False)
    return 0


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
    # Served from a thread, so that this script returns at once: CPython
    # keeps the syntax tree of the file it runs as a script (~2 KiB a line)
    # until the script returns, which for a server is its whole life; the
    # interpreter then waits for the thread, which ends the process. (Run
    # as a module or as the kvmfleet-mcp command, main() serves in place.)
    # The thread's own allocations come from a glibc malloc arena of its
    # own, so they reuse the freed tree only with MALLOC_ARENA_MAX=1.
    sys.exit(main(background=True))
