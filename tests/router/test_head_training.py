"""`edgelora router train`: graded labels, a calibrated head that is never worse than the best
constant choice, the refusal to save one that is (unless --force), and a loaded head blending
with the cards of adapters it has never seen."""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
from pathlib import Path

import pytest
import torch

from bench.selector_accuracy import DEMO, read_cards
from edgelora.cli import main as cli_main
from router.head_labels import read_labels
from router.head_training import HeadNotSaved, decision_scores, train
from router.selector import AdapterSelector
from router.selector_head import TrainedHead, pad_segments, split_rows

DIM = 32
SIGNAL = torch.nn.functional.normalize(torch.ones(DIM), dim=0)


class FakeEmbedder:
    """One segment per text: a unit vector seeded by the text, pulled towards SIGNAL when the
    text says "signal" (no model: the head's arithmetic is what these tests are about)."""

    def __init__(self, *_, **__) -> None:
        self.dim = DIM

    def embed_segments(self, texts: list[str]) -> list[torch.Tensor]:
        out = []
        for text in texts:
            seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")
            v = torch.randn(DIM, generator=torch.Generator().manual_seed(seed))
            v = torch.nn.functional.normalize(v, dim=0) + (2 * SIGNAL if "signal" in text else 0)
            out.append(torch.nn.functional.normalize(v, dim=0)[None])
        return out


def write_graded(path: Path, rows: list[tuple[str, dict[str, float]]]) -> Path:
    path.write_text("".join(json.dumps({"prompt": p, "scores": s}) + "\n" for p, s in rows))
    return path


