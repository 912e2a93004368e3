"""Property-based fuzzing of the public API with a tenant key: whatever a GenerateRequest,
RegisterAdapterRequest, UnregisterAdapterRequest or SelectAdapterRequest holds, every call ends
within its deadline with OK or a status that names a client mistake, never INTERNAL or UNKNOWN
(an unhandled server error), and the server stays healthy.

EDGELORA_FUZZ_EXAMPLES sets the examples per property (default 40), so a bench can run longer.
"""

from __future__ import annotations

import os

import grpc
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from edgelora.v1 import router_pb2, types_pb2
from tests.security.helpers import SHARED_AT_START

EXAMPLES = int(os.environ.get("EDGELORA_FUZZ_EXAMPLES", "40"))
DEADLINE_S = 20.0
# A server fault, or a call that did not end in time (the client's deadline cut it).
FORBIDDEN = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS,
             grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE,
             grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.CANCELLED}
FUZZ_SETTINGS = settings(max_examples=EXAMPLES, deadline=None,
                         suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                HealthCheck.too_slow])

# Protobuf strings are UTF-8: anything but lone surrogates, control characters and NUL included.
any_char = st.characters(blacklist_categories=("Cs",))
text = st.text(any_char, max_size=200)
short_text = st.text(any_char, max_size=40)


def mostly(plausible: st.SearchStrategy, hostile: st.SearchStrategy) -> st.SearchStrategy:
    """Plausible values four times in five, so that a good share of requests gets past every
    check and reaches tokenizing, selection and decoding; hostile ones the rest of the time."""
    return st.sampled_from([True, True, True, True, False]).flatmap(
        lambda pick: plausible if pick else hostile)


odd_floats = st.one_of(st.floats(width=32), st.sampled_from(
    [float("nan"), float("inf"), float("-inf"), -1.0, -0.0, 1e-45, 1.5, 3e38]))
temperatures = mostly(st.floats(0.0, 2.0, width=32), odd_floats)
top_ps = mostly(st.floats(0.0625, 1.0, width=32), odd_floats)
adapter_ids = mostly(
    st.sampled_from(["", "auto", SHARED_AT_START, "ref-acme-x", "x", "acme-only-y"]),
    st.one_of(st.sampled_from(["AUTO", "acme:x", ":x", "x" * 128, "x" * 129, "../x",
                               "a/../../b", "-x", ".x", "a b", "ops:common-json", "\x00",
                               "a\nb"]), short_text))
roles = mostly(st.sampled_from(["system", "user", "assistant", "tool"]),
               st.one_of(st.sampled_from(["", "USER", "user ", "function", "\x00"]),
                         short_text))
messages = st.lists(st.builds(types_pb2.ChatMessage, role=roles, content=text), min_size=1,
                    max_size=4)
max_tokens = mostly(st.integers(1, 8), st.one_of(st.integers(0, 10**6),
                                                 st.sampled_from([0, 255, 256, 2**32 - 1])))
stops = mostly(st.lists(st.text(any_char, min_size=1, max_size=8), max_size=4),
               st.lists(short_text, max_size=20))


@st.composite
def sampling_params(draw) -> types_pb2.SamplingParams:
    params = types_pb2.SamplingParams(stop=draw(stops), ignore_eos=draw(st.booleans()),
                                      max_tokens=draw(max_tokens))  # unset = 128: keep it quick
    if draw(st.booleans()):
        params.temperature = draw(temperatures)
    if draw(st.booleans()):
        params.top_p = draw(top_ps)
    if draw(st.booleans()):
        params.top_k = draw(mostly(st.integers(0, 50), st.integers(0, 2**32 - 1)))
    if draw(st.booleans()):
        params.seed = draw(st.integers(0, 2**64 - 1))
    return params


@st.composite
def generate_requests(draw) -> types_pb2.GenerateRequest:
    request = types_pb2.GenerateRequest(adapter_id=draw(adapter_ids),
                                        params=draw(sampling_params()))
    shape = draw(mostly(st.sampled_from(["prompt", "messages"]),
                        st.sampled_from(["both", "neither"])))
    if shape in ("prompt", "both"):
        request.prompt = draw(mostly(st.text(any_char, min_size=1, max_size=200), text))
    if shape in ("messages", "both"):
        request.messages.extend(draw(messages))
    return request


