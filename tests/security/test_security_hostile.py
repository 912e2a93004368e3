"""Hostile inputs, each while another tenant's greedy stream runs: every hostile call ends with a
refusal within seconds (no hang, no frozen process), and the bystander's tokens are exactly those
it gets alone; so do the generation controls' extreme values that are accepted (penalties,
logprobs, JSON masks on a neighbouring row change nothing in the bystander's row). Then
per-tenant limits: a tenant over its max_queued gets RESOURCE_EXHAUSTED while another tenant is
served."""

from __future__ import annotations

import json
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edgelora.v1 import router_pb2, router_pb2_grpc, types_pb2
from tests.conftest import write_random_adapter
from tests.security.helpers import (
    CATASTROPHIC_REGEXES,
    RANK,
    SHARED_AT_START,
    SteadyStream,
    greedy,
    listed,
    register,
    rpc,
    stream,
)

HOSTILE_MAX_S = 8.0  # a refusal comes well within this (the server's --register-timeout-s is 5)
BYSTANDER_PROMPT = "Write a long story about the sea and the wind"
REFUSED = (grpc.StatusCode.INVALID_ARGUMENT,)


def bystander_request() -> types_pb2.GenerateRequest:
    return greedy(BYSTANDER_PROMPT, SHARED_AT_START, max_tokens=48)


@pytest.fixture(scope="module")
def alone(sec) -> list[int]:
    """The bystander's tokens with nothing else running."""
    code, details, tokens, _ = stream(sec.router(), bystander_request(), sec.auth("acme"))
    assert code == grpc.StatusCode.OK, details
    assert len(tokens) == 48
    code, details, again, _ = stream(sec.router(), bystander_request(), sec.auth("acme"))
    assert again == tokens, "greedy fp32 output is not even repeatable alone"
    return tokens


def during_bystander(sec, alone: list[int], hostile) -> tuple[grpc.StatusCode, str, float]:
    """Runs hostile() -> (code, details) while acme's stream runs back to back; checks that
    every bystander run matches `alone` and that at least one overlapped the hostile call."""
    with SteadyStream(sec.router(), sec.auth("acme"), bystander_request()) as bystander:
        started = time.monotonic()
        code, details = hostile()
        elapsed = time.monotonic() - started
        ended = time.monotonic()
    for run_code, run_details, tokens, _, _ in bystander.runs:
        assert run_code == grpc.StatusCode.OK, (run_code, run_details)
        assert tokens == alone, "the bystander's output changed under a hostile call"
    assert any(s < ended and e > started for *_, s, e in bystander.runs), "no overlap"
    assert sec.health() == health_pb2.HealthCheckResponse.SERVING
    return code, details, elapsed


def admin_register(sec, adapter_id: str, path, **fields):
    def call():
        code, details, _ = register(sec.router(), sec.auth("ops"), adapter_id, path,
                                    timeout=30, **fields)
        return code, details
    return call


def assert_refused(result, adapter_id: str | None, sec, *words: str,
                   codes=REFUSED) -> None:
    code, details, elapsed = result
    assert code in codes, (code, details)
    assert elapsed < HOSTILE_MAX_S, f"refused only after {elapsed:.1f} s: {details}"
    for word in words:
        assert word.lower() in details.lower(), details
    if adapter_id is not None:
        assert adapter_id not in {a.adapter_id for a in listed(sec.router(), sec.auth("ops"))}


@pytest.mark.parametrize("index", range(len(CATASTROPHIC_REGEXES)))
def test_catastrophic_target_modules_regex(sec, alone, index: int) -> None:
    path = sec.hostile[f"regex-{index}"]
    health = health_pb2_grpc.HealthStub(sec.channel())
    done = threading.Event()
    latencies: list[tuple[float, int | str]] = []

    def probe() -> None:  # health answers within 1 s while the regex is being matched
        while not done.is_set():
            started = time.monotonic()
            try:
                status = health.Check(health_pb2.HealthCheckRequest(), timeout=1.0).status
            except grpc.RpcError as exc:
                status = exc.code().name
            latencies.append((time.monotonic() - started, status))
            time.sleep(0.05)

    prober = threading.Thread(target=probe, daemon=True)

    def hostile():
        prober.start()
        try:
            return admin_register(sec, f"hostile-regex-{index}", path)()
        finally:
            done.set()
            prober.join(timeout=10)

    result = during_bystander(sec, alone, hostile)
    # refused as invalid, or cut by the server's own deadline: either way bounded
    assert_refused(result, f"hostile-regex-{index}", sec,
                   codes=(grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.DEADLINE_EXCEEDED))
    assert latencies, "no health probe ran"
    slow = [(round(s, 3), status) for s, status in latencies
            if s >= 1.0 or status != health_pb2.HealthCheckResponse.SERVING]
    assert not slow, f"health stalled during the regex registration: {slow}"


