"""The adapter selector: the decision rule, the trained head (fit, save, load, hot reload), and the
zero-shot confidences on the demo adapters' held-out prompts."""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from router.selector import (
    BELOW_THRESHOLD,
    BEST_NOT_RESIDENT,
    BEST_RESIDENT,
    NO_ADAPTERS,
    RESIDENT_WITHIN_MARGIN,
    AdapterSelector,
    decide,
)
from router.selector_head import TrainedHead, evaluate, fit_head, split_rows

DEMO = Path(__file__).resolve().parents[2] / "adapters" / "demo"


@dataclass
class Card:
    description: str = ""
    example_prompts: list[str] = field(default_factory=list)


def demo_cards() -> dict[str, Card]:
    cards = {}
    for path in sorted(DEMO.glob("*/card.json")):
        data = json.loads(path.read_text())
        cards[data["adapter_id"]] = Card(data["description"], data["example_prompts"])
    return cards


def rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (DEMO / name).read_text().splitlines()]


# -- decide: pure --
def test_below_threshold_is_the_base_model() -> None:
    selection = decide({"a": 0.4, "b": 0.1}, {"a"}, threshold=0.5)
    assert selection.adapter_id == "" and "threshold" in selection.reason
    assert selection.kind == BELOW_THRESHOLD
    assert decide({}, set()).kind == NO_ADAPTERS
    assert selection.ranking == [("a", 0.4), ("b", 0.1)]
    assert decide({}, set()).adapter_id == ""


def test_prefers_a_resident_adapter_within_the_margin() -> None:
    confidences = {"best": 0.9, "close": 0.85, "far": 0.7}
    assert decide(confidences, set(), margin=0.1).adapter_id == "best"
    picked = decide(confidences, {"close", "far"}, margin=0.1)
    assert picked.adapter_id == "close" and "resident" in picked.reason
    assert picked.kind == RESIDENT_WITHIN_MARGIN
    assert decide(confidences, {"far"}, margin=0.1).kind == BEST_NOT_RESIDENT
    assert decide(confidences, {"best"}).kind == BEST_RESIDENT
    assert decide(confidences, {"far"}, margin=0.1).adapter_id == "best"  # 0.2 lower: too far
    assert decide(confidences, {"far"}, margin=0.25).adapter_id == "far"
    assert decide(confidences, {"far"}, margin=0.25, top_k=2).adapter_id == "best"  # not in top 2
    assert decide(confidences, {"best", "close"}).adapter_id == "best"


def test_a_resident_adapter_must_pass_the_threshold_too() -> None:
    assert decide({"a": 0.55, "b": 0.48}, {"b"}, threshold=0.5, margin=0.1).adapter_id == "a"


# -- the trained head --
def test_head_fits_saves_and_loads(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    directions = torch.nn.functional.normalize(torch.randn(3, 16, generator=gen), dim=1)
    examples, targets = [], []
    for i in range(200):
        cls = i % 4  # 3 = no adapter
        noise = torch.randn(2, 16, generator=gen) * 0.3
        segments = noise + (directions[cls] if cls < 3 else 0)  # [2, 16]: the signal in one
        examples.append(torch.nn.functional.normalize(segments, dim=1))
        targets.append([float(cls == a) for a in range(3)])
    targets_t = torch.tensor(targets)
    base = (targets_t.sum(dim=1) == 0).float()  # as profile labels score the base model
    train, held = split_rows(200, 0.25, seed=0)
    assert len(held) == 50 and not set(train) & set(held)
    head = fit_head([examples[i] for i in train], targets_t[train], ["a", "b", "c"],
                    base_targets=base[train])
    score = evaluate(head, [examples[i] for i in held], targets_t[held])
    assert score["accuracy"] >= 0.85 and score["f1"] >= 0.8, score
    head.metrics = score
    head.save(tmp_path / "head.pt")
    loaded = TrainedHead.load(tmp_path / "head.pt")
    assert loaded.adapter_ids == ["a", "b", "c"] and loaded.metrics == score
    assert loaded.confidences(examples[0]) == head.confidences(examples[0])
    (tmp_path / "junk.pt").write_text("not a head")
    with pytest.raises(Exception):  # noqa: B017 - torch's unpickling error type varies
        TrainedHead.load(tmp_path / "junk.pt")


def constant_head(adapter_id: str, bias: float) -> TrainedHead:
    return TrainedHead([adapter_id], torch.zeros(1, 384), torch.tensor([bias]))


def test_head_takes_over_its_adapters_and_reloads_on_change(batcher, tmp_path: Path) -> None:
    path = tmp_path / "head.pt"
    selector = AdapterSelector(batcher, head_path=str(path))
    cards = demo_cards()

    async def pick(text: str):
        return await selector.select(text, cards, set())

    async def main() -> None:
        before = await pick("What is a fossil?")  # no head file yet: zero-shot
        assert before.adapter_id == "" and set(before.sources.values()) == {"zero-shot"}
        constant_head("json", 5.0).save(path)  # head says json for everything
        after = await pick("What is a fossil?")
        assert after.adapter_id == "json" and after.sources["json"] == "head"
        assert after.sources["shout"] == "zero-shot" and "(head)" in after.reason
        constant_head("json", -5.0).save(path)
        st = os.stat(path)  # same second and size as before: force a distinct mtime
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
        assert (await pick("What is a fossil?")).adapter_id == ""
        path.write_text("corrupt")  # keeps the last good head
        assert (await pick("What is a fossil?")).sources["json"] == "head"
        TrainedHead(["shout"], torch.zeros(1, 16), torch.tensor([5.0])).save(path)  # wrong dim
        wrong_dim = await pick("What is a fossil?")
        assert wrong_dim.sources["json"] == "head" and wrong_dim.sources["shout"] == "zero-shot"
        # an adapter the head knows but that is not registered is never ranked
        constant_head("gone", 5.0).save(path)
        assert "gone" not in dict((await pick("What is a fossil?")).ranking)

    asyncio.run(main())


# -- zero-shot on the demo adapters --
def selector_accuracy(selector: AdapterSelector, prompts: list[dict],
                      adversarial: bool) -> tuple[float, list]:
    cards = demo_cards()

    async def main() -> list[str]:
        picks = []
        for row in prompts:  # adversarial: every adapter resident but the intended one
            resident = set(cards) - {row["adapter_id"]} if adversarial else set()
            picks.append((await selector.select(row["prompt"], cards, resident)).adapter_id)
        return picks

    picks = asyncio.run(main())
    misses = [(r["prompt"], p) for r, p in zip(prompts, picks, strict=True)
              if p != r["adapter_id"]]
    return 1 - len(misses) / len(prompts), misses


@pytest.mark.parametrize("adversarial", [False, True], ids=["none-resident", "others-resident"])
def test_zero_shot_picks_the_intended_demo_adapter(batcher, adversarial: bool) -> None:
    accuracy, misses = selector_accuracy(AdapterSelector(batcher), rows("heldout.jsonl"),
                                         adversarial)
    print(f"zero-shot accuracy {accuracy:.3f}; misses {misses}")
    assert accuracy >= 0.95, misses


def test_adapters_without_cards_are_never_picked_zero_shot(batcher) -> None:
    cards = {f"tenant-{i}": Card() for i in range(2000)} | demo_cards()

    async def main():
        return await AdapterSelector(batcher).select("Answer in ALL CAPS: what is a comet?",
                                                     cards, set())

    selection = asyncio.run(main())
    assert selection.adapter_id == "shout" and len(selection.ranking) == len(cards)
    assert dict(selection.ranking)["tenant-7"] == 0.0
