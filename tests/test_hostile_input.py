"""Hostile input on stdio, generated with hypothesis: the dispatcher in process, then the real process.

Every stdin line gets at most one stdout line, and it is JSON-RPC 2.0; every request with a readable id
gets exactly one reply with that id, in order; no REST call goes anywhere but its tool's own path, with
each id quoted into its one segment. CI (KVMFLEET_TESTS_STRICT=1) runs ten times as many examples.
"""
from __future__ import annotations

import json
import queue
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from typing import Any, List, Optional, Tuple
from urllib.parse import quote, unquote

import pytest
import responses
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

import kvmfleet_mcp as kv
from conftest import CANARY, INIT, MODERN_META, SERVER, STRICT, line, make_config, make_server, server_env

EXAMPLES: Counter = Counter()  # examples actually run
DISPATCHER = ("raw lines", "messages", "tool calls", "paths")


def budget(n: int) -> settings:
    """n examples on a laptop, ten times as many in CI."""
    return settings(max_examples=n * (10 if STRICT else 1), deadline=None, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much, HealthCheck.large_base_example])


# -- strategies: each built once, as hypothesis checks every new strategy object ----------------

HOSTILE = ["../", "..", "/", "?", "#", "%2F", "%2f", "%00", "%", "\\", "\n", "\r", "\t", "\x00", "\x1b", "\x7f",
           "\x85", "\u2028", "\u202e", "\ufeff", "\ud800", "\udfff", "é", "😀", " ", ":approve", "@", "&a=1", "+"]
PIECES = st.sampled_from(HOSTILE) | st.text(max_size=6)
TEXT = st.one_of(st.text(max_size=12), st.lists(PIECES, max_size=5).map("".join),
                 st.builds(lambda n, tail: "A" * n + tail, st.integers(100, 1 << 16), st.sampled_from(HOSTILE)))
INTS = st.one_of(st.integers(-3, 3), st.integers(), st.sampled_from([2**31, 2**53 + 1, 2**63, -2**63, 10**4000]))
FLOATS = st.floats(allow_nan=False, allow_infinity=False)  # NaN, Infinity and 1e400 come in ODD_LINES
SCALARS = st.one_of(st.none(), st.booleans(), INTS, FLOATS, TEXT)
KEYS = st.sampled_from(["id", "method", "params", "_meta", "name", "arguments"]) | TEXT
FLAT = st.one_of(SCALARS, st.lists(SCALARS, max_size=3), st.dictionaries(KEYS, SCALARS, max_size=3))
VALUES = st.one_of(FLAT, st.lists(FLAT, max_size=2), st.dictionaries(KEYS, FLAT, max_size=2))  # deeper: RAW_LINES
IDS = INTS | TEXT
ODD_IDS = st.one_of(st.none(), st.booleans(), FLOATS, st.lists(INTS, max_size=2), st.dictionaries(TEXT, INTS))
METHODS = ["initialize", "ping", "server/discover", "tools/list", "tools/call", "prompts/list", "prompts/get",
           "notifications/initialized", "notifications/cancelled", "resources/list", "", "PING", "tools/call\x00"]
METAS = st.one_of(  # the 2026-07-28 era's _meta, right or wrong in one way
    st.just(MODERN_META), st.just({kv.META_VERSION: "2026-07-28"}), VALUES,
    *(st.builds(lambda v, key=key: dict(MODERN_META, **{key: v}), values) for key, values in (
        (kv.META_VERSION, st.sampled_from(list(kv.LEGACY_VERSIONS) + ["2027-01-01", "2026-07-28 ", ""]) | VALUES),
        (kv.META_CAPABILITIES, VALUES), (kv.META_CLIENT, VALUES))))
