"""The committed demo adapters (adapters/demo/*) show their behaviour under plain transformers +
peft, and the base model alone does not: greedy, chat template, 12 held-out prompts batched."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from scripts.demo_adapter_checks import ADAPTER_NAMES, HELD_OUT_PROMPTS, check

pytestmark = pytest.mark.smollm2

DEMO_DIR = Path(__file__).resolve().parents[2] / "adapters" / "demo"
MAX_NEW_TOKENS = 48
MIN_PASSES = 10  # of 12 held-out prompts, per adapter
MAX_BASE_PASSES = 2  # of 12, per behaviour, for the base model without any adapter


@pytest.fixture(scope="module")
def generate(default_model_dir: Path):
    """generate(adapter_name or None) -> greedy answers to HELD_OUT_PROMPTS (cached per adapter)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    base = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, DEMO_DIR / ADAPTER_NAMES[0],
                                      adapter_name=ADAPTER_NAMES[0])
    for name in ADAPTER_NAMES[1:]:
        model.load_adapter(DEMO_DIR / name, adapter_name=name)
    model.eval()

    rows = [tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": p}],
                                                    tokenize=False, add_generation_prompt=True),
                      add_special_tokens=False)["input_ids"] for p in HELD_OUT_PROMPTS]
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    cache: dict[str | None, list[str]] = {}

    def run() -> list[str]:
        with torch.no_grad():
            out = model.generate(input_ids=input_ids, attention_mask=mask, do_sample=False,
                                 max_new_tokens=MAX_NEW_TOKENS, pad_token_id=pad)
        return [t.strip() for t in tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)]

    def answers(name: str | None) -> list[str]:
        if name not in cache:
            if name is None:
                with model.disable_adapter():
                    cache[name] = run()
            else:
                model.set_adapter(name)
                cache[name] = run()
        return cache[name]

    return answers


@pytest.mark.parametrize("name", ADAPTER_NAMES)
def test_adapter_shows_behaviour(generate, name: str) -> None:
    answers = generate(name)
    failed = [a for a in answers if not check(name, a)]
    passed = len(answers) - len(failed)
    print(f"{name}: {passed}/{len(answers)} held-out prompts pass")
    assert passed >= MIN_PASSES, f"{name}: only {passed}/{len(answers)} pass; failures: {failed}"


def test_base_model_lacks_behaviours(generate) -> None:
    answers = generate(None)
    counts = {name: sum(check(name, a) for a in answers) for name in ADAPTER_NAMES}
    print(f"base model passes: {counts}")
    assert all(n <= MAX_BASE_PASSES for n in counts.values()), (counts, answers)


@pytest.mark.parametrize("name", ADAPTER_NAMES)
def test_adapter_files(name: str) -> None:
    from safetensors.torch import load_file

    target = DEMO_DIR / name
    config = json.loads((target / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "SmolLM2-135M-Instruct"
    assert config["peft_type"] == "LORA"
    weights = target / "adapter_model.safetensors"
    assert weights.stat().st_size <= 1.6e6
    assert {t.dtype for t in load_file(weights).values()} == {torch.float16}
    card = json.loads((target / "card.json").read_text())
    assert card["adapter_id"] == name and card["description"]
    assert len(card["example_prompts"]) == 10
