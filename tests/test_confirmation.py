"""Issue 5: a person confirms destructive calls (elicitation, both eras), the impact preview, the record of agent actions.

Driven through the real process with a scripted client that declares elicitation and answers each way.
"""
from __future__ import annotations

import json
import os
import queue
import signal
import re
import stat
import subprocess
import sys
import threading
import time
from typing import Any, Dict, List, Optional

import pytest
import responses

from conftest import (API, INIT, MODERN_META, REQUEST_ID, SERVER, make_config, make_server, platform_calls,
                      server_env, text_of, writes_sent)
import kvmfleet_mcp as kv

OPERATOR = "kvmf_demo_operator"  # olga.operator
CYCLE = {"device_id": "dev_srv_pdx_3", "action": "cycle"}
ASKS = {"elicitation": {}}  # form mode, as the spec reads an empty object
FORM_SCHEMA = {"type": "object", "required": ["approve"], "properties": {"approve": {
    "type": "boolean", "title": "Approve: Power action", "default": False,
    "description": "Tick to let the assistant send power action 'cycle' to device dev_srv_pdx_3, interrupting "
                   "everything running on it."}}}
ACCEPT = {"action": "accept", "content": {"approve": True}}


class Client:
    """The real server on pipes, and a client that speaks one message at a time."""

    def __init__(self, api: str, **env: str) -> None:
        env.setdefault("KVMFLEET_MCP_ALLOW_WRITES", "true")
        self.env = server_env(api, OPERATOR, **env)
        self.start()
        self.inbox: "queue.Queue[bytes]" = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=self.env)
        self.stdin, self.stdout = self.proc.stdin, self.proc.stdout

    def finish(self) -> str:
        """Wait for the server to exit 0 after stdin closed; its stderr."""
        assert self.proc.wait(timeout=15) == 0
        return self.proc.stderr.read().decode()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def _pump(self) -> None:
        for raw in iter(self.stdout.readline, b""):
            self.inbox.put(raw)

    def send(self, message: Dict[str, Any]) -> None:
        self.stdin.write(json.dumps(message).encode() + b"\n")
        self.stdin.flush()

    def recv(self, timeout: float = 15) -> Dict[str, Any]:
        raw = self.inbox.get(timeout=timeout)
        assert raw.endswith(b"\n") and b"\r" not in raw
        return json.loads(raw)

    def silent_for(self, seconds: float) -> bool:
        try:
            self.inbox.get(timeout=seconds)
        except queue.Empty:
            return True
        return False

    def initialize(self, version: str = "2025-11-25", capabilities: Optional[Dict[str, Any]] = None) -> None:
        self.send({"jsonrpc": "2.0", "id": 0, "method": "initialize",
                   "params": dict(INIT, protocolVersion=version, capabilities=capabilities or {})})
        assert self.recv()["result"]["protocolVersion"] == version

    def call(self, request_id: Any, name: str, arguments: Dict[str, Any], **params: Any) -> None:
        self.send({"jsonrpc": "2.0", "id": request_id, "method": "tools/call",
                   "params": dict(params, name=name, arguments=arguments)})

    def close(self) -> str:
        self.stdin.close()
        err = self.finish()
        assert OPERATOR not in err
        return err


class InProcessClient(Client):
    """The same conversation with serve() on a thread of this process (so mutation testing sees it)."""

    capfd: Any = None

    def start(self) -> None:
        config = kv.Config.from_env(self.env)
        server_in, self.stdin = os.pipe()
        self.stdout, server_out = os.pipe()
        self.stdin, self.stdout = open(self.stdin, "wb"), open(self.stdout, "rb")
        self.status: List[int] = []

        def run() -> None:
            with open(server_in, "rb", buffering=0) as stdin, open(server_out, "wb") as stdout:
                self.status.append(kv.serve(kv.Server(config), stdin, stdout))

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def finish(self) -> str:
        self.thread.join(timeout=15)
        assert self.status == [0]
        return self.capfd.readouterr().err

    def kill(self) -> None:
        if not self.stdin.closed:
            self.stdin.close()


@pytest.fixture(params=[Client, InProcessClient], ids=["process", "in-process"])
def client(request, platform, capfd):
    opened: List[Client] = []

    def start(**env: str) -> Client:
        request.param.capfd = capfd
        opened.append(request.param(platform.url, **env))
        return opened[-1]

    yield start
    for each in opened:
        each.kill()


def asked(client: Client) -> Dict[str, Any]:
    """The elicitation/create the server sent, checked for shape."""
    request = client.recv()
    assert request["method"] == "elicitation/create" and isinstance(request["id"], str)
    return request


def answer(client: Client, request: Dict[str, Any], result: Any) -> None:
    client.send({"jsonrpc": "2.0", "id": request["id"], "result": result})


