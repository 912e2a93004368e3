"""The selector's trainable head: one logistic unit per adapter over the prompt's clause
embeddings, max-pooled over clauses (a prompt is for an adapter when one of its parts says so,
the same reading as the zero-shot rule), fitted on profiling labels and saved as a small file.

    confidence[a] = sigmoid(max_k (W[a] . segment_k + b[a]))        segment_k: [dim], unit norm
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

FORMAT = "edgelora-selector-head/1"


@dataclass
class TrainedHead:
    adapter_ids: list[str]
    weight: torch.Tensor  # [num_adapters, dim]
    bias: torch.Tensor    # [num_adapters]
    metrics: dict[str, float] = field(default_factory=dict)

    def logits(self, segments: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """segments [..., k, dim] (mask [..., k], True = real) -> [..., num_adapters]."""
        per_segment = segments @ self.weight.T + self.bias  # [..., k, num_adapters]
        if mask is not None:
            per_segment = per_segment.masked_fill(~mask[..., None], float("-inf"))
        return per_segment.amax(dim=-2)

    def confidences(self, segments: torch.Tensor) -> dict[str, float]:
        with torch.no_grad():
            values = torch.sigmoid(self.logits(segments)).tolist()
        return dict(zip(self.adapter_ids, values, strict=True))

    def save(self, path: str | Path) -> None:
        """Written to a temporary file and renamed: a router reloading it never reads half."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save({"format": FORMAT, "adapter_ids": self.adapter_ids, "weight": self.weight,
                    "bias": self.bias, "metrics": self.metrics}, tmp)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> TrainedHead:
        data = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"{path} is not a selector head ({FORMAT}); make one with "
                             "`edgelora router train`")
        return cls(list(data["adapter_ids"]), data["weight"].float(), data["bias"].float(),
                   dict(data.get("metrics", {})))


def pad_segments(examples: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """-> segments [n, kmax, dim] (zeros past each prompt's own), mask [n, kmax]."""
    kmax = max(len(e) for e in examples)
    x = torch.zeros(len(examples), kmax, examples[0].shape[1])
    mask = torch.zeros(len(examples), kmax, dtype=torch.bool)
    for i, e in enumerate(examples):
        x[i, :len(e)], mask[i, :len(e)] = e, True
    return x, mask


def fit_head(examples: Sequence[torch.Tensor], targets: torch.Tensor, adapter_ids: list[str],
             epochs: int = 300, lr: float = 0.05, l2: float = 1e-3, seed: int = 0) -> TrainedHead:
    """examples: per prompt [k, dim]; targets [n, num_adapters] in {0, 1}. Full-batch Adam on
    binary cross-entropy, positives up-weighted by the negative/positive ratio (<= 10) since most
    prompts suit few adapters."""
    torch.manual_seed(seed)
    x, mask = pad_segments(examples)
    num_pos = targets.sum(0)
    pos_weight = ((len(targets) - num_pos) / num_pos.clamp(min=1)).clamp(1.0, 10.0)
    head = TrainedHead(adapter_ids, torch.zeros(len(adapter_ids), x.shape[-1], requires_grad=True),
                       torch.full((len(adapter_ids),), -2.0, requires_grad=True))
    optimizer = torch.optim.Adam([head.weight, head.bias], lr=lr)
    for _ in range(epochs):
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            head.logits(x, mask), targets, pos_weight=pos_weight)
        (loss + l2 * head.weight.pow(2).sum()).backward()
        optimizer.step()
    head.weight, head.bias = head.weight.detach(), head.bias.detach()
    return head


def split_rows(num_rows: int, holdout: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """Shuffled (train, held_out) row indices; at least one of each when num_rows >= 2."""
    order = list(range(num_rows))
    random.Random(seed).shuffle(order)
    num_held = min(max(1, round(num_rows * holdout)), num_rows - 1) if num_rows >= 2 else 0
    return sorted(order[num_held:]), sorted(order[:num_held])


def evaluate(head: TrainedHead, examples: Sequence[torch.Tensor], targets: torch.Tensor,
             threshold: float = 0.5) -> dict[str, float]:
    """micro-F1 of the per-adapter labels at `threshold`, and decision accuracy: the top
    adapter above the threshold is one of the row's positives, or none is when it has none."""
    if not examples:
        return {"f1": float("nan"), "accuracy": float("nan"), "rows": 0}
    x, mask = pad_segments(examples)
    with torch.no_grad():
        conf = torch.sigmoid(head.logits(x, mask))  # [n, num_adapters]
    predicted = conf >= threshold
    truth = targets >= 0.5
    tp = (predicted & truth).sum().item()
    fp, fn = (predicted & ~truth).sum().item(), (~predicted & truth).sum().item()
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0
    best = conf.argmax(dim=1)
    correct = 0
    for row in range(len(conf)):
        if conf[row, best[row]] >= threshold:
            correct += bool(truth[row, best[row]])
        else:
            correct += not truth[row].any()
    return {"f1": f1, "accuracy": correct / len(conf), "rows": len(conf)}
