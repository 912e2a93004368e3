"""The selector's trainable head: one logistic unit per adapter over the prompt's clause
embeddings, max-pooled over clauses (a prompt is for an adapter when one of its parts says so,
the same reading as the zero-shot rule), fitted on labels and saved as a small file.

    p[a] = sigmoid(max_k (W[a] . segment_k + b[a]))        segment_k: [dim], unit norm

p[a] is calibrated: the probability (or expected reward, for graded labels) that adapter a
answers the prompt well. It is fitted by plain binary cross-entropy, with no per-adapter
re-weighting: up-weighting the rare positives of an adapter (as this head once did) inflates its
p and erases how often each adapter is right, and on a multi-task router dataset such a head
picked worse adapters than always picking the single best one. The biases start at each
adapter's base rate and the weights at zero, so an untrained head is the best constant choice.

The base model competes through `base_rule`, the confidence the selector's threshold reads:
  - "learned" (labels that score the base model): a unit of its own, p_base; confidence[a] =
    0.5 + (p[a] - p_base) / 2, at least 0.5 exactly when a is expected to beat the base model;
  - "never" (graded labels that do not score it): confidence[a] = 0.5 + p[a] / 2, always past the
    threshold: the labels say nothing about the base model, so the head always picks an adapter;
  - "threshold" (heads made directly, and files of format /1): confidence[a] = p[a].
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

FORMAT = "edgelora-selector-head/2"
LEGACY_FORMAT = "edgelora-selector-head/1"  # pos-weighted, no base rule: read as "threshold"
BASE_RULES = ("threshold", "learned", "never")


@dataclass
class TrainedHead:
    adapter_ids: list[str]
    weight: torch.Tensor  # [num_adapters, dim]
    bias: torch.Tensor    # [num_adapters]
    metrics: dict[str, Any] = field(default_factory=dict)  # what `router train` measured
    base_rule: str = "threshold"
    base_weight: torch.Tensor | None = None  # [dim], base_rule "learned" only
    base_bias: float = 0.0

    def __post_init__(self) -> None:
        if self.base_rule not in BASE_RULES:
            raise ValueError(f"base_rule {self.base_rule!r}: use one of {BASE_RULES}")
        if (self.base_rule == "learned") != (self.base_weight is not None):
            raise ValueError("a base_weight goes with base_rule 'learned', and only with it")

    def logits(self, segments: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """segments [..., k, dim] (mask [..., k], True = real) -> [..., num_adapters]."""
        return _max_pool(segments @ self.weight.T + self.bias, mask)

    def decision_confidences(self, segments: torch.Tensor,
                             mask: torch.Tensor | None = None) -> torch.Tensor:
        """What the selector's threshold reads (see base_rule): [..., num_adapters]."""
        p = torch.sigmoid(self.logits(segments, mask))
        if self.base_rule == "threshold":
            return p
        if self.base_rule == "never":
            return 0.5 + p / 2
        p_base = torch.sigmoid(self.base_logits(segments, mask))  # [...]
        return 0.5 + (p - p_base[..., None]) / 2

    def base_logits(self, segments: torch.Tensor, mask: torch.Tensor | None = None
                    ) -> torch.Tensor:
        """The base model's unit (base_rule "learned"): [..., k, dim] -> [...]."""
        assert self.base_weight is not None
        per_segment = (segments @ self.base_weight + self.base_bias)[..., None]  # [..., k, 1]
        return _max_pool(per_segment, mask)[..., 0]

    def confidences(self, segments: torch.Tensor) -> dict[str, float]:
        with torch.no_grad():
            values = self.decision_confidences(segments).tolist()
        return dict(zip(self.adapter_ids, values, strict=True))

    def save(self, path: str | Path) -> None:
        """Written to a temporary file and renamed: a router reloading it never reads half."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save({"format": FORMAT, "adapter_ids": self.adapter_ids, "weight": self.weight,
                    "bias": self.bias, "metrics": self.metrics, "base_rule": self.base_rule,
                    "base_weight": self.base_weight, "base_bias": self.base_bias}, tmp)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> TrainedHead:
        data = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(data, dict) or data.get("format") not in (FORMAT, LEGACY_FORMAT):
            raise ValueError(f"{path} is not a selector head ({FORMAT}); make one with "
                             "`edgelora router train`")
        base_weight = data.get("base_weight")
        return cls(list(data["adapter_ids"]), data["weight"].float(), data["bias"].float(),
                   dict(data.get("metrics", {})), data.get("base_rule", "threshold"),
                   None if base_weight is None else base_weight.float(),
                   float(data.get("base_bias", 0.0)))


def _max_pool(per_segment: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """[..., k, units] -> [..., units], the best real segment."""
    if mask is not None:
        per_segment = per_segment.masked_fill(~mask[..., None], float("-inf"))
    return per_segment.amax(dim=-2)


def pad_segments(examples: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """-> segments [n, kmax, dim] (zeros past each prompt's own), mask [n, kmax]."""
    kmax = max(len(e) for e in examples)
    x = torch.zeros(len(examples), kmax, examples[0].shape[1])
    mask = torch.zeros(len(examples), kmax, dtype=torch.bool)
    for i, e in enumerate(examples):
        x[i, :len(e)], mask[i, :len(e)] = e, True
    return x, mask


def _logit(rate: torch.Tensor) -> torch.Tensor:
    rate = rate.clamp(1e-3, 1 - 1e-3)
    return torch.log(rate / (1 - rate))


def fit_head(examples: Sequence[torch.Tensor], targets: torch.Tensor, adapter_ids: list[str],
             epochs: int = 300, lr: float = 0.05, l2: float = 1e-3, seed: int = 0,
             base_targets: torch.Tensor | None = None,
             base_rule: str | None = None) -> TrainedHead:
    """examples: per prompt [k, dim]; targets [n, num_adapters] in [0, 1] (0/1 labels or graded
    rewards); base_targets [n] the base model's, when the labels score it (base_rule "learned";
    else `base_rule`, default "threshold"). Full-batch Adam on binary cross-entropy (calibrated:
    no re-weighting), L2 on the weights only, so a strong L2 tends to the base rates."""
    torch.manual_seed(seed)
    x, mask = pad_segments(examples)
    units = targets if base_targets is None else torch.cat([targets, base_targets[:, None]], 1)
    weight = torch.zeros(units.shape[1], x.shape[-1], requires_grad=True)
    bias = _logit(units.mean(0)).requires_grad_(True)
    optimizer = torch.optim.Adam([weight, bias], lr=lr)
    for _ in range(epochs):
        optimizer.zero_grad()
        logits = _max_pool(x @ weight.T + bias, mask)  # [n, units]
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, units)
        (loss + l2 * weight.pow(2).sum()).backward()
        optimizer.step()
    weight, bias = weight.detach(), bias.detach()
    num = len(adapter_ids)
    if base_targets is None:
        return TrainedHead(adapter_ids, weight, bias, base_rule=base_rule or "threshold")
    return TrainedHead(adapter_ids, weight[:num], bias[:num], base_rule="learned",
                       base_weight=weight[num], base_bias=float(bias[num]))


