"""The real SmolLM2-135M-Instruct: transformers parity, batching invariance, `edgelora serve`."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import torch

from edgelora.client import build_request
from edgelora.v1 import router_pb2_grpc
from tests.conftest import run_engine
from worker.config import WorkerConfig
from worker.sequence import SamplingOptions
from worker.server import build_engine

pytestmark = pytest.mark.smollm2

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis to a child.",
    "List three prime numbers.",
    "How do I boil an egg?",
]


@pytest.fixture(scope="module")
def engine(default_model_dir: Path):
    engine, tokenizer, _ = build_engine(  # float32: the reference the tests compare with
        WorkerConfig(dtype="float32", num_threads=1, max_batch_size=16, kv_cache_mb=128),
        emit=lambda e: None)
    return engine, tokenizer


@pytest.fixture(scope="module")
def hf_model(default_model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()


def chat_ids(tokenizer, prompt: str) -> list[int]:
    return tokenizer.encode_chat([("user", prompt)])


def test_logits_match_transformers(default_model_dir: Path, engine, hf_model) -> None:
    from tests.worker.test_model import Harness

    ids = chat_ids(engine[1], PROMPTS[0])
    harness = Harness(default_model_dir, num_blocks=16, block_size=16)
    (ours,) = harness.logits([(harness_seq(ids), len(ids))])
    with torch.no_grad():
        ref = hf_model(torch.tensor([ids])).logits[0]
    diff = (ours - ref).abs().max().item()
    assert diff <= 1e-4, f"max abs logit diff {diff:.3g}"


def harness_seq(ids: list[int]):
    from worker.sequence import Sequence

    return Sequence(1, ids, SamplingOptions(max_tokens=1))


def test_greedy_generations_match_transformers_generate(engine, hf_model) -> None:
    eng, tokenizer = engine
    prompts = [chat_ids(tokenizer, p) for p in PROMPTS]
    ours = run_engine(eng, [(ids, SamplingOptions(max_tokens=32)) for ids in prompts])
    eos = hf_model.generation_config.eos_token_id
    for ids, got in zip(prompts, ours, strict=True):
        with torch.no_grad():
            ref = hf_model.generate(torch.tensor([ids]), max_new_tokens=32,
                                    do_sample=False)[0, len(ids):].tolist()
        if eos in ref:  # transformers pads after the end; we stop there
            ref = ref[:ref.index(eos) + 1]
        assert got == ref, f"{tokenizer.hf.decode(ids)!r}: ours {got} vs transformers {ref}"
    assert sum(len(g) for g in ours) > 100, "most prompts should run the full 32 tokens"


def test_sixteen_concurrent_streams_match_each_alone(engine) -> None:
    eng, tokenizer = engine
    topics = ["the moon", "bread", "a cat", "rivers", "music", "winter", "trains", "bees"]
    requests = []
    for i in range(16):
        prompt = f"Write {'a long' if i % 2 else 'a short'} note about {topics[i % 8]}."
        options = SamplingOptions(max_tokens=8 + 2 * i, ignore_eos=True)
        requests.append((chat_ids(tokenizer, prompt), options))
    together = run_engine(eng, requests)
    for request, got in zip(requests, together, strict=True):
        assert run_engine(eng, [request])[0] == got


def test_serve_answers_paris_in_several_chunks(default_model_dir: Path, tmp_path: Path) -> None:
    port = _free_port()
    env = {**os.environ, "EDGELORA_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "edgelora.cli", "serve", "--port", str(port),
                             "--state-dir", str(tmp_path / "state"),
                             "--http-port", "0"],  # not 8000: a `make run` may hold it
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        grpc.channel_ready_future(channel).result(timeout=120)
        stub = router_pb2_grpc.RouterStub(channel)
        request = build_request("What is the capital of France?", chat=True, max_tokens=32)
        chunks = _retry_until_ready(lambda: list(stub.GenerateStream(request, timeout=60)))
        text = "".join(c.text for c in chunks)
        assert "Paris" in text, text
        assert len([c for c in chunks if c.text]) > 1
        assert chunks[-1].finish_reason == "stop"
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out


def _retry_until_ready(call, timeout_s: float = 60.0):
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return call()
        except grpc.RpcError as exc:  # the router can come up before its worker in other setups
            if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
