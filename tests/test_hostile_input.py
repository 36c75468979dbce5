"""Hostile input on stdio, generated: the dispatcher and the real process against hypothesis.

Every stdin line gets at most one stdout line, which is JSON-RPC 2.0; every request with a readable id
gets exactly one reply with that id, in order; no REST call goes anywhere but a tool's own path, with
each id quoted into its one segment. CI (KVMFLEET_TESTS_STRICT=1) runs ten times the examples.
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
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import kvmfleet_mcp as kv
from conftest import CANARY, INIT, MODERN_META, SERVER, STRICT, line, make_server, server_env

EXAMPLES: Counter = Counter()  # examples actually run, per test
DISPATCHER = ("raw lines", "messages", "tool calls", "paths")


def budget(n: int) -> settings:
    """n examples on a laptop, ten times as many in CI."""
    return settings(max_examples=n * (10 if STRICT else 1), deadline=None, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much, HealthCheck.large_base_example])


# -- strategies ----------------------------------------------------------------

HOSTILE = ["../", "..", "/", "?", "#", "%2F", "%2f", "%00", "%", "\\", "\n", "\r", "\t", "\x00", "\x1b", "\x7f",
           "\x85", "\u2028", "\u202e", "\ufeff", "\ud800", "\udfff", "é", "😀", " ", ":approve", "@", "&a=1", "+"]
PIECES = st.one_of(st.sampled_from(HOSTILE), st.text(max_size=6))
TEXT = st.one_of(st.text(max_size=12), st.lists(PIECES, max_size=5).map("".join),
                 st.builds(lambda n, tail: "A" * n + tail, st.integers(100, 1 << 16), st.sampled_from(HOSTILE)))
INTS = st.one_of(st.integers(-3, 3), st.integers(), st.sampled_from([2**31, 2**53 + 1, 2**63, -2**63, 10**4000]))
FLOATS = st.floats(allow_nan=False, allow_infinity=False)
SCALARS = st.one_of(st.none(), st.booleans(), INTS, FLOATS, TEXT)
KEYS = st.sampled_from(["id", "method", "params", "_meta", "name", "arguments", "x"]) | TEXT
FLAT = st.one_of(SCALARS, st.lists(SCALARS, max_size=3), st.dictionaries(KEYS, SCALARS, max_size=3))
VALUES = st.one_of(FLAT, st.lists(FLAT, max_size=2), st.dictionaries(KEYS, FLAT, max_size=2))  # deeper: RAW_LINES
IDS = st.one_of(INTS, TEXT, SCALARS, st.lists(st.integers(), max_size=2), st.dictionaries(TEXT, INTS, max_size=2))
METHODS = ["initialize", "ping", "server/discover", "tools/list", "tools/call", "notifications/initialized",
           "notifications/cancelled", "resources/list", "", "PING", "tools/call\x00", "tools/list/../call"]
METAS = st.one_of(  # the 2026-07-28 era's _meta: right, or wrong in one way
    st.just(MODERN_META),
    st.builds(lambda v: dict(MODERN_META, **{kv.META_VERSION: v}),
              st.sampled_from(list(kv.LEGACY_VERSIONS) + ["2027-01-01", "2026-07-28 ", ""]) | VALUES),
    st.builds(lambda v: dict(MODERN_META, **{kv.META_CAPABILITIES: v}), VALUES),
    st.builds(lambda v: dict(MODERN_META, **{kv.META_CLIENT: v}), VALUES),
    st.just({kv.META_VERSION: "2026-07-28"}), VALUES)
WRONG_TYPE = {"string": st.one_of(INTS, FLOATS, st.booleans(), st.none(), st.lists(INTS, max_size=2)),
              "integer": st.one_of(TEXT, st.booleans(), st.none(), st.just(1.5), st.dictionaries(TEXT, INTS)),
              "boolean": st.one_of(INTS, TEXT, st.none(), st.just("true"))}


ALNUM = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
FAST_PATTERNS = {  # what from_regex would make of the common patterns, at a fraction of the cost
    kv.ID_PATTERN: st.builds(str.__add__, st.sampled_from(ALNUM), st.text(ALNUM + "._~:@-", max_size=127)),
    kv.RFC3339_PATTERN: st.builds(lambda t, frac, zone: time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + frac + zone,
                                  st.integers(0, 2**35), st.sampled_from(["", ".5", ".123456789"]),
                                  st.sampled_from(["Z", "+00:00", "-05:30"]))}


def valid_value(schema: dict) -> st.SearchStrategy:
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    if schema["type"] == "boolean":
        return st.booleans()
    if schema["type"] == "integer":
        return st.integers(schema["minimum"], schema["maximum"])
    if schema.get("pattern") in FAST_PATTERNS:
        return FAST_PATTERNS[schema["pattern"]]
    if "pattern" in schema:
        return st.from_regex(ecma(schema["pattern"]), fullmatch=True)
    low, high = schema["minLength"], schema["maxLength"]
    return st.one_of(st.text(min_size=low, max_size=min(high, 40)), st.just("x" * high),
                     st.lists(PIECES, min_size=1, max_size=4).map("".join).filter(lambda s: low <= len(s) <= high))


def ecma(pattern: str) -> str:
    """A table pattern as a Python fullmatch pattern: JSON Schema's (ECMA-262) ^ and $ are the ends of the string."""
    return re.sub(r"^\^|\$(\(\?!\\n\))?$", "", pattern)