WRONG_TYPE = {"string": st.one_of(INTS, FLOATS, st.booleans(), st.none(), st.lists(INTS, max_size=2)),
              "integer": st.one_of(TEXT, st.booleans(), st.none(), st.just(1.5), st.dictionaries(TEXT, INTS)),
              "boolean": st.one_of(INTS, TEXT, st.none(), st.just("true")),
              "array": st.one_of(TEXT, INTS, st.none(), st.just([]), st.just(["id", "id"]), st.just(["x"] * 17),
                                 st.lists(TEXT, min_size=1, max_size=3).filter(
                                     lambda names: not all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,63}", n)
                                                           for n in names)))}


def ecma(pattern: str) -> re.Pattern:
    """A table pattern as JSON Schema reads it (ECMA-262, where $ is the very end), for re.search."""
    return re.compile(re.sub(r"(?<!\\)\$(\(\?!\\n\))?", r"\\Z", pattern))


ALNUM = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
FAST = {  # what from_regex makes of the commonest patterns, at a fraction of the cost
    kv.ID_PATTERN: st.builds(str.__add__, st.sampled_from(ALNUM), st.text(ALNUM + "._~:@-", max_size=127)),
    kv.SINCE["pattern"]: st.one_of(  # RFC 3339, or a duration back from now
        st.builds(lambda t, frac, zone: time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + frac + zone,
                  st.integers(0, 2**35), st.sampled_from(["", ".5", ".123456789"]), st.sampled_from(["Z", "-05:30"])),
        st.builds("{}{}".format, st.integers(1, 9999), st.sampled_from("mhdw")),
    ).filter(ecma(kv.SINCE["pattern"]).search),
    kv.FIELD_PATTERN: st.builds(str.__add__, st.sampled_from(ALNUM[:52] + "_"), st.text(ALNUM + "_", max_size=63))}


def valid_value(schema: dict) -> st.SearchStrategy:
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    if schema["type"] == "array":
        return st.lists(valid_value(schema["items"]), min_size=schema["minItems"], max_size=schema["maxItems"],
                        unique=True)
    if schema["type"] != "string":
        return st.booleans() if schema["type"] == "boolean" else st.integers(schema["minimum"], schema["maximum"])
    if "pattern" in schema:
        return FAST[schema["pattern"]] if schema["pattern"] in FAST else st.from_regex(ecma(schema["pattern"]))
    low, high = schema["minLength"], schema["maxLength"]
    return st.one_of(st.text(min_size=low, max_size=min(high, 40)), st.just("x" * high),
                     st.lists(PIECES, min_size=1, max_size=4).map("".join).filter(lambda s: low <= len(s) <= high))


def invalid_value(schema: dict) -> st.SearchStrategy:
    """Values the schema surely refuses: wrong type, outside enum or bounds, hostile ids, too long or empty."""
    options = [WRONG_TYPE[schema["type"]]]
    if "enum" in schema:
        options.append(TEXT.filter(lambda s: s not in schema["enum"]))
    if schema["type"] == "integer":
        options += [st.integers(max_value=schema["minimum"] - 1), st.integers(min_value=schema["maximum"] + 1)]
    if "pattern" in schema:  # ../, /, ?, #, %2F, controls, a trailing newline, unicode, huge ...
        fits = ecma(schema["pattern"]).search
        options.append(st.builds(lambda a, b, c: a + b + c, st.sampled_from(["", "d1", "gr_1"]), PIECES | TEXT,
                                 st.sampled_from(["", "x", "\n", "/power", "%2F..%2F", "?a=1", "#x"]))
                       .filter(lambda s: not fits(s)))
    elif "maxLength" in schema:
        options += [st.just(""), st.integers(schema["maxLength"] + 1, 4 * schema["maxLength"]).map(lambda n: "y" * n)]
    return st.one_of(options)


MUTATIONS = st.sampled_from(["none", "none", "wrong value", "extra key", "missing", "not an object"])


