"""Worker.Score on the tiny model: log-likelihoods vs transformers + peft, batching across adapters,
chunked prefill, preemption, errors, cancellation, and no effect on concurrent streams."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch

from common.adapter_format import read_adapter_spec
from edgelora.v1 import types_pb2, worker_pb2, worker_pb2_grpc
from tests.conftest import write_random_adapter
from worker.config import WorkerConfig
from worker.kv_cache import BlockManager
from worker.scheduler import Scheduler
from worker.sequence import SamplingOptions, Sequence
from worker.server import build_engine, start_worker

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# (name, rank, alpha, modules): ranks, targets and scalings differ
ADAPTERS = [("all-r8", 8, 16.0, ALL), ("attn-r4", 4, 8.0, ("q_proj", "v_proj", "o_proj")),
            ("mlp-r2", 2, 4.0, ("gate_proj", "up_proj", "down_proj"))]
PROMPT = "Question: what is the capital of France?\nAnswer:"
REFERENCE = " The capital of France is Paris, a city on the Seine."
LONG_REFERENCE = " " + " ".join(f"Step {i}: add the next number and carry on." for i in range(30))
CONFIG = {"port": 0, "dtype": "float32", "num_threads": 1, "max_model_len": 512, "kv_cache_mb": 16,
          "max_lora_rank": 8, "device_adapter_slots": 4, "host_adapter_cache": 4}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("score-adapters")
    return {name: write_random_adapter(root / name, tiny_model_dir, rank, alpha, modules,
                                       seed=10 + i)
            for i, (name, rank, alpha, modules) in enumerate(ADAPTERS)}


class WorkerThread:
    """A worker alone (no router) on an asyncio loop in a thread, with the adapters registered."""

    def __init__(self, config: WorkerConfig, adapters: dict[str, Path]) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.runtime = asyncio.run_coroutine_threadsafe(start_worker(config),
                                                        self.loop).result(timeout=120)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.runtime.port}")
        self.stub = worker_pb2_grpc.WorkerStub(self.channel)
        for name, path in adapters.items():
            self.stub.RegisterAdapter(types_pb2.RegisterAdapterRequest(adapter_id=name,
                                                                       path=str(path)), timeout=30)

    def stop(self) -> None:
        self.channel.close()
        asyncio.run_coroutine_threadsafe(self.runtime.stop(0), self.loop).result(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def worker(tiny_model_dir: Path, adapters: dict[str, Path]):
    server = WorkerThread(WorkerConfig(model=str(tiny_model_dir), **CONFIG), adapters)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def chunked_worker(tiny_model_dir: Path, adapters: dict[str, Path]):
    """Prompt chunks of at most 16 tokens: every score spans several steps."""
    server = WorkerThread(WorkerConfig(model=str(tiny_model_dir), max_num_batched_tokens=16,
                                       max_batch_size=4, **CONFIG), adapters)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    from worker.tokenizer import Tokenizer

    return Tokenizer(tiny_model_dir)


@pytest.fixture(scope="module")
def peft_log_likelihood(tiny_model_dir: Path, adapters: dict[str, Path]):
    """(adapter_id, prompt_ids, reference_ids) -> (sum of log p of the reference, count), straight
    from transformers (+ peft), one sequence at a time."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    models: dict[str, torch.nn.Module] = {}

    def score(adapter_id: str, prompt_ids: list[int], reference_ids: list[int]
              ) -> tuple[float, int]:
        if adapter_id not in models:
            base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
            models[adapter_id] = (PeftModel.from_pretrained(base, adapters[adapter_id])
                                  if adapter_id else base).eval()
        ids = torch.tensor([prompt_ids + reference_ids])
        with torch.no_grad():
            logits = models[adapter_id](ids).logits[0].double()
        logp = torch.log_softmax(logits[len(prompt_ids) - 1:-1], dim=-1)
        return logp.gather(1, torch.tensor(reference_ids)[:, None]).sum().item(), len(reference_ids)

    return score


def reference_ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer.hf(text, add_special_tokens=False).input_ids)


