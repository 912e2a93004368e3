"""router.http_api without a server: the FastAPI app over a scripted dispatcher (the request path
is tested with real workers in tests/integration/test_openai_api.py). Bodies, errors, SSE
framing, n choices, auto's adapter in `model`, and errors after the stream started."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
import pytest
from starlette.testclient import TestClient

from common.errors import EdgeLoraError, Unauthenticated, Unavailable
from common.limits import AUTO
from edgelora.v1 import types_pb2
from router.adapter_record import AdapterRecord, record_name, worker_key
from router.config import RouterConfig
from router.http_api import build_app
from router.metrics import RouterMetrics
from router.openai_schema import MAX_CHOICES
from router.registry import RpcError
from router.tenants import Caller

KEY = "k-acme-0001"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT = {"model": "pirate", "messages": [{"role": "user", "content": "hi"}]}


@dataclass
class FakePool:
    workers: list = field(default_factory=lambda: ["w"])

    def unavailable_reason(self) -> str:
        return "no live worker"


@dataclass
class FakeRegistry:
    records: dict[str, AdapterRecord]

    def find(self, tenant: str, adapter_id: str) -> AdapterRecord | None:
        return (self.records.get(worker_key(tenant, adapter_id))
                or self.records.get(worker_key("", adapter_id)))


class FakeDispatch:
    """The Dispatcher's surface: requests are recorded; each choice streams `script` (chunks
    as (text, finish_reason), or an EdgeLoraError raised at that point)."""

    def __init__(self) -> None:
        self.config = RouterConfig(max_prompt_bytes=1000)
        self.pool = FakePool()
        self.registry = FakeRegistry({
            "acme:pirate": AdapterRecord("pirate", "", 8, owner="acme", created_s=5.0),
            "shout": AdapterRecord("shout", "", 8)})
        self.relayed: list[types_pb2.GenerateRequest] = []
        self.script: list = [("Arr", ""), (" matey!", "stop")]
        self.closed = 0
        self.request_ids: set[str] = set()  # what prepare and relay were given
        self.metrics = RouterMetrics(lambda key: key in self.registry.records)  # for /metrics

    def authenticate(self, token: str) -> Caller:
        if token != KEY:
            raise Unauthenticated("unknown API key")
        return Caller("acme")

    def base_model_name(self) -> str:
        return "Smol"

    def max_model_len(self) -> int:
        return 512

    def visible_adapters(self, caller: Caller) -> list[AdapterRecord]:
        return sorted(self.registry.records.values(), key=lambda r: r.adapter_id)

    async def prepare(self, caller: Caller, request: types_pb2.GenerateRequest,
                      request_id: str = "") -> types_pb2.GenerateRequest:
        self.request_ids.add(request_id)
        prepared = types_pb2.GenerateRequest()
        prepared.CopyFrom(request)
        if request.adapter_id == AUTO:
            prepared.adapter_id = "shout"  # what the selector chose
        elif request.adapter_id:
            record = self.registry.find(caller.tenant, request.adapter_id)
            if record is None:
                raise RpcError(grpc.StatusCode.NOT_FOUND, "adapter not registered")
            prepared.adapter_id = record.key
        return prepared

    async def relay(self, caller: Caller, request: types_pb2.GenerateRequest,
                    request_id: str = "") -> AsyncIterator[types_pb2.GenerateResponse]:
        self.relayed.append(request)
        self.request_ids.add(request_id)
        try:
            for completion, step in enumerate(self.script, 1):
                if isinstance(step, EdgeLoraError):
                    raise step
                text, finish = step
                yield types_pb2.GenerateResponse(
                    text=text, token_ids=[completion], adapter_id=record_name(request.adapter_id),
                    finish_reason=finish, usage=types_pb2.Usage(prompt_tokens=4,
                                                                completion_tokens=completion))
        finally:
            self.closed += 1

    async def tokenize(self, caller: Caller, request: types_pb2.TokenizeRequest
                       ) -> types_pb2.TokenizeResponse:
        return types_pb2.TokenizeResponse(token_ids=[1, 2, len(request.messages)],
                                          max_model_len=512)


@pytest.fixture
def fake() -> FakeDispatch:
    return FakeDispatch()


@pytest.fixture
def client(fake: FakeDispatch) -> TestClient:
    return TestClient(build_app(fake))


def events(text: str) -> list:
    """The SSE body's data payloads, in order; each event is `data: ...` and a blank line."""
    assert text.endswith("\n\n")
    blocks = text[:-2].split("\n\n")
    assert all(b.startswith("data: ") and "\n" not in b for b in blocks), text
    return [b[6:] if b == "data: [DONE]" else json.loads(b[6:]) for b in blocks]


