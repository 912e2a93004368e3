"""Labels `edgelora router train` fits the selector head on, in either of two JSONL formats
(one per file). Torch only for the result's tensors.

profile labels (written by `edgelora router profile`): per prompt, every profiled adapter and
the positives among them (the adapters worth picking over the base model):
    {"text": "...", "adapter_ids": ["a", "b"], "positives": ["a"], ...}
  read as rewards: 1 for a positive, else 0; the base model's reward is 1 when the row has no
  positive, else 0 (a row with no positive teaches "use the base model").

graded labels (any dataset that scores adapters per prompt, e.g. which task-tuned models
answered correctly): a reward in [0, 1] per adapter (0/1 correctness, or a grade):
    {"prompt": "..." | "messages": [...] | "text": "...", "scores": {"a": 1, "b": 0.25}}
  Every row scores the same adapters. "" in scores is the base model: give it in every row or in
  none; without it the labels say nothing about the base model and the head always picks an
  adapter (router/selector_head.py, base_rule "never").
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from edgelora.v1 import types_pb2
from router.embedder import prompt_text

BASE = ""


@dataclass
class Labels:
    texts: list[str]                  # what the router embeds for each prompt
    adapter_ids: list[str]
    rewards: torch.Tensor             # [n, num_adapters] in [0, 1]
    base_rewards: torch.Tensor | None  # [n], or None: the labels do not score the base model
    graded: bool                      # the graded format (else profile labels)


def _text(row: dict[str, Any]) -> str:
    if "text" in row:
        return str(row["text"])
    messages = [types_pb2.ChatMessage(**m) for m in row.get("messages", [])]
    return prompt_text(str(row.get("prompt", "")), messages)


def _reward(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value) \
            or not 0.0 <= value <= 1.0:
        raise ValueError(f"{where}: a score must be a number in [0, 1], got {value!r}")
    return float(value)


def read_labels(path: str | Path) -> Labels:
    lines = [(n, line) for n, line in enumerate(Path(path).read_text().splitlines(), start=1)
             if line.strip()]
    if not lines:
        raise ValueError(f"{path}: no labeled rows (make them with `edgelora router profile`, "
                         "or write graded rows: {\"prompt\": ..., \"scores\": {adapter: 0..1}})")
    rows = []
    for number, line in lines:
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise ValueError(f"{path}:{number}: not JSON: {exc}") from exc
        if not isinstance(row, dict) or ("scores" in row) == ("positives" in row):
            raise ValueError(f"{path}:{number}: expected \"scores\" (graded labels) or "
                             "\"positives\" (`router profile` labels)")
        rows.append((f"{path}:{number}", row))
    graded = {"scores" in row for _, row in rows}
    if len(graded) > 1:
        raise ValueError(f"{path}: mixes graded (\"scores\") and profile (\"positives\") rows; "
                         "use one format per file")
    return _read_graded(rows) if graded.pop() else _read_profile(rows)


def _read_profile(rows: list[tuple[str, dict]]) -> Labels:
    adapter_ids = sorted({a for _, r in rows for a in r["adapter_ids"]})
    rewards = torch.zeros(len(rows), len(adapter_ids))
    for i, (where, row) in enumerate(rows):
        for adapter_id in row["positives"]:
            if adapter_id not in adapter_ids:
                raise ValueError(f"{where}: positive {adapter_id!r} is not in adapter_ids")
            rewards[i, adapter_ids.index(adapter_id)] = 1.0
    base = (rewards.sum(dim=1) == 0).float()
    return Labels([_text(r) for _, r in rows], adapter_ids, rewards, base, graded=False)


def _read_graded(rows: list[tuple[str, dict]]) -> Labels:
    first_where, first = rows[0]
    if not isinstance(first["scores"], dict) or not first["scores"]:
        raise ValueError(f"{first_where}: \"scores\" must map adapter ids to rewards")
    ids = sorted(first["scores"])
    adapter_ids = [a for a in ids if a != BASE]
    if not adapter_ids:
        raise ValueError(f"{first_where}: scores name no adapter (only the base model)")
    rewards = torch.zeros(len(rows), len(adapter_ids))
    base = torch.zeros(len(rows))
    for i, (where, row) in enumerate(rows):
        scores = row["scores"]
        if not isinstance(scores, dict) or sorted(scores) != ids:
            raise ValueError(f"{where}: every row must score the same adapters as the first "
                             f"({', '.join(repr(a) for a in ids)}); this one scores "
                             f"{sorted(scores) if isinstance(scores, dict) else scores!r}")
        if not _text(row).strip():
            raise ValueError(f"{where}: no prompt (give prompt, messages or text)")
        for j, adapter_id in enumerate(adapter_ids):
            rewards[i, j] = _reward(scores[adapter_id], where)
        if BASE in scores:
            base[i] = _reward(scores[BASE], where)
    return Labels([_text(r) for _, r in rows], adapter_ids, rewards,
                  base if BASE in ids else None, graded=True)
