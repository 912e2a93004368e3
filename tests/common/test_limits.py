"""common.limits: every bound on untrusted request fields refuses with INVALID_ARGUMENT and says
which limit, and a value inside every bound passes."""

from __future__ import annotations

import json

import pytest

from common.errors import InvalidArgument
from common.limits import (
    MAX_JSON_SCHEMA_DEPTH,
    check_adapter_id,
    check_card,
    check_generate,
    json_depth,
    shown,
)
from common.shared_config import SharedConfig
from edgelora.v1 import types_pb2

LIMITS = SharedConfig(max_prompt_bytes=100, max_messages=3, max_stop_strings=2, max_stop_bytes=5)


def nested_schema(objects: int) -> str:
    """`objects` objects each inside the last one's "properties" (JSON depth 2 * objects + 1)."""
    head = '{"type": "object", "required": ["x"], "properties": {"x": '
    return head * objects + '{"type": "object"}' + "}}" * objects


def request(**fields) -> types_pb2.GenerateRequest:
    params = fields.pop("params", {})
    return types_pb2.GenerateRequest(params=types_pb2.SamplingParams(**params), **fields)


def msg(content: str, role: str = "user") -> types_pb2.ChatMessage:
    return types_pb2.ChatMessage(role=role, content=content)


@pytest.mark.parametrize("fields", [
    {"prompt": "x" * 100},
    {"prompt": "é" * 50},  # 100 bytes
    {"messages": [msg("a" * 50), msg("b" * 50, "assistant")]},
    {"prompt": "hi", "params": {"stop": ["12345", "."]}},
    {"prompt": "hi", "params": {"presence_penalty": -2.0, "frequency_penalty": 2.0,
                                "repetition_penalty": 3.0}},
    {"prompt": "hi", "params": {"logprobs": True, "top_logprobs": 20}},
    {"prompt": "hi", "params": {"response_format": {"type": "json_object"}}},
    {"prompt": "hi", "params": {"response_format": {"type": "text"}}},
    {"prompt": "hi", "params": {"response_format": {"type": "json_schema",
                                                    "json_schema": nested_schema(31)}}},
    {"prompt": "hi", "params": {"response_format": {"type": "json_schema",
                                                    "json_schema": '{"type": "object"}'}}},
])
def test_requests_inside_the_bounds_pass(fields: dict) -> None:
    check_generate(request(**fields), LIMITS)