def usual_and_rare(n: int, seed: int, with_signal: bool) -> list[tuple[str, dict[str, float]]]:
    """"usual" answers 85% of prompts well, "rare" 5%; prompts with the signal (half, when
    with_signal) are the other way round, 50% and 95%: the best constant is "usual" (67.5%),
    the best choice per prompt scores 90%."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        signal = with_signal and i % 2 == 0
        rows.append((f"prompt {i}{' signal' if signal else ''}",
                     {"usual": float(rng.random() < (0.5 if signal else 0.85)),
                      "rare": float(rng.random() < (0.95 if signal else 0.05))}))
    return rows


def shifted(n: int) -> list[tuple[str, dict[str, float]]]:
    """On the training split the signal (a third of the prompts) means "rare"; on the held-out
    split it does not, and "usual" is always right there: what the head learns makes it worse
    than always "usual", the best constant on the training split."""
    _, held = split_rows(n, 0.2, seed=0)
    rows = []
    for i in range(n):
        signal = i % 3 == 0
        rare = signal and i not in held
        rows.append((f"prompt {i}{' signal' if signal else ''}",
                     {"usual": float(not rare), "rare": float(rare)}))
    return rows


# -- graded labels --
def test_graded_labels_are_read_and_checked(tmp_path: Path) -> None:
    labels = read_labels(write_graded(tmp_path / "a.jsonl", [
        ("one", {"b": 0.5, "a": 1, "": 0}), ("two", {"a": 0, "b": 1, "": 1})]))
    assert labels.adapter_ids == ["a", "b"] and labels.graded and labels.texts == ["one", "two"]
    assert labels.rewards.tolist() == [[1.0, 0.5], [0.0, 1.0]]
    assert labels.base_rewards is not None and labels.base_rewards.tolist() == [0.0, 1.0]
    assert read_labels(write_graded(tmp_path / "b.jsonl", [("x", {"a": 1})])).base_rewards is None
    bad = {"c.jsonl": [("x", {"a": 1}), ("y", {"a": 1, "b": 0})],   # not the same adapters
           "d.jsonl": [("x", {"a": 1.5})], "e.jsonl": [("x", {"a": True})],
           "f.jsonl": [("x", {"": 1})]}                               # only the base model
    for name, rows in bad.items():
        with pytest.raises(ValueError, match=name):
            read_labels(write_graded(tmp_path / name, rows))
    mixed = tmp_path / "g.jsonl"
    mixed.write_text(json.dumps({"prompt": "x", "scores": {"a": 1}}) + "\n" + json.dumps(
        {"text": "y", "adapter_ids": ["a"], "positives": []}) + "\n")
    with pytest.raises(ValueError, match="one format per file"):
        read_labels(mixed)


def test_profile_labels_score_the_base_model(tmp_path: Path) -> None:
    path = tmp_path / "labels.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [
        {"text": "x", "adapter_ids": ["a", "b"], "positives": ["b"]},
        {"text": "y", "adapter_ids": ["a", "b"], "positives": []}]))
    labels = read_labels(path)
    assert labels.rewards.tolist() == [[0.0, 1.0], [0.0, 0.0]] and not labels.graded
    assert labels.base_rewards is not None and labels.base_rewards.tolist() == [0.0, 1.0]


# -- calibration: never worse than the constant --
@pytest.mark.parametrize("with_signal", [False, True], ids=["no-signal", "signal"])
def test_calibrated_head_never_does_worse_than_the_best_constant(tmp_path: Path,
                                                                with_signal: bool) -> None:
    labels = write_graded(tmp_path / "graded.jsonl", usual_and_rare(400, 0, with_signal))
    metrics = train(str(labels), str(tmp_path / "head.pt"), embedder=FakeEmbedder(), seed=0)
    assert metrics["heldout_best_constant_id"] == "usual"
    assert metrics["heldout_accuracy"] >= metrics["heldout_best_constant"]
    head = TrainedHead.load(tmp_path / "head.pt")
    assert head.base_rule == "never"  # the labels do not score the base model
    if with_signal:  # the head learns when "rare" is the better pick, and gains by it
        assert metrics["heldout_accuracy"] >= metrics["heldout_best_constant"] + 0.1
    # calibrated: the mean predicted probability is each adapter's rate, not inflated
    data = read_labels(labels)
    x, mask = pad_segments(FakeEmbedder().embed_segments(data.texts))
    p = torch.sigmoid(head.logits(x, mask)).mean(dim=0)
    assert torch.allclose(p, data.rewards.mean(dim=0), atol=0.05), (p, data.rewards.mean(0))


def test_decision_scores_against_constants_and_oracle() -> None:
    head = TrainedHead(["a", "b"], torch.zeros(2, 2), torch.tensor([1.0, -1.0]))  # always a
    examples = [torch.eye(2)[:1]] * 4
    rewards = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    scores = decision_scores(head, examples, rewards, torch.tensor([0.0, 0.0, 0.0, 1.0]), 0.5)
    assert scores.decision == 0.5 and scores.oracle == 1.0
    assert scores.constants == {"a": 0.5, "b": 0.5, "": 0.25}
    assert scores.best_constant == ("a", 0.5)  # ties: an adapter, then the larger id


# -- the refusal --
def test_refuses_to_save_a_head_worse_than_the_constant_unless_forced(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    labels = write_graded(tmp_path / "shifted.jsonl", shifted(100))
    out = tmp_path / "head.pt"
    with pytest.raises(HeadNotSaved, match="--force") as refused:
        train(str(labels), str(out), embedder=FakeEmbedder())
    assert refused.value.metrics["heldout_best_constant"] == 1.0 and not out.exists()
    monkeypatch.setattr("router.embedder.PromptEmbedder", FakeEmbedder)
    argv = ["router", "train", "--labels", str(labels), "--out", str(out)]
    with pytest.raises(SystemExit) as exited:
        cli_main(argv)
    captured = capsys.readouterr()
    assert exited.value.code == 1 and not out.exists()
    assert "best constant: always 'usual'" in captured.out
    assert "not saved" in captured.err and "below always picking adapter 'usual'" in captured.err
    cli_main([*argv, "--force"])
    assert out.exists() and "saved" in capsys.readouterr().out


# -- blending a head with the cards --
def test_an_adapter_registered_after_the_head_loaded_is_selectable_at_once(
        batcher, tmp_path: Path) -> None:
    path = tmp_path / "head.pt"
    TrainedHead(["json"], torch.zeros(1, 384), torch.tensor([-3.0]), base_rule="never").save(path)
    selector = AdapterSelector(batcher, head_path=str(path))
    cards = read_cards(DEMO)
    json_only = {"json": cards["json"]}

    async def main():
        before = await selector.select("What is a fossil?", json_only, set())
        assert selector.head is not None  # loaded
        pirate = await selector.select("Talk like a pirate: what is a fossil?",
                                       json_only | {"pirate": cards["pirate"]}, set())
        return before, pirate

    before, pirate = asyncio.run(main())
    assert before.adapter_id == "json" and before.sources["json"] == "head"
    assert pirate.adapter_id == "pirate" and pirate.sources == {"json": "head",
                                                                "pirate": "zero-shot"}
