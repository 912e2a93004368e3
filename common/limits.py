"""Bounds on untrusted request fields, checked before any work is done (no tokenizing, no
embedding, no file access). Each refusal is an InvalidArgument naming the limit, its value and
the flag that sets it; an untrusted value reaches a message only through repr() and truncated."""

from __future__ import annotations

import json
import math
import re

from common.errors import InvalidArgument
from common.shared_config import SharedConfig
from edgelora.v1 import types_pb2

ADAPTER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,127}")
AUTO = "auto"
ROLES = ("system", "user", "assistant", "tool")
# OpenAI's bounds (and vLLM's): presence/frequency penalties, and top_logprobs.
MAX_ABS_PENALTY = 2.0
MAX_TOP_LOGPROBS = 20
RESPONSE_FORMATS = ("text", "json_object", "json_schema")
# A JSON Schema is compiled to a grammar per request (milliseconds for a few KiB): bounded so
# that one request cannot hold a compile thread for long. Nesting is what costs: xgrammar took
# 0.05 s for 32 nested objects (JSON depth 65), 2.6 s for 300 and 96 s for 1,000 (60 KiB);
# real schemas nest a handful of levels.
MAX_JSON_SCHEMA_BYTES = 64 * 1024
MAX_JSON_SCHEMA_DEPTH = 64
# Size and depth do not bound everything: `pattern` repetition counts and `format` fields cost
# seconds in fewer bytes. A json_schema is compiled in a child process first (worker.schema_trial)
# and refused when that takes longer than this; real schemas compile in milliseconds.
MAX_JSON_COMPILE_S = 5.0


def shown(value: str, limit: int = 80) -> str:
    """A safe rendering of an untrusted string for messages and logs: repr() escapes control
    characters, and a long value is cut."""
    return repr(value[:limit]) + ("..." if len(value) > limit else "")


def utf8_len(text: str, limit: int) -> int:
    """Bytes of `text` in UTF-8, without encoding a text that is surely over `limit`."""
    if len(text) > limit:  # every character takes at least one byte
        return len(text)
    return len(text.encode("utf-8", "surrogatepass"))


def check_adapter_id(adapter_id: str, field: str = "adapter_id") -> None:
    if not ADAPTER_ID.fullmatch(adapter_id) or adapter_id == AUTO:
        raise InvalidArgument(f"{field} {shown(adapter_id)}: use 1-128 letters, digits, '-', "
                              "'_', '.', '/', starting with a letter or digit (and not 'auto')")


def check_prompt(request: types_pb2.GenerateRequest | types_pb2.TokenizeRequest,
                 limits: SharedConfig) -> None:
    """The prompt or messages of a request (Generate, Tokenize): one of them, roles, sizes."""
    if request.prompt and request.messages:
        raise InvalidArgument("set either prompt or messages, not both")
    if len(request.messages) > limits.max_messages:
        raise InvalidArgument(f"{len(request.messages)} messages; this server takes at most "
                              f"{limits.max_messages} (--max-messages)")
    total = utf8_len(request.prompt, limits.max_prompt_bytes)
    for message in request.messages:
        if message.role not in ROLES:
            raise InvalidArgument(f"message role {shown(message.role)}: use one of "
                                  f"{', '.join(ROLES)}")
        total += utf8_len(message.content, limits.max_prompt_bytes)
        if total > limits.max_prompt_bytes:
            break
    if total > limits.max_prompt_bytes:
        raise InvalidArgument(f"the prompt is over {limits.max_prompt_bytes} bytes "
                              "(--max-prompt-bytes): shorten it")


def check_generate(request: types_pb2.GenerateRequest, limits: SharedConfig) -> None:
    """The prompt (or messages), stop strings, ids and generation controls of a request."""
    check_prompt(request, limits)
    stops = request.params.stop
    if len(stops) > limits.max_stop_strings:
        raise InvalidArgument(f"{len(stops)} stop strings; this server takes at most "
                              f"{limits.max_stop_strings} (--max-stop-strings)")
    for stop in stops:
        if not stop or utf8_len(stop, limits.max_stop_bytes) > limits.max_stop_bytes:
            raise InvalidArgument(f"stop string {shown(stop)}: each must be 1-"
                                  f"{limits.max_stop_bytes} bytes (--max-stop-bytes)")
    check_controls(request.params)