def writes(platform) -> List[Dict[str, Any]]:
    return writes_sent(platform_calls(platform))


# -- the legacy era: elicitation/create in the middle of the call ---------------------------------


def test_a_person_who_ticks_the_box_and_accepts_lets_the_power_cycle_through_once(client, platform):
    c = client()
    c.initialize(capabilities=ASKS)
    c.call(2, "power_action", CYCLE)
    request = asked(c)
    params = request["params"]
    assert params["mode"] == "form" and params["requestedSchema"] == FORM_SCHEMA
    message = params["message"]
    assert message.startswith("An AI assistant (kvmfleet-mcp/%s (pytest/1.0)) asks to send power action 'cycle' "
                              "to device dev_srv_pdx_3, interrupting everything running on it.\n" % kv.__version__)
    assert '- device "srv-pdx-3" (dev_srv_pdx_3): status "online", power "on"' in message
    assert '- console sessions open on it: "olga.operator" on device "dev_srv_pdx_3" since ' in message
    assert "- active access grants on it: none" in message
    assert message.endswith("Approve only if you want exactly this; anything else sends nothing.")
    assert writes(platform) == []
    c.send({"jsonrpc": "2.0", "id": 3, "method": "ping"})  # answered while the person is asked
    assert c.recv() == {"jsonrpc": "2.0", "id": 3, "result": {}}
    answer(c, request, ACCEPT)
    reply = c.recv()
    assert reply["id"] == 2 and "isError" not in reply["result"]
    assert json.loads(text_of(reply["result"]))["action"] == "cycle"
    sent = writes(platform)
    assert [(w["method"], w["path"], w["body"]) for w in sent] == [
        ("POST", "/v1/devices/dev_srv_pdx_3/power", {"action": "cycle"})]
    key = REQUEST_ID.fullmatch(reply["result"]["content"][1]["text"]).group(1)
    assert sent[0]["headers"]["idempotency-key"] == key
    c.close()


@pytest.mark.parametrize("result,why", [
    ({"action": "decline"}, "the user declined"),
    ({"action": "cancel"}, "the user dismissed the question"),
    ({"action": "accept", "content": {"approve": False}}, "the user accepted without ticking the box"),
    ({"action": "accept", "content": {"approve": "true"}}, "the user accepted without ticking the box"),
    ({"action": "accept"}, "the user accepted without ticking the box"),
    ({"action": "yes"}, "the user gave an answer this server does not understand"),
    ("accept", "the user gave an answer this server does not understand"),
])
def test_anything_but_accept_with_the_box_ticked_writes_nothing(client, platform, result, why):
    c = client()
    c.initialize(capabilities=ASKS)
    c.call("call-1", "end_console_session", {"session_id": "cs_pdx3_9h", "reason": "idle"})
    answer(c, asked(c), result)
    reply = c.recv()
    assert reply["id"] == "call-1" and reply["result"]["isError"] is True
    assert text_of(reply["result"]) == (
        "Not done: end_console_session would end console session cs_pdx3_9h, disconnecting its user, and %s. "
        "No write was sent to KVM Fleet. Do not try again unless the user asks you to." % why)
    assert writes(platform) == []
    c.close()


def test_a_client_error_instead_of_an_answer_writes_nothing(client, platform):
    c = client()
    c.initialize(capabilities=ASKS)
    c.call(2, "revoke_access", {"grant_id": "gr_db_migration"})
    request = asked(c)
    c.send({"jsonrpc": "2.0", "id": request["id"], "error": {"code": -32601, "message": "no UI"}})
    text = text_of(c.recv()["result"])
    assert "and the user could not be asked (the client answered " in text and "no UI" in text
    assert writes(platform) == []
    c.close()


def test_nobody_answering_in_time_writes_nothing_and_the_client_is_told_to_close_the_question(client, platform):
    c = client(KVMFLEET_MCP_CONFIRM_TIMEOUT="1")
    c.initialize(capabilities=ASKS)
    c.call(2, "power_action", CYCLE)
    request = asked(c)
    assert c.recv(timeout=5) == {"jsonrpc": "2.0", "method": "notifications/cancelled",
                                 "params": {"requestId": request["id"], "reason": "no answer within 1 s"}}
    reply = c.recv()
    assert reply["id"] == 2 and "and the user did not answer within 1 s." in text_of(reply["result"])
    answer(c, request, ACCEPT)  # too late: it is not an answer to anything now
    c.send({"jsonrpc": "2.0", "id": 4, "method": "ping"})
    assert c.recv() == {"jsonrpc": "2.0", "id": 4, "result": {}}
    assert writes(platform) == []
    c.close()