def test_chat_whole_names_the_adapter_and_counts_usage(client, fake) -> None:
    reply = client.post("/v1/chat/completions", json=CHAT, headers=AUTH)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["model"] == "pirate" and body["object"] == "chat.completion"
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant",
                                                        "content": "Arr matey!"},
                                "logprobs": None, "finish_reason": "stop"}]
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}
    assert fake.relayed[0].adapter_id == "acme:pirate"  # the tenant's own, by worker key
    # the response's id is the request id the router gave prepare and relay (ReportOutcome's)
    (request_id,) = fake.request_ids
    assert body["id"] == f"chatcmpl-{request_id}" and len(request_id) == 32


def test_auto_and_base_report_what_served(client) -> None:
    auto = client.post("/v1/chat/completions", json={**CHAT, "model": "auto"}, headers=AUTH)
    assert auto.json()["model"] == "shout"
    for model in ("Smol", None):
        body = {**CHAT, "model": model} if model else {"messages": CHAT["messages"]}
        assert client.post("/v1/chat/completions", json=body,
                           headers=AUTH).json()["model"] == "Smol"


def test_n_choices_fan_out_with_derived_seeds(client, fake) -> None:
    reply = client.post("/v1/completions", json={"model": "shout", "prompt": "x", "n": 3,
                                                 "seed": 11}, headers=AUTH).json()
    assert [c["index"] for c in reply["choices"]] == [0, 1, 2]
    assert fake.relayed[0].params.seed == 11
    assert len({r.params.seed for r in fake.relayed}) == 3
    assert reply["usage"]["prompt_tokens"] == 4  # one prompt, counted once
    assert reply["usage"]["completion_tokens"] == 6
    batch = client.post("/v1/completions", json={"prompt": ["a", "b"], "n": 2},
                        headers=AUTH).json()
    assert len(batch["choices"]) == 4 and batch["usage"]["prompt_tokens"] == 8
    too_many = client.post("/v1/completions", json={"prompt": ["a", "b"], "n": MAX_CHOICES},
                           headers=AUTH)
    assert too_many.status_code == 400 and "at most" in too_many.json()["error"]["message"]


def test_chat_stream_frames_and_usage_chunk(client) -> None:
    reply = client.post("/v1/chat/completions", headers=AUTH, json={
        **CHAT, "stream": True, "stream_options": {"include_usage": True}})
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/event-stream")
    got = events(reply.text)
    assert got[-1] == "[DONE]"
    assert got[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [e["choices"][0]["delta"]["content"] for e in got[1:3]] == ["Arr", " matey!"]
    assert [e["choices"][0]["finish_reason"] for e in got[1:3]] == [None, "stop"]
    assert all(e["usage"] is None and e["model"] == "pirate" for e in got[:3])
    assert got[3]["choices"] == [] and got[3]["usage"]["completion_tokens"] == 2
    assert len({e["id"] for e in got[:4]}) == 1


def test_completion_stream_with_continuous_usage(client) -> None:
    got = events(client.post("/v1/completions", headers=AUTH, json={
        "prompt": "x", "stream": True, "n": 2,
        "stream_options": {"continuous_usage_stats": True}}).text)
    assert got[-1] == "[DONE]"
    chunks = got[:-1]
    assert all(e["object"] == "text_completion" for e in chunks)
    assert sorted(e["choices"][0]["index"] for e in chunks) == [0, 0, 1, 1]
    assert sorted(e["usage"]["completion_tokens"] for e in chunks) == [1, 1, 2, 2]


def test_an_error_after_the_first_chunk_is_a_last_event(client, fake) -> None:
    fake.script = [("Arr", ""), Unavailable("worker w became unavailable")]
    reply = client.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=AUTH)
    assert reply.status_code == 200
    got = events(reply.text)
    assert got[-1] == {"error": {"message": "worker w became unavailable",
                                 "type": "server_error", "param": None,
                                 "code": "unavailable"}}
    assert "[DONE]" not in got
    assert fake.closed == 1  # the worker call was closed