def test_huge_description(sec, alone) -> None:
    path = write_random_adapter(sec.root / "big-card", sec.base_dir, rank=RANK, seed=120)
    result = during_bystander(sec, alone, admin_register(sec, "big-card", path,
                                                         description="d" * 100_000))
    assert_refused(result, "big-card", sec, "--max-card-bytes")
    result = during_bystander(sec, alone, admin_register(
        sec, "big-card", path, example_prompts=["fine", "e" * 100_000]))
    assert_refused(result, "big-card", sec, "--max-card-bytes")
    result = during_bystander(sec, alone, admin_register(
        sec, "big-card", path, example_prompts=["short"] * 10_000))
    assert_refused(result, "big-card", sec, "--max-example-prompts")


def test_ten_thousand_stop_strings(sec, alone) -> None:
    stub, beta = sec.router(), sec.auth("beta")
    request = greedy("Hello", max_tokens=4)
    request.params.stop.extend(f"stop{i}" for i in range(10_000))

    def hostile():
        return rpc(stub.Generate, request, beta, 30)[:2]

    assert_refused(during_bystander(sec, alone, hostile), None, sec, "--max-stop-strings")
    long_stop = greedy("Hello", max_tokens=4)
    long_stop.params.stop.append("s" * 100_000)
    assert_refused(during_bystander(sec, alone, lambda: rpc(stub.Generate, long_stop, beta,
                                                            30)[:2]),
                   None, sec, "--max-stop-bytes")


def test_four_megabyte_prompt(sec, alone) -> None:
    stub, beta = sec.router(), sec.auth("beta")
    prompt = "word " * 800_000  # 4,000,000 bytes: under gRPC's 4 MiB message limit
    codes = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED)
    result = during_bystander(sec, alone, lambda: rpc(
        stub.Generate, greedy(prompt, max_tokens=4), beta, 30)[:2])
    assert_refused(result, None, sec, codes=codes)
    if result[0] == grpc.StatusCode.INVALID_ARGUMENT:
        assert "--max-prompt-bytes" in result[1], result[1]
    messages = types_pb2.GenerateRequest(  # the same bytes as chat turns
        messages=[types_pb2.ChatMessage(role="user", content="word " * 8_000)] * 100,
        params=types_pb2.SamplingParams(max_tokens=4))
    result = during_bystander(sec, alone, lambda: rpc(stub.Generate, messages, beta, 30)[:2])
    assert_refused(result, None, sec, codes=codes)
    many = types_pb2.GenerateRequest(
        messages=[types_pb2.ChatMessage(role="user", content="hi")] * 50_000,
        params=types_pb2.SamplingParams(max_tokens=4))
    result = during_bystander(sec, alone, lambda: rpc(stub.Generate, many, beta, 30)[:2])
    assert_refused(result, None, sec, "--max-messages")


def controlled(**params) -> types_pb2.GenerateRequest:
    request = greedy("Tell me about the sea", max_tokens=12)
    for name, value in params.items():
        if name == "response_format":
            request.params.response_format.CopyFrom(value)
        else:
            setattr(request.params, name, value)
    return request


def nested_schema(objects: int) -> str:
    head = '{"type": "object", "required": ["x"], "properties": {"x": '
    return head * objects + '{"type": "object"}' + "}}" * objects