register_requests = st.builds(
    types_pb2.RegisterAdapterRequest, adapter_id=adapter_ids,
    path=st.one_of(st.sampled_from(["", "/", ".", "..", "/etc", "/etc/passwd", "/dev/zero",
                                    "/proc/self", "adapter", "~", "hostile-fifo",
                                    "../outside/adapter", "\x00"]), short_text),
    description=text, example_prompts=st.lists(text, max_size=5), replace=st.booleans(),
    shared=st.booleans(), tenant=st.one_of(st.sampled_from(["", "fuzz", "acme", "ops"]),
                                           short_text))
unregister_requests = st.builds(
    types_pb2.UnregisterAdapterRequest, adapter_id=adapter_ids,
    tenant=mostly(st.just(""), st.one_of(st.sampled_from(["fuzz", "acme"]), short_text)),
    shared=mostly(st.just(False), st.just(True)))
select_requests = mostly(
    st.one_of(st.builds(router_pb2.SelectAdapterRequest, prompt=text,
                        top_k=st.integers(0, 2**32 - 1)),
              st.builds(router_pb2.SelectAdapterRequest, messages=messages,
                        top_k=st.integers(0, 8))),
    st.builds(router_pb2.SelectAdapterRequest, prompt=text, messages=messages))


def assert_handled(call, request, metadata) -> grpc.StatusCode:
    try:
        result = call(request, metadata=metadata, timeout=DEADLINE_S)
        if hasattr(result, "__iter__") and not hasattr(result, "ListFields"):
            list(result)  # a stream: read it to its end
        code = grpc.StatusCode.OK
    except grpc.RpcError as exc:
        assert exc.code() not in FORBIDDEN, (exc.code(), exc.details(), request)
        code = exc.code()
    event(f"{getattr(call, '_method', b'?')!s}: {code.name}")  # --hypothesis-show-statistics
    return code


@FUZZ_SETTINGS
@given(request=generate_requests())
def test_fuzz_generate(sec, request: types_pb2.GenerateRequest) -> None:
    stub, fuzz = sec.router(), sec.auth("fuzz")
    assert_handled(stub.Generate, request, fuzz)
    assert_handled(stub.GenerateStream, request, fuzz)


@FUZZ_SETTINGS
@given(request=register_requests, removal=unregister_requests)
def test_fuzz_register_and_unregister(sec, request: types_pb2.RegisterAdapterRequest,
                                      removal: types_pb2.UnregisterAdapterRequest) -> None:
    stub, fuzz = sec.router(), sec.auth("fuzz")
    code = assert_handled(stub.RegisterAdapter, request, fuzz)
    assert code != grpc.StatusCode.OK, "a tenant key registered an adapter by path"
    assert_handled(stub.UnregisterAdapter, removal, fuzz)


@FUZZ_SETTINGS
@given(request=select_requests)
def test_fuzz_select(sec, request: router_pb2.SelectAdapterRequest) -> None:
    stub, fuzz = sec.router(), sec.auth("fuzz")
    assert_handled(stub.SelectAdapter, request, fuzz)


def test_server_healthy_after_fuzzing(sec) -> None:
    """Runs after the fuzz tests (file order): still serving, and the shared adapter intact."""
    assert sec.health() == health_pb2.HealthCheckResponse.SERVING
    stub = sec.router()
    reply = stub.Generate(types_pb2.GenerateRequest(
        prompt="Hello", adapter_id=SHARED_AT_START,
        params=types_pb2.SamplingParams(max_tokens=4, ignore_eos=True)),
        metadata=sec.auth("fuzz"), timeout=60)
    assert len(reply.token_ids) == 4
    adapters = stub.ListAdapters(types_pb2.ListAdaptersRequest(), metadata=sec.auth("ops"),
                                 timeout=30).adapters
    assert SHARED_AT_START in {a.adapter_id for a in adapters}
    assert not [a for a in adapters if a.tenant == "fuzz"], "the fuzz tenant registered one"