def score(stub, adapter_ids: list[str], reference: str = REFERENCE, prompt: str = PROMPT,
          messages: list[tuple[str, str]] | None = None) -> worker_pb2.ScoreResponse:
    request = worker_pb2.ScoreRequest(
        prompt="" if messages else prompt, reference=reference, adapter_ids=adapter_ids,
        messages=[types_pb2.ChatMessage(role=r, content=c) for r, c in messages or []])
    return stub.Score(request, timeout=120)


ADAPTER_IDS = ["", *(name for name, *_ in ADAPTERS)]


def test_base_and_adapters_in_one_call_match_peft(worker: WorkerThread, tokenizer,
                                                  peft_log_likelihood) -> None:
    response = score(worker.stub, ["mlp-r2", "", "all-r8", "attn-r4"])
    assert [r.adapter_id for r in response.results] == ["mlp-r2", "", "all-r8", "attn-r4"]
    prompt_ids, ref_ids = tokenizer.encode_prompt(PROMPT), reference_ids(tokenizer, REFERENCE)
    for result in response.results:
        want, count = peft_log_likelihood(result.adapter_id, prompt_ids, ref_ids)
        assert result.num_tokens == count
        assert result.log_likelihood == pytest.approx(want, abs=1e-3), result.adapter_id
    values = [r.log_likelihood for r in response.results]
    assert len({round(v, 2) for v in values}) == 4, f"adapters should change the score: {values}"


def test_chat_messages_score_the_assistant_answer(worker: WorkerThread, tokenizer,
                                                  peft_log_likelihood) -> None:
    messages = [("system", "Answer briefly."), ("user", "What is the capital of France?")]
    response = score(worker.stub, ["attn-r4", ""], reference="Paris.", messages=messages)
    prompt_ids, ref_ids = tokenizer.encode_chat(messages), reference_ids(tokenizer, "Paris.")
    for result in response.results:
        want, count = peft_log_likelihood(result.adapter_id, prompt_ids, ref_ids)
        assert result.num_tokens == count
        assert result.log_likelihood == pytest.approx(want, abs=1e-3), result.adapter_id


def test_empty_adapter_list_scores_the_base_model(worker: WorkerThread) -> None:
    only_base = score(worker.stub, [])
    explicit = score(worker.stub, [""])
    assert [r.adapter_id for r in only_base.results] == [""]
    assert only_base.results[0].log_likelihood == pytest.approx(
        explicit.results[0].log_likelihood, abs=1e-6)


def test_long_reference_over_many_chunks_matches(worker: WorkerThread,
                                                 chunked_worker: WorkerThread, tokenizer,
                                                 peft_log_likelihood) -> None:
    ref_ids = reference_ids(tokenizer, LONG_REFERENCE)
    assert len(ref_ids) > 10 * 16, "the reference should need many 16-token chunks"
    whole = score(worker.stub, ADAPTER_IDS, reference=LONG_REFERENCE)
    chunked = score(chunked_worker.stub, ADAPTER_IDS, reference=LONG_REFERENCE)
    prompt_ids = tokenizer.encode_prompt(PROMPT)
    for one, many in zip(whole.results, chunked.results, strict=True):
        want, count = peft_log_likelihood(one.adapter_id, prompt_ids, ref_ids)
        assert one.num_tokens == many.num_tokens == count
        assert many.log_likelihood == pytest.approx(one.log_likelihood, abs=1e-3)
        assert many.log_likelihood == pytest.approx(want, abs=1e-3), one.adapter_id


@pytest.mark.parametrize("case, code", [
    ("unknown adapter", grpc.StatusCode.NOT_FOUND),
    ("empty reference", grpc.StatusCode.INVALID_ARGUMENT),
    ("too long", grpc.StatusCode.INVALID_ARGUMENT),
    ("no prompt", grpc.StatusCode.INVALID_ARGUMENT),
    ("prompt and messages", grpc.StatusCode.INVALID_ARGUMENT),
])
def test_bad_requests_get_clear_status_codes(worker: WorkerThread, case: str,
                                             code: grpc.StatusCode) -> None:
    request = worker_pb2.ScoreRequest(prompt=PROMPT, reference=REFERENCE,
                                      adapter_ids=["", "all-r8"])
    if case == "unknown adapter":
        request.adapter_ids.append("no-such-adapter")
    elif case == "empty reference":
        request.reference = ""
    elif case == "too long":
        request.reference = " word" * 600  # the context holds 512 tokens
    elif case == "no prompt":
        request.prompt = ""
    else:
        request.messages.append(types_pb2.ChatMessage(role="user", content="Hi"))
    with pytest.raises(grpc.RpcError) as info:
        worker.stub.Score(request, timeout=30)
    assert info.value.code() == code, info.value.details()
    if case == "unknown adapter":
        assert "no-such-adapter" in info.value.details()
    idle = worker.stub.Info(worker_pb2.InfoRequest(), timeout=5)
    assert (idle.num_running, idle.num_waiting) == (0, 0)


