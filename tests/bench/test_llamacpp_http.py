"""The llama.cpp side of the serving benchmark against a tiny fake llama-server: request payloads,
SSE stream parsing (chunked and plain bodies), errors, and the launcher's LoRA-scale reset."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest

from bench.llamacpp.http_client import (
    HttpError,
    SseParser,
    TokenCounter,
    completion_payload,
    completion_token_counts,
    split_url,
    sse_events,
)
from bench.llamacpp.server import LlamaServer, LlamaServerConfig
from bench.serve_targets import llamacpp_stream
from bench.workload import Request, replay


def _event(n: int, stop: bool = False, content: str = "x") -> bytes:
    body = {"content": "" if stop else content, "tokens": [], "stop": stop,
            "tokens_predicted": n, "tokens_evaluated": 5}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


class FakeLlamaServer(BaseHTTPRequestHandler):
    """POST /completion streams n_predict events (two tokens in one, like a held-back stop string
    prefix) then a final one; "prompt": "bad" gets a 400; GET/POST /lora-adapters keep scales."""

    protocol_version = "HTTP/1.1"
    bodies: ClassVar[list[dict]] = []
    scales: ClassVar[list[float]] = []
    plain_body = False  # Content-Length instead of chunked

    def log_message(self, *args: object) -> None:
        pass

    def _json(self, status: int, payload: object) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == "/health":
            self._json(200, {"status": "ok"})
        elif self.path == "/lora-adapters":
            self._json(200, [{"id": i, "path": f"/a{i}.gguf", "scale": s}
                             for i, s in enumerate(self.scales)])
        else:
            self._json(404, {"error": {"code": 404, "message": "File Not Found"}})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path == "/lora-adapters":
            listed = {e["id"]: e["scale"] for e in body}
            type(self).scales = [listed.get(i, 0.0) for i in range(len(self.scales))]
            self._json(200, {"success": True})
            return
        type(self).bodies.append(body)
        if body["prompt"] == "bad":
            self._json(400, {"error": {"code": 400, "message": "bad prompt"}})
            return
        n = body["n_predict"]
        counts = [1, *range(3, n + 1)] if n >= 3 else list(range(1, n + 1))
        events = [_event(c) for c in counts] + [_event(n, stop=True)]
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        if self.plain_body:
            data = b"".join(events)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for event in events:  # split events across chunks at odd places
            for part in (event[:7], event[7:]):
                self.wfile.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
                self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")


@pytest.fixture
def fake_server() -> Iterator[str]:
    FakeLlamaServer.bodies, FakeLlamaServer.scales = [], [1.0, 1.0, 1.0]
    FakeLlamaServer.plain_body = False
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeLlamaServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


async def _counts(url: str, prompt: str, n: int, lora: int | None) -> list[int]:
    return [c async for c in completion_token_counts(url, prompt, n, lora, timeout_s=10.0)]


def test_payload_asks_for_exactly_n_greedy_streamed_tokens_on_one_adapter() -> None:
    payload = completion_payload("hi", 7, 3)
    assert payload == {"prompt": "hi", "n_predict": 7, "ignore_eos": True, "temperature": 0.0,
                       "stream": True, "lora": [{"id": 3, "scale": 1.0}]}
    assert "lora" not in completion_payload("hi", 7, None)
    assert split_url("http://h:81/x/") == ("h", 81, "/x") and split_url("h:82")[1] == 82
    with pytest.raises(ValueError):
        split_url("https://h")


def test_sse_parser_handles_arbitrary_splits_and_errors() -> None:
    stream = _event(1) + b": keep-alive comment\n\n" + _event(2) + b"data: [DONE]\n\n"
    whole = list(sse_events([stream]))
    for size in (1, 3, 17):
        assert list(sse_events(stream[i:i + size] for i in range(0, len(stream), size))) == whole
    assert [e["tokens_predicted"] for e in whole] == [1, 2]
    tail = SseParser()
    assert tail.feed(_event(4).rstrip(b"\n")) == []  # no newline yet: incomplete line
    assert tail.close()[0]["tokens_predicted"] == 4
    with pytest.raises(HttpError, match="slot unavailable"):
        list(sse_events([b'data: {"error": {"message": "slot unavailable"}}\n\n']))


def test_token_counter_turns_cumulative_counts_into_deltas() -> None:
    count = TokenCounter()
    deltas = [count(e) for e in ({"tokens_predicted": 1}, {"prompt_progress": {}},
                                 {"tokens_predicted": 3}, {"tokens_predicted": 3, "stop": True})]
    assert deltas == [1, 0, 2, 0]


@pytest.mark.parametrize("plain", [False, True])
def test_streamed_completion_against_fake_server(fake_server: str, plain: bool) -> None:
    FakeLlamaServer.plain_body = plain
    counts = asyncio.run(_counts(fake_server, "Hello there", 6, 2))
    assert sum(counts) == 6 and counts[:2] == [1, 2]  # the held-back pair counts as two tokens
    body = FakeLlamaServer.bodies[-1]
    assert body["lora"] == [{"id": 2, "scale": 1.0}] and body["n_predict"] == 6
    assert body["ignore_eos"] is True and body["stream"] is True


def test_http_error_is_raised_with_the_server_message(fake_server: str) -> None:
    with pytest.raises(HttpError, match=r"HTTP 400.*bad prompt"):
        asyncio.run(_counts(fake_server, "bad", 4, 0))


def test_replay_through_llamacpp_stream_records_tokens_and_failures(fake_server: str) -> None:
    prompts = ["one two", "bad", "three"]
    requests = [Request(0, 0.0, 1, 2, 5), Request(1, 0.0, 0, 2, 3), Request(2, 0.01, 0, 2, 9)]
    records = asyncio.run(replay(requests, llamacpp_stream(fake_server, prompts, 10.0)))
    assert [r.output_tokens for r in records] == [5, 0, 9]
    assert records[1].error.startswith("HttpError: HTTP 400")
    assert all(r.first_token_at >= r.arrival for r in records if not r.error)
    sent = {b["prompt"]: b["lora"][0]["id"] for b in FakeLlamaServer.bodies}
    assert sent == {"one two": 1, "bad": 0, "three": 0}


def test_launcher_zeroes_global_lora_scales(fake_server: str, tmp_path: Path) -> None:
    loras = tuple(tmp_path / f"a{i}.gguf" for i in range(3))
    server = LlamaServer(LlamaServerConfig(tmp_path / "m.gguf", loras,
                                           port=int(fake_server.rsplit(":", 1)[1])))
    server.wait_healthy(timeout_s=5.0)
    assert [a["scale"] for a in server.lora_adapters()] == [1.0, 1.0, 1.0]
    server.zero_global_scales()
    assert FakeLlamaServer.scales == [0.0, 0.0, 0.0]
    short = LlamaServer(LlamaServerConfig(tmp_path / "m.gguf", loras[:2],
                                          port=server.port))
    with pytest.raises(RuntimeError, match="loaded 3 adapters, 2 given"):
        short.zero_global_scales()


def test_llama_server_command_has_every_adapter_and_slot_settings(tmp_path: Path,
                                                                   monkeypatch) -> None:
    monkeypatch.setattr("bench.llamacpp.server.binary", lambda name: Path("/bin") / name)
    config = LlamaServerConfig(tmp_path / "m.gguf", (Path("a.gguf"), Path("b.gguf")),
                               parallel=16, threads=2, ctx_per_slot=512)
    cmd = config.command(8081)
    assert cmd[0] == "/bin/llama-server"
    def value(flag: str) -> str:
        return cmd[cmd.index(flag) + 1]

    assert value("--parallel") == "16" and value("--ctx-size") == str(16 * 512)
    assert value("--threads") == "2" and value("--port") == "8081"
    assert value("--lora") == "a.gguf,b.gguf" and cmd.count("--lora") == 1
    assert "--lora-init-without-apply" in cmd
    with pytest.raises(ValueError, match="comma"):
        LlamaServerConfig(tmp_path / "m.gguf", (Path("a,b.gguf"),)).command(8081)