HOSTILE_CONTROLS = {  # name -> (params, a word of the refusal)
    "top-logprobs": ({"logprobs": True, "top_logprobs": 1_000_000}, "top_logprobs"),
    "nan-presence": ({"presence_penalty": math.nan}, "presence_penalty"),
    "inf-frequency": ({"frequency_penalty": math.inf}, "frequency_penalty"),
    "zero-repetition": ({"repetition_penalty": 0.0}, "repetition_penalty"),
    "negative-repetition": ({"repetition_penalty": -3.0}, "repetition_penalty"),
    # 1,000 nested objects compile for minutes; 40 would still cost the grammar thread seconds
    "nested-schema": ({"response_format": types_pb2.ResponseFormat(
        type="json_schema", json_schema=nested_schema(40))}, "nests deeper"),
    "schema-not-json": ({"response_format": types_pb2.ResponseFormat(
        type="json_schema", json_schema="{" * 5000)}, "json"),
    "schema-huge": ({"response_format": types_pb2.ResponseFormat(
        type="json_schema", json_schema='{"enum": [' + "1," * 200_000 + "1]}")}, "bytes"),
    "schema-uncompilable": ({"response_format": types_pb2.ResponseFormat(
        type="json_schema", json_schema='{"type": "no-such-type"}')}, "json_schema"),
    "unknown-format": ({"response_format": types_pb2.ResponseFormat(type="xml")}, "xml"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE_CONTROLS))
def test_hostile_generation_controls(sec, alone, name: str) -> None:
    params, word = HOSTILE_CONTROLS[name]
    stub, beta = sec.router(), sec.auth("beta")
    result = during_bystander(sec, alone, lambda: rpc(stub.Generate, controlled(**params), beta,
                                                      30)[:2])
    assert_refused(result, None, sec, word)


def test_a_schema_that_compiles_for_ever_is_refused_beside_the_bystander(sec, alone) -> None:
    """6 KiB of pattern repetitions: minutes of compiling, refused at the worker's 5 s deadline
    (worker.schema_trial) while acme's stream runs on unchanged."""
    stub, beta = sec.router(), sec.auth("beta")
    small = json.dumps({"type": "object", "properties": {"ok": {"type": "boolean"}}})
    code, details, _ = rpc(stub.Generate, controlled(response_format=types_pb2.ResponseFormat(
        type="json_schema", json_schema=small)), beta, 60)  # the compile process is up
    assert code == grpc.StatusCode.OK, details
    slow = json.dumps({"type": "object", "properties": {
        f"p{i}": {"type": "string", "pattern": "[a-z]{1,5000}"} for i in range(100)}})
    result = during_bystander(sec, alone, lambda: rpc(stub.Generate, controlled(
        response_format=types_pb2.ResponseFormat(type="json_schema", json_schema=slow)), beta,
        30)[:2])
    assert_refused(result, None, sec, "to compile", codes=(grpc.StatusCode.INVALID_ARGUMENT,))


def test_extreme_accepted_controls_leave_the_bystander_alone(sec, alone) -> None:
    """Rows with every control at its bound decode beside the bystander's row, several at
    once: its tokens stay those it gets alone."""
    stub, beta = sec.router(), sec.auth("beta")
    extremes = [controlled(presence_penalty=2.0, frequency_penalty=2.0, repetition_penalty=5.0),
                controlled(presence_penalty=-2.0, frequency_penalty=-2.0,
                           repetition_penalty=0.01),
                controlled(logprobs=True, top_logprobs=20, temperature=1.5, top_k=3),
                controlled(response_format=types_pb2.ResponseFormat(type="json_object")),
                controlled(response_format=types_pb2.ResponseFormat(
                    type="json_schema", json_schema=nested_schema(31)))]

    def neighbours():
        with ThreadPoolExecutor(len(extremes)) as pool:
            results = list(pool.map(lambda r: rpc(stub.Generate, r, beta, 60), extremes))
        bad = [(code, details) for code, details, _ in results if code != grpc.StatusCode.OK]
        return (bad[0] if bad else (grpc.StatusCode.OK, "")), results

    with SteadyStream(sec.router(), sec.auth("acme"), bystander_request()) as bystander:
        started = time.monotonic()
        (code, details), results = neighbours()
        ended = time.monotonic()
    assert code == grpc.StatusCode.OK, details
    assert all(reply.usage.completion_tokens > 0 for _, _, reply in results)
    assert len(results[2][2].logprobs) == results[2][2].usage.completion_tokens
    assert all(len(e.top_logprobs) == 20 for e in results[2][2].logprobs)
    for run_code, run_details, tokens, _, _ in bystander.runs:
        assert run_code == grpc.StatusCode.OK, run_details
        assert tokens == alone, "a neighbour's controls changed the bystander's tokens"
    assert any(s < ended and e > started for *_, s, e in bystander.runs), "no overlap"


