"""The built-in argument checker gives jsonschema's verdict, in both dialects, on generated arguments."""
from __future__ import annotations

import os

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvmfleet_mcp as kv
from conftest import make_server, rpc, text_of

STRICT = os.environ.get("KVMFLEET_TESTS_STRICT") == "1"
VALIDATORS = [jsonschema.Draft7Validator] + (
    [jsonschema.Draft202012Validator] if hasattr(jsonschema, "Draft202012Validator") else [])

# Values near every edge our keywords have: types, enums, patterns, lengths, bounds.
EDGE_STRINGS = ["", "a", "dev_1", "../x", "a/b", "a b", ".", "..", "-x", "x" * 128, "x" * 129, "x" * 1001,
                "2026-11-23T08:00:00Z", "2026-11-23T08:00:00.123+01:00", "2026-11-23 08:00:00Z", "2026-13",
                "2026-11", "nis2", "NIS2", "on", "off", "cycle", "firing", "pending", "dev\n", "ü", "日本"]
EDGE_VALUES = st.one_of(
    st.sampled_from(EDGE_STRINGS), st.text(max_size=40), st.integers(-2, 12000), st.sampled_from([0, 1, 500, 501, 10080, 10081]),
    st.floats(allow_nan=False), st.sampled_from([5.0, 1.0, 500.5, True, False, None, [], {}, [1], {"a": 1}]),
)


def arguments(tool):
    names = list(tool.properties) + ["confirm", "extra", "cursor"]
    return st.dictionaries(st.sampled_from(names), EDGE_VALUES, max_size=len(names))


@pytest.mark.parametrize("tool", kv.TOOLS, ids=lambda t: t.name)
def test_the_checker_agrees_with_jsonschema_on_generated_arguments(tool):
    schema = kv.input_schema(tool)
    validators = [cls(schema) for cls in VALIDATORS]

    @settings(max_examples=500 if STRICT else 100, deadline=None, suppress_health_check=list(HealthCheck))
    @given(arguments(tool))
    def agree(args):
        verdict = kv.arguments_fit(tool, args)
        for validator in validators:
            assert verdict == validator.is_valid(args), (validator.__name__, args)

    agree()


@pytest.mark.parametrize("tool", kv.TOOLS, ids=lambda t: t.name)
def test_the_checker_accepts_a_valid_call_of_every_tool(tool):
    from test_http_requests import CASES

    for name, args, *_ in CASES:
        if name == tool.name:
            assert kv.arguments_fit(tool, args) and jsonschema.Draft7Validator(kv.input_schema(tool)).is_valid(args)


def test_an_integral_float_is_an_integer_and_is_sent_as_one():
    tool = kv.TOOLS_BY_NAME["list_devices"]
    assert kv.arguments_fit(tool, {"limit": 5.0}) and not kv.arguments_fit(tool, {"limit": 5.5})
    assert not kv.arguments_fit(tool, {"limit": True})


def test_a_disagreement_is_refused_and_logged_never_let_through(monkeypatch, capsys):
    # Security: fail closed if the built-in checker and jsonschema ever disagree.
    monkeypatch.setattr(kv, "arguments_fit", lambda tool, args: False)
    result = rpc(make_server(), "tools/call", {"name": "list_isos", "arguments": {}})["result"]
    assert result["isError"] and text_of(result) == "Invalid arguments for list_isos. See the tool's inputSchema."
    assert "bug: list_isos's arguments were refused, yet jsonschema accepts them" in capsys.readouterr().err
