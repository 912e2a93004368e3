"""A minimal HTTP/1.1 client for llama-server's API, on asyncio streams (no extra dependency).

Streaming: POST /completion with "stream": true answers Server-Sent Events ("data: {json}\\n\\n"),
usually with chunked transfer encoding. Each partial event carries "tokens_predicted" (the
cumulative count of generated tokens), so the tokens in one event are the difference to the
previous one: robust to events the server holds back (stop-string or UTF-8 boundaries) and to the
final event ("stop": true), which repeats the count.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any
from urllib.parse import urlsplit


class HttpError(RuntimeError):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body[:300]}")
        self.status = status


def split_url(url: str) -> tuple[str, int, str]:
    """'http://host:port/prefix' -> (host, port, prefix without trailing slash)."""
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme != "http":
        raise ValueError(f"only http:// URLs are supported, got {url!r}")
    return parts.hostname or "127.0.0.1", parts.port or 80, parts.path.rstrip("/")


def completion_payload(prompt: str, n_predict: int, lora_id: int | None,
                       lora_scale: float = 1.0) -> dict[str, Any]:
    """Greedy, exactly n_predict tokens (ignore_eos), streamed, one adapter (or none: every
    adapter at scale 0 explicitly, since an empty "lora" list falls back to the global scales)."""
    payload: dict[str, Any] = {"prompt": prompt, "n_predict": n_predict, "ignore_eos": True,
                               "temperature": 0.0, "stream": True}
    if lora_id is not None:
        payload["lora"] = [{"id": lora_id, "scale": lora_scale}]
    return payload


class SseParser:
    """Incremental: feed() byte chunks split at arbitrary places, get the JSON objects of the
    complete "data:" lines so far; close() flushes a last line without a newline."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[dict[str, Any]]:
        *lines, self._buffer = (self._buffer + chunk).split(b"\n")
        return list(_data_lines(lines))

    def close(self) -> list[dict[str, Any]]:
        rest, self._buffer = self._buffer, b""
        return list(_data_lines([rest]))


def sse_events(chunks: Iterable[bytes]) -> Iterator[dict[str, Any]]:
    parser = SseParser()
    for chunk in chunks:
        yield from parser.feed(chunk)
    yield from parser.close()


def _data_lines(lines: list[bytes]) -> Iterator[dict[str, Any]]:
    for raw in lines:
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue  # blank separators, comments, "event:" lines
        data = line[5:].strip()
        if data == b"[DONE]":
            continue
        event = json.loads(data)
        if isinstance(event, dict) and "error" in event:
            raise HttpError(500, json.dumps(event["error"]))
        yield event


class TokenCounter:
    """Tokens generated per event, from the cumulative "tokens_predicted"."""

    def __init__(self) -> None:
        self.seen = 0

    def __call__(self, event: dict[str, Any]) -> int:
        total = event.get("tokens_predicted")
        if total is None:  # not a completion event (e.g. prompt progress)
            return 0
        new = max(0, int(total) - self.seen)
        self.seen = max(self.seen, int(total))
        return new


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str],
                     timeout_s: float) -> AsyncIterator[bytes]:
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size_line = await asyncio.wait_for(reader.readline(), timeout_s)
            if not size_line:
                raise ConnectionError("connection closed inside a chunked body")
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                return
            data = await asyncio.wait_for(reader.readexactly(size + 2), timeout_s)
            yield data[:-2]  # drop the CRLF after each chunk
    elif "content-length" in headers:
        length = int(headers["content-length"])
        if length:
            yield await asyncio.wait_for(reader.readexactly(length), timeout_s)
    else:  # HTTP/1.0 style: until the server closes
        while data := await asyncio.wait_for(reader.read(65536), timeout_s):
            yield data


async def post_stream(url: str, path: str, payload: dict[str, Any],
                      timeout_s: float = 600.0) -> AsyncIterator[dict[str, Any]]:
    """POSTs JSON to url + path and yields each SSE event as it arrives. timeout_s bounds every
    wait (connect, headers, each chunk), so a stuck server fails the request instead of hanging."""
    host, port, prefix = split_url(url)
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
    try:
        body = json.dumps(payload).encode()
        writer.write(f"POST {prefix}{path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                     f"Content-Type: application/json\r\nAccept: text/event-stream\r\n"
                     f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), timeout_s)
        if not status_line:
            raise ConnectionError(f"{url}{path}: connection closed before a response")
        status = int(status_line.split()[1])
        headers = {}
        while (line := await asyncio.wait_for(reader.readline(), timeout_s)) not in (b"\r\n",
                                                                                     b"\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        if status != 200:
            data = b"".join([c async for c in _read_body(reader, headers, timeout_s)])
            raise HttpError(status, data.decode(errors="replace"))
        parser = SseParser()
        async for chunk in _read_body(reader, headers, timeout_s):
            for event in parser.feed(chunk):
                yield event
        for event in parser.close():
            yield event
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()


async def completion_token_counts(url: str, prompt: str, n_predict: int, lora_id: int | None,
                                  timeout_s: float = 600.0) -> AsyncIterator[int]:
    """The number of new tokens in each streamed event of one /completion request."""
    count = TokenCounter()
    async for event in post_stream(url, "/completion",
                                   completion_payload(prompt, n_predict, lora_id), timeout_s):
        yield count(event)


def get_json(url: str, timeout_s: float = 10.0) -> Any:
    """GET -> parsed JSON; raises HttpError on a non-2xx answer (e.g. 503 while loading)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        raise HttpError(exc.code, exc.read().decode(errors="replace")) from None


def post_json(url: str, payload: Any, timeout_s: float = 30.0) -> Any:
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        raise HttpError(exc.code, exc.read().decode(errors="replace")) from None
