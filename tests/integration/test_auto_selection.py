"""adapter_id "auto" through the router: the demo adapters' cards (description + example prompts)
registered on a tiny-model worker, the held-out prompts of adapters/demo/heldout.jsonl (written
apart from the cards, 25 per adapter + 30 for the base model) served with "auto"; the response
must name the intended adapter >= 95% of the time, and SelectAdapter must agree and explain."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest

from edgelora.client import build_request
from edgelora.v1 import router_pb2, router_pb2_grpc, types_pb2
from tests.conftest import ServeThread, write_random_adapter
from worker.config import WorkerConfig

DEMO = Path(__file__).resolve().parents[2] / "adapters" / "demo"
NAMES = ("shout", "json", "brief", "pirate")


def heldout_rows() -> list[dict]:
    return [json.loads(line) for line in (DEMO / "heldout.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def stub(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    server = ServeThread(WorkerConfig(model=str(tiny_model_dir), port=0, num_threads=1,
                                      max_model_len=256, kv_cache_mb=16, max_batch_size=16))
    stub = router_pb2_grpc.RouterStub(grpc.insecure_channel(server.address))
    root = tmp_path_factory.mktemp("cards")
    for seed, name in enumerate(NAMES):  # tiny-model weights, the demo adapters' cards
        card = json.loads((DEMO / name / "card.json").read_text())
        stub.RegisterAdapter(types_pb2.RegisterAdapterRequest(
            adapter_id=name, path=str(write_random_adapter(root / name, tiny_model_dir,
                                                           rank=4, seed=seed)),
            description=card["description"], example_prompts=card["example_prompts"]),
            timeout=60)
    yield stub
    server.stop()


def test_heldout_prompts_meet_the_card_examples_nowhere() -> None:
    rows = heldout_rows()
    examples = {p for n in NAMES
                for p in json.loads((DEMO / n / "card.json").read_text())["example_prompts"]}
    assert not examples & {r["prompt"] for r in rows}
    for name in NAMES:
        assert sum(r["adapter_id"] == name for r in rows) >= 20
    assert sum(r["adapter_id"] == "" for r in rows) >= 20


def test_auto_serves_the_intended_adapter(stub) -> None:
    rows = heldout_rows()
    served = [stub.Generate(build_request(r["prompt"], adapter_id="auto", max_tokens=1),
                            timeout=120).adapter_id for r in rows]
    misses = [(r["prompt"], r["adapter_id"], got) for r, got in zip(rows, served, strict=True)
              if got != r["adapter_id"]]
    accuracy = 1 - len(misses) / len(rows)
    print(f"auto picked the intended adapter for {accuracy:.1%} of {len(rows)}: misses {misses}")
    assert accuracy >= 0.95, misses
    for name in NAMES:  # every adapter actually served something
        assert name in served


def test_select_adapter_ranks_and_explains(stub) -> None:
    reply = stub.SelectAdapter(router_pb2.SelectAdapterRequest(
        messages=[types_pb2.ChatMessage(role="system", content="You answer in JSON."),
                  types_pb2.ChatMessage(role="user", content="Talk like a pirate: what is rum?")]),
        timeout=60)
    assert reply.selected_adapter_id == "pirate"  # the last user turn decides
    scores = [s.score for s in reply.ranking]
    assert reply.ranking[0].adapter_id == "pirate" and len(scores) == len(NAMES)
    assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)
    assert "pirate" in reply.reason and "zero-shot" in reply.reason
    top2 = stub.SelectAdapter(router_pb2.SelectAdapterRequest(prompt="What is rum?", top_k=2),
                              timeout=60)
    assert len(top2.ranking) == 2 and top2.selected_adapter_id == ""
    assert "threshold" in top2.reason


def test_select_adapter_needs_a_prompt(stub) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.SelectAdapter(router_pb2.SelectAdapterRequest(), timeout=30)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT


def test_a_new_adapter_is_selectable_at_once(stub, tiny_model_dir: Path, tmp_path: Path) -> None:
    stub.RegisterAdapter(types_pb2.RegisterAdapterRequest(
        adapter_id="french", path=str(write_random_adapter(tmp_path / "fr", tiny_model_dir,
                                                           rank=4, seed=9)),
        description="Answers in French.",
        example_prompts=["Answer in French: what is gravity?", "Réponds en français, s'il te "
                         "plaît: why is the sky blue?", "Reply in French: how do I boil an egg?",
                         "In French please: what is a black hole?"]), timeout=60)
    try:
        reply = stub.Generate(build_request("Please answer in French: where do penguins live?",
                                            adapter_id="auto", max_tokens=1), timeout=60)
        assert reply.adapter_id == "french"
    finally:
        stub.UnregisterAdapter(types_pb2.UnregisterAdapterRequest(adapter_id="french"),
                               timeout=30)
    after = stub.SelectAdapter(router_pb2.SelectAdapterRequest(
        prompt="Please answer in French: where do penguins live?"), timeout=60)
    assert "french" not in {s.adapter_id for s in after.ranking}


@pytest.mark.smollm2
def test_auto_on_the_real_model_answers_in_the_asked_style(default_model_dir: Path) -> None:
    """`--adapters-dir adapters/demo` (cards read from card.json), the real model: a chat request
    with "auto" is served by the adapter its prompt asks for, and the answer shows it."""
    from router.config import RouterConfig
    from router.server import start_router
    from scripts.demo_adapter_checks import check

    server = ServeThread(WorkerConfig(model=str(default_model_dir), port=0, num_threads=1,
                                      max_model_len=512, kv_cache_mb=64))
    runtime = server._call(start_router(RouterConfig(port=0, workers=server.worker_address,
                                                     adapters_dir=str(DEMO))))
    try:
        stub = router_pb2_grpc.RouterStub(grpc.insecure_channel(f"127.0.0.1:{runtime.port}"))
        asks = {"shout": "Answer in all capital letters: what is the capital of France?",
                "json": "Give me the answer as a JSON object: what is the capital of France?",
                "pirate": "Talk like a pirate: what is the capital of France?"}
        for name, prompt in asks.items():
            reply = stub.Generate(build_request(prompt, chat=True, adapter_id="auto",
                                                max_tokens=40), timeout=120)
            assert reply.adapter_id == name, (prompt, reply.adapter_id)
            assert check(name, reply.text), (name, reply.text)
        plain = stub.Generate(build_request("What is the capital of France?", chat=True,
                                            adapter_id="auto", max_tokens=16), timeout=120)
        assert plain.adapter_id == "" and "Paris" in plain.text
    finally:
        server._call(runtime.stop(0))
        server.stop()