def hostile_id(pattern: str) -> st.SearchStrategy:
    """Strings the pattern refuses: ../, /, ?, #, %2F, controls, a trailing newline, unicode, huge ..."""
    made = st.builds(lambda a, b, c: a + b + c, st.sampled_from(["", "d1", "dev_srv_pdx_3", "gr_1"]),
                     PIECES | TEXT, st.sampled_from(["", "x", "\n", "/power", "%2F..%2F", "?a=1", "#x"]))
    body = re.compile(ecma(pattern))
    return made.filter(lambda s: not body.fullmatch(s))


def invalid_value(schema: dict) -> st.SearchStrategy:
    options = [WRONG_TYPE[schema["type"]]]
    if "enum" in schema:
        options.append(TEXT.filter(lambda s: s not in schema["enum"]))
    if schema["type"] == "integer":
        options += [st.integers(max_value=schema["minimum"] - 1), st.integers(min_value=schema["maximum"] + 1)]
    if "pattern" in schema:
        options.append(hostile_id(schema["pattern"]))
    elif "maxLength" in schema:
        options += [st.just(""), st.integers(schema["maxLength"] + 1, 4 * schema["maxLength"]).map(lambda n: "y" * n)]
    return st.one_of(options)


# Every strategy is built once: hypothesis validates each new strategy object on its first draw.
MUTATIONS = st.sampled_from(["none", "none", "wrong value", "extra key", "missing", "not an object"])
NOT_AN_OBJECT = st.one_of(st.lists(VALUES, max_size=3), TEXT, INTS, st.booleans())


def tool_arguments(tool: kv.Tool) -> st.SearchStrategy:
    """Arguments from the tool's schema, maybe mutated so that they are surely invalid; (arguments, valid)."""
    props = tool.properties
    valid = st.fixed_dictionaries({k: valid_value(props[k]) for k in tool.required},
                                  optional={k: valid_value(v) for k, v in props.items() if k not in tool.required})
    wrong = {k: invalid_value(v) for k, v in props.items()}
    names, required = st.sampled_from(sorted(props) or [""]), st.sampled_from(tool.required or ("",))
    extra_key = TEXT.filter(lambda k: k not in props)

    @st.composite
    def arguments(draw: Any) -> Tuple[Any, bool]:
        args, how = draw(valid), draw(MUTATIONS)
        if how == "wrong value" and props:
            name = draw(names)
            args[name] = draw(wrong[name])
        elif how == "missing" and tool.required:
            del args[draw(required)]
        elif how == "extra key":
            args[draw(extra_key)] = draw(VALUES)
        elif how == "not an object":
            return draw(NOT_AN_OBJECT), False
        else:
            return args, True
        return args, False

    return arguments()


TOOL_CALLS = st.one_of([st.tuples(st.just(tool), tool_arguments(tool)) for tool in kv.TOOLS])
COIN = st.integers(0, 3)  # 0: the wrong kind of value, one time in four
JSONRPC, METHOD, ANY_METHOD = st.just("2.0"), st.sampled_from(METHODS), st.sampled_from(METHODS) | TEXT | VALUES
VERSIONS = st.sampled_from(kv.SUPPORTED_VERSIONS + ("1999-01-01",))
CLIENT_INFO, PARAMS = st.just(INIT["clientInfo"]) | VALUES, st.dictionaries(st.sampled_from(["cursor", "x"]), VALUES)
KEY_DROP, EXTRA = st.integers(0, 6), st.sampled_from(["result", "error", "extra"])


