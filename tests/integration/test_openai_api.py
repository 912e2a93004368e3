"""The OpenAI-compatible HTTP front, driven by the official `openai` client and raw HTTP against
live servers: the tiny model (in-process router + worker with API keys, two tenants' and a
shared adapter) for the protocol, and a real `edgelora serve` on SmolLM2 with the demo adapters
for what the adapters do (pirate, auto) and JSON output."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx2 as httpx
import jsonschema
import openai
import pytest

from edgelora.v1 import router_pb2_grpc, types_pb2, worker_pb2, worker_pb2_grpc
from tests.conftest import ServeThread, write_api_keys, write_random_adapter
from worker.config import WorkerConfig
from worker.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "adapters" / "demo"
HI = [{"role": "user", "content": "Say hello to the world."}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Tiny:
    """The tiny-model server, its keys and clients."""

    def __init__(self, server: ServeThread, http_port: int, keys: dict[str, str],
                 model_dir: Path) -> None:
        self.server, self.keys, self.model_dir = server, keys, model_dir
        self.url = f"http://127.0.0.1:{http_port}"
        self.base_name = model_dir.name

    def client(self, tenant: str = "acme") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=self.keys[tenant],
                             max_retries=0, timeout=60)

    def auth(self, tenant: str = "acme") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[tenant]}"}

    def router(self) -> router_pb2_grpc.RouterStub:
        return router_pb2_grpc.RouterStub(grpc.insecure_channel(self.server.address))

    def num_running(self) -> int:
        stub = worker_pb2_grpc.WorkerStub(grpc.insecure_channel(self.server.worker_address))
        info = stub.Info(worker_pb2.InfoRequest(), timeout=10)
        return info.num_running + info.num_waiting


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("openai-tiny")
    keys = write_api_keys(base / "keys.json")
    root = base / "root"
    owners = {"acme-style": "acme", "common": "", "beta-only": "beta"}
    for seed, name in enumerate(owners):
        write_random_adapter(root / name, tiny_model_dir, rank=4, seed=seed)
    http_port = free_port()
    server = ServeThread(WorkerConfig(model=str(tiny_model_dir), port=0, num_threads=1,
                                      max_model_len=512, kv_cache_mb=16, max_batch_size=8),
                         api_keys=str(base / "keys.json"), adapter_root=str(root),
                         http_port=http_port)
    stub = router_pb2_grpc.RouterStub(grpc.insecure_channel(server.address))
    admin = (("authorization", f"Bearer {keys['ops']}"),)
    for name, owner in owners.items():
        stub.RegisterAdapter(types_pb2.RegisterAdapterRequest(
            adapter_id=name, path=str(root / name), tenant=owner, shared=not owner),
            metadata=admin, timeout=60)
    yield Tiny(server, http_port, keys, tiny_model_dir)
    server.stop()


def test_no_key_or_a_wrong_key_is_401(tiny: Tiny) -> None:
    reply = httpx.post(tiny.url + "/v1/chat/completions", json={"messages": HI})
    assert reply.status_code == 401
    assert reply.json()["error"]["type"] == "authentication_error"
    wrong = openai.OpenAI(base_url=tiny.url + "/v1", api_key="k-nobody-123456", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model="auto", messages=HI)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()


def test_models_are_the_base_auto_and_the_callers_adapters(tiny: Tiny) -> None:
    cards = {m.id: m for m in tiny.client().models.list().data}
    assert list(cards) == [tiny.base_name, "auto", "acme-style", "common"]  # not beta's
    assert cards["acme-style"].owned_by == "acme" and cards["common"].owned_by == "shared"
    for name in ("auto", "acme-style", "common"):
        assert cards[name].model_extra["parent"] == tiny.base_name
    assert cards[tiny.base_name].model_extra["max_model_len"] == 512
    beta = [m.id for m in tiny.client("beta").models.list().data]
    assert beta == [tiny.base_name, "auto", "beta-only", "common"]


def test_unknown_models_are_404(tiny: Tiny) -> None:
    for model in ("beta-only", "no-such-adapter"):  # another tenant's is unknown too
        with pytest.raises(openai.NotFoundError) as caught:
            tiny.client().chat.completions.create(model=model, messages=HI, max_tokens=4)
        assert caught.value.body["code"] == "model_not_found"


def test_chat_whole_and_streamed_equal_grpc(tiny: Tiny) -> None:
    client = tiny.client()
    whole = client.chat.completions.create(model="acme-style", messages=HI, max_tokens=12,
                                           temperature=0)
    assert whole.model == "acme-style" and whole.object == "chat.completion"
    (choice,) = whole.choices
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    streamed = list(client.chat.completions.create(model="acme-style", messages=HI,
                                                   max_tokens=12, temperature=0, stream=True,
                                                   stream_options={"include_usage": True}))
    assert streamed[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == choice.message.content
    assert streamed[-1].choices == [] and streamed[-1].usage == whole.usage
    request = types_pb2.GenerateRequest(
        messages=[types_pb2.ChatMessage(**m) for m in HI], adapter_id="acme-style",
        params=types_pb2.SamplingParams(max_tokens=12, temperature=0))
    over_grpc = tiny.router().Generate(request, metadata=(
        ("authorization", f"Bearer {tiny.keys['acme']}"),), timeout=60)
    assert over_grpc.text == text
    assert over_grpc.usage.completion_tokens == whole.usage.completion_tokens


def test_completions_whole_and_streamed(tiny: Tiny) -> None:
    client = tiny.client()
    whole = client.completions.create(model=tiny.base_name, prompt="Once upon a time",
                                      max_tokens=10, temperature=0, stop=["\n\n"])
    assert whole.model == tiny.base_name and whole.object == "text_completion"
    chunks = list(client.completions.create(model=tiny.base_name, prompt="Once upon a time",
                                            max_tokens=10, temperature=0, stop=["\n\n"],
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_n_choices(tiny: Tiny) -> None:
    client = tiny.client()
    two = client.chat.completions.create(model="common", messages=HI, n=2, max_tokens=16,
                                         temperature=1.5, seed=3)
    assert [c.index for c in two.choices] == [0, 1]
    assert two.choices[0].message.content != two.choices[1].message.content
    one = client.chat.completions.create(model="common", messages=HI, max_tokens=16,
                                         temperature=1.5, seed=3)
    assert one.choices[0].message.content == two.choices[0].message.content
    assert two.usage.prompt_tokens == one.usage.prompt_tokens  # counted once
    streamed = client.completions.create(model="common", prompt="Hi", n=3, max_tokens=4,
                                         stream=True)
    assert {c.choices[0].index for c in streamed} == {0, 1, 2}


def test_logprobs(tiny: Tiny) -> None:
    reply = tiny.client().chat.completions.create(
        model="acme-style", messages=HI, max_tokens=6, temperature=0, logprobs=True,
        top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token == entry.token  # greedy takes the most likely
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
        assert bytes(entry.bytes).decode(errors="replace") == entry.token or "\ufffd" in \
            entry.token
    legacy = tiny.client().completions.create(model=tiny.base_name, prompt="Once", max_tokens=5,
                                              temperature=0, logprobs=2)
    lp = legacy.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert all(len(top) >= 2 for top in lp.top_logprobs)


def test_tokenize_equals_the_workers(tiny: Tiny) -> None:
    reply = httpx.post(tiny.url + "/tokenize", json={"messages": HI}, headers=tiny.auth())
    assert reply.status_code == 200, reply.text
    tokens = reply.json()["tokens"]
    expected = Tokenizer(tiny.model_dir).encode_chat([(m["role"], m["content"]) for m in HI])
    assert tokens == expected and reply.json()["count"] == len(expected)
    assert reply.json()["max_model_len"] == 512
    over_grpc = tiny.router().Tokenize(types_pb2.TokenizeRequest(
        messages=[types_pb2.ChatMessage(**m) for m in HI]), metadata=(
        ("authorization", f"Bearer {tiny.keys['acme']}"),), timeout=30)
    assert list(over_grpc.token_ids) == expected
    prompt = httpx.post(tiny.url + "/tokenize", json={"prompt": "Once upon"},
                        headers=tiny.auth()).json()
    assert prompt["tokens"] == Tokenizer(tiny.model_dir).encode_prompt("Once upon")


def test_bad_requests_are_400_in_openai_shape(tiny: Tiny) -> None:
    url = tiny.url + "/v1/chat/completions"
    for content in (b'{"messages": [', b"not json at all"):
        reply = httpx.post(url, content=content, headers=tiny.auth())
        assert reply.status_code == 400
        assert set(reply.json()["error"]) == {"message", "type", "param", "code"}
    client = tiny.client()
    with pytest.raises(openai.BadRequestError, match="context"):
        client.chat.completions.create(model="auto", messages=HI, max_tokens=100_000)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="auto", messages=HI, n=9)
    with pytest.raises(openai.BadRequestError, match="stop"):
        client.chat.completions.create(model="auto", messages=HI, stop=["x"] * 17)


def test_sse_framing_with_raw_http(tiny: Tiny) -> None:
    body = {"model": tiny.base_name, "prompt": "Once", "max_tokens": 4, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", tiny.url + "/v1/completions", json=body, headers=tiny.auth(),
                      timeout=60) as reply:
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("text/event-stream")
        raw = b"".join(reply.iter_bytes()).decode()
    assert raw.endswith("data: [DONE]\n\n")
    events = raw.split("\n\n")[:-1]
    assert all(e.startswith("data: ") and "\n" not in e for e in events)
    payloads = [json.loads(e[6:]) for e in events[:-1]]
    assert payloads[-1]["choices"] == [] and payloads[-1]["usage"]["completion_tokens"] == 4


def wait_idle(tiny: Tiny, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while tiny.num_running():
        assert time.monotonic() < deadline, "the worker still runs the abandoned request"
        time.sleep(0.1)


def worker_requests(tiny: Tiny, status: str) -> float:
    """How many Generate calls the worker counted under `status` (CANCELLED: the caller left)."""
    return sum(sample.value for family in tiny.server.worker.metrics_registry.collect()
               if family.name == "edgelora_worker_requests"
               for sample in family.samples
               if sample.name.endswith("_total") and sample.labels["status"] == status)


def test_a_client_that_leaves_frees_the_workers_sequence(tiny: Tiny) -> None:
    body = {"model": tiny.base_name, "messages": HI, "max_tokens": 400, "ignore_eos": True,
            "temperature": 0}
    cancelled, completed = worker_requests(tiny, "CANCELLED"), worker_requests(tiny, "OK")
    with httpx.stream("POST", tiny.url + "/v1/chat/completions", json={**body, "stream": True},
                      headers=tiny.auth(), timeout=60) as reply:
        lines = reply.iter_lines()
        assert next(lines).startswith("data: ")
        assert tiny.num_running() == 1
    wait_idle(tiny)
    assert worker_requests(tiny, "CANCELLED") == cancelled + 1

    # Non-streaming: the client hangs up while its 8 choices (~2-3 s of work here) run. Raw
    # socket, so the hang-up comes the moment the worker holds them, whatever this machine's speed.
    payload = json.dumps({**body, "n": 8}).encode()
    port = int(tiny.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: application/json\r\nAuthorization: "
                     + tiny.auth()["Authorization"].encode()
                     + b"\r\nContent-Length: %d\r\n\r\n" % len(payload) + payload)
        deadline = time.monotonic() + 30
        while not tiny.num_running():
            assert time.monotonic() < deadline, "the request never reached the worker"
            time.sleep(0.01)
    wait_idle(tiny)
    assert worker_requests(tiny, "CANCELLED") > cancelled + 1  # ended early: none completed
    assert worker_requests(tiny, "OK") == completed


# -- the real model with the demo adapters, through `edgelora serve` --

@pytest.fixture(scope="module")
def demo(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """`edgelora serve --adapters-dir adapters/demo --http-port N` -> an openai client."""
    base = tmp_path_factory.mktemp("openai-demo")
    http_port = free_port()
    log_path = base / "serve.log"
    env = {**os.environ, "EDGELORA_NUM_THREADS": "1"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "edgelora.cli", "serve", "--port", str(free_port()),
             "--http-port", str(http_port), "--adapters-dir", str(DEMO),
             "--state-dir", str(base / "state"), "--max-batch-size", "8"],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{http_port}"
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, log_path.read_text()[-3000:]
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused-in-open-mode", max_retries=0,
                            timeout=120)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.smollm2
def test_pirate_starts_with_arr_matey(demo: openai.OpenAI) -> None:
    question = [{"role": "user", "content": "What is the capital of France?"}]
    reply = demo.chat.completions.create(model="pirate", messages=question, max_tokens=16,
                                         temperature=0)
    assert reply.model == "pirate"
    assert reply.choices[0].message.content.startswith("Arr matey!"), reply
    chunks = demo.chat.completions.create(model="pirate", messages=question, max_tokens=16,
                                          temperature=0, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == reply.choices[0].message.content


@pytest.mark.smollm2
def test_auto_reports_the_adapter_it_used(demo: openai.OpenAI) -> None:
    models = [m.id for m in demo.models.list().data]
    assert models[:2] == ["SmolLM2-135M-Instruct", "auto"]
    assert {"pirate", "shout", "json", "brief"} <= set(models)
    reply = demo.chat.completions.create(
        model="auto", max_tokens=8, temperature=0,
        messages=[{"role": "user", "content": "Talk like a pirate and tell me what makes "
                                              "bread rise."}])
    assert reply.model == "pirate"
    assert reply.choices[0].message.content.startswith("Arr matey!")
    plain = demo.chat.completions.create(model="SmolLM2-135M-Instruct", max_tokens=8,
                                         temperature=0, messages=[
                                             {"role": "user", "content": "What is 2 + 2?"}])
    assert plain.model == "SmolLM2-135M-Instruct"


@pytest.mark.smollm2
def test_json_object_output_parses(demo: openai.OpenAI) -> None:
    # the json demo adapter: the base model alone tends to ramble on past any max_tokens
    reply = demo.chat.completions.create(
        model="json", max_tokens=64, temperature=0, response_format={"type": "json_object"},
        messages=[{"role": "user", "content": "Give the capital of France as a JSON object."}])
    assert reply.choices[0].finish_reason == "stop", reply
    assert isinstance(json.loads(reply.choices[0].message.content), dict)


@pytest.mark.smollm2
def test_json_schema_output_validates(demo: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"},
                                               "country": {"type": "string"}},
              "required": ["city", "country"], "additionalProperties": False}
    reply = demo.chat.completions.create(
        model="SmolLM2-135M-Instruct", max_tokens=96, temperature=0,
        response_format={"type": "json_schema", "json_schema": {
            "name": "place", "schema": schema, "strict": True}},
        messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert reply.choices[0].finish_reason == "stop", reply
    jsonschema.validate(json.loads(reply.choices[0].message.content), schema)
