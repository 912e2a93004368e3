"""--batch-invariant end to end (tiny model, bfloat16, mixed adapters, mixed prompt lengths): a
greedy request's tokens and every logit row it sampled from are bitwise the same alone, in
batches of other sizes and compositions, arriving mid-flight, and with its prompt prefilled in
chunks; on the C++ kernels and on torch's paths (EDGELORA_CPU_KERNELS=0)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pytest
import torch

from common.adapter_format import read_adapter_spec
from tests.conftest import write_random_adapter
from worker.config import WorkerConfig
from worker.engine import Engine
from worker.loader import load_model
from worker.sequence import SamplingOptions, Sequence
from worker.server import assemble_engine

NUM_TOKENS = 24
ADAPTER_RANKS = {"a4": 4, "a8": 8, "a16": 16}
PROMPT_LENGTHS = [23, 5, 41, 70, 9, 2, 33]
# (prompt, adapter, max_tokens, the engine step it arrives at)
Request = tuple[list[int], str, int, int]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("invariance-adapters")
    return {name: write_random_adapter(root / name, tiny_model_dir, rank, seed=rank)
            for name, rank in ADAPTER_RANKS.items()}


@pytest.fixture(scope="module")
def prompts() -> list[tuple[list[int], str]]:
    gen = torch.Generator().manual_seed(1)
    names = ["", *ADAPTER_RANKS]
    return [(torch.randint(3, 49152, (n,), generator=gen).tolist(), names[i % len(names)])
            for i, n in enumerate(PROMPT_LENGTHS)]


def make_engine(model_dir: Path, adapters: dict[str, Path], kernels: bool,
                monkeypatch: pytest.MonkeyPatch, weights: str = "auto",
                dtype: torch.dtype = torch.bfloat16, **limits) -> Engine:
    if not kernels:  # as with EDGELORA_CPU_KERNELS=0
        monkeypatch.setattr("worker.server.device_kernels", lambda device, dtype: (None, None))
    model = load_model(model_dir, torch.device("cpu"), dtype, weights)
    config = WorkerConfig(device="cpu", kv_cache_mb=8, max_lora_rank=16, device_adapter_slots=4,
                          batch_invariant=True, **limits)
    engine, _ = assemble_engine(config, model, lambda stop: None, (), lambda event: None)
    for name, path in adapters.items():
        engine.scheduler.adapters.register(read_adapter_spec(name, path))
    engine.bind_threads()
    return engine


def generate(engine: Engine, requests: list[Request]) -> list[tuple[list[int], torch.Tensor]]:
    """Steps the engine until every request ends -> per request its greedy tokens and the logits
    [tokens, vocab] each was sampled from."""
    tokens: dict[int, list[int]] = defaultdict(list)
    logits: dict[int, list[torch.Tensor]] = defaultdict(list)
    done: set[int] = set()
    sample = engine.runner._sample

    def recording_sample(items, rows):
        for it, row in zip(items, rows, strict=True):
            if it.seq.num_computed_tokens + it.num_new_tokens == it.seq.num_tokens:
                logits[it.seq.request_id].append(row.clone())  # a token, not a mid-prompt chunk
        return sample(items, rows)

    def collect(event) -> None:
        assert event.finish_reason != "error", event.error
        tokens[event.request_id].extend(event.token_ids)
        if event.finish_reason:
            done.add(event.request_id)

    engine.runner._sample, engine.emit = recording_sample, collect
    step = 0
    while len(done) < len(requests):
        for i, (ids, adapter, max_tokens, arrival) in enumerate(requests):
            if arrival == step:
                options = SamplingOptions(max_tokens=max_tokens, ignore_eos=True)
                engine.scheduler.add(Sequence(i, ids, options, adapter,
                                              detok=engine.make_detokenizer(())))
        engine.step()
        step += 1
    engine.runner._sample = sample
    return [(tokens[i], torch.stack(logits[i])) for i in range(len(requests))]


def scenarios(target: int, prompts: list[tuple[list[int], str]]) -> dict[str, tuple[int, list]]:
    """name -> (where the target is, the requests): batches of other sizes and compositions,
    the others ending at different steps, the target arriving while others decode."""
    ids, adapter = prompts[target]
    others = [p for i, p in enumerate(prompts) if i != target]
    me = (ids, adapter, NUM_TOKENS, 0)
    return {
        "alone": (0, [me]),
        "all at once": (0, [me] + [(p, a, 3 + 4 * i, 0) for i, (p, a) in enumerate(others)]),
        "in the middle of 3": (1, [(*others[0], 30, 0), me, (*others[3], 2, 0)]),
        "arriving mid-flight": (3, [(p, a, 30, i) for i, (p, a) in enumerate(others[:3])]
                                + [(ids, adapter, NUM_TOKENS, 2)]),
    }


@pytest.mark.parametrize(("kernels", "weights", "dtype"), [
    (True, "auto", torch.bfloat16), (False, "auto", torch.bfloat16),
    (True, "int8", torch.bfloat16), (True, "int4", torch.bfloat16),
    (True, "auto", torch.float32)],
    ids=["cpp-kernels", "torch-paths", "int8-weights", "int4-weights", "float32"])
def test_greedy_requests_give_the_same_bits_alone_batched_and_chunked(
        kernels: bool, weights: str, dtype: torch.dtype, tiny_model_dir: Path,
        adapters: dict[str, Path], prompts, monkeypatch: pytest.MonkeyPatch) -> None:
    """int8/int4: quantized projections switch kernels by step size
    (worker.kernels.quantized_weights), which the tiling's calibration must see and cover.
    float32: where this CPU's BLAS needs heights that are multiples of a tile
    (RowTiling.one_call), the padded calls."""
    whole = make_engine(tiny_model_dir, adapters, kernels, monkeypatch, weights, dtype,
                        max_batch_size=8, max_num_batched_tokens=512)
    # 7-token budget: prompts are prefilled in chunks, beside other rows' decodes
    chunked = make_engine(tiny_model_dir, adapters, kernels, monkeypatch, weights, dtype,
                          max_batch_size=4, max_num_batched_tokens=7)
    assert whole.runner.invariance.tiling == chunked.runner.invariance.tiling
    for target in (0, 3, 5):  # 23 tokens on the base, 70 on a16, 2 on a4
        cases = scenarios(target, prompts)
        expected_tokens, expected_logits = generate(whole, cases["alone"][1])[0]
        assert len(expected_tokens) == NUM_TOKENS
        for name, (index, requests) in cases.items():
            for engine, how in ((whole, "whole"), (chunked, "chunked")):
                got_tokens, got_logits = generate(engine, requests)[index]
                label = f"target {target}, {name}, {how}"
                assert got_tokens == expected_tokens, label
                assert torch.equal(got_logits, expected_logits), label
