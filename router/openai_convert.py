"""OpenAI shapes <-> the proto: request bodies to GenerateRequests, GenerateResponses to OpenAI's
completion objects, chunks, logprobs and usage, EdgeLoraErrors to OpenAI's error bodies.
Pure functions, no I/O: the HTTP handlers (router/http_api.py) do the calling.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from typing import Any

import grpc

from common.errors import EdgeLoraError, InvalidArgument
from edgelora.v1 import types_pb2
from router.openai_schema import (
    UINT64_MAX,
    ChatCompletionRequest,
    ChatMessageIn,
    CompletionRequest,
    SamplingBody,
)

HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400, grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403, grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409, grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}  # any other status: 500
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
               403: "permission_error", 404: "not_found_error", 409: "conflict_error",
               413: "invalid_request_error", 429: "rate_limit_error"}  # any other: server_error
ROLE_ALIASES = {"developer": "system"}  # OpenAI's newer name for the system turn


# -- requests --

def adapter_id_for(model: str | None, base_model_name: str) -> str:
    """The GenerateRequest.adapter_id a `model` names: "" for the base model (its name, or no
    model), else the adapter id or "auto" as given. The base model's name wins over an adapter
    of the same id."""
    return "" if not model or model == base_model_name else model


def chat_messages(messages: Sequence[ChatMessageIn]) -> list[types_pb2.ChatMessage]:
    converted = []
    for index, message in enumerate(messages):
        content = message.content
        if isinstance(content, list):
            if any(part.type != "text" for part in content):
                raise InvalidArgument(f"messages[{index}].content: only text parts are "
                                      "supported (this model reads text)")
            content = "".join(part.text or "" for part in content)
        converted.append(types_pb2.ChatMessage(role=ROLE_ALIASES.get(message.role, message.role),
                                               content=content or ""))
    return converted


def _refuse_unsupported(body: SamplingBody) -> None:
    if body.logit_bias:
        raise InvalidArgument("logit_bias is not supported by this server")
    if isinstance(body, ChatCompletionRequest) and body.tools:
        raise InvalidArgument("tools (function calling) are not supported by this server")
    if isinstance(body, CompletionRequest):
        if body.echo or body.suffix:
            raise InvalidArgument("echo and suffix are not supported by this server")
        if body.best_of is not None and body.best_of != body.n:
            raise InvalidArgument("best_of is not supported by this server (use n)")


def sampling_params(body: SamplingBody) -> types_pb2.SamplingParams:
    """The body's sampling fields; absent ones stay absent (the worker's defaults), except the
    temperature, which OpenAI defaults to 1 where our proto defaults to greedy."""
    _refuse_unsupported(body)
    params = types_pb2.SamplingParams(
        temperature=1.0 if body.temperature is None else body.temperature,
        ignore_eos=body.ignore_eos)
    if isinstance(body, ChatCompletionRequest):
        max_tokens = body.max_completion_tokens or body.max_tokens
        params.logprobs = body.logprobs
        if body.top_logprobs is not None:
            params.top_logprobs = body.top_logprobs
    else:
        max_tokens = body.max_tokens
        if body.logprobs is not None:
            params.logprobs, params.top_logprobs = True, body.logprobs
    if max_tokens is not None:
        params.max_tokens = max_tokens
    for name in ("top_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
        if (value := getattr(body, name)) is not None:
            setattr(params, name, value)
    if body.top_k is not None and body.top_k > 0:
        params.top_k = body.top_k
    if body.seed is not None:
        params.seed = body.seed % (UINT64_MAX + 1)  # OpenAI's seeds are signed
    if body.stop is not None:
        params.stop.extend([body.stop] if isinstance(body.stop, str) else body.stop)
    if body.response_format is not None and body.response_format.type != "text":
        params.response_format.type = body.response_format.type
        if body.response_format.type == "json_schema":
            spec = body.response_format.json_schema
            if spec is None or spec.json_schema is None:
                raise InvalidArgument("response_format json_schema needs "
                                      "{\"json_schema\": {\"name\": ..., \"schema\": {...}}}")
            params.response_format.json_schema = json.dumps(spec.json_schema)
    return params


def chat_request(body: ChatCompletionRequest, adapter_id: str) -> types_pb2.GenerateRequest:
    return types_pb2.GenerateRequest(messages=chat_messages(body.messages),
                                     adapter_id=adapter_id, params=sampling_params(body))


def completion_requests(body: CompletionRequest, adapter_id: str
                        ) -> list[types_pb2.GenerateRequest]:
    """One request per prompt of the body (a batch of texts gives several)."""
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise InvalidArgument("prompt must be a text or a list of texts (token-id prompts are "
                              "not supported)")
    params = sampling_params(body)
    return [types_pb2.GenerateRequest(prompt=p, adapter_id=adapter_id, params=params)
            for p in prompts]


def derived_seed(seed: int, index: int) -> int:
    """Choice `index`'s seed: the request's own for choice 0 (n=1 and n=2 start alike), a hash
    for the others, so seeded choices differ from each other and from nearby seeds."""
    if index == 0:
        return seed
    digest = hashlib.blake2b(f"{seed}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def choice_requests(prepared: types_pb2.GenerateRequest, n: int
                    ) -> list[types_pb2.GenerateRequest]:
    """n copies of a prepared request, one per choice, each seeded apart when seeded."""
    choices = []
    for index in range(n):
        choice = types_pb2.GenerateRequest()
        choice.CopyFrom(prepared)
        if prepared.params.HasField("seed"):
            choice.params.seed = derived_seed(prepared.params.seed, index)
        choices.append(choice)
    return choices


# -- responses --

def _token_bytes(entry: types_pb2.TokenLogprob | types_pb2.TopLogprob) -> list[int]:
    return list(entry.token_bytes or entry.token.encode())


def chat_logprobs(entries: Iterable[types_pb2.TokenLogprob]) -> dict[str, Any]:
    return {"content": [
        {"token": e.token, "logprob": e.logprob, "bytes": _token_bytes(e),
         "top_logprobs": [{"token": t.token, "logprob": t.logprob, "bytes": _token_bytes(t)}
                          for t in e.top_logprobs]}
        for e in entries]}


def completion_logprobs(entries: Sequence[types_pb2.TokenLogprob], text_offset: int
                        ) -> dict[str, Any]:
    """The legacy shape; each position's top dict holds the sampled token too (as vLLM's)."""
    offsets = []
    for e in entries:
        offsets.append(text_offset)
        text_offset += len(e.token)
    return {"tokens": [e.token for e in entries],
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{e.token: e.logprob, **{t.token: t.logprob for t in e.top_logprobs}}
                             for e in entries],
            "text_offset": offsets}


def usage(responses: Sequence[types_pb2.GenerateResponse], n: int) -> dict[str, int]:
    """Totals over the choices; each prompt (every n-th response) is counted once."""
    prompt = sum(r.usage.prompt_tokens for r in responses[::n])
    completion = sum(r.usage.completion_tokens for r in responses)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def chat_completion(request_id: str, created: int, model: str,
                    responses: Sequence[types_pb2.GenerateResponse], n: int,
                    with_logprobs: bool) -> dict[str, Any]:
    return {"id": request_id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": i, "message": {"role": "assistant", "content": r.text},
                         "logprobs": chat_logprobs(r.logprobs) if with_logprobs else None,
                         "finish_reason": r.finish_reason or None}
                        for i, r in enumerate(responses)],
            "usage": usage(responses, n)}


def text_completion(request_id: str, created: int, model: str,
                    responses: Sequence[types_pb2.GenerateResponse], n: int,
                    with_logprobs: bool) -> dict[str, Any]:
    return {"id": request_id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": i, "text": r.text,
                         "logprobs": completion_logprobs(r.logprobs, 0) if with_logprobs
                         else None,
                         "finish_reason": r.finish_reason or None}
                        for i, r in enumerate(responses)],
            "usage": usage(responses, n)}


def model_card(model_id: str, owned_by: str, created: int, parent: str | None,
               max_model_len: int | None = None) -> dict[str, Any]:
    """A /v1/models entry in vLLM's shape (parent: the base model an adapter applies to)."""
    card = {"id": model_id, "object": "model", "created": created, "owned_by": owned_by,
            "root": model_id, "parent": parent}
    if max_model_len:
        card["max_model_len"] = max_model_len
    return card


# -- errors --

def error_body(status: int, message: str, code: str | None = None,
               param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"),
                      "param": param, "code": code}}


def status_error(exc: EdgeLoraError, model_param: bool = False) -> tuple[int, dict[str, Any]]:
    """(HTTP status, OpenAI error body) of a refusal; `model_param`: a NOT_FOUND is about the
    request's `model`."""
    status = HTTP_STATUS.get(exc.code, 500)
    code = exc.code.name.lower()
    param = None
    if model_param and exc.code is grpc.StatusCode.NOT_FOUND:
        code, param = "model_not_found", "model"
    return status, error_body(status, str(exc), code, param)
