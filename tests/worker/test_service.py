"""The gRPC path on the tiny model: streaming, validation, isolation, cancel, backpressure."""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from edgelora.client import build_request
from edgelora.v1 import router_pb2_grpc, types_pb2, worker_pb2, worker_pb2_grpc
from tests.conftest import ServeThread
from worker.config import WorkerConfig


@pytest.fixture(scope="module")
def router(tiny_server: ServeThread) -> router_pb2_grpc.RouterStub:
    channel = grpc.insecure_channel(tiny_server.address)
    yield router_pb2_grpc.RouterStub(channel)
    channel.close()


@pytest.fixture(scope="module")
def worker(tiny_server: ServeThread) -> worker_pb2_grpc.WorkerStub:
    channel = grpc.insecure_channel(tiny_server.worker_address)
    yield worker_pb2_grpc.WorkerStub(channel)
    channel.close()


def collect(stub: router_pb2_grpc.RouterStub, request: types_pb2.GenerateRequest
            ) -> list[types_pb2.GenerateResponse]:
    return list(stub.GenerateStream(request, timeout=60))


def test_stream_chunks_add_up_to_the_unary_answer(router: router_pb2_grpc.RouterStub) -> None:
    request = build_request("Tell me a story", max_tokens=20, ignore_eos=True)
    chunks = collect(router, request)
    whole = router.Generate(request, timeout=60)
    assert len(chunks) > 1
    assert [c.finish_reason for c in chunks[:-1]] == [""] * (len(chunks) - 1)
    assert chunks[-1].finish_reason == "length" == whole.finish_reason
    assert [t for c in chunks for t in c.token_ids] == list(whole.token_ids)
    assert "".join(c.text for c in chunks) == whole.text
    assert whole.usage.completion_tokens == 20 == len(whole.token_ids)
    assert whole.usage.prompt_tokens > 0


def test_seeded_sampling_is_reproducible(router: router_pb2_grpc.RouterStub) -> None:
    def run(seed: int) -> list[int]:
        request = build_request("Hello", max_tokens=16, temperature=1.0, top_p=0.95, seed=seed,
                                ignore_eos=True)
        return list(router.Generate(request, timeout=60).token_ids)

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_chat_messages_use_the_chat_template(router: router_pb2_grpc.RouterStub) -> None:
    prompt = router.Generate(build_request("Hi", max_tokens=1), timeout=60).usage.prompt_tokens
    chat = router.Generate(build_request("Hi", chat=True, max_tokens=1), timeout=60)
    # the template adds the system turn and role markers around the same text
    assert chat.usage.prompt_tokens > prompt + 5


