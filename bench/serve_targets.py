"""The servers bench/serve_bench.py drives over the network, each as a `stream(request)` factory for
bench.workload.replay (it yields the number of tokens in each streamed chunk):

- ours over gRPC: the public Router API (GenerateStream, adapter_id = the registered id, greedy,
  ignore_eos, max_tokens = the request's output length); EdgeloraServer launches `edgelora serve`
  as a child process and registers the adapters with RegisterAdapter;
- ours over HTTP: the same requests as OpenAI-compatible POST /v1/completions (model = the
  adapter id, stream, temperature 0, ignore_eos, continuous usage stats: tokens per event = the
  increase of usage.completion_tokens), on the same minimal HTTP/1.1 client as llama.cpp's;
- llama.cpp: llama-server's HTTP POST /completion (stream, n_predict, ignore_eos, per-request
  "lora": [{"id": i, "scale": 1.0}]); bench/llamacpp/server.py launches it.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import IO

from bench.llamacpp.adapters import REPO, BenchAdapter
from bench.llamacpp.http_client import completion_token_counts, get_json, post_stream
from bench.llamacpp.server import free_port, stop_process
from bench.workload import Request

StreamFn = Callable[[Request], AsyncIterator[int]]


class EdgeloraServer:
    """`edgelora serve` (router + one worker) as a child process on a free port."""

    def __init__(self, threads: int = 2, max_batch: int = 16, max_rank: int = 8,
                 device_slots: int = 16, extra_args: Sequence[str] = (),
                 log_path: Path | None = None) -> None:
        self.port, self.http_port = free_port(), free_port()
        self.command = [sys.executable, "-m", "edgelora.cli", "serve", "--host", "127.0.0.1",
                        "--port", str(self.port), "--http-port", str(self.http_port),
                        "--num-threads", str(threads),
                        "--max-batch-size", str(max_batch), "--max-lora-rank", str(max_rank),
                        "--device-adapter-slots", str(device_slots), "--log-level", "WARNING",
                        "--state-dir", "",  # a bench registers its own adapters each run
                        *extra_args]
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, adapters: Sequence[BenchAdapter], timeout_s: float = 300.0) -> EdgeloraServer:
        import grpc

        from edgelora.v1 import router_pb2_grpc, types_pb2

        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(self.command, cwd=REPO, stdin=subprocess.DEVNULL,
                                        stdout=self._log or subprocess.DEVNULL,
                                        stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout_s
            with grpc.insecure_channel(self.address) as channel:
                while True:  # the router binds its port only once the worker has loaded
                    if self.process.poll() is not None:
                        raise RuntimeError(f"edgelora serve exited with code "
                                           f"{self.process.returncode} (log: {self.log_path})")
                    try:
                        grpc.channel_ready_future(channel).result(timeout=1.0)
                        break
                    except grpc.FutureTimeoutError:
                        if time.monotonic() > deadline:
                            raise TimeoutError(f"edgelora serve not ready after {timeout_s:.0f} s "
                                               f"(log: {self.log_path})") from None
                stub = router_pb2_grpc.RouterStub(channel)
                for adapter in adapters:
                    stub.RegisterAdapter(types_pb2.RegisterAdapterRequest(
                        adapter_id=adapter.name, path=str(adapter.path)), timeout=60.0)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        stop_process(self.process, self._log, timeout_s)
        self._log = None


def edgelora_adapter_ids(address: str) -> list[str]:
    """Registered adapter ids of a running router, sorted (the external-server default)."""
    import grpc

    from edgelora.client import list_adapters
    from edgelora.v1 import router_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        adapters = list(list_adapters(router_pb2_grpc.RouterStub(channel)))
    return sorted(a.adapter_id for a in adapters)


def llamacpp_adapter_count(url: str) -> int:
    return len(get_json(f"{url.rstrip('/')}/lora-adapters"))


def edgelora_stream(channel: object, prompts: Sequence[str], adapter_ids: Sequence[str],
                    timeout_s: float) -> StreamFn:
    """Request -> GenerateStream on adapter_ids[request.adapter] (channel: a grpc.aio channel)."""
    from edgelora.client import build_request
    from edgelora.v1 import router_pb2_grpc

    stub = router_pb2_grpc.RouterStub(channel)

    async def stream(r: Request) -> AsyncIterator[int]:
        call = stub.GenerateStream(build_request(
            prompts[r.index], adapter_id=adapter_ids[r.adapter], max_tokens=r.output_len,
            temperature=0.0, ignore_eos=True), timeout=timeout_s)
        async for chunk in call:
            yield len(chunk.token_ids)

    return stream


def edgelora_http_stream(url: str, prompts: Sequence[str], adapter_ids: Sequence[str],
                         timeout_s: float) -> StreamFn:
    """Request -> POST /v1/completions on adapter_ids[request.adapter] (our HTTP front)."""

    async def stream(r: Request) -> AsyncIterator[int]:
        payload = {"model": adapter_ids[r.adapter], "prompt": prompts[r.index],
                   "max_tokens": r.output_len, "temperature": 0.0, "ignore_eos": True,
                   "stream": True, "stream_options": {"continuous_usage_stats": True}}
        seen = 0
        async for event in post_stream(url, "/v1/completions", payload, timeout_s):
            usage = event.get("usage")
            if usage:  # cumulative for the one choice
                yield usage["completion_tokens"] - seen
                seen = usage["completion_tokens"]

    return stream


def llamacpp_stream(url: str, prompts: Sequence[str], timeout_s: float) -> StreamFn:
    """Request -> POST /completion with lora id = request.adapter (the --lora position)."""

    def stream(r: Request) -> AsyncIterator[int]:
        return completion_token_counts(url, prompts[r.index], r.output_len, r.adapter, timeout_s)

    return stream