def test_full_queue_fails_the_whole_call_and_frees_the_rest(tiny_model_dir: Path,
                                                            adapters: dict[str, Path]) -> None:
    server = WorkerThread(WorkerConfig(model=str(tiny_model_dir), max_queue=2,
                                       **CONFIG), adapters)
    try:
        with pytest.raises(grpc.RpcError) as info:
            score(server.stub, ADAPTER_IDS)  # 4 sequences reach a queue that holds 2
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value.details()
        idle = wait_idle(server.stub)
        assert (idle.num_running, idle.num_waiting) == (0, 0)
        assert idle.num_free_kv_blocks == idle.num_kv_blocks
        assert len(score(server.stub, ADAPTER_IDS[:2]).results) == 2
    finally:
        server.stop()


def wait_idle(stub, timeout_s: float = 30.0) -> worker_pb2.InfoResponse:
    deadline = time.monotonic() + timeout_s
    while True:
        info = stub.Info(worker_pb2.InfoRequest(), timeout=5)
        if (info.num_running, info.num_waiting) == (0, 0) or time.monotonic() > deadline:
            return info
        time.sleep(0.02)


def test_cancelled_score_frees_its_sequences(chunked_worker: WorkerThread) -> None:
    stub = chunked_worker.stub
    request = worker_pb2.ScoreRequest(prompt=PROMPT, reference=LONG_REFERENCE,
                                      adapter_ids=ADAPTER_IDS)
    call = stub.Score.future(request, timeout=120)
    deadline = time.monotonic() + 30
    while stub.Info(worker_pb2.InfoRequest(), timeout=5).num_running == 0:
        assert time.monotonic() < deadline and not call.done(), "scoring never started"
        time.sleep(0.005)
    call.cancel()
    info = wait_idle(stub)
    assert (info.num_running, info.num_waiting) == (0, 0)
    assert info.num_free_kv_blocks == info.num_kv_blocks


def test_score_beside_a_stream_changes_neither(worker: WorkerThread) -> None:
    stub = worker.stub
    generate = types_pb2.GenerateRequest(
        prompt="Once upon a time", params=types_pb2.SamplingParams(max_tokens=60, ignore_eos=True))
    alone = [t for chunk in stub.Generate(generate, timeout=60) for t in chunk.token_ids]
    scores_alone = score(stub, ADAPTER_IDS)

    streamed: list[int] = []
    started = threading.Event()

    def stream() -> None:
        for chunk in stub.Generate(generate, timeout=60):
            streamed.extend(chunk.token_ids)
            started.set()

    thread = threading.Thread(target=stream)
    thread.start()
    assert started.wait(30)
    beside = []
    while thread.is_alive() or not beside:  # keep scoring for as long as the stream runs
        beside.append(score(stub, ADAPTER_IDS))
    thread.join()
    assert streamed == alone
    for response in beside:
        for got, want in zip(response.results, scores_alone.results, strict=True):
            assert got.log_likelihood == pytest.approx(want.log_likelihood, abs=1e-3)


# -- engine level: batching and preemption --

def make_engine(tiny_model_dir: Path, adapters: dict[str, Path], **overrides):
    engine, tokenizer, _ = build_engine(WorkerConfig(model=str(tiny_model_dir), **{**CONFIG,
                                                                                  **overrides}),
                                        emit=lambda event: None)
    for name, path in adapters.items():
        engine.scheduler.adapters.register(read_adapter_spec(name, path))
    return engine, tokenizer


