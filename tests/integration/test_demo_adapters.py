"""The committed demo adapters do what their cards say, served by our engine in one mixed batch."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.adapter_format import read_adapter_spec
from scripts.demo_adapter_checks import ADAPTER_NAMES, HELD_OUT_PROMPTS, check
from tests.conftest import run_engine
from worker.config import WorkerConfig
from worker.sequence import SamplingOptions
from worker.server import build_engine

pytestmark = pytest.mark.smollm2
DEMO_DIR = Path(__file__).resolve().parents[2] / "adapters" / "demo"
PROMPTS = HELD_OUT_PROMPTS[:6]


def test_demo_adapters_show_their_behaviour(default_model_dir: Path) -> None:
    engine, tokenizer, _ = build_engine(WorkerConfig(num_threads=1, max_batch_size=32,
                                                     kv_cache_mb=128, max_lora_rank=16,
                                                     device_adapter_slots=4), emit=lambda e: None)
    for name in ADAPTER_NAMES:
        engine.scheduler.adapters.register(read_adapter_spec(name, DEMO_DIR / name))
    requests, adapter_ids = [], []
    for name in (*ADAPTER_NAMES, ""):  # every adapter and the base model share the batches
        for prompt in PROMPTS:
            requests.append((tokenizer.encode_chat([("user", prompt)]),
                             SamplingOptions(max_tokens=40)))
            adapter_ids.append(name)
    outputs = run_engine(engine, requests, adapter_ids)
    texts = [tokenizer.hf.decode(ids, skip_special_tokens=True) for ids in outputs]
    by_adapter: dict[str, list[str]] = {}
    for name, text in zip(adapter_ids, texts, strict=True):
        by_adapter.setdefault(name, []).append(text)
    for name in ADAPTER_NAMES:
        passed = sum(check(name, t) for t in by_adapter[name])
        base_passed = sum(check(name, t) for t in by_adapter[""])
        assert passed >= len(PROMPTS) - 1, f"{name}: {passed}/{len(PROMPTS)}: {by_adapter[name]}"
        assert base_passed <= 1, f"base model already shows {name}: {by_adapter['']}"