@st.composite
def messages(draw: Any) -> Any:
    """A JSON-RPC request, notification or response with any field possibly missing or wrong."""
    method = draw(METHOD if draw(COIN) else ANY_METHOD)
    if method == "tools/call":
        tool, (args, _) = draw(TOOL_CALLS)
        params = {"name": tool.name, "arguments": args} if draw(COIN) else draw(VALUES)
    elif method == "initialize":
        params = {"protocolVersion": draw(VERSIONS if draw(COIN) else VALUES), "capabilities": {},
                  "clientInfo": draw(CLIENT_INFO)}
    else:
        params = draw(PARAMS if draw(COIN) else VALUES)
    if isinstance(params, dict) and draw(st.booleans()):
        params["_meta"] = draw(METAS)
    message = {"jsonrpc": draw(JSONRPC if draw(COIN) else VALUES), "id": draw(IDS), "method": method,
               "params": params}
    for key in list(message):
        if draw(KEY_DROP) == 0:
            del message[key]
    if draw(KEY_DROP) == 0:
        message[draw(EXTRA)] = draw(VALUES)
    return message


@st.composite
def encoded(draw: Any, values: st.SearchStrategy) -> bytes:
    value = draw(values)
    if draw(st.booleans()):
        return json.dumps(value).encode()  # ASCII, lone surrogates as \ud800 escapes
    return json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")  # raw UTF-8, or invalid UTF-8


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
MESSAGES = encoded(st.one_of(messages(), st.lists(messages() | VALUES, max_size=3)))  # batches too
RAW_LINES = st.one_of(
    MESSAGES, damaged(MESSAGES), st.binary(max_size=200), st.sampled_from(ODD_LINES),
    st.builds(lambda n, t: t * n, st.integers(1, 200_000), st.sampled_from([b"[", b"{", b'{"a":', b'[{"id":'])),
    # Balanced nesting stays far below the parser's depth limit, which differs between this process and the server.
    st.integers(1, 200).map(lambda n: b'{"jsonrpc":"2.0","id":7,"method":"ping","params":{"a":%s}}' % (b"[" * n + b"]" * n)),
    st.integers(1, 6000).map(lambda n: b'{"jsonrpc":"2.0","id":' + b"9" * n + b',"method":"ping"}'))
ERAS = st.sampled_from([None, "2025-11-25", kv.BATCH_VERSION])  # None: stateless 2026-07-28 requests only


def stdin_line(raw: bytes) -> bytes:
    return raw.replace(b"\n", b" ") + b"\n"


# -- what the server must answer ------------------------------------------------

