"""Who may call: every Router RPC wants a known API key (UNAUTHENTICATED otherwise), health and
reflection stay open, the public port speaks TLS only, and the worker's port refuses callers
without the router <-> worker secret."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from edgelora.v1 import router_pb2, router_pb2_grpc, types_pb2, worker_pb2, worker_pb2_grpc
from tests.security.helpers import greedy, rpc, stream

NO_KEY: tuple = ()
UNKNOWN_KEY = (("authorization", "Bearer k-nobody-0123456789abcdef"),)
NOT_BEARER = (("authorization", "Basic b3BzOnNlY3JldA=="),)


def router_calls(sec, stub) -> dict[str, object]:
    """Each Router RPC as a callable of the metadata -> (status code, details)."""
    target = str(sec.root / "whatever")

    def generate_stream(metadata):
        code, details, tokens, _ = stream(stub, greedy("Hello", max_tokens=4), metadata,
                                          timeout=30)
        assert not tokens, "tokens reached a caller without a key"
        return code, details

    def unary(method, request):
        return lambda metadata: rpc(method, request, metadata, 30)[:2]

    return {
        "GenerateStream": generate_stream,
        "Generate": unary(stub.Generate, greedy("Hello", max_tokens=4)),
        "ListAdapters": unary(stub.ListAdapters, types_pb2.ListAdaptersRequest()),
        "RegisterAdapter": unary(stub.RegisterAdapter, types_pb2.RegisterAdapterRequest(
            adapter_id="intruder", path=target)),
        "UnregisterAdapter": unary(stub.UnregisterAdapter, types_pb2.UnregisterAdapterRequest(
            adapter_id="common-json")),
        "SelectAdapter": unary(stub.SelectAdapter, router_pb2.SelectAdapterRequest(
            prompt="Reply in JSON: what is 2 + 2?")),
    }


def test_every_router_rpc_needs_a_known_key(sec) -> None:
    stub = sec.router()
    refused = {}
    for name, call in router_calls(sec, stub).items():
        for label, metadata in (("no key", NO_KEY), ("unknown key", UNKNOWN_KEY),
                                ("not a bearer key", NOT_BEARER)):
            refused[f"{name} with {label}"] = call(metadata)
    wrong = {k: v for k, v in refused.items() if v[0] != grpc.StatusCode.UNAUTHENTICATED}
    assert not wrong, wrong
    # nothing an unauthenticated caller did took effect: the shared adapter is still there
    ids = [a.adapter_id for a in stub.ListAdapters(types_pb2.ListAdaptersRequest(),
                                                   metadata=sec.auth("ops"), timeout=30).adapters]
    assert "common-json" in ids and "intruder" not in ids


def test_health_and_reflection_stay_open_without_a_key(sec) -> None:
    channel = sec.channel()
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "edgelora.v1.Router"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = list(reflection.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10))
    names = {s.name for r in replies for s in r.list_services_response.service}
    assert "edgelora.v1.Router" in names, names


def test_public_port_is_tls_only(sec) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{sec.port}") as plain:
        health = health_pb2_grpc.HealthStub(plain)
        code, _, _ = rpc(health.Check, health_pb2.HealthCheckRequest(), timeout=5)
        assert code != grpc.StatusCode.OK, "a plain-text health check answered on the TLS port"
        stub = router_pb2_grpc.RouterStub(plain)
        code, _, reply = rpc(stub.Generate, greedy("Hello"), sec.auth("acme"), timeout=5)
        assert code != grpc.StatusCode.OK and reply is None, "plain text reached the router"


def test_tls_round_trip_with_a_key_generates_text(sec) -> None:
    stub = sec.router()
    reply = stub.Generate(greedy("The capital of France is", max_tokens=8),
                          metadata=sec.auth("acme"), timeout=60)
    assert len(reply.token_ids) == 8 and reply.finish_reason == "length"
    assert reply.usage.completion_tokens == 8 and reply.text
    code, details, tokens, text = stream(stub, greedy("The capital of France is", max_tokens=8),
                                         sec.auth("beta"))
    assert code == grpc.StatusCode.OK, details
    assert tokens == list(reply.token_ids) and text == reply.text  # same greedy output


def test_worker_port_refuses_calls_without_the_secret(sec) -> None:
    address = f"127.0.0.1:{sec.worker_port}"
    with grpc.insecure_channel(address) as channel:
        worker = worker_pb2_grpc.WorkerStub(channel)
        for metadata in (NO_KEY, (("authorization", "Bearer not-the-secret"),),
                         sec.auth("ops")):  # not even a router admin key opens it
            code, details, _ = rpc(worker.Info, worker_pb2.InfoRequest(), metadata, 10)
            assert code == grpc.StatusCode.UNAUTHENTICATED, (code, details)
            request = greedy("Hello", adapter_id="", max_tokens=4)
            try:
                chunks = list(worker.Generate(request, metadata=metadata, timeout=10))
                code = grpc.StatusCode.OK
            except grpc.RpcError as exc:
                chunks, code = [], exc.code()
            assert code == grpc.StatusCode.UNAUTHENTICATED and not chunks, code
            code, _, _ = rpc(worker.ListAdapters, types_pb2.ListAdaptersRequest(), metadata, 10)
            assert code == grpc.StatusCode.UNAUTHENTICATED
            code, _, _ = rpc(worker.RegisterAdapter, types_pb2.RegisterAdapterRequest(
                adapter_id="intruder", path=str(sec.outside / "adapter")), metadata, 10)
            assert code == grpc.StatusCode.UNAUTHENTICATED
            code, _, _ = rpc(worker.UnregisterAdapter, types_pb2.UnregisterAdapterRequest(
                adapter_id="common-json"), metadata, 10)
            assert code == grpc.StatusCode.UNAUTHENTICATED
            code, _, _ = rpc(worker.Score, worker_pb2.ScoreRequest(
                prompt="Hello", reference=" world"), metadata, 10)
            assert code == grpc.StatusCode.UNAUTHENTICATED
        health = health_pb2_grpc.HealthStub(channel)
        reply = health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    # the router still reaches its worker (it has the secret), and nothing was unregistered
    ids = [a.adapter_id for a in sec.router().ListAdapters(
        types_pb2.ListAdaptersRequest(), metadata=sec.auth("ops"), timeout=30).adapters]
    assert "common-json" in ids and "intruder" not in ids