def tool_arguments(tool: kv.Tool) -> st.SearchStrategy:
    """(arguments, valid): from the tool's schema, or mutated in one way so that they are surely invalid."""
    props = tool.properties
    valid = st.fixed_dictionaries({k: valid_value(props[k]) for k in tool.required},
                                  optional={k: valid_value(v) for k, v in props.items() if k not in tool.required})
    wrong = {k: invalid_value(v) for k, v in props.items()}
    names, required = st.sampled_from(sorted(props) or [""]), st.sampled_from(tool.required or ("",))
    extra = TEXT.filter(lambda k: k not in props)
    not_an_object = st.one_of(st.lists(VALUES, max_size=3), TEXT, INTS, st.booleans())

    @st.composite
    def arguments(draw: Any) -> Tuple[Any, bool]:
        args, how = draw(valid), draw(MUTATIONS)
        if how == "wrong value" and props:
            name = draw(names)
            args[name] = draw(wrong[name])
        elif how == "missing" and tool.required:
            del args[draw(required)]
        elif how == "extra key":
            args[draw(extra)] = draw(VALUES)
        elif how == "not an object":
            return draw(not_an_object), False
        else:
            return args, True
        return args, False

    return arguments()


TOOL_CALLS = st.one_of([st.tuples(st.just(tool), tool_arguments(tool)) for tool in kv.TOOLS])
RIGHT, DROP = st.sampled_from([True] * 5 + [False]), st.sampled_from([False] * 7 + [True])  # both shrink to right
METHOD, VERSIONS = st.sampled_from(METHODS), st.sampled_from(kv.SUPPORTED_VERSIONS + ("1999-01-01",))
CLIENT_INFO = st.just(INIT["clientInfo"]) | VALUES
PARAMS = st.dictionaries(st.sampled_from(["cursor", "name", "arguments"]), st.sampled_from(["fleet_status"]) | VALUES)


@st.composite
def messages(draw: Any) -> Any:
    """A JSON-RPC request, notification or response with any field possibly missing or wrong."""
    method = draw(METHOD if draw(RIGHT) else METHOD | TEXT | VALUES)
    if method == "tools/call":
        tool, (args, _) = draw(TOOL_CALLS)
        params = {"name": tool.name, "arguments": args} if draw(RIGHT) else draw(VALUES)
    elif method == "initialize":
        params = {"protocolVersion": draw(VERSIONS if draw(RIGHT) else VALUES), "clientInfo": draw(CLIENT_INFO)}
    else:
        params = draw(PARAMS if draw(RIGHT) else VALUES)
    if isinstance(params, dict) and draw(st.booleans()):
        params["_meta"] = MODERN_META if draw(RIGHT) else draw(METAS)
    message = {"jsonrpc": "2.0" if draw(RIGHT) else draw(VALUES), "id": draw(IDS if draw(RIGHT) else ODD_IDS),
               "method": method, "params": params}
    for key in list(message):
        if draw(DROP):
            del message[key]
    if draw(DROP):
        message[draw(st.sampled_from(["result", "error", "extra"]))] = draw(VALUES)
    return message


@st.composite
def encoded(draw: Any, values: st.SearchStrategy) -> bytes:
    if draw(st.booleans()):
        return json.dumps(draw(values)).encode()  # ASCII: lone surrogates as \ud800 escapes
    return json.dumps(draw(values), ensure_ascii=False).encode("utf-8", "surrogatepass")  # maybe invalid UTF-8


@st.composite
def damaged(draw: Any, lines: st.SearchStrategy) -> bytes:
    raw = draw(lines)
    at = draw(st.integers(0, len(raw)))
    return raw[:at] + draw(st.binary(max_size=3)) + raw[at + draw(st.integers(0, 3)):]