def scoring_seq(request_id: int, prompt_ids: list[int], ref_ids: list[int],
                adapter_id: str) -> Sequence:
    return Sequence(request_id, prompt_ids + ref_ids, SamplingOptions(max_tokens=1), adapter_id,
                    num_reference_tokens=len(ref_ids))


def run_to_completion(engine, seqs: list[Sequence]) -> dict[int, object]:
    """Adds every sequence, steps until all finish; -> last event per request."""
    last: dict[int, object] = {}

    def collect(event) -> None:
        assert event.finish_reason != "error", event.error
        if event.finish_reason:
            last[event.request_id] = event

    engine.emit = collect
    for seq in seqs:
        engine.scheduler.add(seq)
    deadline = time.monotonic() + 120
    while len(last) < len(seqs):
        assert time.monotonic() < deadline
        engine.step()
    return last


def test_adapters_are_scored_in_one_forward(tiny_model_dir: Path, adapters: dict[str, Path],
                                            tokenizer, peft_log_likelihood) -> None:
    engine, _ = make_engine(tiny_model_dir, adapters)
    prompt_ids, ref_ids = tokenizer.encode_prompt(PROMPT), reference_ids(tokenizer, REFERENCE)
    for name in adapters:  # resident first, so admission does not wait on the loader thread
        while not engine.scheduler.adapters.can_acquire(name):
            time.sleep(0.001)
    seqs = [scoring_seq(i, prompt_ids, ref_ids, name) for i, name in enumerate(ADAPTER_IDS)]
    forwards = []
    run = engine.runner.run
    engine.runner.run = lambda batch: forwards.append(
        sorted(it.seq.slot for it in batch.items)) or run(batch)
    events = run_to_completion(engine, seqs)
    assert len(forwards) == 1, forwards
    assert len(set(forwards[0])) == len(ADAPTER_IDS), "one row per adapter, each in its own slot"
    for seq in seqs:
        event = events[seq.request_id]
        assert event.finish_reason == "scored" and event.token_ids == [] and event.text == ""
        want, _ = peft_log_likelihood(seq.adapter_id, prompt_ids, ref_ids)
        assert event.log_likelihood == pytest.approx(want, abs=1e-3), seq.adapter_id
    assert engine.scheduler.blocks.num_free_blocks == engine.scheduler.blocks.num_blocks


def test_preempted_score_is_recomputed_from_scratch(tiny_model_dir: Path,
                                                     adapters: dict[str, Path],
                                                     tokenizer) -> None:
    engine, _ = make_engine(tiny_model_dir, adapters)
    prompt_ids = tokenizer.encode_prompt(PROMPT)
    ref_ids = reference_ids(tokenizer, LONG_REFERENCE)[:60]
    alone = run_to_completion(engine, [scoring_seq(0, prompt_ids, ref_ids, "all-r8")])[0]

    # 6 blocks of 16 tokens: a growing stream and the score cannot both hold their KV
    old = engine.scheduler
    engine.scheduler = Scheduler(BlockManager(6, 16), max_batch_size=4, max_num_batched_tokens=32,
                                 max_queue=8, eos_token_ids=tuple(old.eos_token_ids),
                                 adapters=old.adapters)
    while not old.adapters.can_acquire("attn-r4"):  # so that the stream is admitted first
        time.sleep(0.001)
    preempted = []
    preempt = engine.scheduler._preempt
    engine.scheduler._preempt = lambda seq: preempted.append(seq.request_id) or preempt(seq)
    # 40 + 40 tokens (5 blocks) for the stream, admitted first; 72 for the score
    stream = Sequence(1, tokenizer.encode_prompt(LONG_REFERENCE)[:40],
                      SamplingOptions(max_tokens=40, ignore_eos=True), "attn-r4")
    events = run_to_completion(engine, [stream, scoring_seq(2, prompt_ids, ref_ids, "all-r8")])
    assert 2 in preempted, "the test should preempt the scoring sequence"
    assert events[2].log_likelihood == pytest.approx(alone.log_likelihood, abs=1e-4)
    assert events[1].finish_reason == "length"
