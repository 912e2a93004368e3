"""router.openai_convert: OpenAI request bodies -> GenerateRequests (every field where the proto
has it, refusals for what it lacks), responses -> OpenAI shapes, statuses -> HTTP."""

from __future__ import annotations

import json

import grpc
import pytest

from common.errors import EdgeLoraError, InvalidArgument, NotFound
from edgelora.v1 import types_pb2
from router.openai_convert import (
    HTTP_STATUS,
    adapter_id_for,
    chat_completion,
    chat_logprobs,
    chat_request,
    choice_requests,
    completion_logprobs,
    completion_requests,
    derived_seed,
    status_error,
    text_completion,
    usage,
)
from router.openai_schema import ChatCompletionRequest, CompletionRequest
from router.registry import RpcError

USER = [{"role": "user", "content": "hi"}]


def chat(**fields) -> types_pb2.GenerateRequest:
    return chat_request(ChatCompletionRequest.model_validate({"messages": USER, **fields}), "a")


def completion(**fields) -> list[types_pb2.GenerateRequest]:
    return completion_requests(CompletionRequest.model_validate(fields), "a")


def test_model_names_the_adapter_auto_or_the_base() -> None:
    assert adapter_id_for(None, "Smol") == ""
    assert adapter_id_for("Smol", "Smol") == ""
    assert adapter_id_for("auto", "Smol") == "auto"
    assert adapter_id_for("pirate", "Smol") == "pirate"


def test_chat_fields_map_onto_the_proto() -> None:
    request = chat(max_tokens=9, max_completion_tokens=7, temperature=0.5, top_p=0.9, seed=-1,
                   stop="END", presence_penalty=0.5, frequency_penalty=-0.25,
                   repetition_penalty=1.2, logprobs=True, top_logprobs=3, top_k=40,
                   ignore_eos=True, user="u-1", some_future_field={"x": 1})
    p = request.params
    assert request.adapter_id == "a"
    assert [(m.role, m.content) for m in request.messages] == [("user", "hi")]
    assert p.max_tokens == 7  # max_completion_tokens wins, as OpenAI's and vLLM's
    assert (p.temperature, p.top_p, p.top_k) == (0.5, pytest.approx(0.9), 40)
    assert p.seed == (1 << 64) - 1  # signed seeds wrap into the proto's uint64
    assert list(p.stop) == ["END"]
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (
        0.5, -0.25, pytest.approx(1.2))
    assert (p.logprobs, p.top_logprobs, p.ignore_eos) == (True, 3, True)
    assert not p.HasField("response_format")


def test_absent_fields_stay_absent_but_temperature_defaults_to_one() -> None:
    p = chat().params
    assert p.temperature == 1.0  # OpenAI's default; gRPC's absent temperature is greedy
    for name in ("max_tokens", "top_p", "top_k", "seed", "presence_penalty",
                 "frequency_penalty", "repetition_penalty"):
        assert not p.HasField(name), name
    assert not p.logprobs and not list(p.stop)
    assert not chat(top_k=-1).params.HasField("top_k")  # vLLM's "off"