@pytest.mark.parametrize("fields, says", [
    ({"prompt": "x" * 101}, "--max-prompt-bytes"),
    ({"prompt": "é" * 51}, "--max-prompt-bytes"),  # 51 characters, 102 bytes
    ({"messages": [msg("a" * 60), msg("b" * 60)]}, "--max-prompt-bytes"),
    ({"messages": [msg("a")] * 4}, "--max-messages"),
    ({"messages": [msg("a", role="root")]}, "role"),
    ({"prompt": "hi", "messages": [msg("a")]}, "not both"),
    ({"prompt": "hi", "params": {"stop": ["a", "b", "c"]}}, "--max-stop-strings"),
    ({"prompt": "hi", "params": {"stop": ["123456"]}}, "--max-stop-bytes"),
    ({"prompt": "hi", "params": {"stop": [""]}}, "--max-stop-bytes"),
    ({"prompt": "hi", "params": {"presence_penalty": 2.5}}, "presence_penalty"),
    ({"prompt": "hi", "params": {"frequency_penalty": -2.01}}, "frequency_penalty"),
    ({"prompt": "hi", "params": {"frequency_penalty": float("nan")}}, "frequency_penalty"),
    ({"prompt": "hi", "params": {"repetition_penalty": 0.0}}, "repetition_penalty"),
    ({"prompt": "hi", "params": {"repetition_penalty": float("inf")}}, "repetition_penalty"),
    ({"prompt": "hi", "params": {"logprobs": True, "top_logprobs": 21}}, "at most 20"),
    ({"prompt": "hi", "params": {"top_logprobs": 2}}, "needs params.logprobs"),
    ({"prompt": "hi", "params": {"response_format": {"type": "xml"}}}, "response_format.type"),
    ({"prompt": "hi", "params": {"response_format": {"type": "json_object",
                                                     "json_schema": "{}"}}}, "json_schema only"),
    ({"prompt": "hi", "params": {"response_format": {"type": "json_schema"}}}, "JSON object"),
    ({"prompt": "hi", "params": {"response_format": {"type": "json_schema",
                                                     "json_schema": "[1, 2]"}}}, "JSON object"),
    ({"prompt": "hi", "params": {"response_format": {"type": "json_schema",
                                                     "json_schema": "{oops"}}}, "valid JSON"),
    ({"prompt": "hi", "params": {"response_format": {
        "type": "json_schema", "json_schema": "[" * 100_000 + "]" * 100_000}}}, "bytes"),
    ({"prompt": "hi", "params": {"response_format": {
        "type": "json_schema", "json_schema": "[" * 30_000 + "]" * 30_000}}}, "valid JSON"),
    # 60 KiB of nesting took the worker's grammar compiler 96 s
    ({"prompt": "hi", "params": {"response_format": {
        "type": "json_schema", "json_schema": nested_schema(32)}}}, "nests deeper than 64"),
    ({"prompt": "hi", "params": {"response_format": {
        "type": "json_schema", "json_schema": nested_schema(300)}}}, "nests deeper"),
    ({"prompt": "hi", "params": {"response_format": {
        "type": "json_schema", "json_schema": '{"enum": ' + "[" * 70 + "]" * 70 + "}"}}},
        "nests deeper"),
])
def test_each_bound_refuses_and_names_its_flag(fields: dict, says: str) -> None:
    with pytest.raises(InvalidArgument, match=says):
        check_generate(request(**fields), LIMITS)


@pytest.mark.parametrize("adapter_id", ["pirate", "a", "org/model-v1.2", "x" * 128])
def test_good_adapter_ids(adapter_id: str) -> None:
    check_adapter_id(adapter_id)


@pytest.mark.parametrize("adapter_id", ["", "auto", "-x", "a:b", "a b", "a\nb", "x" * 129, "é"])
def test_bad_adapter_ids(adapter_id: str) -> None:
    with pytest.raises(InvalidArgument, match="adapter_id"):
        check_adapter_id(adapter_id)


def test_card_bounds() -> None:
    check_card("d" * 10, ["p" * 10] * 2, max_card_bytes=10, max_example_prompts=2)
    for kind in ("", "behaviour", "domain"):
        check_card("d", [], max_card_bytes=10, max_example_prompts=2, kind=kind)
    with pytest.raises(InvalidArgument, match="kind"):
        check_card("d", [], max_card_bytes=10, max_example_prompts=2, kind="Domain")
    for description, examples, says in [("d" * 11, [], "description"),
                                        ("", ["p"] * 3, "example prompts"),
                                        ("", ["p" * 11], r"example_prompts\[0\]")]:
        with pytest.raises(InvalidArgument, match=says):
            check_card(description, examples, max_card_bytes=10, max_example_prompts=2)


def test_shown_escapes_control_characters_and_cuts() -> None:
    assert "\n" not in shown("a\nb\x1b[31m") and "\\n" in shown("a\nb")
    assert shown("x" * 1000).endswith("...") and len(shown("x" * 1000)) < 100


def test_json_depth() -> None:
    assert json_depth(1, 5) == 0 and json_depth({}, 5) == 1 and json_depth([[], {"a": [1]}], 5) == 3
    assert json_depth(json.loads(nested_schema(31)), MAX_JSON_SCHEMA_DEPTH) == 63
    assert json_depth(json.loads("[" * 500 + "]" * 500), 10) == 11  # stops past the limit