ODD_LINES = [b'{"jsonrpc":"2.0","id":1,"method":"ping","params":{"x":NaN}}', b'{"jsonrpc":"2.0","id":-Infinity}',
             b'{"jsonrpc":"2.0","id":1e400,"method":"ping"}', b'{"jsonrpc":"2.0","id":"\xed\xa0\x80","method":"ping"}',
             b'\xef\xbb\xbf{"jsonrpc":"2.0","id":1,"method":"ping"}', '{"id":1,"method":"ping"}'.encode("utf-16"),
             b'{"jsonrpc":"2.0","id":"\\udc00","method":"ping"}', b'{"jsonrpc":"2.0","id":1,"id":"2","method":"ping"}',
             b"\x00", b"null", b"[]", b"[[]]", b"{}", b" \t ", b"\x0b\x0c", b'{"jsonrpc":"2.0","id":null,"result":{}}']
MESSAGES = encoded(RIGHT.flatmap(lambda one: messages() if one else st.lists(messages() | VALUES, max_size=3)))
RAW_LINES = st.one_of(
    MESSAGES, damaged(MESSAGES), st.binary(max_size=200), st.sampled_from(ODD_LINES),
    st.builds(lambda n, t: t * n, st.integers(1, 200_000), st.sampled_from([b"[", b"{", b'{"a":', b'[{"id":'])),
    # Balanced nesting stays far from the parser's depth limit, which differs between this process and the server.
    st.integers(1, 200).map(lambda n: b'{"jsonrpc":"2.0","id":7,"method":"ping","params":{"a":%s}}'
                            % (b"[" * n + b"]" * n)),
    st.integers(1, 6000).map(lambda n: b'{"jsonrpc":"2.0","id":' + b"9" * n + b',"method":"ping"}'))
ERAS = st.sampled_from([None, "2025-11-25", kv.BATCH_VERSION])  # None: stateless 2026-07-28 requests only


def tools_call(call: Tuple[kv.Tool, Tuple[Any, bool]], request_id: Any, meta: Any = None) -> bytes:
    """A well-formed tools/call request for one generated (tool, (arguments, valid))."""
    params = {"name": call[0].name, "arguments": call[1][0]}
    return json.dumps({"jsonrpc": "2.0", "id": request_id, "method": "tools/call",
                       "params": params if meta is None else dict(params, _meta=meta)}).encode()


TOOL_CALL_LINES = st.builds(tools_call, TOOL_CALLS, IDS)


# -- what the server must answer -------------------------------------------------------------