def test_chat_content_parts_and_roles() -> None:
    request = chat_request(ChatCompletionRequest.model_validate({"messages": [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": None}]}), "")
    assert [(m.role, m.content) for m in request.messages] == [
        ("system", "Be brief."), ("user", "ab"), ("assistant", "")]
    with pytest.raises(InvalidArgument, match="only text parts"):
        chat_request(ChatCompletionRequest.model_validate({"messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}),
            "")


def test_response_formats() -> None:
    assert chat(response_format={"type": "text"}).params.response_format.type == ""
    assert chat(response_format={"type": "json_object"}).params.response_format.type == \
        "json_object"
    schema = {"type": "object", "properties": {"city": {"type": "string"}}}
    fmt = chat(response_format={"type": "json_schema", "json_schema": {
        "name": "place", "schema": schema, "strict": True}}).params.response_format
    assert fmt.type == "json_schema" and json.loads(fmt.json_schema) == schema
    with pytest.raises(InvalidArgument, match="json_schema"):
        chat(response_format={"type": "json_schema"})


def test_stop_list_and_completion_logprobs() -> None:
    (request,) = completion(prompt="Once", stop=["a", "b"], logprobs=2)
    assert request.prompt == "Once" and list(request.params.stop) == ["a", "b"]
    assert (request.params.logprobs, request.params.top_logprobs) == (True, 2)
    assert request.params.max_tokens == 16  # the legacy endpoint's default, as OpenAI's
    (zero,) = completion(prompt="Once", logprobs=0)
    assert zero.params.logprobs and zero.params.top_logprobs == 0


def test_completion_prompt_batches_and_refusals() -> None:
    assert [r.prompt for r in completion(prompt=["a", "b"])] == ["a", "b"]
    for prompt in ([1, 2, 3], [[1, 2]], []):
        with pytest.raises(InvalidArgument, match="prompt"):
            completion(prompt=prompt)
    for fields, word in (({"echo": True}, "echo"), ({"suffix": "x"}, "suffix"),
                         ({"best_of": 3}, "best_of"), ({"logit_bias": {"1": 5}}, "logit_bias")):
        with pytest.raises(InvalidArgument, match=word):
            completion(prompt="a", **fields)
    with pytest.raises(InvalidArgument, match="tools"):
        chat(tools=[{"type": "function", "function": {"name": "f"}}])


def test_choices_get_distinct_derived_seeds() -> None:
    seeded = choice_requests(chat(seed=7), 4)
    seeds = [c.params.seed for c in seeded]
    assert seeds[0] == 7 and len(set(seeds)) == 4
    assert seeds == [derived_seed(7, i) for i in range(4)]
    assert all(not c.params.HasField("seed") for c in choice_requests(chat(), 2))
    assert all(c.messages[0].content == "hi" for c in seeded)


def logprob(token: str, value: float, tops: list[tuple[str, float]]) -> types_pb2.TokenLogprob:
    return types_pb2.TokenLogprob(
        token_id=1, token=token, token_bytes=token.encode(), logprob=value,
        top_logprobs=[types_pb2.TopLogprob(token=t, token_bytes=t.encode(), logprob=v)
                      for t, v in tops])


def test_logprobs_in_openai_shapes() -> None:
    entries = [logprob("He", -0.5, [("He", -0.5), ("I", -1.5)]),
               logprob("llo", -0.1, [("llo", -0.1)])]
    assert chat_logprobs(entries) == {"content": [
        {"token": "He", "logprob": -0.5, "bytes": [72, 101], "top_logprobs": [
            {"token": "He", "logprob": -0.5, "bytes": [72, 101]},
            {"token": "I", "logprob": -1.5, "bytes": [73]}]},
        {"token": "llo", "logprob": pytest.approx(-0.1), "bytes": [108, 108, 111],
         "top_logprobs": [{"token": "llo", "logprob": pytest.approx(-0.1),
                           "bytes": [108, 108, 111]}]}]}
    legacy = completion_logprobs(entries, 3)
    assert legacy["tokens"] == ["He", "llo"]
    assert legacy["text_offset"] == [3, 5]
    assert legacy["top_logprobs"][0] == {"He": -0.5, "I": -1.5}


def response(text: str, prompt: int, completion: int, finish: str = "stop"
             ) -> types_pb2.GenerateResponse:
    return types_pb2.GenerateResponse(text=text, finish_reason=finish, usage=types_pb2.Usage(
        prompt_tokens=prompt, completion_tokens=completion))


def test_whole_responses_and_usage_count_each_prompt_once() -> None:
    two = [response("a", 10, 3), response("b", 10, 4, "length")]
    assert usage(two, 2) == {"prompt_tokens": 10, "completion_tokens": 7, "total_tokens": 17}
    assert usage(two, 1)["prompt_tokens"] == 20  # two prompts of one choice each
    body = chat_completion("chatcmpl-1", 5, "pirate", two, 2, with_logprobs=False)
    assert body["object"] == "chat.completion" and body["model"] == "pirate"
    assert [c["message"]["content"] for c in body["choices"]] == ["a", "b"]
    assert [c["finish_reason"] for c in body["choices"]] == ["stop", "length"]
    legacy = text_completion("cmpl-1", 5, "base", two[:1], 1, with_logprobs=True)
    assert legacy["choices"][0]["text"] == "a"
    assert legacy["choices"][0]["logprobs"]["tokens"] == []


@pytest.mark.parametrize(("code", "status"), [
    (grpc.StatusCode.INVALID_ARGUMENT, 400), (grpc.StatusCode.FAILED_PRECONDITION, 400),
    (grpc.StatusCode.OUT_OF_RANGE, 400), (grpc.StatusCode.UNAUTHENTICATED, 401),
    (grpc.StatusCode.PERMISSION_DENIED, 403), (grpc.StatusCode.NOT_FOUND, 404),
    (grpc.StatusCode.ALREADY_EXISTS, 409), (grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
    (grpc.StatusCode.UNAVAILABLE, 503), (grpc.StatusCode.DEADLINE_EXCEEDED, 504),
    (grpc.StatusCode.INTERNAL, 500), (grpc.StatusCode.CANCELLED, 500)])
def test_statuses_map_one_to_one(code: grpc.StatusCode, status: int) -> None:
    got, body = status_error(RpcError(code, "why"))
    assert got == status
    assert body == {"error": {"message": "why", "type": body["error"]["type"], "param": None,
                              "code": code.name.lower()}}
    assert (HTTP_STATUS.get(code, 500)) == status


def test_an_unknown_model_is_model_not_found() -> None:
    status, body = status_error(NotFound("adapter 'x' is not registered"), model_param=True)
    assert status == 404
    assert body["error"]["code"] == "model_not_found" and body["error"]["param"] == "model"
    assert body["error"]["type"] == "not_found_error"
    assert status_error(EdgeLoraError("bug"))[0] == 500
