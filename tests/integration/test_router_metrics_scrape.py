"""The router's /metrics on its HTTP port, as `serve` shows it (router and in-process worker on
one page): after known requests over gRPC and HTTP, scraped and parsed with prometheus_client's
parser, the counters moved by exactly what was sent, and "auto" selections are counted."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import httpx2 as httpx
import pytest

from edgelora.client import build_request
from edgelora.v1 import router_pb2_grpc, types_pb2
from tests.conftest import ServeThread, write_random_adapter
from tests.metrics_samples import Samples, free_port, scrape, total
from worker.config import WorkerConfig

R, W = "edgelora_router", "edgelora_worker"


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    port = free_port()
    serve = ServeThread(WorkerConfig(model=str(tiny_model_dir), port=0, num_threads=1,
                                     max_model_len=512, kv_cache_mb=16, max_batch_size=8),
                        http_port=port)
    serve.url = f"http://127.0.0.1:{port}"
    serve.adapter = write_random_adapter(tmp_path_factory.mktemp("scrape") / "a", tiny_model_dir,
                                         rank=4)
    yield serve
    serve.stop()


def settled(url: str, expected: int) -> Samples:
    """A scrape once the router counted `expected` requests (the last one ends a moment after
    its final chunk reached the client)."""
    deadline = time.monotonic() + 10
    while True:
        samples = scrape(url)
        if total(samples, f"{R}_requests_total") >= expected or time.monotonic() > deadline:
            return samples
        time.sleep(0.05)


def test_router_metrics_count_grpc_and_http_requests(server: ServeThread) -> None:
    stub = router_pb2_grpc.RouterStub(grpc.insecure_channel(server.address))
    stub.RegisterAdapter(types_pb2.RegisterAdapterRequest(adapter_id="sea",
                                                          path=str(server.adapter)), timeout=60)
    before = scrape(server.url + "/metrics")
    usages = [stub.Generate(build_request("Hello", max_tokens=n, ignore_eos=True,
                                          adapter_id=adapter), timeout=60).usage
              for n, adapter in ((3, ""), (5, "sea"), (4, "sea"))]
    reply = httpx.post(server.url + "/v1/completions", timeout=60, json={
        "model": "sea", "prompt": "Once upon", "max_tokens": 6, "temperature": 0,
        "ignore_eos": True}).json()
    usages.append(types_pb2.Usage(prompt_tokens=reply["usage"]["prompt_tokens"],
                                  completion_tokens=reply["usage"]["completion_tokens"]))
    with pytest.raises(grpc.RpcError) as unknown:
        stub.Generate(build_request("Hello", adapter_id="nope"), timeout=60)
    assert unknown.value.code() is grpc.StatusCode.NOT_FOUND
    stub.Generate(build_request("Hello", max_tokens=2, adapter_id="auto"), timeout=60)

    after = settled(server.url + "/metrics", total(before, f"{R}_requests_total") + 6)

    def moved(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    assert moved(f"{R}_requests_total", adapter="sea", status="OK") == 3
    assert moved(f"{R}_requests_total", status="NOT_FOUND") == 1
    assert moved(f"{R}_requests_total", status="OK") == 5
    assert moved(f"{R}_generated_tokens_total") == sum(u.completion_tokens for u in usages) + 2
    assert moved(f"{R}_prompt_tokens_total", adapter="sea") == sum(
        u.prompt_tokens for u in usages[1:])
    assert moved(f"{R}_time_to_first_token_seconds_count") == 5
    assert moved(f"{R}_auto_selections_total") == 1
    # the in-process worker's metrics on the same page: it served the five that ran
    assert moved(f"{W}_requests_total", status="OK") == 5
    assert total(after, f"{W}_kv_blocks_free") > 0