def test_a_call_the_client_cancels_while_the_person_is_asked_gets_no_reply_and_writes_nothing(client, platform):
    c = client()
    c.initialize(capabilities=ASKS)
    c.call(7, "power_action", CYCLE)
    request = asked(c)
    c.send({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 6}})  # not this call
    c.send({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": "7"}})  # nor these
    c.send({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 7.0}})
    c.send({"jsonrpc": "2.0", "id": 8, "method": "ping"})
    assert c.recv() == {"jsonrpc": "2.0", "id": 8, "result": {}}  # still asking
    c.send({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 7, "reason": "user"}})
    # The person's question is withdrawn, and the call gets no reply.
    assert c.recv() == {"jsonrpc": "2.0", "method": "notifications/cancelled",
                        "params": {"requestId": request["id"], "reason": "the call was cancelled"}}
    c.send({"jsonrpc": "2.0", "id": 9, "method": "ping"})
    assert c.recv() == {"jsonrpc": "2.0", "id": 9, "result": {}}
    answer(c, request, ACCEPT)
    assert c.silent_for(0.5)
    assert writes(platform) == []
    c.close()


def test_requests_that_arrive_while_a_person_is_asked_are_answered_after_it_in_order(client, platform):
    c = client()
    c.initialize(capabilities=ASKS)
    c.call(2, "power_action", CYCLE)
    request = asked(c)
    c.send({"jsonrpc": "2.0", "id": 3, "method": "tools/list"})
    c.call(4, "get_device_health", {"device_id": "dev_srv_pdx_3"})
    assert c.silent_for(0.3)
    answer(c, request, {"action": "decline"})
    assert [c.recv()["id"] for _ in range(3)] == [2, 3, 4]
    c.close()


def test_a_2025_06_18_client_gets_the_form_without_the_later_mode_field(client):
    c = client()
    c.initialize("2025-06-18", ASKS)
    c.call(2, "mount_iso", {"device_id": "dev_srv_pdx_3", "iso_id": "iso_ubuntu_2404"})
    params = asked(c)["params"]
    assert "mode" not in params and params["requestedSchema"]["required"] == ["approve"]
    c.close()


@pytest.mark.parametrize("version,capabilities", [
    ("2025-11-25", {}),
    ("2025-11-25", {"elicitation": {"url": {}}}),  # url mode only: no form to tick
    ("2025-11-25", {"elicitation": True}),
    ("2025-03-26", ASKS),  # elicitation came with 2025-06-18
])
def test_a_client_that_cannot_ask_its_user_gets_the_confirm_rule_with_a_preview(client, platform, version,
                                                                               capabilities):
    c = client()
    c.initialize(version, capabilities)
    c.call(2, "power_action", CYCLE)
    reply = c.recv()
    assert reply["id"] == 2 and text_of(reply["result"]).startswith("Not done: power_action would send")
    assert '"confirm": true.\nWhat it would touch' in text_of(reply["result"])
    c.call(3, "power_action", dict(CYCLE, confirm=True))
    assert "isError" not in c.recv()["result"]
    assert len(writes(platform)) == 1
    c.close()


# -- KVMFLEET_MCP_CONFIRM=human --------------------------------------------------------------------


def test_human_mode_refuses_confirm_true_from_a_model_whose_client_cannot_ask(client, platform):
    # Security: a prompt-injected model sets confirm: true as easily as an id.
    c = client(KVMFLEET_MCP_CONFIRM="human")
    c.initialize()
    c.call(2, "power_action", dict(CYCLE, confirm=True))
    text = text_of(c.recv()["result"])
    assert text.startswith(
        "Not done: power_action would send power action 'cycle' to device dev_srv_pdx_3, interrupting everything "
        "running on it. No write was sent to KVM Fleet. This server takes only a person's confirmation for writes "
        "(KVMFLEET_MCP_CONFIRM=human), and this client cannot ask one: it did not offer elicitation (form mode, "
        "protocol 2025-06-18 or later). confirm: true is not enough.")
    assert '- device "srv-pdx-3" (dev_srv_pdx_3)' in text
    assert writes(platform) == []
    c.close()