ERROR_CODES = {kv.PARSE_ERROR, kv.INVALID_REQUEST, kv.METHOD_NOT_FOUND, kv.INVALID_PARAMS, kv.UNSUPPORTED_VERSION}
TEMPLATES = {t.name: re.compile(re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/?#]+)", re.escape(t.path))) for t in kv.TOOLS}
PRINTABLE_ASCII = re.compile(r"[!-~]+")
LONE_SURROGATE = re.compile("[\ud800-\udfff]")


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
    if len(raw.rstrip(b"\n")) > kv.MAX_LINE_BYTES:
        return False, [None]

    def not_json(name: str) -> None:
        raise ValueError(name)

    try:
        message = json.loads(raw.decode("utf-8"), parse_constant=not_json)
    except (ValueError, RecursionError):
        return False, [None]
    if isinstance(message, list) and message and batches:
        ids = [i for item in message for i in reply_ids(item)]
        return (True, ids) if ids else None
    ids = [None] if isinstance(message, list) else reply_ids(message)
    return (False, ids) if ids else None


def decode(out: bytes) -> Any:
    """One stdout line: UTF-8 JSON holding one JSON-RPC 2.0 response or a non-empty array of them."""
    assert out.endswith(b"\n") and out.count(b"\n") == 1 and b"\r" not in out, out[:300]
    data = json.loads(out.decode("utf-8"))
    for reply in data if isinstance(data, list) and data else [data]:
        assert isinstance(reply, dict) and reply.get("jsonrpc") == "2.0", data
        assert set(reply) in ({"jsonrpc", "id", "result"}, {"jsonrpc", "id", "error"}), reply
        assert reply["id"] is None or readable(reply["id"])
        if "result" in reply:
            assert isinstance(reply["result"], dict)
        else:
            error = reply["error"]
            assert set(error) <= {"code", "message", "data"} and isinstance(error["message"], str)
            assert type(error["code"]) is int and error["code"] in ERROR_CODES, reply  # never -32603
    return data


def shape(data: Any) -> Tuple[bool, list]:
    return (True, [r["id"] for r in data]) if isinstance(data, list) else (False, [data["id"]])


def same(got: Any, want: Any) -> bool:
    return json.dumps(got) == json.dumps(want)  # unlike ==, tells 1 from true and 1.0


def check_request(method: str, path: str, body: Any) -> re.Match:
    """A REST call goes to exactly one tool's method and path template, printable ASCII, without confirm."""
    assert PRINTABLE_ASCII.fullmatch(path) and not {"", ".", ".."} & set(path[1:].split("/")), path
    tools = [t for t in kv.TOOLS if t.method == method and TEMPLATES[t.name].fullmatch(path)]
    assert len(tools) == 1, (method, path)
    assert not (isinstance(body, dict) and "confirm" in body), body
    return TEMPLATES[tools[0].name].fullmatch(path)


def needs_approval(tool: kv.Tool, args: dict) -> bool:
    if isinstance(tool.confirm, tuple):
        return args.get(tool.confirm[0]) in tool.confirm[1]
    return tool.confirm == kv.ALWAYS


class RecordingPlatform:
    """Stands in for the network: records each REST call and answers 200 {}."""

    def __init__(self, config: kv.Config) -> None:
        self.config, self.calls = config, []

    def call(self, method: str, path: str, query: Any = None, body: Any = None, client: str = "",
             write: bool = False) -> kv.Reply:
        self.calls.append((method, path, query, body))
        return kv.Reply(200, "OK", b"{}", "")


def fresh_server(era: Optional[str], writes: bool = True) -> kv.Server:
    server = make_server(writes=writes, initialize=era)
    server.platform = RecordingPlatform(server.config)
    return server


def feed(server: kv.Server, era: Optional[str], lines: List[bytes]) -> None:
    """Each line through handle_line: never raises, answers as `expected` says, calls only tool paths."""
    for raw in map(stdin_line, lines):
        if not raw.strip():
            continue  # serve() skips blank lines before handle_line
        before = len(server.platform.calls)
        out = server.handle_line(raw)
        data = None if out is None else decode(out)
        assert same(data and shape(data), expected(raw, era == kv.BATCH_VERSION)), (raw[:300], out and out[:300])
        if isinstance(data, dict) and "protocolVersion" in data.get("result", {}):
            era = data["result"]["protocolVersion"]
        for method, path, _, body in server.platform.calls[before:]:
            check_request(method, path, body)
        assert data or len(server.platform.calls) == before  # a notification does nothing


# -- the dispatcher, in process ----------------------------------------------------

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
@given(era=ERAS, writes=st.booleans(), call=TOOL_CALLS, meta=st.just(MODERN_META) | METAS,
       request_id=st.integers() | st.text(max_size=8))
def test_only_valid_approved_tool_calls_reach_the_platform_each_id_quoted_into_its_segment(era, writes, call, meta,
                                                                                          request_id):
    EXAMPLES["tool calls"] += 1
    tool, (args, valid) = call
    valid = valid and not LONE_SURROGATE.search(json.dumps(args, ensure_ascii=False))  # not Unicode, so not valid
    server = fresh_server(era, writes)
    params = {"name": tool.name, "arguments": args, "_meta": meta}
    reply = decode(server.handle_line(line({"jsonrpc": "2.0", "id": request_id, "method": "tools/call", "params": params})))
    assert same(reply["id"], request_id)
    modern = isinstance(meta, dict) and meta.get(kv.META_VERSION) == "2026-07-28" and isinstance(
        meta.get(kv.META_CAPABILITIES), dict)
    reached = (era is not None or modern) and (writes or not tool.write)
    approved = not (isinstance(args, dict) and needs_approval(tool, args) and args.get("confirm") is not True)
    calls = server.platform.calls
    assert len(calls) == (1 if reached and valid and approved else 0), (reply, calls)
    if calls:
        assert reply["result"]["content"] == [{"type": "text", "text": "{}"}] and "isError" not in reply["result"]
        method, path, query, body = calls[0]
        segments = check_request(method, path, body).groupdict()
        assert method == tool.method and TEMPLATES[tool.name].fullmatch(path)
        for name, segment in segments.items():
            assert segment == quote(args[name], safe="") and unquote(segment) == args[name]
        sent = set(body or {}) | {name for name, _ in query or []}
        assert not sent & (set(segments) | {"confirm"}) and sent <= set(tool.properties) | {k for k, _ in tool.fixed_query}
    elif reached and isinstance(args, dict):
        text = reply["result"]["content"][0]["text"]
        assert reply["result"]["isError"] and text.startswith("Invalid arguments" if not valid else "Not done:")
    else:
        assert "error" in reply


@budget(100)
@given(tool=st.sampled_from([t for t in kv.TOOLS if "{" in t.path]),
       ident=st.lists(PIECES, min_size=1, max_size=6).map("".join).filter(
           lambda s: s not in ("", ".", "..") and not LONE_SURROGATE.search(s)))
def test_build_path_keeps_any_id_inside_its_own_segment(tool, ident):
    # Defence in depth: even an id the schema refuses stays in its segment. Only the schema (an id starts with
    # a letter or digit) keeps out "", "." and "..", which URL libraries collapse, and lone surrogates.
    EXAMPLES["paths"] += 1
    args = {name: ident for name in TEMPLATES[tool.name].groupindex}
    path = kv.build_path(tool.path, dict(args))
    assert check_request(tool.method, path, None).groupdict() == {name: quote(ident, safe="") for name in args}


# -- the real process ---------------------------------------------------------------

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
        sentinel = "sentinel-%d" % len(stdout)
        writer = threading.Thread(target=lambda: (proc.stdin.write(b"".join(lines) + line(
            {"jsonrpc": "2.0", "id": sentinel, "method": "ping"})), proc.stdin.flush()))
        writer.start()
        got = []
        while True:
            out = replies.get(timeout=max(deadline - time.monotonic(), 0.1))
            assert out, "the server closed stdout; stderr so far: %r" % b"".join(stderr)[-2000:]
            data = decode(out)
            if data == {"jsonrpc": "2.0", "id": sentinel, "result": {}}:
                writer.join()
                return got
            got.append(data)

    readers = [threading.Thread(target=read_stdout), threading.Thread(target=lambda: stderr.append(proc.stderr.read()))]
    for reader in readers:
        reader.start()
    try:
        init = {"protocolVersion": kv.BATCH_VERSION, "capabilities": {}, "clientInfo": {"name": "hypothesis"}}
        assert shape(exchange([line({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": init})])[0]) == (False, [0])

        @budget(10)
        @given(lines=st.lists(st.one_of(RAW_LINES, MESSAGES).map(stdin_line).filter(lambda s: b'"confirm": true' not in s),
                              min_size=20, max_size=40))
        def stream(lines):
            EXAMPLES["process lines"] += len(lines)
            want = [w for w in (expected(raw, batches=True) for raw in lines) if w is not None]
            assert same([shape(data) for data in exchange(lines)], want)

        @settings(budget(1), max_examples=2 if STRICT else 1)
        @example(size=kv.MAX_LINE_BYTES, over=1)
        @given(size=st.integers(2 << 20, kv.MAX_LINE_BYTES), over=st.integers(1, 1 << 20))
        def several_megabytes(size, over):
            def request(size: int, request_id: str) -> bytes:
                head = '{"jsonrpc":"2.0","id":"%s","method":"tools/call","params":{"name":"list_devices","arguments":{"q":"' % request_id
                return (head + "q" * (size - len(head) - 4) + '"}}}\n').encode()

            under, beyond = exchange([request(size, "big"), request(kv.MAX_LINE_BYTES + over, "lost")])
            assert under["id"] == "big" and under["result"]["isError"]
            assert under["result"]["content"][0]["text"].startswith("Invalid arguments for list_devices at q:")
            assert beyond["id"] is None and beyond["error"]["code"] == kv.INVALID_REQUEST
            assert "longer than %d bytes" % kv.MAX_LINE_BYTES in beyond["error"]["message"]

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
    for token in (b"kvmf_demo_admin", CANARY.encode()):
        assert token not in b"".join(stdout) + b"".join(stderr)
    for request in platform.requests:
        check_request(request["method"], request["path"], request["body"])
    assert EXAMPLES["process lines"] >= (2000 if STRICT else 200)


def test_ci_generates_at_least_10000_dispatcher_cases():
    if not all(EXAMPLES[name] for name in DISPATCHER):
        pytest.skip("counts only when the whole module runs")
    assert sum(EXAMPLES[name] for name in DISPATCHER) >= (10_000 if STRICT else 1_000), EXAMPLES


# -- what the properties found in 42b4b77, each fixed since: kept as regression tests --------

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
    # It passed the schema, then failed to encode as UTF-8 in Platform.call: -32603 and a traceback on stderr.
    reply = decode(make_server(writes=True).handle_line(line({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                                                              "params": {"name": name, "arguments": arguments}})))
    assert reply["result"]["isError"] and len(responses.calls) == 0


def test_a_client_error_response_with_a_null_id_gets_no_reply():
    # JSON-RPC's own error responses carry id null; answering one with -32600 invites an endless error ping-pong.
    assert make_server().handle_line(b'{"jsonrpc":"2.0","id":null,"error":{"code":-32700,"message":"x"}}\n') is None
