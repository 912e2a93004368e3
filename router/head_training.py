"""`edgelora router train`: fit the selector head on labels (router/head_labels.py), score its
decisions on a held-out split beside every constant choice and the oracle, and save it only when
it is not worse than the best constant (unless forced).

Decision score: the mean reward of what the router would pick for each held-out prompt (the
adapter of highest confidence when it passes the threshold, else the base model, whose reward
is 0 where the labels do not score it). Oracle: the best choice of each prompt. The best
constant choice ("always adapter X", or always the base model where the labels score it) is the
one best on the training prompts, scored on the held-out ones: a constant picked on the held-out
prompts themselves would be the luckiest of several noisy estimates, and beat an equally good
head by chance (with 7 adapters 2 points apart and 400 held-out prompts, by ~2-5 points).

Regularization: the L2 strength is chosen among L2_GRID by the log-loss on an inner split of the
training rows (calibration; the decision score of a small split is too noisy to choose by: on
synthetic multi-task data it chose heads worse than the constant, the log-loss better ones). On
a tie the stronger wins. The strongest leaves the weights ~0, the head of the best constant
choice, which the inner split picks where the prompts carry no signal.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from router.head_labels import BASE, Labels, read_labels
from router.selector_head import TrainedHead, evaluate, fit_head, pad_segments, split_rows

L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 10.0)
MIN_ROWS_TO_TUNE = 20  # fewer training rows: no inner split, the default L2


class HeadNotSaved(Exception):
    """The head did worse than a constant choice on the held-out split; .metrics says by how
    much."""

    def __init__(self, message: str, metrics: dict[str, Any]) -> None:
        super().__init__(message)
        self.metrics = metrics


@dataclass
class DecisionScores:
    decision: float
    constants: dict[str, float]  # adapter id -> mean reward of always picking it ("" = base)
    oracle: float
    rows: int

    @property
    def best_constant(self) -> tuple[str, float]:
        return max(self.constants.items(), key=lambda item: (item[1], item[0] != BASE))


def decision_scores(head: TrainedHead, examples: Sequence[torch.Tensor], rewards: torch.Tensor,
                    base_rewards: torch.Tensor | None, threshold: float) -> DecisionScores:
    """examples: per prompt [k, dim]; rewards [n, num_adapters]; base_rewards [n] or None."""
    if not examples:
        return DecisionScores(math.nan, {}, math.nan, 0)
    x, mask = pad_segments(examples)
    with torch.no_grad():
        conf = head.decision_confidences(x, mask)  # [n, num_adapters]
    best_conf, best = conf.max(dim=1)
    base = base_rewards if base_rewards is not None else torch.zeros(len(rewards))
    got = torch.where(best_conf >= threshold, rewards.gather(1, best[:, None])[:, 0], base)
    constants = {a: rewards[:, j].mean().item() for j, a in enumerate(head.adapter_ids)}
    if base_rewards is not None:
        constants[BASE] = base_rewards.mean().item()
    oracle = torch.maximum(rewards.max(dim=1).values, base).mean().item()
    return DecisionScores(got.mean().item(), constants, oracle, len(rewards))


def _fit(labels: Labels, examples: list[torch.Tensor], rows: list[int], l2: float,
         epochs: int, seed: int) -> TrainedHead:
    base = None if labels.base_rewards is None else labels.base_rewards[rows]
    return fit_head([examples[i] for i in rows], labels.rewards[rows], labels.adapter_ids,
                    epochs=epochs, l2=l2, seed=seed, base_targets=base, base_rule="never")


def log_loss(head: TrainedHead, examples: Sequence[torch.Tensor], rewards: torch.Tensor,
             base_rewards: torch.Tensor | None) -> float:
    """Binary cross-entropy of the head's probabilities (its base unit's too) on these rows."""
    x, mask = pad_segments(examples)
    with torch.no_grad():
        loss = torch.nn.functional.binary_cross_entropy_with_logits(head.logits(x, mask),
                                                                    rewards) * rewards.shape[1]
        if head.base_weight is not None and base_rewards is not None:
            base = head.base_logits(x, mask)
            loss = loss + torch.nn.functional.binary_cross_entropy_with_logits(base, base_rewards)
    return loss.item()


def choose_l2(labels: Labels, examples: list[torch.Tensor], rows: list[int], epochs: int,
              seed: int) -> float:
    if len(rows) < MIN_ROWS_TO_TUNE:
        return 1e-3
    inner_train, inner_held = split_rows(len(rows), 0.25, seed + 1)
    fit_rows, held = [rows[i] for i in inner_train], [rows[i] for i in inner_held]
    base = None if labels.base_rewards is None else labels.base_rewards[held]
    scored = []
    for l2 in L2_GRID:
        head = _fit(labels, examples, fit_rows, l2, epochs, seed)
        scored.append((log_loss(head, [examples[i] for i in held], labels.rewards[held], base),
                       -l2))
    return -min(scored)[1]  # ties: the stronger L2


def _describe(adapter_id: str) -> str:
    return "the base model" if adapter_id == BASE else f"adapter {adapter_id!r}"


def train(labels: str, out: str, holdout: float = 0.2, epochs: int = 300, seed: int = 0,
          threshold: float = 0.5, embedder: Any = None, force: bool = False,
          l2: float | None = None) -> dict[str, Any]:
    """Fits on the train split, scores on the held-out split, saves -> the metrics. Raises
    HeadNotSaved, saving nothing, when the head's decisions score below the best constant choice
    on the held-out split and not `force`. embedder: a router.embedder.PromptEmbedder (default:
    a new one)."""
    data = read_labels(labels)
    if embedder is None:
        from router.embedder import PromptEmbedder
        embedder = PromptEmbedder()
    examples = embedder.embed_segments(data.texts)
    train_rows, held_rows = split_rows(len(data.texts), holdout, seed)
    chosen_l2 = l2 if l2 is not None else choose_l2(data, examples, train_rows, epochs, seed)
    head = _fit(data, examples, train_rows, chosen_l2, epochs, seed)
    base_held = None if data.base_rewards is None else data.base_rewards[held_rows]
    held = decision_scores(head, [examples[i] for i in held_rows], data.rewards[held_rows],
                           base_held, threshold)
    base_train = None if data.base_rewards is None else data.base_rewards[train_rows]
    train_score = decision_scores(head, [examples[i] for i in train_rows],
                                  data.rewards[train_rows], base_train, threshold)
    held_labels = evaluate(head, [examples[i] for i in held_rows], data.rewards[held_rows],
                           threshold)
    best_id = train_score.best_constant[0]  # the constant one would deploy, chosen on train
    best = held.constants[best_id]
    head.metrics = {
        "heldout_rows": held.rows, "heldout_accuracy": held.decision,
        "heldout_best_constant": best, "heldout_best_constant_id": best_id,
        "heldout_oracle": held.oracle, "heldout_f1": held_labels["f1"],
        "heldout_base_only_accuracy": held.constants.get(BASE, math.nan),
        "train_accuracy": train_score.decision,
        "train_rows": len(train_rows), "l2": chosen_l2, "graded": float(data.graded)}
    if held.decision < best - 1e-9 and not force:
        raise HeadNotSaved(
            f"not saved: on the held-out split ({held.rows} prompts) the head's picks score "
            f"{held.decision:.3f}, below always picking {_describe(best_id)} ({best:.3f}), so "
            "it would make \"auto\" worse than a constant choice. Label more (and more varied) "
            "prompts, or pass --force to save it anyway.", head.metrics)
    head.save(out)
    return head.metrics