@pytest.mark.parametrize("name,arguments,effect", [
    ("power_action", {"device_id": "dev_srv_pdx_3", "action": "reboot"},
     "send power action 'reboot' to device dev_srv_pdx_3"),
    ("approve_access", {"grant_id": "gr_kernel_patch"}, "approve access request gr_kernel_patch as its second pair"),
    ("resolve_alert", {"alert_id": "al_disk_full", "note": "done"}, "mark alert al_disk_full resolved"),
    ("request_access", {"device_id": "dev_srv_pdx_3", "reason": "patching", "duration_minutes": 30},
     "request 30 minutes of access to device dev_srv_pdx_3"),
])
def test_in_human_mode_a_model_cannot_reboot_approve_or_resolve_alone(client, platform, name, arguments, effect):
    # Security: in human mode every write is put to the person, not only the destructive ones.
    c = client(KVMFLEET_MCP_CONFIRM="human")
    c.initialize()
    c.call(2, name, arguments)
    text = text_of(c.recv()["result"])
    assert text.startswith("Not done: %s would %s" % (name, effect)) and "KVMFLEET_MCP_CONFIRM=human" in text
    assert writes(platform) == []
    c.close()
    c = client(KVMFLEET_MCP_CONFIRM="human")
    c.initialize(capabilities=ASKS)
    c.call(2, name, arguments)
    request = asked(c)
    assert effect in request["params"]["message"] and kv.compact(arguments) in request["params"]["message"]
    answer(c, request, {"action": "decline"})
    assert c.recv()["result"]["isError"] is True
    assert writes(platform) == []
    c.close()


def test_in_the_default_mode_non_destructive_writes_are_not_put_to_the_person(client, platform):
    c = client()
    c.initialize(capabilities=ASKS)
    c.call(3, "power_action", {"device_id": "dev_srv_pdx_3", "action": "on"})
    assert "isError" not in c.recv()["result"]
    assert [w["body"] for w in writes(platform)] == [{"action": "on"}]
    c.close()


def test_human_mode_goes_ahead_when_a_person_accepts(client, platform):
    c = client(KVMFLEET_MCP_CONFIRM="human")
    c.initialize(capabilities=ASKS)
    c.call(2, "power_action", CYCLE)
    answer(c, asked(c), ACCEPT)
    assert "isError" not in c.recv()["result"]
    assert len(writes(platform)) == 1
    c.close()


def test_an_unknown_confirm_mode_stops_the_server_at_start():
    with pytest.raises(kv.ConfigError, match="KVMFLEET_MCP_CONFIRM=humans: give human"):
        make_config(KVMFLEET_MCP_CONFIRM="humans")


# -- the 2026-07-28 era: input_required, then the retry -----------------------------------------


def modern_meta(capabilities: Dict[str, Any]) -> Dict[str, Any]:
    return dict(MODERN_META, **{kv.META_CAPABILITIES: capabilities})