ERROR_CODES = {kv.PARSE_ERROR, kv.INVALID_REQUEST, kv.METHOD_NOT_FOUND, kv.INVALID_PARAMS, kv.UNSUPPORTED_VERSION}
TEMPLATES = {t.name: re.compile(re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/?#]+)", re.escape(t.path))) for t in kv.TOOLS}
LONE_SURROGATE = re.compile("[\ud800-\udfff]")
SCOPE_PROBE = ("GET", "/v1/tokens/current")  # the server's own question: may this token write?


def stdin_line(raw: bytes) -> bytes:
    return raw.replace(b"\n", b" ") + b"\n"


def not_json(constant: str) -> None:
    raise ValueError("%s is not JSON" % constant)


def readable(request_id: Any) -> bool:
    return isinstance(request_id, (str, int)) and not isinstance(request_id, bool)


def reply_ids(message: Any) -> list:
    """The ids of the replies one decoded message must get: none for a notification or a client's response."""
    if not isinstance(message, dict):
        return [None]
    if "id" not in message or "method" not in message and ("result" in message or "error" in message):
        return []
    return [message["id"] if readable(message["id"]) else None]


def expected(raw: bytes, batches: bool) -> Optional[Tuple[bool, list]]:
    """What one stdin line must be answered with: None (no line), or (is it an array, the ids in order)."""
    if not raw.strip():
        return None
    if len(raw) > kv.MAX_LINE_BYTES + 1:  # the newline not counted
        return False, [None]
    try:
        message = json.loads(raw.decode("utf-8"), parse_constant=not_json)
    except (ValueError, RecursionError):
        return False, [None]
    if not isinstance(message, list):
        batch, ids = False, reply_ids(message)
    elif message and batches:
        batch, ids = True, [i for item in message for i in reply_ids(item)]
    else:
        batch, ids = False, [None]
    return (batch, ids) if ids else None


def decode(out: bytes) -> Any:
    """One stdout line: UTF-8 JSON, one JSON-RPC 2.0 response or a non-empty array of them, never -32603."""
    assert out.endswith(b"\n") and out.count(b"\n") == 1 and b"\r" not in out, out[:300]
    data = json.loads(out.decode("utf-8"))
    for reply in data if isinstance(data, list) and data else [data]:
        assert isinstance(reply, dict) and reply.get("jsonrpc") == "2.0", data
        assert set(reply) in ({"jsonrpc", "id", "result"}, {"jsonrpc", "id", "error"}), reply
        assert reply["id"] is None or readable(reply["id"])
        if "error" in reply:
            assert set(reply["error"]) <= {"code", "message", "data"} and isinstance(reply["error"]["message"], str)
            assert type(reply["error"]["code"]) is int and reply["error"]["code"] in ERROR_CODES, reply
        else:
            assert isinstance(reply["result"], dict)
    return data


def shape(data: Any) -> Tuple[bool, list]:
    return (True, [r["id"] for r in data]) if isinstance(data, list) else (False, [data["id"]])


def outcome(data: Any) -> str:
    """For pytest --hypothesis-show-statistics."""
    if not isinstance(data, dict):
        return "array" if data else "no reply"
    return "result" if "result" in data else "error %d" % data["error"]["code"]


def same(got: Any, want: Any) -> bool:
    return json.dumps(got) == json.dumps(want)  # unlike ==, tells 1 from true and 1.0


def check_request(method: str, path: str, body: Any) -> Optional[re.Match]:
    """A REST call goes to exactly one tool's method and path template, printable ASCII, without confirm."""
    if (method, path) == SCOPE_PROBE:
        return None
    assert re.fullmatch(r"[!-~]+", path) and not {"", ".", ".."} & set(path[1:].split("/")), path
    tools = [t for t in kv.TOOLS if t.method == method and TEMPLATES[t.name].fullmatch(path)]
    assert len(tools) == 1 and not (isinstance(body, dict) and "confirm" in body), (method, path, body)
    return TEMPLATES[tools[0].name].fullmatch(path)


class RecordingPlatform:
    """Stands in for the network: records each REST call and answers 200 {}."""

    def __init__(self, config: kv.Config) -> None:
        self.config, self.calls = config, []

    def call(self, method: str, path: str, query: Any, body: Any, client: str = "", write: bool = False,
             **options: Any) -> kv.Reply:
        if (method, path) == SCOPE_PROBE:
            return kv.Reply(200, "OK", b'{"scope": "write"}', "")
        self.calls.append((method, path, query, body))
        return kv.Reply(200, "OK", b"{}", "")

    def write_wait(self) -> float:
        return 0.0  # a fresh server each example: never near the write rate


def fresh_server(era: Optional[str], writes: bool = True) -> kv.Server:
    """make_server's server, on the recording platform from the start (make_server's mocks cost ~2 ms)."""
    config = make_config(KVMFLEET_MCP_ALLOW_WRITES="true" if writes else "")
    server = kv.Server(config, RecordingPlatform(config))
    assert not era or "result" in server.handle({"jsonrpc": "2.0", "id": 0, "method": "initialize",
                                                 "params": dict(INIT, protocolVersion=era)})
    return server


def feed(server: kv.Server, era: Optional[str], lines: List[bytes]) -> None:
    """Each line through handle_line: it never raises, answers as `expected` says, calls only tool paths."""
    for raw in map(stdin_line, lines):
        if not raw.strip():
            continue  # serve() skips blank lines
        before = len(server.platform.calls)
        out = server.handle_line(raw)
        data = None if out is None else decode(out)
        event(outcome(data))
        assert same(data and shape(data), expected(raw, era == kv.BATCH_VERSION)), (raw[:300], out and out[:300])
        era = data["result"].get("protocolVersion", era) if isinstance(data, dict) and "result" in data else era
        for method, path, _, body in server.platform.calls[before:]:
            check_request(method, path, body)
        assert data or len(server.platform.calls) == before  # a notification does nothing


# -- the dispatcher, in process ----------------------------------------------------------------

@budget(250)
@given(era=ERAS, raw=RAW_LINES)
def test_any_line_gets_at_most_one_json_rpc_line_back_and_never_an_exception(era, raw):
    EXAMPLES["raw lines"] += 1
    feed(fresh_server(era), era, [raw])


@budget(250)
@given(era=ERAS, writes=st.booleans(), lines=st.lists(MESSAGES, min_size=1, max_size=2))
def test_every_request_with_a_readable_id_gets_exactly_one_reply_with_that_id(era, writes, lines):
    EXAMPLES["messages"] += 1
    feed(fresh_server(era, writes), era, lines)


@budget(400)
@given(era=ERAS, writes=st.booleans(), call=TOOL_CALLS, meta=st.just(MODERN_META) | METAS, request_id=IDS)
def test_only_valid_approved_tool_calls_reach_the_platform_each_id_quoted_into_its_segment(
        era, writes, call, meta, request_id):
    EXAMPLES["tool calls"] += 1
    tool, (args, valid) = call
    # Not Unicode, not valid; a surrogate pair, though, is one character once the server has read the JSON.
    valid = valid and not LONE_SURROGATE.search(json.dumps(json.loads(json.dumps(args)), ensure_ascii=False))
    counting = isinstance(args, dict) and "count_by" in args
    valid = valid and not (counting and "cursor" in args)  # count_by reads every page itself
    # A duration is relative to now: with a cursor, the next page would have another window.
    valid = valid and not (isinstance(args, dict) and "cursor" in args and any(
        re.fullmatch(r"[1-9][0-9]{0,3}[mhdw]", str(args.get(name))) for name in ("since", "until")))
    server = fresh_server(era, writes)
    reply = decode(server.handle_line(stdin_line(tools_call(call, request_id, meta))))
    assert same(reply["id"], request_id)
    # A request stamped 2026-07-28 is served by that revision's rules in either era.
    stamped = isinstance(meta, dict) and meta.get(kv.META_VERSION) == "2026-07-28"
    modern = stamped and isinstance(meta.get(kv.META_CAPABILITIES), dict)
    reached = (modern or era is not None and not stamped) and (writes or not tool.write)
    gated = tool.confirm == kv.ALWAYS or isinstance(tool.confirm, tuple) and isinstance(args, dict) and args.get(
        tool.confirm[0]) in tool.confirm[1]
    approved = not gated or isinstance(args, dict) and args.get("confirm") is True
    # A gated call that is not approved makes only the reads of its impact preview.
    previews = [c for c in server.platform.calls if gated and c[0] == "GET"]
    calls = [c for c in server.platform.calls if c not in previews]
    event("sent" if calls else "invalid" if not valid else "not approved" if reached else outcome(reply))
    assert len(calls) == (1 if reached and valid and approved else 0), (reply, calls)
    assert bool(previews) == (reached and valid and gated and not approved), previews
    for method, path, _, body in previews:
        check_request(method, path, body)
    if calls and counting:  # {} is no page: the count stops at its first one and says so
        assert reply["result"]["isError"] and "Counting stopped at page 1: 0 pages (0 items)" in json.dumps(reply)
        assert dict(calls[0][2])["limit"] == "500" and "cursor" not in dict(calls[0][2])
    elif calls:
        assert reply["result"]["content"][0]["text"].startswith("{}") and "isError" not in reply["result"]
    if calls:
        method, path, query, body = calls[0]
        assert method == tool.method and TEMPLATES[tool.name].fullmatch(path)
        segments = check_request(method, path, body).groupdict()
        assert segments == {name: quote(args[name], safe="") for name in segments}
        assert all(unquote(segment) == args[name] for name, segment in segments.items())
        sent = set(body or {}) | {name for name, _ in query or []}
        assert not sent & {"confirm", "fields", "count_by", *segments}
        assert sent <= set(tool.properties) | {k for k, _ in tool.fixed_query}
    elif reached and isinstance(args, dict):
        text = reply["result"]["content"][0]["text"]
        assert reply["result"]["isError"] and text.startswith("Not done:" if valid else "Invalid arguments")
    else:
        assert "error" in reply


ANY_ID = st.lists(st.sampled_from(HOSTILE) | st.text(min_size=1, max_size=6), min_size=1, max_size=6).map("".join)


@budget(100)
@given(tool=st.sampled_from([t for t in kv.TOOLS if "{" in t.path]),
       ident=ANY_ID.filter(lambda s: s not in (".", "..") and not LONE_SURROGATE.search(s)))
def test_build_path_keeps_any_id_inside_its_own_segment(tool, ident):
    # Defence in depth: even an id the schema refuses stays in its segment. Only the schema (an id starts
    # with a letter or digit) keeps out "." and "..", which URL libraries collapse, and lone surrogates.
    EXAMPLES["paths"] += 1
    path = kv.build_path(tool.path, {name: ident for name in TEMPLATES[tool.name].groupindex})
    segments = check_request(tool.method, path, None).groupdict()
    assert segments == {name: quote(ident, safe="") for name in segments}


# -- the real process --------------------------------------------------------------------------

def test_the_real_process_answers_a_generated_stream_line_for_line_and_exits_0(platform):
    env = server_env(platform.url, "kvmf_demo_admin", KVMFLEET_MCP_ALLOW_WRITES="true")
    proc = subprocess.Popen([sys.executable, SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    stdout: List[bytes] = []
    stderr: List[bytes] = []
    replies: queue.Queue = queue.Queue()
    deadline = time.monotonic() + (150 if STRICT else 60)

    def read_stdout() -> None:
        for out in proc.stdout:
            stdout.append(out)
            replies.put(out)
        replies.put(b"")

    def exchange(lines: List[bytes]) -> List[Any]:
        """Write lines and a sentinel ping from a thread; read the decoded replies up to the sentinel's."""
        sentinel = {"jsonrpc": "2.0", "id": "sentinel-%d" % len(stdout), "method": "ping"}
        payload = b"".join(lines) + line(sentinel)
        writer = threading.Thread(target=lambda: (proc.stdin.write(payload), proc.stdin.flush()))
        writer.start()
        got = []
        while True:
            out = replies.get(timeout=max(deadline - time.monotonic(), 0.1))
            assert out, "the server closed stdout; stderr: %r" % b"".join(stderr)[-2000:]
            data = decode(out)
            if data == {"jsonrpc": "2.0", "id": sentinel["id"], "result": {}}:
                writer.join()
                return got
            got.append(data)

    @budget(10)  # well-formed tool calls too, so that a good many reach the demo platform
    @given(lines=st.lists(st.one_of(RAW_LINES, MESSAGES, TOOL_CALL_LINES).map(stdin_line), min_size=20, max_size=40))
    def stream(lines):
        EXAMPLES["process lines"] += len(lines)
        got = exchange(lines)
        for data in got:
            event(outcome(data))
        assert same([shape(data) for data in got], [w for w in (expected(raw, True) for raw in lines) if w])

    @settings(budget(1), max_examples=2 if STRICT else 1)
    @example(size=kv.MAX_LINE_BYTES, over=1)
    @given(size=st.integers(2 << 20, kv.MAX_LINE_BYTES), over=st.integers(1, 1 << 20))
    def several_megabytes(size, over):
        def request(size: int, request_id: str) -> bytes:  # size bytes before the newline
            head = '{"jsonrpc":"2.0","id":"%s","method":"tools/call","params":{"name":"list_devices","arguments":{"q":"'
            return (head % request_id + "q" * (size - len(head % request_id) - 4) + '"}}}\n').encode()

        under, beyond = exchange([request(size, "big"), request(kv.MAX_LINE_BYTES + over, "lost")])
        assert under["id"] == "big" and under["result"]["isError"]
        assert under["result"]["content"][0]["text"].startswith("Invalid arguments for list_devices at q:")
        assert beyond["id"] is None and beyond["error"]["code"] == kv.INVALID_REQUEST
        assert "longer than %d bytes" % kv.MAX_LINE_BYTES in beyond["error"]["message"]

    readers = [threading.Thread(target=read_stdout), threading.Thread(target=lambda: stderr.append(proc.stderr.read()))]
    for reader in readers:
        reader.start()
    try:
        init = {"protocolVersion": kv.BATCH_VERSION, "capabilities": {}, "clientInfo": {"name": "hypothesis"}}
        first = exchange([line({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": init})])
        assert [shape(data) for data in first] == [(False, [0])]
        stream()
        several_megabytes()
        assert exchange([]) == [] and proc.poll() is None  # still alive, and the final ping is answered
        proc.stdin.close()
        assert proc.wait(timeout=max(deadline - time.monotonic(), 5)) == 0
        for reader in readers:
            reader.join(timeout=10)
        assert replies.get(timeout=1) == b""  # nothing after the last reply
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert b"kvmf_demo_admin" not in b"".join(stdout + stderr) and CANARY.encode() not in b"".join(stdout + stderr)
    for request in platform.requests:
        check_request(request["method"], request["path"], request["body"])
    platform.reset()  # the stream may have powered devices off, with confirm: true
    assert EXAMPLES["process lines"] >= (2000 if STRICT else 200)


def test_ci_generates_at_least_10000_dispatcher_cases():
    if not all(EXAMPLES[name] for name in DISPATCHER):
        pytest.skip("counts only when the whole module runs")
    assert sum(EXAMPLES[name] for name in DISPATCHER) >= (10_000 if STRICT else 1_000), EXAMPLES


# -- what these properties found, each fixed since: regression tests ----------------------------

def test_an_id_with_a_trailing_newline_is_refused_before_anything_is_sent():
    # Python's $ also matches before a final newline: "d1\n" passed ^...$ and went out as /v1/devices/d1%0A.
    server = fresh_server("2025-11-25")
    reply = decode(server.handle_line(line({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {
        "name": "get_device_health", "arguments": {"device_id": "d1\n"}}})))
    assert server.platform.calls == [] and reply["result"]["isError"]


@pytest.mark.parametrize("name,arguments", [("list_devices", {"q": "\ud800"}),
                                            ("deny_access", {"grant_id": "gr_1", "reason": "\udfff"})])
@responses.activate
def test_a_lone_surrogate_in_a_text_argument_is_a_tool_error_not_an_internal_error(name, arguments):
    # It passed the schema, then failed to encode as UTF-8 in Platform.call: -32603, a traceback on stderr.
    reply = decode(make_server(writes=True).handle_line(line({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                                                              "params": {"name": name, "arguments": arguments}})))
    assert reply["result"]["isError"] and len(responses.calls) == 0


def test_a_client_error_response_with_a_null_id_gets_no_reply():
    # JSON-RPC error responses may carry id null; answering one with -32600 invites an error ping-pong.
    assert make_server().handle_line(b'{"jsonrpc":"2.0","id":null,"error":{"code":-32700,"message":"x"}}\n') is None


@pytest.mark.parametrize("name", [["fleet_status"], {"a": 1}])
def test_an_unhashable_prompt_name_is_invalid_params(name):
    # prompts/get looked the name up in a dict before checking its type: TypeError, answered with -32603.
    reply = decode(make_server().handle_line(line({"jsonrpc": "2.0", "id": 1, "method": "prompts/get",
                                                   "params": {"name": name}})))
    assert reply["error"]["code"] == kv.INVALID_PARAMS