def test_hostile_outcome_reports_and_card_kinds(sec, alone) -> None:
    """ReportOutcome's fields and a card's kind, hostile, while acme streams: refused at once;
    beta cannot report on (or learn that exists) a request of acme's."""
    stub, acme, beta = sec.router(), sec.auth("acme"), sec.auth("beta")
    code, details, reply = rpc(stub.Generate, greedy("Hello", max_tokens=2), acme, 30)
    assert code == grpc.StatusCode.OK, details
    acme_id = reply.request_id

    def report(request_id: str, reward: float, who=beta):
        return lambda: rpc(stub.ReportOutcome, router_pb2.ReportOutcomeRequest(
            request_id=request_id, reward=reward), who, 30)[:2]

    for hostile, word in ((report("x" * 100_000, 1.0), "request_id"),
                          (report(acme_id, math.nan), "reward"),
                          (report(acme_id, 1e308), "reward"), (report(acme_id, -math.inf),
                                                                "reward"),
                          (report("", 0.5), "request_id")):
        assert_refused(during_bystander(sec, alone, hostile), None, sec, word)
    result = during_bystander(sec, alone, report(acme_id, 1.0))  # beta: not its request
    assert_refused(result, None, sec, "unknown", codes=(grpc.StatusCode.NOT_FOUND,))
    assert report(acme_id, 1.0, acme)()[0] == grpc.StatusCode.OK  # still acme's to report
    path = write_random_adapter(sec.root / "kinded", sec.base_dir, rank=RANK, seed=121)
    for kind in ("k" * 100_000, "domain\x00", "Domain"):
        result = during_bystander(sec, alone, admin_register(sec, "kinded", path, kind=kind))
        assert_refused(result, "kinded", sec, "kind")


@pytest.mark.parametrize("kind", ["fifo", "nan-alpha", "nan-weights", "int-dtype", "oversized"])
def test_hostile_adapter_files(sec, alone, kind: str) -> None:
    adapter_id = f"hostile-{kind}"
    result = during_bystander(sec, alone, admin_register(sec, adapter_id, sec.hostile[kind]))
    assert_refused(result, adapter_id, sec)
    # also when an admin registers it for a tenant: nothing reaches that tenant's requests
    result = during_bystander(sec, alone, admin_register(sec, adapter_id, sec.hostile[kind],
                                                         tenant="beta"))
    assert_refused(result, None, sec)
    code, _, _ = rpc(sec.router().Generate, greedy("Hello", adapter_id), sec.auth("beta"), 30)
    assert code == grpc.StatusCode.NOT_FOUND


def test_tenant_over_max_queued_is_refused_alone(sec) -> None:
    """gamma: max_running 1, max_queued 1. Eight of its streams at once: at most two are held
    (one running, one queued), the rest RESOURCE_EXHAUSTED; beta's request meanwhile is served."""
    flood = 8
    request = greedy("Tell me everything about the ocean", max_tokens=160)
    gamma, beta = sec.auth("gamma"), sec.auth("beta")
    stubs = [router_pb2_grpc.RouterStub(sec.new_channel()) for _ in range(flood + 1)]
    barrier = threading.Barrier(flood + 1)

    def gamma_call(i: int):
        barrier.wait()
        return stream(stubs[i], request, gamma, timeout=120)

    def beta_call():
        barrier.wait()
        time.sleep(0.2)  # while gamma's flood is held
        return stream(stubs[flood], greedy("Hello there", max_tokens=16), beta, timeout=120)

    with ThreadPoolExecutor(flood + 1) as pool:
        futures = [pool.submit(gamma_call, i) for i in range(flood)]
        other = pool.submit(beta_call)
        results = [f.result(timeout=150) for f in futures]
        beta_result = other.result(timeout=150)
    codes = [r[0] for r in results]
    refused = [r for r in results if r[0] == grpc.StatusCode.RESOURCE_EXHAUSTED]
    served = [r for r in results if r[0] == grpc.StatusCode.OK]
    assert len(refused) + len(served) == flood, [(r[0], r[1]) for r in results]
    assert refused, f"no request of gamma's flood was refused: {codes}"
    assert 1 <= len(served) <= flood - 1, codes
    assert all(len(r[2]) == 160 for r in served)
    assert all(not r[2] for r in refused), "a refused request streamed tokens"
    assert beta_result[0] == grpc.StatusCode.OK, beta_result[:2]
    assert len(beta_result[2]) == 16
    # gamma is not locked out afterwards
    code, details, tokens, _ = stream(sec.router(), greedy("Hello", max_tokens=4), gamma)
    assert code == grpc.StatusCode.OK and len(tokens) == 4, (code, details)