@pytest.mark.parametrize(("error", "status"), [
    (RpcError(grpc.StatusCode.INVALID_ARGUMENT, "max_tokens too large"), 400),
    (RpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full"), 429),
    (Unavailable("no live worker"), 503)])
@pytest.mark.parametrize("stream", [False, True])
def test_errors_before_the_first_chunk_keep_their_status(client, fake, error, status,
                                                         stream) -> None:
    fake.script = [error]
    reply = client.post("/v1/chat/completions", json={**CHAT, "stream": stream, "n": 2},
                        headers=AUTH)
    assert reply.status_code == status
    assert reply.json()["error"]["message"] == str(error)
    assert fake.closed == 2


def test_unknown_models_are_404(client) -> None:
    for model in ("nobody-has-it", "not an id!"):
        reply = client.post("/v1/chat/completions", json={**CHAT, "model": model},
                            headers=AUTH)
        assert reply.status_code == 404
        assert reply.json()["error"]["code"] == "model_not_found"
        assert reply.json()["error"]["param"] == "model"


def test_keys_and_bodies(client) -> None:
    for headers in ({}, {"Authorization": "Bearer k-wrong-0001"}):
        reply = client.post("/v1/chat/completions", json=CHAT, headers=headers)
        assert reply.status_code == 401 and reply.headers["www-authenticate"] == "Bearer"
        assert reply.json()["error"]["type"] == "authentication_error"
    assert client.get("/v1/models").status_code == 401
    for content in (b"{not json", b"[1, 2]", b"[" * 100_000 + b"]" * 100_000):
        reply = client.post("/v1/chat/completions", content=content, headers=AUTH)
        assert reply.status_code == 400, reply.text
        assert reply.json()["error"]["type"] == "invalid_request_error"
    for body, where in (({"messages": []}, "messages"), ({**CHAT, "n": MAX_CHOICES + 1}, "n"),
                        ({**CHAT, "temperature": "hot"}, "temperature"),
                        ({**CHAT, "max_tokens": -1}, "max_tokens")):
        reply = client.post("/v1/chat/completions", json=body, headers=AUTH)
        assert reply.status_code == 400 and where in reply.json()["error"]["message"]


def test_a_large_body_is_refused_unread(client, fake) -> None:
    limit = fake.config.max_http_body_bytes
    reply = client.post("/v1/completions", content=b" " * (limit + 1), headers=AUTH)
    assert reply.status_code == 413
    assert reply.json()["error"]["code"] == "request_too_large"


def test_models_tokenize_health(client, fake) -> None:
    cards = client.get("/v1/models", headers=AUTH).json()["data"]
    assert [(c["id"], c["owned_by"], c["parent"]) for c in cards] == [
        ("Smol", "edgelora", None), ("auto", "edgelora", "Smol"), ("pirate", "acme", "Smol"),
        ("shout", "shared", "Smol")]
    assert all(c["object"] == "model" and c["max_model_len"] == 512 for c in cards)
    reply = client.post("/tokenize", headers=AUTH, json={"messages": CHAT["messages"]})
    assert reply.json() == {"count": 3, "max_model_len": 512, "tokens": [1, 2, 1]}
    assert client.post("/tokenize", headers=AUTH,
                       json={"model": "zzz", "prompt": "a"}).status_code == 404
    assert client.get("/health").status_code == 200
    fake.pool.workers = []
    assert client.get("/health").status_code == 503
    missing = client.get("/v1/nothing-here")
    assert missing.status_code == 404 and "error" in missing.json()