def first_round(c: Client, request_id: Any = 1, arguments: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    c.call(request_id, "power_action", arguments or CYCLE, _meta=modern_meta(ASKS))
    result = c.recv()["result"]
    assert result["resultType"] == "input_required" and set(result) == {
        "resultType", "inputRequests", "requestState", "_meta"}
    ask = result["inputRequests"]["confirm_action"]
    assert ask["method"] == "elicitation/create" and ask["params"]["mode"] == "form"
    if arguments is None:
        assert ask["params"]["requestedSchema"] == FORM_SCHEMA
        assert '- device "srv-pdx-3" (dev_srv_pdx_3)' in ask["params"]["message"]
    return result


def retry(c: Client, request_id: Any, state: Any, response: Any, arguments: Optional[Dict[str, Any]] = None,
          name: str = "power_action") -> Dict[str, Any]:
    params: Dict[str, Any] = {"_meta": modern_meta(ASKS), "inputResponses": {"confirm_action": response}}
    if state is not None:
        params["requestState"] = state
    c.call(request_id, name, arguments or CYCLE, **params)
    reply = c.recv()
    assert reply["id"] == request_id
    return reply["result"]


def test_a_2026_client_is_asked_with_input_required_and_the_accepting_retry_acts_once(client, platform):
    c = client()
    state = first_round(c)["requestState"]
    assert writes(platform) == []
    done = retry(c, 2, state, ACCEPT)
    assert done["resultType"] == "complete" and "isError" not in done
    assert len(writes(platform)) == 1
    # Security: a replayed retry (same state, same yes) does not power-cycle twice.
    again = retry(c, 3, state, ACCEPT)
    assert again["isError"] and "This approval was already used once; ask again." in text_of(again)
    assert len(writes(platform)) == 1
    c.close()


@pytest.mark.parametrize("tamper", ["flip a character", "another call's state", "none", "not base64", "number"])
def test_a_forged_or_borrowed_request_state_is_refused(client, platform, tamper):
    # Security: requestState comes back through the client: a forged "yes" must not act.
    c = client()
    state = first_round(c)["requestState"]
    other = first_round(c, 9, {"device_id": "dev_lab_pikvm_1", "action": "off"})["requestState"]
    forged = {"flip a character": state[:5] + ("A" if state[5] != "A" else "B") + state[6:],
              "another call's state": other, "none": None, "not base64": "!!!.abc", "number": 5}[tamper]
    result = retry(c, 2, forged, ACCEPT)
    assert result["isError"] and text_of(result) == (
        "Not done: power_action would send power action 'cycle' to device dev_srv_pdx_3, interrupting everything "
        "running on it. The answer came with a requestState that this server did not issue for this tool and "
        "these arguments. No write was sent.")
    assert writes(platform) == []
    c.close()


def test_a_request_state_cannot_carry_a_yes_over_to_other_arguments(client, platform):
    c = client()
    state = first_round(c)["requestState"]
    other_device = {"device_id": "dev_lab_pikvm_1", "action": "cycle"}
    assert "did not issue for this tool and these arguments" in text_of(retry(c, 2, state, ACCEPT, other_device))
    result = retry(c, 3, state, ACCEPT, {"session_id": "cs_pdx3_9h"}, "end_console_session")
    assert "did not issue for this tool and these arguments" in text_of(result)
    assert writes(platform) == []
    c.close()


def test_a_request_state_from_another_server_process_is_refused(client, platform):
    state = first_round(client())["requestState"]
    result = retry(client(), 2, state, ACCEPT)
    assert "did not issue" in text_of(result) and writes(platform) == []


def test_a_2026_decline_writes_nothing_and_a_retry_without_the_answer_asks_again(client, platform):
    c = client()
    state = first_round(c)["requestState"]
    declined = retry(c, 2, state, {"action": "decline"})
    assert declined["isError"] and "and the user declined. No write was sent" in text_of(declined)
    c.call(3, "power_action", CYCLE, _meta=modern_meta(ASKS), requestState=state, inputResponses={})
    assert c.recv()["result"]["resultType"] == "input_required"
    assert writes(platform) == []
    c.close()


def test_a_2026_answer_after_the_time_limit_is_refused(client, platform):
    c = client(KVMFLEET_MCP_CONFIRM_TIMEOUT="0.5")
    state = first_round(c)["requestState"]
    time.sleep(0.7)
    result = retry(c, 2, state, ACCEPT)
    assert "The user's answer came after 0.5 s; ask again." in text_of(result)
    assert writes(platform) == []
    c.close()


def test_a_2026_client_without_elicitation_keeps_the_confirm_rule(client, platform):
    c = client()
    c.call(1, "power_action", dict(CYCLE, confirm=True), _meta=modern_meta({}))
    result = c.recv()["result"]
    assert result["resultType"] == "complete" and "isError" not in result
    assert len(writes(platform)) == 1
    c.close()


# -- the impact preview, from reads only ---------------------------------------------------------


def preview_of(platform, name: str, fail: bool = False, **arguments: Any) -> str:
    config = make_config(KVMFLEET_API=platform.url, KVMFLEET_TOKEN=OPERATOR, KVMFLEET_MCP_ALLOW_WRITES="true")
    server = kv.Server(config)
    server.handle({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": INIT})
    server.offered()  # the token-scope probe, out of the way
    if fail:
        platform.fail_next(503, "<html>maintenance</html>")
    reply = server.handle({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                           "params": {"name": name, "arguments": arguments}})
    assert reply is not None and reply["result"]["isError"] is True
    assert writes(platform) == []
    return text_of(reply["result"]).split("What it would touch, read from KVM Fleet just now:\n")[1]


def test_revoking_a_grant_previews_whose_access_on_which_device(platform):
    expires = platform.grants["gr_db_migration"]["expires_at"]
    assert preview_of(platform, "revoke_access", grant_id="gr_db_migration") == (
        '- access grant gr_db_migration: "omar.operator"\'s access to device "dev_db_fra_1" until "%s" '
        '("gr_db_migration")' % expires)
    assert preview_of(platform, "revoke_access", grant_id="gr_kernel_patch") == (
        "- access grant gr_kernel_patch is not among the first 500 active grants KVM Fleet listed")


def test_ending_a_session_previews_whose_it_is_and_how_long_it_has_been_open(platform):
    text = preview_of(platform, "end_console_session", session_id="cs_pdx3_9h")
    started = platform.sessions["cs_pdx3_9h"]["started_at"]
    # Seeded 9 h before the demo platform started, some minutes ago.
    assert re.fullmatch(re.escape('- console session cs_pdx3_9h: "olga.operator" on device "dev_srv_pdx_3" since '
                                  '"%s", open for 9 h ' % started) + r"[0-9]{1,2} min", text), text


def test_a_device_preview_names_its_open_sessions_and_active_grants(platform):
    text = preview_of(platform, "mount_iso", device_id="dev_db_fra_1", iso_id="iso_ubuntu_2404")
    lines = text.split("\n")
    assert lines[0] == '- device "db-fra-1" (dev_db_fra_1): status "online", power "on"'
    assert lines[1] == "- console sessions open on it: none"
    assert lines[2].startswith('- active access grants on it: "omar.operator"\'s access to device "dev_db_fra_1"')


def test_a_failed_preview_read_is_said_and_the_call_is_still_refused(platform):
    text = preview_of(platform, "power_action", fail=True, **CYCLE)
    assert text.split("\n")[0] == ('- could not read device dev_srv_pdx_3: HTTP 503 Service Unavailable '
                                   '"<html>maintenance</html>"')
    assert len(platform_calls(platform)) == 3  # one try each: a preview does not retry


# -- the record of agent actions ---------------------------------------------------------------------


def test_the_record_has_one_line_per_call_is_private_and_holds_no_token_or_body(client, platform, tmp_path):
    path = tmp_path / "agent.jsonl"
    c = client(KVMFLEET_MCP_AUDIT_LOG=str(path))
    c.initialize(capabilities=ASKS)
    c.call(1, "list_devices", {"q": "pdx-secret-search"})
    c.recv()
    c.call(2, "end_console_session", {"session_id": "cs_pdx3_9h", "reason": "reason-not-for-the-record"})
    answer(c, asked(c), ACCEPT)
    done = c.recv()["result"]
    c.call(3, "power_action", CYCLE)
    answer(c, asked(c), {"action": "decline"})
    c.recv()
    c.close()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    raw = path.read_text()
    assert OPERATOR not in raw and "secret-search" not in raw and "reason-not-for-the-record" not in raw
    rows = [json.loads(text) for text in raw.splitlines()]
    for row in rows:
        assert set(row) >= {"time", "client", "tool", "targets", "write", "outcome", "duration_ms"}
        assert row["client"] == {"name": "pytest", "version": "1.0"}
    read, ended, refused = rows
    assert (read["tool"], read["write"], read["targets"], read["status"], read["outcome"]) == (
        "list_devices", False, {}, 200, "done")
    assert read["request_id"] is None and read["platform_request_id"].startswith("ev_")
    key = REQUEST_ID.fullmatch(done["content"][1]["text"]).group(1)
    row = [e for e in platform.events if e.get("request_id") == key]
    assert len(row) == 1  # the key in the result leads to the platform's audit row
    assert ended == dict(ended, tool="end_console_session", write=True, targets={"session_id": "cs_pdx3_9h"},
                         confirmation={"by": "person", "answer": "accept"}, status=200, request_id=key,
                         platform_request_id=row[0]["id"], outcome="done")
    assert refused == dict(refused, tool="power_action", targets=CYCLE, outcome="error",
                           confirmation={"by": "person", "answer": "decline"})
    assert "status" not in refused and "request_id" not in refused


def test_a_record_that_cannot_be_written_is_logged_and_the_call_goes_on(client, tmp_path):
    c = client(KVMFLEET_MCP_AUDIT_LOG=str(tmp_path))  # a directory
    c.initialize()
    c.call(1, "list_isos", {})
    assert "isError" not in c.recv()["result"]
    assert "could not append to KVMFLEET_MCP_AUDIT_LOG=%s (Is a directory); the call went on" % tmp_path in c.close()


def test_a_record_readable_by_others_is_warned_about_at_start(tmp_path, capsys):
    path = tmp_path / "agent.jsonl"
    path.write_text("")
    path.chmod(0o644)
    make_config(KVMFLEET_MCP_AUDIT_LOG=str(path))
    assert "KVMFLEET_MCP_AUDIT_LOG=%s is readable by group or others; chmod 600 it." % path in capsys.readouterr().err


@pytest.mark.parametrize("page", [{"items": 5}, {"items": "abc"}, {"items": [1, None, "x"]}, {}])
def test_a_preview_survives_a_list_answer_of_the_wrong_shape(page):
    with responses.RequestsMock() as mock:
        mock.add("GET", API + "/v1/access-grants", json=page)
        result = make_server(writes=True).handle({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {
            "name": "revoke_access", "arguments": {"grant_id": "g1"}}})["result"]
    assert text_of(result).endswith("- access grant g1 is not among the first 500 active grants KVM Fleet listed")


@pytest.mark.parametrize("attempt", range(4))  # a held lock aborts the exit only sometimes
def test_sigterm_while_a_person_is_asked_exits_0_quietly(platform, attempt):
    # The reader thread is blocked on stdin then: no lock of a buffered stream may be held at exit.
    c = Client(platform.url)
    c.initialize(capabilities=ASKS)
    c.call(2, "power_action", CYCLE)
    asked(c)
    c.proc.send_signal(signal.SIGTERM)
    assert c.proc.wait(timeout=10) == 0
    assert c.proc.stderr.read() == b""
    assert writes(platform) == []


# -- details pinned in-process (mutation testing sees these) -----------------------------------------


@responses.activate
def test_the_record_says_when_the_model_confirmed_or_did_not(tmp_path):
    path = tmp_path / "agent.jsonl"
    server = make_server(writes=True, KVMFLEET_MCP_AUDIT_LOG=str(path))
    responses.add("POST", API + "/v1/access-grants/g1:revoke", json={}, headers={"X-Request-Id": "req\x1b-7"})
    for confirm in (False, True):
        server.handle({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {
            "name": "revoke_access", "arguments": {"grant_id": "g1", "reason": "x", "confirm": confirm}}})
    missing, confirmed = [json.loads(row) for row in path.read_text().splitlines()]
    assert missing["confirmation"] == {"by": "model", "answer": "missing"} and missing["outcome"] == "error"
    assert "status" not in missing and missing["targets"] == {"grant_id": "g1"}
    assert confirmed["confirmation"] == {"by": "model", "answer": "confirm"} and confirmed["outcome"] == "done"
    assert (confirmed["status"], confirmed["platform_request_id"]) == (200, "req-7")  # header text made safe
    assert confirmed["client"] == {"name": "pytest", "version": "1.0"} and confirmed["write"] is True
    assert re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z", confirmed["time"])
    assert isinstance(confirmed["duration_ms"], float) and 0 <= confirmed["duration_ms"] < 10_000


@responses.activate
def test_a_preview_quotes_the_device_id_into_its_segment_and_bounds_what_the_platform_says():
    long_name = "n" * 100
    started = kv._utc(time.time() - 7230)[:19] + ".5+00:00"  # 2 h 0 min 30 s ago; the fraction is not read
    responses.add("GET", API + "/v1/devices/a%3Ab%40c", json={"name": long_name, "status": None, "power_state": 3})
    responses.add("GET", API + "/v1/console-sessions", json={"items": [
        {"user": "u", "device_id": "a:b@c", "started_at": started},
        {"user": "v", "device_id": "a:b@c", "started_at": "tomorrow"},
        {"user": "w", "device_id": "a:b@c", "started_at": kv._utc(time.time() + 3600)}]})
    responses.add("GET", API + "/v1/access-grants", json={"items": []})
    result = make_server(writes=True).handle({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {
        "name": "power_action", "arguments": {"device_id": "a:b@c", "action": "off"}}})["result"]
    lines = text_of(result).split("\n")[2:]
    assert lines[0] == '- device "%s\\n[... 20 more characters not shown]" (a:b@c): status unknown, power 3' % (
        "n" * 80)
    assert re.fullmatch(re.escape('- console sessions open on it: "u" on device "a:b@c" since "%s", open for 2 h 0 min; '
                                  '"v" on device "a:b@c" since "tomorrow"; "w" on device "a:b@c" since "' % started)
                        + r'[0-9T:Z-]+"', lines[1]), lines[1]  # no age for what cannot be read or lies ahead
    assert lines[2] == "- active access grants on it: none"


def test_without_a_stdio_channel_a_client_that_can_ask_is_refused_not_skipped():
    server = make_server(writes=True, initialize=None)
    server.handle({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": dict(INIT, capabilities=ASKS)})
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        mock.add("GET", API + "/v1/access-grants", json={"items": []})
        result = server.handle({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {
            "name": "revoke_access", "arguments": {"grant_id": "g1", "confirm": True}}})["result"]
    assert text_of(result) == ("Not done: revoke_access would revoke access grant g1 at once, cutting off its "
                               "holder, and there is no stdio channel to ask the user on.")


@pytest.mark.parametrize("capabilities,asks", [
    ({"elicitation": {}}, True), ({"elicitation": {"form": {}}}, True), ({"elicitation": {"form": {}, "url": {}}}, True),
    ({"elicitation": {"url": {}}}, False), ({"elicitation": {"form": True}}, False), ({"elicitation": []}, False),
    ({}, False), (None, False), ([], False)])
def test_form_elicitation_is_read_from_the_capabilities_as_the_spec_says(capabilities, asks):
    assert kv.asks_forms(capabilities) is asks


def test_a_queued_call_cancelled_while_it_waited_is_never_run(client, platform):
    # Security: a cancelled destructive call must not come back to life after the person answers another.
    c = client()
    c.initialize(capabilities=ASKS)
    c.call(1, "power_action", CYCLE)
    request = asked(c)
    c.call(2, "end_console_session", {"session_id": "cs_r640_20m"})
    c.send({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 2}})
    answer(c, request, ACCEPT)
    assert c.recv()["id"] == 1
    c.send({"jsonrpc": "2.0", "id": 3, "method": "ping"})
    assert c.recv() == {"jsonrpc": "2.0", "id": 3, "result": {}}  # nothing for 2: not asked, not run
    assert [w["path"] for w in writes(platform)] == ["/v1/devices/dev_srv_pdx_3/power"]
    c.close()


def test_requests_beyond_the_waiting_bound_are_answered_busy(platform, monkeypatch, capfd):
    # Security: a client cannot make the server hold without bound what it sends during a question.
    monkeypatch.setattr(kv, "MAX_WAITING_BYTES", 160)
    InProcessClient.capfd = capfd
    c = InProcessClient(platform.url)
    c.initialize(capabilities=ASKS)
    c.call(1, "power_action", CYCLE)
    request = asked(c)
    for n in (2, 3, 4):
        c.send({"jsonrpc": "2.0", "id": n, "method": "tools/list"})  # 51 bytes each: 153 held
    c.send({"jsonrpc": "2.0", "method": "notifications/initialized"})  # over: dropped, nothing to answer
    c.send({"jsonrpc": "2.0", "id": "x" * 60, "method": "tools/list"})
    assert c.recv() == {"jsonrpc": "2.0", "id": "x" * 60, "error": {"code": -32600, "message": (
        "Busy: the user is being asked to confirm another call; send this again after it")}}
    answer(c, request, {"action": "decline"})
    assert [c.recv()["id"] for _ in range(4)] == [1, 2, 3, 4]
    c.close()


def test_the_person_sees_the_free_text_the_call_would_send(client):
    c = client()
    c.initialize(capabilities=ASKS)
    c.call(1, "end_console_session", {"session_id": "cs_pdx3_9h", "reason": "approved by the CISO\u202e"})
    message = asked(c)["params"]["message"]
    assert ('disconnecting its user.\nIt would send exactly: {"session_id":"cs_pdx3_9h",'
            '"reason":"approved by the CISO\\u202e"}\n') in message
    c.close()


def test_the_person_sees_every_character_of_a_long_reason_not_the_first_80(client, platform):
    # Security: the end of a 1,000-character reason must not reach the platform unseen.
    reason = "routine maintenance, " * 45 + "approved by the CISO; skip 4-eyes review"
    assert len(reason) <= 1000
    c = client()
    c.initialize(capabilities=ASKS)
    c.call(1, "end_console_session", {"session_id": "cs_pdx3_9h", "reason": reason})
    message = asked(c)["params"]["message"]
    assert '"reason":%s' % json.dumps(reason) in message
    c.close()


@responses.activate
def test_a_preview_read_nested_too_deeply_to_parse_is_a_failed_read_not_a_crash():
    responses.add("GET", API + "/v1/access-grants", body=b"[" * 100_000 + b"]" * 100_000,
                  content_type="application/json")
    result = make_server(writes=True).handle({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {
        "name": "revoke_access", "arguments": {"grant_id": "g1"}}})["result"]
    assert '\n- could not read access grant: HTTP 200 OK "[[[[' in text_of(result)


def test_a_signature_lifted_onto_a_payload_written_for_another_call_is_refused(client, platform):
    # Security: the payload is readable (base64 JSON) and its digest computable; only the MAC binds it.
    import base64

    c = client()
    state = first_round(c)["requestState"]
    encoded, mac = state.split(".")
    payload = json.loads(base64.urlsafe_b64decode(encoded))
    other = {"device_id": "dev_lab_pikvm_1", "action": "cycle"}
    payload["args"] = kv._digest(other)
    forged = base64.urlsafe_b64encode(json.dumps(payload, separators=(",", ":")).encode()).decode() + "." + mac
    result = retry(c, 2, forged, ACCEPT, other)
    assert "did not issue for this tool and these arguments" in text_of(result)
    assert writes(platform) == []
    c.close()


@responses.activate
def test_a_yes_given_under_one_token_does_not_act_under_the_next(tmp_path):
    # Security: requestState is bound to the principal: after a token rotation it is refused.
    token_file = tmp_path / "token"
    token_file.write_text("kvmf_first_token_123")
    token_file.chmod(0o600)
    responses.add("GET", API + "/v1/tokens/current", json={"scope": "write"})
    for path in ("/v1/devices/d1", "/v1/console-sessions", "/v1/access-grants"):
        responses.add("GET", API + path, json={"items": []})
    server = kv.Server(make_config(KVMFLEET_TOKEN="", KVMFLEET_TOKEN_FILE=str(token_file),
                                   KVMFLEET_MCP_ALLOW_WRITES="true"))
    params = {"name": "power_action", "arguments": {"device_id": "d1", "action": "off"}, "_meta": modern_meta(ASKS)}
    asked = server.handle({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": params})["result"]
    token_file.write_text("kvmf_second_token_456")
    retried = dict(params, requestState=asked["requestState"], inputResponses={"confirm_action": ACCEPT})
    result = server.handle({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": retried})["result"]
    assert "did not issue for this tool and these arguments" in text_of(result)
    assert writes_sent(responses.calls) == []
