"""The declarative tool table against the contract in kvmfleet-api.md."""
from __future__ import annotations

import re
import string

import jsonschema
import pytest

import kvmfleet_mcp as kv

# Transcribed from ../shared/kvmfleet-api.md: tool -> (method, path, needs confirm).
CONTRACT = {
    "list_devices": ("GET", "/v1/devices", "never"),
    "get_device_health": ("GET", "/v1/devices/{device_id}", "never"),
    "query_audit_log": ("GET", "/v1/audit/events", "never"),
    "verify_audit_integrity": ("GET", "/v1/audit/integrity", "never"),
    "list_open_console_sessions": ("GET", "/v1/console-sessions", "never"),
    "list_access_grants": ("GET", "/v1/access-grants", "never"),
    "list_alerts": ("GET", "/v1/alerts/history", "never"),
    "list_policies": ("GET", "/v1/policies", "never"),
    "list_isos": ("GET", "/v1/isos", "never"),
    "get_audit_chain_head": ("GET", "/v1/audit/head", "never"),
    "get_compliance_score": ("POST", "/v1/reports/{framework}", "never"),
    "power_action": ("POST", "/v1/devices/{device_id}/power", "when action is off|off_hard|cycle"),
    "request_access": ("POST", "/v1/devices/{device_id}/access-requests", "never"),
    "approve_access": ("POST", "/v1/access-grants/{grant_id}:approve", "never"),
    "deny_access": ("POST", "/v1/access-grants/{grant_id}:deny", "never"),
    "revoke_access": ("POST", "/v1/access-grants/{grant_id}:revoke", "always"),
    "mount_iso": ("POST", "/v1/devices/{device_id}/iso:mount", "always"),
    "unmount_iso": ("POST", "/v1/devices/{device_id}/iso:unmount", "never"),
    "end_console_session": ("POST", "/v1/console-sessions/{session_id}:end", "always"),
    "acknowledge_alert": ("POST", "/v1/alerts/history/{alert_id}/acknowledge", "never"),
    "resolve_alert": ("POST", "/v1/alerts/history/{alert_id}/resolve", "never"),
}
READS = list(CONTRACT)[:11]


def test_the_table_is_exactly_the_contract_in_order():
    assert [(t.name, t.method, t.path, kv._confirm_rule(t)) for t in kv.TOOLS] == [
        (name,) + row for name, row in CONTRACT.items()]


def test_eleven_reads_are_read_only_and_ten_writes_are_not():
    assert [t.name for t in kv.TOOLS if not t.write] == READS
    assert len([t for t in kv.TOOLS if t.write]) == 10


def test_tool_names_are_valid_and_unique():
    names = [t.name for t in kv.TOOLS]
    assert len(set(names)) == len(names) == 21
    assert all(re.fullmatch(r"[a-z][a-z0-9_]{0,63}", name) for name in names)
    assert set(kv.TOOLS_BY_NAME) == set(names)


@pytest.mark.parametrize("tool", kv.TOOLS, ids=lambda t: t.name)
def test_input_schema_is_valid_in_both_dialects(tool):
    schema = kv.input_schema(tool)
    jsonschema.Draft7Validator.check_schema(schema)
    if hasattr(jsonschema, "Draft202012Validator"):
        jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["type"] == "object" and schema["additionalProperties"] is False


@pytest.mark.parametrize("tool", kv.TOOLS, ids=lambda t: t.name)
def test_every_property_is_typed_and_described_and_ids_have_a_pattern(tool):
    for name, prop in tool.properties.items():
        assert prop["type"] in ("string", "integer", "boolean") or name == "fields" and prop["type"] == "array", name
        assert prop["description"].strip(), name
        if name.endswith("_id") or name in ("framework", "count_by"):
            assert prop["pattern"].startswith("^") and prop["pattern"].endswith("$(?!\\n)"), name
    # Only keywords that mean the same in draft 7 and in 2020-12.
    same_in_both = {"type", "properties", "additionalProperties", "required", "description",
                    "pattern", "enum", "minLength", "maxLength", "minimum", "maximum",
                    "items", "minItems", "maxItems", "uniqueItems"}
    schema = kv.input_schema(tool)
    props = list(schema["properties"].values())
    used = set(schema) | {key for prop in props + [p["items"] for p in props if "items" in p] for key in prop}
    assert used <= same_in_both


@pytest.mark.parametrize("tool", kv.TOOLS, ids=lambda t: t.name)
def test_every_path_placeholder_is_a_required_property(tool):
    placeholders = [name for _, name, _, _ in string.Formatter().parse(tool.path) if name]
    for name in placeholders:
        assert name in tool.required and name in tool.properties
    assert set(tool.required) <= set(tool.properties)


@pytest.mark.parametrize("tool", kv.TOOLS, ids=lambda t: t.name)
def test_all_four_annotations_are_written_out(tool):
    annotations = kv.tool_listing(tool)["annotations"]
    for hint in ("readOnlyHint", "destructiveHint", "idempotentHint", "openWorldHint"):
        assert isinstance(annotations[hint], bool), hint
    assert annotations["readOnlyHint"] is not tool.write


@pytest.mark.parametrize("tool", kv.TOOLS, ids=lambda t: t.name)
def test_destructive_means_confirm_and_confirm_means_destructive(tool):
    assert tool.destructive == (tool.confirm is not None)
    assert ("confirm" in tool.properties) == (tool.confirm is not None)
    if tool.confirm is not None:
        assert tool.effect and tool.write and "confirm" not in tool.required
    if tool.destructive:
        assert not tool.read_only


def test_confirm_effect_names_every_placeholder_it_uses():
    for tool in kv.TOOLS:
        if tool.effect:
            used = {name for _, name, _, _ in string.Formatter().parse(tool.effect) if name}
            assert used <= set(tool.required), tool.name


def test_the_full_tool_list_stays_small():
    import json

    size = len(json.dumps([kv.tool_listing(t) for t in kv.TOOLS], separators=(",", ":")))
    assert size <= 16 * 1024, size


PAGED = ["list_devices", "query_audit_log", "list_open_console_sessions", "list_access_grants", "list_alerts"]


def test_exactly_the_paged_list_tools_take_fields_and_count_by_and_neither_is_ever_sent_on():
    assert [t.name for t in kv.TOOLS if "fields" in t.properties] == PAGED
    assert [t.name for t in kv.TOOLS if "count_by" in t.properties] == PAGED
    fields = kv.TOOLS_BY_NAME["list_devices"].properties["fields"]
    assert fields["items"]["pattern"] == kv.FIELD_PATTERN == kv.TOOLS_BY_NAME["list_alerts"].properties[
        "count_by"]["pattern"] == r"^[A-Za-z_][A-Za-z0-9_]{0,63}$(?!\n)"
    assert (fields["minItems"], fields["maxItems"], fields["uniqueItems"]) == (1, 16, True)
