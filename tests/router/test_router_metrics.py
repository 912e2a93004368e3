"""RouterMetrics: `observe` around fake and real GenerateResponse streams counts each request under
its final status with the tokens its chunks report; `refused`, `selection`; label bounds; and
`metrics_asgi_app` served over HTTP (uvicorn), parsed with prometheus_client's parser."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
import uvicorn
from prometheus_client import generate_latest

from common.errors import Unavailable
from edgelora.client import build_request
from edgelora.v1 import types_pb2, worker_pb2_grpc
from router.metrics import (
    NO_SELECTOR,
    RouterMetrics,
    combined_registry,
    metrics_asgi_app,
)
from router.selector import BEST_RESIDENT
from tests.conftest import ServeThread
from tests.metrics_samples import Samples, free_port, parse, scrape, total
from worker.metrics import WorkerMetrics

P = "edgelora_router"


def chunk(tokens: list[int], prompt: int, completion: int,
          finish: str = "") -> types_pb2.GenerateResponse:
    return types_pb2.GenerateResponse(
        token_ids=tokens, text="x" * len(tokens), finish_reason=finish,
        usage=types_pb2.Usage(prompt_tokens=prompt, completion_tokens=completion))


class FakeStream:
    """Yields `chunks`, then raises `error` if given; records whether it was closed."""

    def __init__(self, chunks: list[types_pb2.GenerateResponse],
                 error: BaseException | None = None) -> None:
        self.chunks, self.error, self.closed = chunks, error, False

    def __aiter__(self) -> FakeStream:
        self._iter = iter(self.chunks)
        return self

    async def __anext__(self) -> types_pb2.GenerateResponse:
        await asyncio.sleep(0.001)
        item = next(self._iter, None)
        if item is not None:
            return item
        if self.error is not None:
            raise self.error
        raise StopAsyncIteration

    async def aclose(self) -> None:
        self.closed = True


def samples(metrics: RouterMetrics) -> Samples:
    return parse(generate_latest(metrics.registry).decode())


async def drain(stream: AsyncIterator[types_pb2.GenerateResponse]) -> list:
    return [response async for response in stream]


REGISTERED = {"shared", "acme:own"}


@pytest.fixture
def metrics() -> RouterMetrics:
    return RouterMetrics(REGISTERED.__contains__, max_tenants=2)


def test_a_finished_stream_counts_ok_with_its_usage_and_latencies(metrics: RouterMetrics
                                                                  ) -> None:
    fake = FakeStream([chunk([1], 7, 1), chunk([2, 3], 7, 3), chunk([4], 7, 4, "length")])
    out = asyncio.run(drain(metrics.observe(fake, "acme:own", "acme")))
    assert len(out) == 3 and fake.closed
    s = samples(metrics)
    assert total(s, f"{P}_requests_total", adapter="acme:own", tenant="acme", status="OK") == 1
    assert total(s, f"{P}_prompt_tokens_total", adapter="acme:own", tenant="acme") == 7
    assert total(s, f"{P}_generated_tokens_total", adapter="acme:own", tenant="acme") == 4
    assert total(s, f"{P}_time_to_first_token_seconds_count", tenant="acme") == 1
    assert total(s, f"{P}_inter_token_latency_seconds_count", tenant="acme") == 3
    assert total(s, f"{P}_request_duration_seconds_count", tenant="acme") == 1
    assert total(s, f"{P}_request_duration_seconds_sum", tenant="acme") > 0


@pytest.mark.parametrize(("error", "status"), [
    (Unavailable("worker went away"), "UNAVAILABLE"),
    (ValueError("a bug"), "UNKNOWN"),
])
def test_a_failed_stream_counts_its_error_status_and_the_tokens_sent(
        metrics: RouterMetrics, error: Exception, status: str) -> None:
    fake = FakeStream([chunk([1, 2], 5, 2)], error)
    with pytest.raises(type(error)):
        asyncio.run(drain(metrics.observe(fake, "shared", "")))
    s = samples(metrics)
    assert total(s, f"{P}_requests_total", adapter="shared", status=status) == 1
    assert total(s, f"{P}_requests_total") == 1
    assert total(s, f"{P}_generated_tokens_total") == 2
    assert fake.closed


def test_closing_early_counts_cancelled_and_closes_the_stream(metrics: RouterMetrics) -> None:
    fake = FakeStream([chunk([1], 5, 1), chunk([2], 5, 2), chunk([3], 5, 3, "stop")])

    async def leave_after_one() -> None:
        stream = metrics.observe(fake, "", "")
        async with contextlib.aclosing(stream):
            await anext(stream)

    asyncio.run(leave_after_one())
    s = samples(metrics)
    assert total(s, f"{P}_requests_total", adapter="", status="CANCELLED") == 1
    assert total(s, f"{P}_generated_tokens_total") == 1
    assert fake.closed


def test_refused_selection_and_label_bounds(metrics: RouterMetrics) -> None:
    metrics.refused("auto", "acme", grpc.StatusCode.INVALID_ARGUMENT)
    metrics.refused("never-registered", "acme", grpc.StatusCode.NOT_FOUND)
    metrics.refused("", "second", "NOT_A_STATUS")
    metrics.refused("", "third", grpc.StatusCode.UNAUTHENTICATED)  # past max_tenants=2
    metrics.selection("shared", BEST_RESIDENT)
    metrics.selection("", NO_SELECTOR)
    metrics.selection("gone", "made up")
    s = samples(metrics)
    requests = f"{P}_requests_total"
    assert total(s, requests, adapter="auto", tenant="acme", status="INVALID_ARGUMENT") == 1
    assert total(s, requests, adapter="_other", tenant="acme", status="NOT_FOUND") == 1
    assert total(s, requests, adapter="", tenant="second", status="UNKNOWN") == 1
    assert total(s, requests, adapter="", tenant="_other", status="UNAUTHENTICATED") == 1
    selections = f"{P}_auto_selections_total"
    assert total(s, selections, adapter="shared", reason=BEST_RESIDENT) == 1
    assert total(s, selections, adapter="", reason=NO_SELECTOR) == 1
    assert total(s, selections, adapter="_other", reason="other") == 1


def test_outcomes_count_reports_and_sum_rewards(metrics: RouterMetrics) -> None:
    for adapter_id, reward in (("shared", 1.0), ("shared", 0.25), ("", 0.5), ("gone", 1.0)):
        metrics.outcome(adapter_id, reward)
    s = samples(metrics)
    assert total(s, f"{P}_outcome_reports_total", adapter="shared") == 2
    assert total(s, f"{P}_outcome_reward_total", adapter="shared") == 1.25
    assert total(s, f"{P}_outcome_reward_total", adapter="") == 0.5
    assert total(s, f"{P}_outcome_reports_total", adapter="_other") == 1


def test_an_unregistered_adapters_series_go_at_the_next_scrape() -> None:
    registered = {"a", "b"}
    metrics = RouterMetrics(registered.__contains__)
    for adapter_id in ("a", "b"):
        metrics.refused(adapter_id, "", grpc.StatusCode.NOT_FOUND)
        metrics.selection(adapter_id, BEST_RESIDENT)
    registered.discard("a")
    s = samples(metrics)
    assert total(s, f"{P}_requests_total", adapter="a") == 0
    assert total(s, f"{P}_auto_selections_total", adapter="a") == 0
    assert total(s, f"{P}_requests_total", adapter="b") == 1


@contextlib.contextmanager
def served(app) -> Iterator[str]:
    """`app` under uvicorn on a free port, in a thread; -> its /metrics URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}/metrics"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_real_worker_streams_counted_and_served_with_a_workers_registry(
        tiny_server: ServeThread) -> None:
    """Requests to a real worker through `observe`; /metrics over HTTP shows the router's
    counters moved by exactly the usage the responses report, beside a worker's families."""
    metrics = RouterMetrics(lambda key: False)
    requests = [build_request("Hello", max_tokens=6, ignore_eos=True),
                build_request("Tell me a story", max_tokens=3, ignore_eos=True)]

    async def run() -> list[types_pb2.GenerateResponse]:
        async with grpc.aio.insecure_channel(tiny_server.worker_address) as channel:
            stub = worker_pb2_grpc.WorkerStub(channel)
            finals = []
            for request in requests:
                chunks = await drain(metrics.observe(stub.Generate(request, timeout=60), "",
                                                     "acme"))
                finals.append(chunks[-1])
            return finals

    finals = asyncio.run(run())
    worker_metrics = WorkerMetrics(max_tenants=1)
    with served(metrics_asgi_app(metrics.registry, worker_metrics.registry)) as url:
        s = scrape(url)
    assert total(s, f"{P}_requests_total", adapter="", tenant="acme", status="OK") == 2
    assert total(s, f"{P}_prompt_tokens_total") == sum(r.usage.prompt_tokens for r in finals)
    assert total(s, f"{P}_generated_tokens_total") == sum(
        r.usage.completion_tokens for r in finals) == 9
    for histogram in ("time_to_first_token_seconds", "request_duration_seconds"):
        assert total(s, f"{P}_{histogram}_count", tenant="acme") == 2
    assert ("edgelora_worker_adapter_load_seconds_count", frozenset({("tier", "host")})) in s


def test_combined_registry_shows_each_once() -> None:
    router, worker = RouterMetrics(lambda key: False), WorkerMetrics(max_tenants=1)
    router.refused("", "", grpc.StatusCode.OK)
    text = generate_latest(combined_registry(router.registry, worker.registry)).decode()
    assert text.count(f"# TYPE {P}_requests_total counter") == 1
    assert text.count("# TYPE edgelora_worker_adapter_load_seconds histogram") == 1
