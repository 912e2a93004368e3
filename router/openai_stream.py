"""Streaming for the HTTP front: one request's choices (n streams of GenerateResponses) read
together, and their chunks written as OpenAI's server-sent events (`data: {json}\\n\\n`, then
`data: [DONE]`). No HTTP here: router/http_api.py sends what these yield.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from typing import Any, TypeVar

from edgelora.v1 import types_pb2
from router.openai_convert import chat_logprobs, completion_logprobs, usage

T = TypeVar("T")
DONE = b"data: [DONE]\n\n"


def sse(event: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"


async def first_items(streams: Sequence[AsyncIterator[T]]) -> list[T | None]:
    """The first item of every stream (None for one that ends at once), read concurrently; if
    one fails, every stream is closed (their worker calls cancelled) and the error raised."""
    if len(streams) == 1:  # the common case, without a task
        try:
            return [await anext(streams[0], None)]
        except BaseException:
            await close_all(streams)
            raise
    tasks = [asyncio.ensure_future(anext(stream, None)) for stream in streams]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await close_all(streams)
        raise


async def close_all(streams: Sequence[AsyncIterator[Any]]) -> None:
    """Closes every stream, which cancels its worker call (a no-op for a finished one)."""
    for stream in streams:
        # RuntimeError: another task runs it right now; that task is being cancelled, which
        # closes it there
        with contextlib.suppress(RuntimeError):
            await stream.aclose()  # type: ignore[attr-defined]


async def merged(streams: Sequence[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """(stream index, item) as items arrive from any stream; the first error ends it all, and
    leaving early (the client went away) cancels the streams still running."""
    if len(streams) == 1:
        async for item in streams[0]:
            yield 0, item
        return
    queue: asyncio.Queue[tuple[int, T | None, BaseException | None]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[T]) -> None:
        try:
            async with aclosing(stream):  # type: ignore[type-var]
                async for item in stream:
                    queue.put_nowait((index, item, None))
            queue.put_nowait((index, None, None))
        except Exception as exc:  # handed to the reader, which raises it
            queue.put_nowait((index, None, exc))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            index, item, error = await queue.get()
            if error is not None:
                raise error
            if item is None:
                running -= 1
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class SseWriter:
    """One request's chunks as OpenAI chunk objects (chat.completion.chunk or text_completion),
    SSE-framed. `n` choices per prompt (usage counts each prompt once)."""

    def __init__(self, is_chat: bool, request_id: str, created: int, model: str, n: int,
                 with_logprobs: bool, include_usage: bool, continuous_usage: bool) -> None:
        self.is_chat = is_chat
        self.head = {"id": request_id,
                     "object": "chat.completion.chunk" if is_chat else "text_completion",
                     "created": created, "model": model}
        self.n = n
        self.with_logprobs = with_logprobs
        self.include_usage = include_usage
        self.continuous_usage = continuous_usage
        self._last: dict[int, types_pb2.GenerateResponse] = {}  # for the final usage
        self._offsets: dict[int, int] = {}  # completions' text_offset, per choice

    def _event(self, choice: dict[str, Any], response: types_pb2.GenerateResponse | None
               ) -> bytes:
        event = {**self.head, "choices": [choice]}
        if self.include_usage or self.continuous_usage:  # OpenAI: null until the last chunk
            event["usage"] = None
        if self.continuous_usage and response is not None:
            prompt, completion = response.usage.prompt_tokens, response.usage.completion_tokens
            event["usage"] = {"prompt_tokens": prompt, "completion_tokens": completion,
                              "total_tokens": prompt + completion}
        return sse(event)

    def opening(self, index: int) -> bytes:
        """Chat's first chunk of a choice: the assistant role (completions have none)."""
        if not self.is_chat:
            return b""
        return self._event({"index": index, "delta": {"role": "assistant", "content": ""},
                            "logprobs": None, "finish_reason": None}, None)

    def chunk(self, index: int, response: types_pb2.GenerateResponse) -> bytes:
        self._last[index] = response
        logprobs = None
        if self.is_chat:
            if self.with_logprobs:
                logprobs = chat_logprobs(response.logprobs)
            choice = {"index": index, "delta": {"content": response.text}}
        else:
            if self.with_logprobs:
                offset = self._offsets.get(index, 0)
                logprobs = completion_logprobs(response.logprobs, offset)
                self._offsets[index] = offset + sum(len(e.token) for e in response.logprobs)
            choice = {"index": index, "text": response.text}
        choice["logprobs"] = logprobs
        choice["finish_reason"] = response.finish_reason or None
        return self._event(choice, response)

    def closing(self) -> bytes:
        """The usage chunk (empty choices) when asked for, then [DONE]."""
        if not self.include_usage:
            return DONE
        last = [self._last[i] for i in sorted(self._last)]
        return sse({**self.head, "choices": [], "usage": usage(last, self.n)}) + DONE