def check_controls(params: types_pb2.SamplingParams) -> None:
    """Penalties, logprobs and response_format, within vLLM's (and OpenAI's) bounds."""
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(params, name)
        if params.HasField(name) and not -MAX_ABS_PENALTY <= value <= MAX_ABS_PENALTY:
            raise InvalidArgument(f"params.{name} must be in [-{MAX_ABS_PENALTY:g}, "
                                  f"{MAX_ABS_PENALTY:g}] (0 = off), got {value:g}")
    rep = params.repetition_penalty
    if params.HasField("repetition_penalty") and not (rep > 0 and math.isfinite(rep)):
        raise InvalidArgument(f"params.repetition_penalty must be > 0 (1 = off), got {rep:g}")
    if params.top_logprobs > MAX_TOP_LOGPROBS:
        raise InvalidArgument(f"params.top_logprobs must be at most {MAX_TOP_LOGPROBS}, got "
                              f"{params.top_logprobs}")
    if params.top_logprobs and not params.logprobs:
        raise InvalidArgument("params.top_logprobs needs params.logprobs set")
    check_response_format(params.response_format)


def check_response_format(fmt: types_pb2.ResponseFormat) -> None:
    """A known type; for json_schema, a bounded JSON object (the worker compiles it)."""
    if fmt.type and fmt.type not in RESPONSE_FORMATS:
        raise InvalidArgument(f"response_format.type {shown(fmt.type)}: use one of "
                              f"{', '.join(RESPONSE_FORMATS)}")
    if fmt.type != "json_schema":
        if fmt.json_schema:
            raise InvalidArgument("response_format.json_schema is for type json_schema only")
        return
    if utf8_len(fmt.json_schema, MAX_JSON_SCHEMA_BYTES) > MAX_JSON_SCHEMA_BYTES:
        raise InvalidArgument(f"response_format.json_schema is over {MAX_JSON_SCHEMA_BYTES} "
                              "bytes")
    try:
        schema = json.loads(fmt.json_schema) if fmt.json_schema else None
    except (ValueError, RecursionError) as exc:
        raise InvalidArgument(f"response_format.json_schema is not valid JSON: "
                              f"{shown(str(exc), 120)}") from exc
    if not isinstance(schema, dict):
        raise InvalidArgument("response_format.json_schema must be a JSON object (a JSON "
                              "Schema)")
    if json_depth(schema, MAX_JSON_SCHEMA_DEPTH) > MAX_JSON_SCHEMA_DEPTH:
        raise InvalidArgument(f"response_format.json_schema nests deeper than "
                              f"{MAX_JSON_SCHEMA_DEPTH} levels of objects and arrays")


def json_depth(value: object, limit: int) -> int:
    """Nesting depth of parsed JSON (a scalar is 0), counted without recursion and no further
    than limit + 1."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        item, depth = todo.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            if depth <= limit:
                todo.extend((child, depth + 1) for child in
                            (item.values() if isinstance(item, dict) else item))
    return deepest


CARD_KINDS = ("", "behaviour", "domain")  # "" = told from how the examples are written


def check_card(description: str, example_prompts: list[str], max_card_bytes: int,
               max_example_prompts: int, kind: str = "") -> None:
    """An adapter card (description, example prompts, kind) the selector will embed."""
    if kind not in CARD_KINDS:
        raise InvalidArgument(f"kind {shown(kind)}: use \"behaviour\", \"domain\" or leave it "
                              "empty (told from the examples)")
    if utf8_len(description, max_card_bytes) > max_card_bytes:
        raise InvalidArgument(f"description is over {max_card_bytes} bytes (--max-card-bytes)")
    if len(example_prompts) > max_example_prompts:
        raise InvalidArgument(f"{len(example_prompts)} example prompts; this server takes at "
                              f"most {max_example_prompts} (--max-example-prompts)")
    for index, prompt in enumerate(example_prompts):
        if utf8_len(prompt, max_card_bytes) > max_card_bytes:
            raise InvalidArgument(f"example_prompts[{index}] is over {max_card_bytes} bytes "
                                  "(--max-card-bytes)")
