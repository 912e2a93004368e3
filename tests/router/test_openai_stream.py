"""router.openai_stream: n choices read together (interleaved, the first error ends all, leaving
early closes every stream) and the SSE framing of chunks."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest

from common.errors import Unavailable
from edgelora.v1 import types_pb2
from router.openai_stream import DONE, SseWriter, first_items, merged


class Stream:
    """An async generator over `items` (an exception item is raised), recording its end."""

    def __init__(self, items: list, delay_s: float = 0.0) -> None:
        self.items, self.delay_s = items, delay_s
        self.closed = False
        self.it = self._run()

    async def _run(self) -> AsyncIterator:
        try:
            for item in self.items:
                await asyncio.sleep(self.delay_s)
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            self.closed = True


def run(coro):
    return asyncio.run(coro)


def test_merged_interleaves_and_tags_each_item() -> None:
    async def go():
        streams = [Stream(["a1", "a2"], 0.01), Stream(["b1", "b2", "b3"], 0.015)]
        got = [x async for x in merged([s.it for s in streams])]
        return got, streams

    got, streams = run(go())
    assert sorted(got) == [(0, "a1"), (0, "a2"), (1, "b1"), (1, "b2"), (1, "b3")]
    assert [i for i, _ in got] != sorted(i for i, _ in got)  # not one stream after the other
    assert all(s.closed for s in streams)


def test_the_first_error_ends_everything() -> None:
    async def go():
        streams = [Stream(["a1", Unavailable("gone")], 0.01), Stream(["b"] * 100, 0.01)]
        got = []
        with pytest.raises(Unavailable):
            async for item in merged([s.it for s in streams]):
                got.append(item)
        await asyncio.sleep(0)
        return got, streams

    got, streams = run(go())
    assert (0, "a1") in got and len(got) < 10
    assert all(s.closed for s in streams)


def test_leaving_early_closes_every_stream() -> None:
    async def go():
        streams = [Stream(["x"] * 100, 0.01) for _ in range(3)]
        async for _ in merged([s.it for s in streams]):
            break
        await asyncio.sleep(0.05)
        return streams

    assert all(s.closed for s in run(go()))


def test_first_items_or_all_closed() -> None:
    async def go(items_per_stream):  # -> (first items or None, which streams were closed)
        streams = [Stream(items, 0.01) for items in items_per_stream]
        try:
            firsts = await first_items([s.it for s in streams])
        except Unavailable:
            firsts = None
        return firsts, [s.closed for s in streams]

    firsts, closed = run(go([["a", "b"], [], ["c", "d"]]))
    assert firsts == ["a", None, "c"]
    assert closed == [False, True, False]  # the rest is still to be read
    firsts, closed = run(go([["a", "b"], [Unavailable("no worker")], ["c", "d"]]))
    assert firsts is None and all(closed)
    firsts, closed = run(go([[Unavailable("no worker")]]))
    assert firsts is None and all(closed)


def parse(data: bytes) -> dict:
    assert data.startswith(b"data: ") and data.endswith(b"\n\n")
    return json.loads(data[6:-2])


def test_writer_frames_chat_and_completion_chunks() -> None:
    chunk = types_pb2.GenerateResponse(
        text="Hi", finish_reason="stop", usage=types_pb2.Usage(prompt_tokens=3,
                                                               completion_tokens=1),
        logprobs=[types_pb2.TokenLogprob(token="Hi", logprob=-0.25)])
    chat = SseWriter(True, "chatcmpl-1", 7, "pirate", 1, with_logprobs=True,
                     include_usage=True, continuous_usage=False)
    assert parse(chat.opening(0))["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    event = parse(chat.chunk(0, chunk))
    assert event["choices"][0]["logprobs"]["content"][0]["logprob"] == -0.25
    assert event["usage"] is None
    closing = chat.closing()
    assert closing.endswith(DONE)
    assert parse(closing[:-len(DONE)])["usage"] == {"prompt_tokens": 3, "completion_tokens": 1,
                                                    "total_tokens": 4}
    legacy = SseWriter(False, "cmpl-1", 7, "base", 1, with_logprobs=True, include_usage=False,
                       continuous_usage=True)
    assert legacy.opening(0) == b""
    first = parse(legacy.chunk(0, chunk))
    assert first["choices"][0]["text"] == "Hi" and first["usage"]["total_tokens"] == 4
    again = parse(legacy.chunk(0, chunk))
    assert again["choices"][0]["logprobs"]["text_offset"] == [2]  # after the first "Hi"
    assert legacy.closing() == DONE