def split_rows(num_rows: int, holdout: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """Shuffled (train, held_out) row indices; at least one of each when num_rows >= 2."""
    order = list(range(num_rows))
    random.Random(seed).shuffle(order)
    num_held = min(max(1, round(num_rows * holdout)), num_rows - 1) if num_rows >= 2 else 0
    return sorted(order[num_held:]), sorted(order[:num_held])


def evaluate(head: TrainedHead, examples: Sequence[torch.Tensor], targets: torch.Tensor,
             threshold: float = 0.5) -> dict[str, float]:
    """0/1 labels: micro-F1 of the per-adapter labels (p >= 0.5), and decision accuracy: the
    pick (best confidence past the threshold, else the base model) is one of the row's
    positives, or the base model when the row has none."""
    if not examples:
        return {"f1": math.nan, "accuracy": math.nan, "rows": 0}
    x, mask = pad_segments(examples)
    with torch.no_grad():
        p = torch.sigmoid(head.logits(x, mask))  # [n, num_adapters]
        conf = head.decision_confidences(x, mask)
    truth = targets >= 0.5
    predicted = p >= 0.5
    tp = (predicted & truth).sum().item()
    fp, fn = (predicted & ~truth).sum().item(), (~predicted & truth).sum().item()
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0
    best = conf.argmax(dim=1)
    picked = conf.gather(1, best[:, None])[:, 0] >= threshold
    right = torch.where(picked, truth.gather(1, best[:, None])[:, 0], ~truth.any(dim=1))
    return {"f1": f1, "accuracy": right.float().mean().item(), "rows": len(conf)}
