"""Selector profiling and training: `edgelora router profile` and `edgelora router train`.

profile: reads a JSONL dataset, one row per prompt:
    {"prompt": "..." | "messages": [{"role": ..., "content": ...}],
     "reference": "an answer in the wanted behaviour"}        scored by log-likelihood, or
    {"prompt": ..., "checker": {"regex": "..."} | {"contains": "..."}}   scored by generation
and asks the workers about every registered adapter and the base model on every prompt.

Labeling rule (an adapter is a positive for a prompt when it is worth picking over the others):
  - reference rows: per-token log-likelihood lp(a) = log p(reference | prompt, a) / tokens, via
    Worker.Score (all adapters of a prompt in one batched prefill). a is positive when
    lp(a) >= lp(base) + min_gain (it does better than no adapter) and
    lp(a) >= max_b lp(b) - best_margin (it is about as good as the best adapter).
  - checker rows: greedy answer of each adapter (Worker.Generate, max_tokens); a is positive when
    its answer passes the checker and the base model's does not (re.search for "regex", DOTALL;
    substring for "contains").
  A row with no positive teaches "use the base model".

train (router/head_training.py, re-exported here): fits the head (router/selector_head.py) on
these labels or on graded ones (router/head_labels.py), scores it on a held-out split beside the
best constant choice and the oracle, and saves it atomically unless it is worse than that
constant; a router whose --selector-head names the file reloads it on its next selection.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from common.internal_auth import secret_interceptors
from edgelora.v1 import types_pb2, worker_pb2, worker_pb2_grpc
from router.embedder import prompt_text
from router.head_training import train  # noqa: F401 - `router train` lives beside `profile`

BASE = ""
SCORE_CHUNK = 16  # adapters per Score call: one batched prefill each


@dataclass
class Row:
    prompt: str = ""
    messages: list[dict[str, str]] = field(default_factory=list)
    reference: str = ""
    checker: dict[str, str] | None = None

    @property
    def text(self) -> str:
        return prompt_text(self.prompt, [types_pb2.ChatMessage(**m) for m in self.messages])

    def request_fields(self) -> dict[str, Any]:
        return {"prompt": self.prompt,
                "messages": [types_pb2.ChatMessage(**m) for m in self.messages]}


def read_dataset(path: str | Path) -> list[Row]:
    rows = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
            row = Row(data.get("prompt", ""), list(data.get("messages", [])),
                      data.get("reference", ""), data.get("checker"))
        except (ValueError, TypeError, AttributeError) as exc:
            raise ValueError(f"{path}:{number}: not a JSON object with prompt/messages and "
                             f"reference/checker: {exc}") from exc
        if bool(row.prompt) == bool(row.messages):
            raise ValueError(f"{path}:{number}: give exactly one of prompt or messages")
        if bool(row.reference) == bool(row.checker):
            raise ValueError(f"{path}:{number}: give exactly one of reference or checker")
        if row.checker is not None and set(row.checker) - {"regex", "contains"}:
            raise ValueError(f"{path}:{number}: checker must be {{\"regex\": ...}} or "
                             "{\"contains\": ...}")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def passes(checker: dict[str, str], text: str) -> bool:
    if "regex" in checker:
        return re.search(checker["regex"], text, re.DOTALL) is not None
    return checker["contains"] in text


def label(per_token: dict[str, float], min_gain: float, best_margin: float) -> list[str]:
    """Positives of one reference row from per-token log-likelihoods ("" = base model)."""
    adapters = {a: v for a, v in per_token.items() if a != BASE}
    if not adapters:
        return []
    best = max(adapters.values())
    return sorted(a for a, v in adapters.items()
                  if v >= per_token[BASE] + min_gain and v >= best - best_margin)


class Profiler:
    def __init__(self, addresses: Sequence[str], min_gain: float = 0.1, best_margin: float = 0.1,
                 max_tokens: int = 48, timeout_s: float = 300.0, secret: str = "") -> None:
        self.channels = [grpc.aio.insecure_channel(a, interceptors=secret_interceptors(secret))
                         for a in addresses]
        self.stubs = [worker_pb2_grpc.WorkerStub(c) for c in self.channels]
        self._next = itertools.cycle(range(len(self.stubs)))
        self.min_gain, self.best_margin = min_gain, best_margin
        self.max_tokens, self.timeout_s = max_tokens, timeout_s

    async def adapter_ids(self) -> list[str]:
        reply = await self.stubs[0].ListAdapters(types_pb2.ListAdaptersRequest(), timeout=30)
        return sorted(a.adapter_id for a in reply.adapters)

    async def _score(self, row: Row, adapter_ids: list[str]) -> dict[str, float]:
        per_token: dict[str, float] = {}
        ids = [BASE, *adapter_ids]
        for start in range(0, len(ids), SCORE_CHUNK):
            reply = await self.stubs[next(self._next)].Score(worker_pb2.ScoreRequest(
                reference=row.reference, adapter_ids=ids[start:start + SCORE_CHUNK],
                **row.request_fields()), timeout=self.timeout_s)
            per_token.update({r.adapter_id: r.log_likelihood / max(r.num_tokens, 1)
                              for r in reply.results})
        return per_token

    async def _generate(self, row: Row, adapter_id: str) -> str:
        request = types_pb2.GenerateRequest(adapter_id=adapter_id, params=types_pb2.SamplingParams(
            max_tokens=self.max_tokens, temperature=0.0), **row.request_fields())
        chunks = [c.text async for c in self.stubs[next(self._next)].Generate(
            request, timeout=self.timeout_s)]
        return "".join(chunks)

    async def profile_row(self, row: Row, adapter_ids: list[str]) -> dict[str, Any]:
        out: dict[str, Any] = {"text": row.text}
        out.update({"prompt": row.prompt} if row.prompt else {"messages": row.messages})
        if row.checker is None:
            per_token = await self._score(row, adapter_ids)
            out["per_token_log_likelihood"] = per_token
            out["positives"] = label(per_token, self.min_gain, self.best_margin)
        else:
            answers = await asyncio.gather(*(self._generate(row, a)
                                             for a in [BASE, *adapter_ids]))
            ok = {a: passes(row.checker, t) for a, t in zip([BASE, *adapter_ids], answers,
                                                              strict=True)}
            out["passes"] = ok
            out["positives"] = [] if ok[BASE] else sorted(a for a in adapter_ids if ok[a])
        out["adapter_ids"] = adapter_ids
        return out

    async def profile(self, rows: Sequence[Row], adapter_ids: list[str] | None = None,
                      concurrency: int = 4) -> list[dict[str, Any]]:
        adapter_ids = adapter_ids if adapter_ids is not None else await self.adapter_ids()
        if not adapter_ids:
            raise ValueError("the workers have no registered adapter to profile")
        limit = asyncio.Semaphore(concurrency)

        async def one(row: Row) -> dict[str, Any]:
            async with limit:
                return await self.profile_row(row, adapter_ids)

        return list(await asyncio.gather(*(one(r) for r in rows)))

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()


async def run_profile(addresses: Sequence[str], dataset: str, out: str,
                      adapter_ids: list[str] | None = None, **options: Any) -> list[dict]:
    concurrency = options.pop("concurrency", 4)
    profiler = Profiler(addresses, **options)
    try:
        labeled = await profiler.profile(read_dataset(dataset), adapter_ids, concurrency)
    finally:
        await profiler.close()
    Path(out).write_text("".join(json.dumps(r) + "\n" for r in labeled))
    return labeled
