"""The worker's /metrics (--metrics-port) on the tiny model: after known requests, scraped over
HTTP and parsed with prometheus_client's parser, the counters moved by exactly what was sent."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest

from edgelora.client import build_request
from edgelora.v1 import types_pb2, worker_pb2, worker_pb2_grpc
from tests.conftest import ServeThread, write_random_adapter
from tests.metrics_samples import Samples, free_port, scrape, total
from worker.config import WorkerConfig

P = "edgelora_worker"


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    # two tenant labels: "" and "acme" keep theirs, the third tenant reads "_other"
    serve = ServeThread(WorkerConfig(model=str(tiny_model_dir), port=0, num_threads=1,
                                     max_model_len=512, kv_cache_mb=16, max_batch_size=8,
                                     metrics_port=free_port(), metrics_max_tenants=2))
    serve.adapter_path = write_random_adapter(tmp_path_factory.mktemp("metrics-adapter") / "a1",
                                              tiny_model_dir, rank=4)
    yield serve
    serve.stop()


def _generate(stub: worker_pb2_grpc.WorkerStub, tenant: str, request: types_pb2.GenerateRequest
              ) -> types_pb2.GenerateResponse:
    chunks = list(stub.Generate(request, metadata=(("edgelora-tenant", tenant),), timeout=60))
    assert chunks[-1].finish_reason in ("stop", "length")
    return chunks[-1]


def _scrape_settled(url: str, expected_requests: int) -> Samples:
    """A scrape once every request has ended and the engine is idle (a cancel lands a moment
    after the client leaves)."""
    deadline = time.monotonic() + 10
    while True:
        samples = scrape(url)
        settled = (total(samples, f"{P}_requests_total") == expected_requests
                   and total(samples, f"{P}_running_sequences") == 0)
        if settled or time.monotonic() > deadline:
            return samples
        time.sleep(0.05)


def test_counters_histograms_and_gauges_match_what_was_sent(server: ServeThread) -> None:
    channel = grpc.insecure_channel(server.worker_address)
    stub = worker_pb2_grpc.WorkerStub(channel)
    stub.RegisterAdapter(types_pb2.RegisterAdapterRequest(adapter_id="a1",
                                                          path=str(server.adapter_path)),
                         timeout=30)
    base = _generate(stub, "", build_request("Hello", max_tokens=5, ignore_eos=True))
    acme = [_generate(stub, "acme", build_request("Hi there", max_tokens=3, ignore_eos=True)),
            _generate(stub, "acme", build_request("Tell me", max_tokens=4, ignore_eos=True,
                                                  adapter_id="a1"))]
    with pytest.raises(grpc.RpcError) as refused:
        list(stub.Generate(build_request("Hi", max_tokens=10_000), timeout=60))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as missing:
        list(stub.Generate(build_request("Hi", adapter_id="nope"),
                           metadata=(("edgelora-tenant", "acme"),), timeout=60))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    leaving = stub.Generate(build_request("Go on", max_tokens=200, ignore_eos=True),
                            metadata=(("edgelora-tenant", "leaver"),), timeout=60)
    received = len(next(leaving).token_ids)
    leaving.cancel()
    info = stub.Info(worker_pb2.InfoRequest(), timeout=10)
    channel.close()

    s = _scrape_settled(f"http://127.0.0.1:{server.worker.metrics_port}/metrics", 6)
    requests = f"{P}_requests_total"
    assert total(s, requests, adapter="", tenant="", status="OK") == 1
    assert total(s, requests, adapter="", tenant="acme", status="OK") == 1
    assert total(s, requests, adapter="a1", tenant="acme", status="OK") == 1
    assert total(s, requests, adapter="_other", tenant="acme", status="NOT_FOUND") == 1
    assert total(s, requests, adapter="", tenant="", status="INVALID_ARGUMENT") == 1
    assert total(s, requests, adapter="", tenant="_other", status="CANCELLED") == 1
    assert total(s, requests) == 6

    for tenant, finals in (("", [base]), ("acme", acme)):
        assert total(s, f"{P}_prompt_tokens_total", tenant=tenant) == sum(
            r.usage.prompt_tokens for r in finals)
        assert total(s, f"{P}_generated_tokens_total", tenant=tenant) == sum(
            r.usage.completion_tokens for r in finals)
        assert total(s, f"{P}_time_to_first_token_seconds_count", tenant=tenant) == len(finals)
    assert total(s, f"{P}_generated_tokens_total", adapter="a1") == 4
    assert total(s, f"{P}_generated_tokens_total", tenant="_other") >= received
    # one latency per request that ended, whatever its status; ITL: at most one per token but
    # the first of each request
    e2e = f"{P}_request_duration_seconds"
    assert {t: total(s, f"{e2e}_count", tenant=t) for t in ("", "acme", "_other")} == \
        {"": 2, "acme": 3, "_other": 1}
    assert total(s, f"{e2e}_bucket", tenant="acme", le="+Inf") == 3
    itl = total(s, f"{P}_inter_token_latency_seconds_count")
    assert 0 < itl <= total(s, f"{P}_generated_tokens_total") - 4

    assert total(s, f"{P}_queue_depth") == 0
    assert total(s, f"{P}_running_sequences") == 0
    assert total(s, f"{P}_kv_blocks_used") == 0
    assert total(s, f"{P}_kv_blocks_free") == info.num_kv_blocks
    assert total(s, f"{P}_adapters_registered") == 1
    for tier in ("host", "device"):  # a1 read from disk once, copied to a slot once
        assert total(s, f"{P}_adapter_loads_total", tier=tier) == 1
        assert total(s, f"{P}_adapter_misses_total", tier=tier) == 1
        assert total(s, f"{P}_adapter_load_seconds_count", tier=tier) == 1
        assert total(s, f"{P}_adapter_evictions_total", tier=tier) == 0


def test_unregistering_an_adapter_drops_its_series(server: ServeThread) -> None:
    url = f"http://127.0.0.1:{server.worker.metrics_port}/metrics"
    channel = grpc.insecure_channel(server.worker_address)
    stub = worker_pb2_grpc.WorkerStub(channel)
    stub.RegisterAdapter(types_pb2.RegisterAdapterRequest(adapter_id="a2",
                                                          path=str(server.adapter_path)),
                         timeout=30)
    _generate(stub, "", build_request("Hi", max_tokens=2, ignore_eos=True, adapter_id="a2"))
    assert total(scrape(url), f"{P}_requests_total", adapter="a2") == 1
    stub.UnregisterAdapter(types_pb2.UnregisterAdapterRequest(adapter_id="a2"), timeout=30)
    channel.close()
    assert total(scrape(url), f"{P}_requests_total", adapter="a2") == 0


def test_metrics_port_off_by_default_and_checked() -> None:
    assert WorkerConfig().metrics_port == 0
    with pytest.raises(ValueError, match="--metrics-port must differ"):
        WorkerConfig(port=9402, metrics_port=9402)
    with pytest.raises(ValueError, match="--metrics-port"):
        WorkerConfig(metrics_port=70000)
    with pytest.raises(ValueError, match="--metrics-max-tenants"):
        WorkerConfig(metrics_max_tenants=0)
