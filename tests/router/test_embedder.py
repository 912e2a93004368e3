"""The router's prompt embedder: parity with sentence-transformers, head+tail truncation, clause
segments, which text of a chat is embedded, and the cross-request batcher."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from edgelora.v1 import types_pb2
from router.embedder import (
    MAX_SEGMENTS,
    MAX_TOKENS,
    EmbeddingBatcher,
    PromptEmbedder,
    default_model_path,
    prompt_text,
    split_segments,
)

TEXTS = ["Briefly, what is a comet?", "Answer in JSON: how do bats see in the dark?", "hello",
         "Talk like a pirate and tell me about the history of the printing press in Europe."]


@pytest.fixture(scope="module")
def fp32() -> PromptEmbedder:
    return PromptEmbedder(dtype="float32")


def test_matches_sentence_transformers(fp32: PromptEmbedder) -> None:
    from sentence_transformers import SentenceTransformer

    reference = torch.tensor(SentenceTransformer(default_model_path(), device="cpu").encode(
        TEXTS, normalize_embeddings=True))
    ours = fp32.embed(TEXTS)  # batched, padded to the longest
    assert ours.shape == (len(TEXTS), 384)
    assert torch.allclose(ours.norm(dim=1), torch.ones(len(TEXTS)), atol=1e-5)
    assert (ours * reference).sum(1).min() > 0.9999
    alone = torch.cat([fp32.embed([t]) for t in TEXTS])  # padding changes nothing
    assert torch.allclose(alone, ours, atol=1e-5)


def test_bfloat16_stays_close_to_float32(fp32: PromptEmbedder) -> None:
    bf16 = PromptEmbedder(dtype="bfloat16")
    assert (bf16.embed(TEXTS) * fp32.embed(TEXTS)).sum(1).min() > 0.995


def test_long_prompts_keep_head_and_tail(fp32: PromptEmbedder) -> None:
    filler = " ".join(f"word{i}" for i in range(400))
    text = f"BEGINNING marker. {filler} Answer in JSON please."
    ids = fp32._encode_ids(text, MAX_TOKENS)
    assert len(ids) == MAX_TOKENS
    decoded = fp32.tokenizer.decode(ids[1:-1])
    assert decoded.startswith("beginning marker") and decoded.endswith("answer in json please.")
    huge = "x " * 200_000 + "Answer in JSON."  # cut in characters before tokenizing
    assert fp32.tokenizer.decode(fp32._encode_ids(huge, MAX_TOKENS)[1:-1]).endswith("json.")
    # the instruction at the end still decides: closer to a JSON request than the filler alone
    request = fp32.embed(["Answer in JSON please."])
    assert (fp32.embed([text]) @ request.T) > (fp32.embed([filler]) @ request.T)


def test_segments_are_the_text_then_its_clauses(fp32: PromptEmbedder) -> None:
    assert split_segments("Briefly, what is a comet?") == [
        "Briefly, what is a comet?", "Briefly", "what is a comet"]
    assert split_segments("hello") == ["hello"]
    many = ". ".join(f"clause {i}" for i in range(20))
    segments = split_segments(many)
    assert len(segments) == 1 + MAX_SEGMENTS and segments[1] == "clause 0"
    assert segments[-1] == "clause 19"
    embedded = fp32.embed_segments(["Briefly, what is a comet?", "hello"])
    assert [len(e) for e in embedded] == [3, 1]
    assert torch.allclose(embedded[0][1], fp32.embed(["Briefly"])[0], atol=1e-5)


def test_prompt_text_is_the_last_user_turn() -> None:
    messages = [types_pb2.ChatMessage(role="system", content="Answer in JSON."),
                types_pb2.ChatMessage(role="user", content="first question"),
                types_pb2.ChatMessage(role="assistant", content="an answer"),
                types_pb2.ChatMessage(role="user", content="Talk like a pirate: why?")]
    assert prompt_text("", messages) == "Talk like a pirate: why?"
    assert prompt_text("raw prompt", []) == "raw prompt"
    assert prompt_text("", messages[:1]) == "Answer in JSON."


class SlowFake:
    """Records the texts of each call; each call takes 50 ms (a forward)."""

    dim = 2

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.threads: set[str] = set()

    def embed_segments(self, texts: list[str]) -> list[torch.Tensor]:
        self.calls.append(list(texts))
        self.threads.add(threading.current_thread().name)
        time.sleep(0.05)
        if "boom" in texts:
            raise RuntimeError("forward failed")
        return [torch.tensor([[float(len(t)), 1.0]]) for t in texts]


def test_batcher_groups_requests_that_arrive_during_a_forward() -> None:
    fake = SlowFake()
    batcher = EmbeddingBatcher(factory=lambda: fake)

    async def main() -> list[torch.Tensor]:
        first = asyncio.ensure_future(batcher.embed_segments("a"))
        await asyncio.sleep(0.01)  # "a" is embedding alone now; these wait for the next batch
        rest = [asyncio.ensure_future(batcher.embed_segments("b" * i)) for i in range(1, 6)]
        return await asyncio.gather(first, *rest)

    results = asyncio.run(main())
    assert fake.calls == [["a"], ["b", "bb", "bbb", "bbbb", "bbbbb"]]
    assert [r[0, 0].item() for r in results] == [1, 1, 2, 3, 4, 5]  # each caller gets its own
    assert batcher.num_batches == 2
    assert fake.threads == {n for n in fake.threads if n.startswith("embedder")}  # off the loop
    batcher.close()


def test_batcher_failure_reaches_its_batch_only() -> None:
    fake = SlowFake()
    batcher = EmbeddingBatcher(factory=lambda: fake, max_batch_size=2)

    async def main():
        calls = [asyncio.ensure_future(batcher.embed_segments(t))
                 for t in ("x", "boom", "y", "zz")]
        return await asyncio.gather(*calls, return_exceptions=True)

    results = asyncio.run(main())
    assert fake.calls == [["x", "boom"], ["y", "zz"]]
    assert all(isinstance(r, RuntimeError) for r in results[:2])
    assert [r[0, 0].item() for r in results[2:]] == [1, 2]
    batcher.close()