def test_stop_string_ends_the_stream_before_it(router: router_pb2_grpc.RouterStub) -> None:
    free = router.Generate(build_request("Count", max_tokens=30, ignore_eos=True), timeout=60).text
    stop = free[len(free) // 2: len(free) // 2 + 3]
    assert stop.strip(), f"pick a visible stop string from {free!r}"
    got = router.Generate(build_request("Count", max_tokens=30, ignore_eos=True, stop=[stop]),
                          timeout=60)
    assert got.finish_reason == "stop"
    assert got.text == free[:free.index(stop)]


BAD_REQUESTS = {
    "empty prompt": (build_request(""), "empty"),
    "max_tokens 0": (build_request("Hi", max_tokens=0), "max_tokens"),
    "max_tokens beyond context": (build_request("Hi", max_tokens=10_000), "context"),
    "negative temperature": (build_request("Hi", temperature=-0.5), "temperature"),
    "top_p zero": (build_request("Hi", top_p=0.0), "top_p"),
    "top_p above one": (build_request("Hi", top_p=1.5), "top_p"),
    "prompt longer than context": (build_request("word " * 2000), "prompt"),
    "prompt and messages": (types_pb2.GenerateRequest(
        prompt="Hi", messages=[types_pb2.ChatMessage(role="user", content="Hi")]), "either"),
    "unknown chat role": (types_pb2.GenerateRequest(
        messages=[types_pb2.ChatMessage(role="robot", content="Hi")]), "role"),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_input_is_invalid_argument(router: router_pb2_grpc.RouterStub, name: str) -> None:
    request, words = BAD_REQUESTS[name]
    with pytest.raises(grpc.RpcError) as info:
        collect(router, request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert words in info.value.details()


def test_unknown_adapter_is_not_found(router: router_pb2_grpc.RouterStub) -> None:
    with pytest.raises(grpc.RpcError) as info:
        collect(router, build_request("Hi", adapter_id="nope"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert "nope" in info.value.details()


def test_bad_requests_do_not_disturb_a_running_stream(router: router_pb2_grpc.RouterStub) -> None:
    request = build_request("Once upon a time", max_tokens=200, ignore_eos=True)
    alone = router.Generate(request, timeout=60)
    result: dict[str, types_pb2.GenerateResponse] = {}
    runner = threading.Thread(target=lambda: result.update(r=router.Generate(request, timeout=60)))
    runner.start()
    for bad, _ in BAD_REQUESTS.values():
        with pytest.raises(grpc.RpcError):
            collect(router, bad)
    runner.join(timeout=60)
    assert list(result["r"].token_ids) == list(alone.token_ids)


def wait_idle(worker: worker_pb2_grpc.WorkerStub,
              timeout_s: float = 10.0) -> worker_pb2.InfoResponse:
    deadline = time.monotonic() + timeout_s
    while True:
        info = worker.Info(worker_pb2.InfoRequest(), timeout=5)
        idle = info.num_running == 0 and info.num_free_kv_blocks == info.num_kv_blocks
        if idle or time.monotonic() > deadline:
            return info
        time.sleep(0.02)


def test_cancel_frees_the_sequence_and_its_kv(router: router_pb2_grpc.RouterStub,
                                              worker: worker_pb2_grpc.WorkerStub) -> None:
    call = router.GenerateStream(build_request("Go on", max_tokens=400, ignore_eos=True),
                                 timeout=60)
    first = next(call)
    assert first.token_ids
    busy = worker.Info(worker_pb2.InfoRequest(), timeout=5)
    assert busy.num_running == 1 and busy.num_free_kv_blocks < busy.num_kv_blocks
    call.cancel()
    info = wait_idle(worker)
    assert (info.num_running, info.num_waiting) == (0, 0)
    assert info.num_free_kv_blocks == info.num_kv_blocks


def test_full_queue_is_resource_exhausted(tiny_model_dir) -> None:
    server = ServeThread(WorkerConfig(model=str(tiny_model_dir), port=0, num_threads=1,
                                      max_model_len=512, kv_cache_mb=16, max_batch_size=1,
                                      max_queue=1))
    try:
        stub = router_pb2_grpc.RouterStub(grpc.insecure_channel(server.address))
        long = build_request("Go", max_tokens=500, ignore_eos=True)
        calls = [stub.GenerateStream(long, timeout=60) for _ in range(4)]
        codes = []
        for call in calls:
            try:
                list(call)
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as exc:
                codes.append(exc.code())
                if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    assert "queue is full" in exc.details()
        # arrival order at the server is not the order of the calls: count, don't index
        assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes, codes
        assert grpc.StatusCode.OK in codes, codes
    finally:
        server.stop()


def test_health_and_reflection_are_served(tiny_server: ServeThread) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    for address, service in ((tiny_server.address, "edgelora.v1.Router"),
                             (tiny_server.worker_address, "edgelora.v1.Worker")):
        with grpc.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING
            reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            response = next(reflect.ServerReflectionInfo(iter([request]), timeout=5))
            names = {s.name for s in response.list_services_response.service}
            assert {service, "grpc.health.v1.Health"} <= names


def worker_generate(worker: worker_pb2_grpc.WorkerStub, prompt: str, **params
                    ) -> list[types_pb2.GenerateResponse]:
    request = types_pb2.GenerateRequest(prompt=prompt, params=types_pb2.SamplingParams(**params))
    return list(worker.Generate(request, timeout=60))


def test_logprobs_come_with_each_token(worker: worker_pb2_grpc.WorkerStub,
                                       tiny_model_dir) -> None:
    from worker.tokenizer import Tokenizer

    chunks = worker_generate(worker, "Tell me about the sea", max_tokens=6, ignore_eos=True,
                             logprobs=True, top_logprobs=3)
    tokens = [t for c in chunks for t in c.token_ids]
    logprobs = [lp for c in chunks for lp in c.logprobs]
    assert [lp.token_id for lp in logprobs] == tokens and len(tokens) == 6
    table = Tokenizer(tiny_model_dir).vocab_bytes
    for lp in logprobs:
        assert lp.logprob <= 0 and len(lp.top_logprobs) == 3
        assert lp.top_logprobs[0].logprob >= lp.top_logprobs[-1].logprob
        for entry in (lp, *lp.top_logprobs):
            assert entry.token_bytes == table[entry.token_id]
            assert entry.token == entry.token_bytes.decode("utf-8", "replace")
    plain = worker_generate(worker, "Tell me about the sea", max_tokens=6, ignore_eos=True)
    assert [t for c in plain for t in c.token_ids] == tokens  # greedy: same tokens
    assert not any(c.logprobs for c in plain)


def test_json_schema_output_validates(worker: worker_pb2_grpc.WorkerStub) -> None:
    import json

    import jsonschema

    schema = {"type": "object", "properties": {"ok": {"type": "boolean"},
                                               "n": {"type": "integer", "maximum": 9}},
              "required": ["ok", "n"]}
    fmt = types_pb2.ResponseFormat(type="json_schema", json_schema=json.dumps(schema))
    chunks = worker_generate(worker, "JSON:", max_tokens=200, response_format=fmt)
    assert chunks[-1].finish_reason == "stop"
    jsonschema.validate(json.loads("".join(c.text for c in chunks)), schema)


def test_a_schema_that_compiles_for_ever_is_refused_and_holds_no_one_up(
        worker: worker_pb2_grpc.WorkerStub) -> None:
    import json

    from common.limits import MAX_JSON_COMPILE_S

    known = types_pb2.ResponseFormat(type="json_schema", json_schema=json.dumps(
        {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}))
    worker_generate(worker, "JSON:", max_tokens=50, response_format=known)  # compiled, cached
    # minutes of compiling in 6 KiB: bounded repetition in patterns (worker.schema_trial)
    slow = types_pb2.ResponseFormat(type="json_schema", json_schema=json.dumps(
        {"type": "object", "properties": {f"p{i}": {"type": "string", "pattern": "[a-z]{1,5000}"}
                                          for i in range(100)}}))
    outcome: dict[str, object] = {}

    def hostile() -> None:
        start = time.monotonic()
        try:
            worker_generate(worker, "JSON:", response_format=slow)
        except grpc.RpcError as exc:
            outcome["error"] = exc
        outcome["seconds"] = time.monotonic() - start

    thread = threading.Thread(target=hostile)
    thread.start()
    time.sleep(1.0)  # the slow schema is compiling now
    start = time.monotonic()
    chunks = worker_generate(worker, "JSON:", max_tokens=50, response_format=known)
    assert chunks[-1].finish_reason == "stop"
    assert time.monotonic() - start < MAX_JSON_COMPILE_S - 2  # not queued behind it
    thread.join(timeout=60)
    error = outcome["error"]
    assert isinstance(error, grpc.RpcError)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert "to compile" in error.details()
    assert outcome["seconds"] < MAX_JSON_COMPILE_S + 15  # the deadline, plus the child's start


@pytest.mark.parametrize("fmt, words", [
    (types_pb2.ResponseFormat(type="json_schema", json_schema='{"type": "bogus"}'),
     "JSON Schema"),
    (types_pb2.ResponseFormat(type="json_schema", json_schema="{not json"), "not valid JSON"),
    (types_pb2.ResponseFormat(type="yaml"), "response_format.type"),
])
def test_bad_response_format_is_invalid_argument(worker: worker_pb2_grpc.WorkerStub,
                                                 fmt: types_pb2.ResponseFormat,
                                                 words: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        worker_generate(worker, "Hi", response_format=fmt)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert words in info.value.details()


def test_tokenize_matches_what_generate_feeds(worker: worker_pb2_grpc.WorkerStub,
                                              tiny_model_dir) -> None:
    from worker.tokenizer import Tokenizer

    tokenizer = Tokenizer(tiny_model_dir)
    reply = worker.Tokenize(types_pb2.TokenizeRequest(prompt="Hello there"), timeout=10)
    assert list(reply.token_ids) == tokenizer.encode_prompt("Hello there")
    assert reply.max_model_len == 512
    messages = [types_pb2.ChatMessage(role="user", content="Hi")]
    reply = worker.Tokenize(types_pb2.TokenizeRequest(messages=messages), timeout=10)
    assert list(reply.token_ids) == tokenizer.encode_chat([("user", "Hi")])
    generated = worker.Generate(types_pb2.GenerateRequest(messages=messages), timeout=60)
    assert [c.usage.prompt_tokens for c in generated][-1] == len(reply.token_ids)
    with pytest.raises(grpc.RpcError) as info:
        worker.Tokenize(types_pb2.TokenizeRequest(prompt="Hi", messages=messages), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
