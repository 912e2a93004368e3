"""A mixed-adapter batch vs the same requests alone through transformers + peft (tiny model)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from common.adapter_format import read_adapter_spec
from tests.conftest import run_engine, write_random_adapter
from worker.config import WorkerConfig
from worker.sequence import SamplingOptions
from worker.server import build_engine

# (name, rank, alpha, modules, file dtype, rslora): ranks, targets, scalings and dtypes all differ
ADAPTERS = [
    ("all-r8", 8, 16.0, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                         "down_proj"), torch.float32, False),
    ("attn-r4-fp16", 4, 8.0, ("q_proj", "v_proj"), torch.float16, False),
    ("mlp-r16-bf16", 16, 8.0, ("gate_proj", "up_proj", "down_proj"), torch.bfloat16, False),
    ("mixed-r2-rslora", 2, 4.0, ("k_proj", "o_proj", "down_proj"), torch.float32, True),
]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {name: write_random_adapter(root / name, tiny_model_dir, rank, alpha, modules, seed=i,
                                       dtype=dtype, use_rslora=rslora)
            for i, (name, rank, alpha, modules, dtype, rslora) in enumerate(ADAPTERS)}


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path, adapters: dict[str, Path]):
    engine, tokenizer, _ = build_engine(WorkerConfig(
        model=str(tiny_model_dir), dtype="float32", num_threads=1, max_model_len=512,
        kv_cache_mb=16, max_lora_rank=16, device_adapter_slots=4, host_adapter_cache=4),
        emit=lambda e: None)
    for name, path in adapters.items():
        engine.scheduler.adapters.register(read_adapter_spec(name, path))
    return engine, tokenizer


def peft_model(tiny_model_dir: Path, adapter: Path | None):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return model if adapter is None else PeftModel.from_pretrained(model, adapter).eval()


def requests(tokenizer) -> list[tuple[str, list[int]]]:
    names = ["", *[a[0] for a in ADAPTERS]]
    prompts = ["Tell me about the sea", "Why is the sky blue?", "A list of fruits:", "Hello!",
               "Write a poem about trees and rivers and mountains", "1, 2, 3,", "Good morning",
               "The best way to learn is"]
    return [(names[i % len(names)], tokenizer.encode_prompt(p)) for i, p in enumerate(prompts)]


def test_mixed_batch_matches_peft_alone(engine, tiny_model_dir: Path,
                                        adapters: dict[str, Path]) -> None:
    eng, tokenizer = engine
    reqs = requests(tokenizer)
    got = run_engine(eng, [(ids, SamplingOptions(max_tokens=12, ignore_eos=True))
                           for _, ids in reqs], adapter_ids=[name for name, _ in reqs])
    models = {}
    for (name, ids), ours in zip(reqs, got, strict=True):
        if name not in models:
            models[name] = peft_model(tiny_model_dir, adapters.get(name))
        with torch.no_grad():
            ref = models[name].generate(torch.tensor([ids]), max_new_tokens=12, min_new_tokens=12,
                                        do_sample=False, suppress_tokens=None)[0, len(ids):]
        assert ours == ref.tolist(), f"adapter {name or 'base'}: ours {ours} vs peft {ref.tolist()}"
    assert len({tuple(g) for g in got}) > 4, "adapters should change the outputs"


def test_mixed_batch_logits_match_peft(engine, tiny_model_dir: Path,
                                       adapters: dict[str, Path]) -> None:
    from tests.worker.test_model import assert_close

    eng, tokenizer = engine
    reqs = requests(tokenizer)
    logits = run_engine_logits(eng, reqs)
    for (name, ids), ours in zip(reqs, logits, strict=True):
        with torch.no_grad():
            ref = peft_model(tiny_model_dir, adapters.get(name))(torch.tensor([ids])).logits[0, -1]
        assert_close(ours, ref, f"adapter {name or 'base'}")


def run_engine_logits(eng, reqs: list[tuple[str, list[int]]]) -> list[torch.Tensor]:
    """Last-position logits of every request from ONE mixed prefill step through the runner."""
    from worker.scheduler import Batch, ScheduledSeq
    from worker.sequence import Sequence

    seqs = [Sequence(100 + i, ids, SamplingOptions(max_tokens=1), adapter_id=name)
            for i, (name, ids) in enumerate(reqs)]
    memory, blocks = eng.scheduler.adapters, eng.scheduler.blocks
    for seq in seqs:
        if seq.adapter_id:
            while not memory.can_acquire(seq.adapter_id):
                pass  # the background load finishes in milliseconds
            seq.slot = memory.acquire(seq.adapter_id)
        blocks.allocate(seq.block_table, seq.num_tokens)
    batch = Batch([ScheduledSeq(s, s.num_tokens) for s in seqs])
    runner = eng.runner
    with torch.inference_mode():
        input_ids, fb, last_idx = runner.prepare(batch)
        hidden = runner.model(input_ids, fb, runner.kv_cache.layers)
        logits = runner.model.compute_logits(hidden.index_select(0, last_idx))
    for seq in seqs:
        blocks.free(seq.block_table)
        if seq.slot:
            memory.release(seq.slot)
    return list(logits)
