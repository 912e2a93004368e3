"""The OpenAI-compatible HTTP API's request bodies as pydantic models: types and shapes only.

Unknown fields are ignored, as OpenAI's and vLLM's servers do. Bounds a gRPC request has too
(prompt bytes, stop strings, penalties, top_logprobs, ...) are not checked here but by
common/limits.py on the GenerateRequest built from the body, so both protocols refuse the same
things with the same words. Only what gRPC lacks (n, content parts) and what the proto's unsigned
and float types need (no negatives where it is unsigned, no NaN or infinity) is bounded here.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# Each choice is a sequence of its own on the worker (a batch row, its KV blocks, a place in its
# tenant's max_running share): 8 keeps one request to an eighth of the default batch of 64, while
# covering what clients ask for in practice (OpenAI's examples use 1-4; vLLM's default cap is 1).
MAX_CHOICES = 8
UINT32_MAX = (1 << 32) - 1
UINT64_MAX = (1 << 64) - 1


class Body(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class ContentPart(Body):
    type: str
    text: str | None = None


class ChatMessageIn(Body):
    role: str
    # a string, or OpenAI's list of content parts (text parts only here), or null (assistant)
    content: str | list[ContentPart] | None = None


class StreamOptions(Body):
    include_usage: bool = False
    # vLLM's extra: usage (cumulative) in every chunk, for clients that count tokens as they come
    continuous_usage_stats: bool = False


class JsonSchemaSpec(Body):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, populate_by_name=True)

    name: str = ""
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormatIn(Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None


class SamplingBody(Body):
    """What chat and completions requests share."""

    model: str | None = None  # adapter id, "auto", or the base model's name; absent = base
    max_tokens: int | None = Field(default=None, ge=1, le=UINT32_MAX)
    temperature: float | None = None  # absent = 1, as OpenAI (gRPC's absent is greedy)
    top_p: float | None = None
    top_k: int | None = Field(default=None, ge=-1, le=UINT32_MAX)  # vLLM's extra; -1 or 0 = off
    seed: int | None = Field(default=None, ge=-(1 << 63), le=UINT64_MAX)
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    user: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None  # vLLM's extra (HF semantics)
    response_format: ResponseFormatIn | None = None
    ignore_eos: bool = False  # vLLM's extra: generate exactly max_tokens (benchmarks)
    logit_bias: dict[str, float] | None = None  # refused unless empty: not implemented


class ChatCompletionRequest(SamplingBody):
    messages: list[ChatMessageIn] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=UINT32_MAX)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=UINT32_MAX)
    tools: list[Any] | None = None  # refused unless empty: no tool calling


class CompletionRequest(SamplingBody):
    # text, or a batch of texts (one choice group each); token-id prompts are refused
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1, le=UINT32_MAX)  # OpenAI's and vLLM's default
    logprobs: int | None = Field(default=None, ge=0, le=UINT32_MAX)  # top tokens per position
    echo: bool = False  # refused when true: not implemented
    suffix: str | None = None  # refused: not implemented
    best_of: int | None = None  # refused unless it equals n


class TokenizeBody(Body):
    """vLLM's /tokenize: a prompt, or messages rendered with the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessageIn] | None = None


class OutcomeBody(Body):
    """POST /v1/outcomes: Router.ReportOutcome over HTTP (the completion's "id", a reward)."""

    request_id: str
    reward: float
