"""Faults, TLS and proxies against real loopback servers: each a clear tool error, and the server keeps serving."""
from __future__ import annotations

import http
import json
import re
import select
import socket
import ssl
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple
from urllib.parse import urlsplit

import pytest

import kvmfleet_mcp as kv
from conftest import CANARY, INIT, line, make_config, replies, require, rpc, run_server, server_env, text_of

try:
    import trustme
except ImportError:  # the test extra has it; without it the TLS and proxy tests skip
    trustme = None

PROXY_VARIABLES = ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "NO_PROXY")
FAST = {"KVMFLEET_CONNECT_TIMEOUT": "0.5", "KVMFLEET_READ_TIMEOUT": "1"}
BACKOFFS = kv.RETRY_BACKOFF * 3  # the two waits before a read's second and third try
HEX32 = re.compile(r"^[0-9a-f]{32}$")

Action = Callable[["Loopback", socket.socket, Dict[str, Any]], None]


def reply(status: int, body: bytes = b"", length: Optional[int] = None, **headers: str) -> bytes:
    """One raw HTTP/1.1 answer; length overrides the Content-Length header; header_name=Header-Name."""
    head = ["HTTP/1.1 %d %s" % (status, http.HTTPStatus(status).phrase), "Connection: close",
            "Content-Length: %d" % (len(body) if length is None else length)]
    head += ["%s: %s" % (name.replace("_", "-"), value) for name, value in headers.items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def send(raw: bytes, stall: float = 0.0) -> Action:
    """Send these bytes, wait (until the test ends, at most stall seconds), then close the connection."""
    def act(server: Loopback, conn: socket.socket, request: Dict[str, Any]) -> None:
        conn.sendall(raw)
        server.stopped.wait(stall)
    return act


def huge(size: int) -> Action:
    """A 200 whose body really is size bytes, sent until the client hangs up."""
    def act(server: Loopback, conn: socket.socket, request: Dict[str, Any]) -> None:
        conn.sendall(reply(200, length=size, Content_Type="application/json"))
        chunk = b" " * 65536
        for _ in range(size // len(chunk)):
            conn.sendall(chunk)
            server.sent += len(chunk)
    return act


OK = send(reply(200, b'{"ok":true}', Content_Type="application/json"))
# Answered aside, outside the script: the token-scope question a server with writes asks once.
ASIDE = {"/v1/tokens/current": send(reply(200, b'{"scope":"write","role":"operator"}'))}
HTML_500 = b"<html><body><h1>Internal Server Error</h1><p>upstream db01 is down</p></body></html>"
# Headers and part of a chunked body, then the connection is closed: a drop mid-body.
DROPPED = send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n400\r\n" + b'{"items":[1,' * 20)


def read_request(conn: socket.socket) -> Optional[Dict[str, Any]]:
    data = b""
    while b"\r\n\r\n" not in data and len(data) < 65536:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    first, *fields = head.decode("latin-1").split("\r\n")
    method, target, _ = first.split(" ", 2)
    headers = {name.strip().lower(): value.strip() for name, _, value in (f.partition(":") for f in fields)}
    while len(body) < min(int(headers.get("content-length", 0)), 1 << 20):
        chunk = conn.recv(65536)
        if not chunk:
            break
        body += chunk
    return {"method": method, "target": target, "headers": headers, "head": head + b"\r\n\r\n", "body": body}


class Loopback:
    """A scriptable HTTP server on 127.0.0.1: the n-th request gets actions[n] (then OK), and is recorded."""

    def __init__(self, actions: List[Action], tls: Optional[ssl.SSLContext] = None) -> None:
        self.actions = actions
        self.tls = tls
        self.requests: List[Dict[str, Any]] = []
        self.aside: List[Dict[str, Any]] = []
        self.sent = 0
        self.connections = 0
        self.stopped = threading.Event()
        self.lock = threading.Lock()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.url = "%s://127.0.0.1:%d" % ("https" if tls else "http", self.port)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        deadline = time.monotonic() + 60
        for _ in range(1000):  # polls of 0.1 s, and at most this many connections
            if self.stopped.is_set() or time.monotonic() > deadline:
                return
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(5)
            if self.tls:
                conn = self.tls.wrap_socket(conn, server_side=True)
            request = read_request(conn)
            if request is not None and request["target"] in ASIDE:
                self.aside.append(request)
                ASIDE[request["target"]](self, conn, request)
            elif request is not None:
                with self.lock:
                    self.requests.append(request)
                    n = len(self.requests) - 1
                (self.actions[n] if n < len(self.actions) else OK)(self, conn, request)
        except OSError:  # includes ssl.SSLError: a client that hung up or refused our certificate
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self.stopped.set()
        self.sock.close()


def tunnel(server: Loopback, conn: socket.socket, request: Dict[str, Any]) -> None:
    """The proxy's action: CONNECT host:port, or an absolute-URI request; only ever to 127.0.0.1."""
    connect = request["method"] == "CONNECT"
    target = urlsplit(("//" if connect else "") + request["target"])
    if target.hostname != "127.0.0.1":
        conn.sendall(reply(403))
        return
    with socket.create_connection(("127.0.0.1", target.port), timeout=5) as upstream:
        if connect:
            conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        else:
            path = (target.path or "/") + ("?" + target.query if target.query else "")
            upstream.sendall(request["head"].replace(request["target"].encode(), path.encode(), 1) + request["body"])
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not server.stopped.is_set():
            for ready in select.select([conn, upstream], [], [], 0.1)[0]:
                data = ready.recv(65536)
                if not data:
                    return
                (upstream if ready is conn else conn).sendall(data)


@pytest.fixture(autouse=True)
def no_canary_anywhere(capsys, monkeypatch):
    """No proxy from the outside; and whatever a test writes to stdout or stderr never holds the token."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    yield
    out, err = capsys.readouterr()
    assert CANARY not in out + err


@pytest.fixture
def serve():
    """Start loopback servers; at the end each is closed, and the token was sent only to API servers."""
    made: List[Tuple[Loopback, str]] = []

    def start(*actions: Action, role: str = "api", tls: Optional[ssl.SSLContext] = None) -> Loopback:
        server = Loopback(list(actions), tls)
        made.append((server, role))
        return server

    yield start
    for server, role in made:
        server.close()
        for request in server.requests + server.aside:
            if role == "api":
                assert request["headers"]["authorization"] == "Bearer " + CANARY
            elif role == "other" or request["method"] == "CONNECT":
                assert CANARY.encode() not in request["head"] + request["body"]


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    """A self-signed CA, a server context with its certificate for 127.0.0.1, and the CA's PEM file."""
    require(trustme is not None, "trustme (pip install trustme)")
    ca = trustme.CA()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    pem = tmp_path_factory.mktemp("tls") / "ca.pem"
    ca.cert_pem.write_to_path(str(pem))
    return context, str(pem)


def mcp(api: str, writes: bool = False, **env: str) -> kv.Server:
    """An initialized in-process server for this platform, with short timeouts."""
    settings = dict(FAST, KVMFLEET_API=api, KVMFLEET_MCP_ALLOW_WRITES="true" if writes else "")
    settings.update(env)
    server = kv.Server(make_config(**settings))
    assert "result" in rpc(server, "initialize", INIT, id=0)
    assert "tools" in rpc(server, "tools/list", id=0)["result"]  # as a client does; settles which tools
    return server


def tool(server: kv.Server, name: str, **arguments: Any) -> Tuple[Dict[str, Any], float]:
    """tools/call through the dispatcher: the result (never holding the token) and the seconds it took."""
    started = time.monotonic()
    result = rpc(server, "tools/call", {"name": name, "arguments": arguments})["result"]
    assert CANARY not in json.dumps(result)
    return result, time.monotonic() - started


def error_text(result: Dict[str, Any]) -> str:
    assert result.get("isError") is True, result
    return text_of(result)


def keeps_serving(server: kv.Server, platform: Optional[Loopback] = None) -> None:
    """After a fault: ping answers, and the next read reaches the platform and succeeds."""
    assert rpc(server, "ping", id=99)["result"] == {}
    if platform is not None:
        seen = len(platform.requests)
        result, _ = tool(server, "list_isos")
        assert json.loads(text_of(result)) == {"ok": True} and not result.get("isError")
        assert len(platform.requests) == seen + 1


# Faults ######################################################################


def test_a_refused_connection_is_a_tool_error_and_only_a_read_is_tried_again():
    with socket.create_server(("127.0.0.1", 0)) as closed:
        port = closed.getsockname()[1]
    server = mcp("http://127.0.0.1:%d" % port, writes=True)
    result, took = tool(server, "list_isos")
    assert "GET /v1/isos could not connect to KVM Fleet at http://127.0.0.1:%d" % port in error_text(result)
    assert "safe to retry" in error_text(result) and took >= BACKOFFS * 0.9  # three tries, two waits
    result, took = tool(server, "unmount_iso", device_id="d1")
    assert "not known whether KVM Fleet acted" in error_text(result) and took < BACKOFFS
    keeps_serving(server)


@pytest.fixture
def full_accept_queue():
    """A port whose accept queue is full and never served: on Linux a further connect hangs until its timeout."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers: List[socket.socket] = []
    hangs = False
    try:
        for _ in range(8):
            fillers.append(socket.socket())
            fillers[-1].settimeout(0.3)
            try:
                fillers[-1].connect(("127.0.0.1", port))
            except socket.timeout:
                hangs = True
                break
        require(hangs, "a loopback accept queue that makes connects hang (Linux)")
        yield port
    finally:
        for sock in fillers + [listener]:
            sock.close()


def test_a_connect_timeout_says_the_request_was_not_sent_and_only_a_read_is_tried_again(full_accept_queue):
    server = mcp("http://127.0.0.1:%d" % full_accept_queue, writes=True)
    result, took = tool(server, "list_isos")
    assert "GET /v1/isos timed out after 0.5 s connecting to KVM Fleet" in error_text(result)
    assert "The request was not sent." in error_text(result)
    assert took >= 3 * 0.5 + BACKOFFS * 0.9
    result, took = tool(server, "unmount_iso", device_id="d1")
    assert "POST /v1/devices/d1/iso:unmount timed out after 0.5 s connecting" in error_text(result)
    assert 0.45 <= took < 1.5
    keeps_serving(server)


def test_a_server_that_stalls_before_answering_is_a_read_timeout_tried_once(serve):
    platform = serve(send(b"", stall=10))
    server = mcp(platform.url)
    result, took = tool(server, "list_isos")
    assert "GET /v1/isos got no answer within 1 s from KVM Fleet" in error_text(result)
    assert len(platform.requests) == 1 and 0.9 <= took < 3
    keeps_serving(server, platform)


def test_a_server_that_stalls_mid_body_is_a_read_timeout_tried_once(serve):
    platform = serve(send(reply(200, b'{"items":[', length=100), stall=10))
    server = mcp(platform.url)
    result, took = tool(server, "list_isos")
    assert "GET /v1/isos: KVM Fleet at %s stopped sending its answer for 1 s." % platform.url in error_text(result)
    assert len(platform.requests) == 1 and 0.9 <= took < 3
    keeps_serving(server, platform)


def trickle(piece: int) -> Action:
    """A 200 whose body comes piece bytes every 0.1 s for 2.5 s: each read is quick, the whole answer slow."""
    def act(server: Loopback, conn: socket.socket, request: Dict[str, Any]) -> None:
        conn.sendall(reply(200, b"[", length=10 * 1024 * 1024))
        for _ in range(25):
            if server.stopped.wait(0.1):
                return
            conn.sendall(b" " * piece)
    return act


@pytest.mark.parametrize("piece", [16384, 1])
def test_a_trickling_answer_is_cut_at_the_total_read_deadline(serve, piece):
    platform = serve(trickle(piece))
    server = mcp(platform.url)
    result, took = tool(server, "list_isos")
    assert "KVM Fleet's answer did not arrive in full within 1 s." in error_text(result)
    assert len(platform.requests) == 1 and took < 2.2
    keeps_serving(server, platform)


@pytest.mark.parametrize("answer,text", [
    (reply(500, HTML_500, Content_Type="text/html"),
     "refused GET /v1/isos: HTTP 500 Internal Server Error\n" + HTML_500.decode()),
    (reply(200, b'{"items": [1, 2,'), 'answered GET /v1/isos with HTTP 200, but the body is not JSON:\n{"items": [1, 2,'),
    (reply(429, b'{"error":"rate limited"}', Retry_After="%d" % (kv.RETRY_AFTER_CAP + 50)),
     'refused GET /v1/isos: HTTP 429 Too Many Requests (Retry-After: 60, how long it asks you to wait '
     'before trying again)\n{"error":"rate limited"}'),
], ids=["500 with an HTML page", "200 with invalid JSON", "429 with a Retry-After above the cap"])
def test_an_answer_that_is_no_result_reaches_the_model_verbatim_after_one_request(serve, answer, text):
    platform = serve(send(answer))
    server = mcp(platform.url)
    result, took = tool(server, "list_isos")
    assert error_text(result) == "KVM Fleet " + text
    assert len(platform.requests) == 1 and took < 2  # a Retry-After above the cap is not waited for
    keeps_serving(server, platform)


@pytest.mark.parametrize("faults,waits", [
    ([reply(429, b"slow down", Retry_After="1")], 1.0),
    ([reply(503, b"busy"), reply(502, b"busy")], BACKOFFS),
], ids=["429 with Retry-After 1", "503 then 502"])
def test_a_passing_fault_is_waited_out_and_the_model_sees_only_the_answer(serve, faults, waits):
    platform = serve(*map(send, faults))
    result, took = tool(mcp(platform.url), "list_isos")
    assert json.loads(text_of(result)) == {"ok": True} and not result.get("isError")
    assert len(platform.requests) == len(faults) + 1 and took >= waits * 0.9


@pytest.mark.parametrize("status", [502, 503, 504])
def test_a_gateway_fault_is_tried_three_times_with_backoff_then_passed_on(serve, status):
    platform = serve(*[send(reply(status, b"<h1>%d from the load balancer</h1>" % status))] * 3)
    server = mcp(platform.url)
    result, took = tool(server, "list_isos")
    assert error_text(result) == "KVM Fleet refused GET /v1/isos: HTTP %d %s (tried 3 times)\n<h1>%d from the " \
        "load balancer</h1>" % (status, http.HTTPStatus(status).phrase, status)
    assert len(platform.requests) == 3 and took >= BACKOFFS * 0.9
    keeps_serving(server, platform)


WRITE_FAULTS = {  # fault -> what the model is told
    "503": (send(reply(503, b"busy")), "HTTP 503 Service Unavailable\nbusy"),
    "429 with Retry-After 1": (send(reply(429, b"later", Retry_After="1")),
                               "HTTP 429 Too Many Requests (Retry-After: 1, how long it asks you to wait"),
    "closed before answering": (send(b""), "not known whether KVM Fleet acted"),
    "dropped mid-body": (DROPPED, "not known whether KVM Fleet acted"),
    "stall before answering": (send(b"", stall=10), "got no answer within 1 s"),
    "stall mid-body": (send(reply(200, b"[", length=100), stall=10), "stopped sending its answer for 1 s"),
}


@pytest.mark.parametrize("fault", list(WRITE_FAULTS))
def test_a_write_is_sent_exactly_once_with_an_idempotency_key_whatever_the_fault(serve, fault):
    action, told = WRITE_FAULTS[fault]
    platform = serve(action)
    server = mcp(platform.url, writes=True)
    text = error_text(tool(server, "unmount_iso", device_id="d1")[0])
    assert "POST /v1/devices/d1/iso:unmount" in text and told in text
    (request,) = platform.requests
    assert request["method"] == "POST" and HEX32.match(request["headers"]["idempotency-key"])
    keeps_serving(server, platform)


def test_each_write_carries_its_own_idempotency_key_and_a_read_none(serve):
    platform = serve(OK, OK, OK)
    server = mcp(platform.url, writes=True)
    for name, arguments in [("unmount_iso", {"device_id": "d1"}), ("unmount_iso", {"device_id": "d1"}),
                            ("list_isos", {})]:
        assert not tool(server, name, **arguments)[0].get("isError")
    first, second, read = [request["headers"] for request in platform.requests]
    assert HEX32.match(first["idempotency-key"]) and HEX32.match(second["idempotency-key"])
    assert first["idempotency-key"] != second["idempotency-key"] and "idempotency-key" not in read


@pytest.mark.parametrize("status,name,arguments", [
    (302, "list_isos", {}), (301, "list_devices", {}), (307, "unmount_iso", {"device_id": "d1"}),
    (308, "unmount_iso", {"device_id": "d1"})])
def test_a_redirect_to_another_host_is_not_followed_and_the_token_never_goes_there(serve, status, name, arguments):
    other = serve(role="other")
    platform = serve(send(reply(status, Location=other.url + "/collect")))
    server = mcp(platform.url, writes=True)
    text = error_text(tool(server, name, **arguments)[0])
    assert "with HTTP %d" % status in text and "a redirect to 127.0.0.1:%d" % other.port in text
    assert "It was not followed" in text and len(platform.requests) == 1
    keeps_serving(server, platform)
    assert other.requests == []


def test_a_50_mb_body_is_not_read_to_the_end_and_the_error_is_short(serve):
    platform = serve(huge(50 * 1024 * 1024))
    server = mcp(platform.url)
    result, took = tool(server, "list_isos")
    assert error_text(result).startswith("KVM Fleet answered HTTP 200 with more than 16 MiB; it was not read to the end.")
    assert len(error_text(result)) < 200 and len(platform.requests) == 1
    assert platform.sent < 40 * 1024 * 1024 and took < 10
    keeps_serving(server, platform)


def test_a_page_of_many_small_items_is_cut_to_the_result_cap_quickly(serve):
    page = json.dumps({"items": [{"id": "d%d" % n} for n in range(30_000)]}).encode()  # 0.5 MB
    platform = serve(send(reply(200, page, Content_Type="application/json")))
    result, took = tool(mcp(platform.url), "list_isos")
    assert len(text_of(result)) <= 50_000 and took < 3  # 30,000 items: ~5 s when it was quadratic


def test_a_connection_dropped_mid_body_is_a_tool_error_and_a_read_is_tried_three_times(serve):
    platform = serve(DROPPED, DROPPED, DROPPED)
    server = mcp(platform.url)
    result, _ = tool(server, "list_isos")
    assert "GET /v1/isos lost the connection mid-answer from KVM Fleet" in error_text(result)
    assert "IncompleteRead" in error_text(result) and "safe to retry" in error_text(result)
    assert len(platform.requests) == 3
    keeps_serving(server, platform)


def test_a_compressed_answer_that_was_not_asked_for_is_not_read_nor_inflated(serve):
    # Security: urllib3 1.x inflates a whole read before the size bound sees it (a 2 KB bomb, gigabytes).
    platform = serve(send(reply(200, b"this is not gzip", Content_Encoding="gzip")))
    server = mcp(platform.url)
    text = error_text(tool(server, "list_isos")[0])
    assert text == ("GET /v1/isos: KVM Fleet answered with Content-Encoding gzip, which was not asked for; it was "
                    "not read. A read changes nothing; it is safe to retry.")
    assert platform.requests[0]["headers"]["accept-encoding"] == "identity"


def test_an_answer_shorter_than_its_content_length_is_not_taken_as_complete(serve):
    platform = serve(*[send(reply(200, b'{"ok":true}', length=1000))] * 3)
    server = mcp(platform.url)
    result, _ = tool(server, "list_isos")
    assert "IncompleteRead" in error_text(result) and len(platform.requests) == 3


# TLS, proxies, plain http #####################################################


def test_a_self_signed_platform_is_refused_without_the_ca_bundle_and_accepted_with_it(serve, tls, monkeypatch):
    context, ca_pem = tls
    platform = serve(OK, tls=context)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", ca_pem)  # ignored: only KVMFLEET_CA_BUNDLE may change the CA
    monkeypatch.setenv("SSL_CERT_FILE", ca_pem)
    server = mcp(platform.url)
    text = error_text(tool(server, "list_isos")[0])
    assert "GET /v1/isos could not verify TLS (set KVMFLEET_CA_BUNDLE for a private CA) of KVM Fleet" in text
    assert "SSLError" in text and "The request was not sent." in text
    assert platform.requests == [] and platform.connections == 1  # not tried again
    keeps_serving(server)
    result, _ = tool(mcp(platform.url, KVMFLEET_CA_BUNDLE=ca_pem), "list_isos")
    assert json.loads(text_of(result)) == {"ok": True} and len(platform.requests) == 1


def environment(monkeypatch, **variables: str) -> Dict[str, str]:
    """Variables set in this process's environment (where requests would look) and given to the config."""
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    return variables


def test_https_proxy_is_used_for_the_platform_and_sees_only_a_connect(serve, tls, monkeypatch):
    context, ca_pem = tls
    platform = serve(tls=context)
    proxy = serve(tunnel, role="proxy")
    env = environment(monkeypatch, HTTPS_PROXY=proxy.url)
    result, _ = tool(mcp(platform.url, KVMFLEET_CA_BUNDLE=ca_pem, **env), "list_isos")
    assert json.loads(text_of(result)) == {"ok": True}
    assert [(r["method"], r["target"]) for r in proxy.requests] == [("CONNECT", "127.0.0.1:%d" % platform.port)]
    assert CANARY.encode() not in proxy.requests[0]["head"]  # the token went inside the TLS tunnel only
    assert [r["target"] for r in platform.requests] == ["/v1/isos"]


@pytest.mark.parametrize("no_proxy", ["127.0.0.1", "localhost,127.0.0.0/8", "*"])
def test_no_proxy_bypasses_the_proxy(serve, tls, monkeypatch, no_proxy):
    context, ca_pem = tls
    platform = serve(tls=context)
    proxy = serve(tunnel, role="proxy")
    env = environment(monkeypatch, HTTPS_PROXY=proxy.url, NO_PROXY=no_proxy)
    result, _ = tool(mcp(platform.url, KVMFLEET_CA_BUNDLE=ca_pem, **env), "list_isos")
    assert json.loads(text_of(result)) == {"ok": True}
    assert proxy.requests == [] and len(platform.requests) == 1


@pytest.mark.parametrize("variable", ["HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy", "HTTPS_PROXY"])
def test_no_proxy_variable_sends_the_token_of_a_plain_http_loopback_platform_to_a_proxy(serve, monkeypatch, variable):
    # Security: requests honours HTTP_PROXY and ALL_PROXY too; through a plain-http proxy the
    # bearer token would cross the network in clear, once for each try of a read.
    platform = serve()
    proxy = serve(tunnel, role="proxy")
    env = environment(monkeypatch, **{variable: proxy.url})
    result, _ = tool(mcp(platform.url, **env), "list_devices", status="offline")
    assert json.loads(text_of(result)) == {"ok": True}
    assert proxy.requests == []
    assert [r["target"] for r in platform.requests] == ["/v1/devices?status=offline"]


def test_an_unreachable_proxy_is_a_tool_error_and_the_platform_is_not_contacted_directly(serve, tls, monkeypatch):
    context, ca_pem = tls
    platform = serve(tls=context)
    with socket.create_server(("127.0.0.1", 0)) as closed:
        env = environment(monkeypatch, HTTPS_PROXY="http://127.0.0.1:%d" % closed.getsockname()[1])
    result, _ = tool(mcp(platform.url, KVMFLEET_CA_BUNDLE=ca_pem, **env), "list_isos")
    assert "could not connect to KVM Fleet" in error_text(result) and "ProxyError" in error_text(result)
    assert platform.requests == []


def test_plain_http_off_loopback_is_refused_unless_opted_in_and_then_warned_about(capsys):
    with pytest.raises(kv.ConfigError) as refused:
        make_config(KVMFLEET_API="http://kvmfleet.example")
    assert "KVMFLEET_API=http://kvmfleet.example uses plain http to a host that is not loopback" in str(refused.value)
    assert "KVMFLEET_ALLOW_INSECURE_HTTP=true" in str(refused.value) and CANARY not in str(refused.value)
    assert capsys.readouterr().err == ""
    for loopback in ("http://127.0.0.1:9", "http://localhost:9", "http://[::1]:9", "http://127.8.9.10"):
        assert make_config(KVMFLEET_API=loopback).api == loopback
    assert capsys.readouterr().err == ""
    config = make_config(KVMFLEET_API="http://kvmfleet.example", KVMFLEET_ALLOW_INSECURE_HTTP="true")
    err = capsys.readouterr().err
    assert config.api == "http://kvmfleet.example" and CANARY not in err
    assert err == "kvmfleet-mcp: warning: KVMFLEET_ALLOW_INSECURE_HTTP=true: the token is sent unencrypted " \
                  "to http://kvmfleet.example.\n"
    with pytest.raises(kv.ConfigError):
        make_config(KVMFLEET_API="http://kvmfleet.example", KVMFLEET_ALLOW_INSECURE_HTTP="yes")


# The real process #############################################################


def session(*calls: Tuple[str, Dict[str, Any]]) -> List[bytes]:
    """initialize, then one tools/call per (name, arguments) with ids 1.., then a ping with the next id."""
    lines = [line({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": INIT}),
             line({"jsonrpc": "2.0", "method": "notifications/initialized"})]
    lines += [line({"jsonrpc": "2.0", "id": n, "method": "tools/call", "params": {"name": name, "arguments": args}})
              for n, (name, args) in enumerate(calls, 1)]
    return lines + [line({"jsonrpc": "2.0", "id": len(calls) + 1, "method": "ping"})]


def one_reply_each(proc: Any, count: int) -> List[Dict[str, Any]]:
    assert proc.returncode == 0, proc.stderr
    out = replies(proc.stdout)
    assert [message["id"] for message in out] == list(range(count + 2))
    assert out[-1]["result"] == {}
    return [message["result"] for message in out[1:-1]]


def test_the_real_process_survives_every_kind_of_fault_with_one_reply_each(serve):
    other = serve(role="other")
    platform = serve(send(reply(500, HTML_500)), send(reply(200, b"<html>login</html>")),
                     send(reply(302, Location=other.url + "/x")), DROPPED, DROPPED, DROPPED,
                     send(b"", stall=10), huge(50 * 1024 * 1024), send(reply(429, b"later", Retry_After="60")),
                     send(reply(503, b"busy")))
    proc = run_server(session(*[("list_isos", {})] * 7, ("unmount_iso", {"device_id": "d1"}), ("list_isos", {})),
                      server_env(platform.url, KVMFLEET_MCP_ALLOW_WRITES="true", **FAST))
    results = one_reply_each(proc, 9)
    assert [result.get("isError", False) for result in results] == [True] * 8 + [False]
    texts = [text_of(result) for result in results]
    expected = ["HTTP 500", "not JSON", "not followed", "lost the connection mid-answer", "no answer within 1 s",
                "with more than 16 MiB", "HTTP 429", "HTTP 503", '{"ok":true}']
    for text, fragment in zip(texts, expected):
        assert fragment in text
    assert len(platform.requests) == 11 and other.requests == []
    assert platform.requests[-2]["method"] == "POST"  # the 503 to the write was not retried
    assert CANARY not in "".join(texts) + proc.stderr.decode()


def test_the_real_process_uses_https_proxy_from_its_env_block(serve, tls):
    context, ca_pem = tls
    platform = serve(tls=context)
    proxy = serve(tunnel, role="proxy")
    proc = run_server(session(("list_isos", {})),
                      server_env(platform.url, HTTPS_PROXY=proxy.url, KVMFLEET_CA_BUNDLE=ca_pem, **FAST))
    (result,) = one_reply_each(proc, 1)
    assert json.loads(text_of(result)) == {"ok": True}
    assert [(r["method"], r["target"]) for r in proxy.requests] == [("CONNECT", "127.0.0.1:%d" % platform.port)]
    assert len(platform.requests) == 1
