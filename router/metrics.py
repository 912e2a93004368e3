"""The router's Prometheus metrics, in a registry of its own, and the ASGI app that serves them
(with an in-process worker's, for `edgelora serve`) at /metrics on the HTTP port.

- Per generation (`observe` wraps the relayed GenerateResponse stream; `refused` counts one
  turned away before it): `edgelora_router_requests_total{adapter,tenant,status}`,
  `..._prompt_tokens_total{adapter,tenant}`, `..._generated_tokens_total{adapter,tenant}`, and
  TTFT, inter-token and end-to-end latency histograms by tenant only.
- `edgelora_router_auto_selections_total{adapter,reason}`: what "auto" chose and by which rule.
- `edgelora_router_outcome_reports_total{adapter}` and `..._outcome_reward_total{adapter}`:
  reports to ReportOutcome and the sum of their rewards (their ratio: the mean reward).

Bounds (common.metrics): adapter = "" (base), "auto" (a refused "auto" request), a registered
worker key ("tenant:id" for a tenant's own adapter), else "_other", and an unregistered
adapter's series go at the next scrape; tenants come from the keys file (authenticated callers
only), capped at `max_tenants` all the same; reason is one of SELECTION_REASONS. Never touches
grpc contexts: the caller maps errors to its protocol.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, make_asgi_app
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from common.errors import EdgeLoraError
from common.limits import AUTO
from common.metrics import AdapterCounter, RequestMetrics
from edgelora.v1 import types_pb2
from router.selector import SELECTION_KINDS

PREFIX = "edgelora_router"
DEFAULT_MAX_TENANTS = 1000
# decide()'s rules, and the two ways "auto" is the base model without asking the selector
NO_SELECTOR, SELECTOR_FAILED = "no_selector", "selector_failed"
SELECTION_REASONS = frozenset((*SELECTION_KINDS, NO_SELECTOR, SELECTOR_FAILED))


class RouterMetrics:
    def __init__(self, is_adapter: Callable[[str], bool],
                 max_tenants: int = DEFAULT_MAX_TENANTS) -> None:
        """`is_adapter(worker_key)`: registered now (e.g. `key in registry.adapters`); called
        on every request and scrape, so a dict lookup."""
        self.registry = CollectorRegistry()
        self.requests = RequestMetrics(self.registry, PREFIX,
                                       lambda key: key == AUTO or is_adapter(key), max_tenants)
        self.selections = AdapterCounter(
            f"{PREFIX}_auto_selections", "Adapters chosen for 'auto' requests (\"\" = the base "
            "model), by the rule that chose", ("reason",), is_adapter, self.registry)
        self.outcome_reports = AdapterCounter(
            f"{PREFIX}_outcome_reports", "Outcomes reported (ReportOutcome), by the adapter "
            "that served (\"\" = the base model)", (), is_adapter, self.registry)
        self.outcome_reward = AdapterCounter(
            f"{PREFIX}_outcome_reward", "Sum of the rewards reported, by the adapter that served",
            (), is_adapter, self.registry)

    async def observe(self, stream: AsyncIterator[types_pb2.GenerateResponse], adapter_id: str,
                      tenant: str) -> AsyncIterator[types_pb2.GenerateResponse]:
        """`stream` as is, counted and timed: the request under its final status (OK once a
        chunk with a finish_reason went out; an EdgeLoraError's or AioRpcError's code; CANCELLED
        when closed early; UNKNOWN for anything else), its tokens from the chunks' cumulative
        usage, TTFT, inter-token and end-to-end latency. `adapter_id` is the worker key served
        ("" = base). Closes `stream` when done, also when itself is closed early."""
        track = self.requests.track(adapter_id, tenant)
        try:
            async for response in stream:
                track.usage(response.usage.prompt_tokens, response.usage.completion_tokens,
                            len(response.token_ids))
                if response.finish_reason:
                    track.status = grpc.StatusCode.OK.name
                yield response
            track.status = track.status or grpc.StatusCode.OK.name
        except BaseException as exc:
            if not track.status:  # an error after the final chunk changes nothing for the client
                track.status = error_status(exc)
            raise
        finally:
            track.finish()
            if hasattr(stream, "aclose"):
                await stream.aclose()

    def refused(self, adapter_id: str, tenant: str, status: grpc.StatusCode | str) -> None:
        """A generation turned away before any worker was asked (unknown adapter, bad
        parameters): `adapter_id` as the client named it (an unregistered one reads
        "_other")."""
        self.requests.track(adapter_id, tenant).finish(status)

    def outcome(self, adapter_id: str, reward: float) -> None:
        """A reported outcome for a generation the worker key `adapter_id` served."""
        self.outcome_reports.inc(adapter_id)
        self.outcome_reward.inc(adapter_id, amount=reward)

    def selection(self, adapter_id: str, reason: str) -> None:
        """An "auto" decision: the worker key chosen ("" = base) and Selection.kind, or
        NO_SELECTOR / SELECTOR_FAILED; anything else reads "other"."""
        self.selections.inc(adapter_id, reason if reason in SELECTION_REASONS else "other")


def error_status(exc: BaseException) -> str:
    """The gRPC status name a client sees for an exception out of the request path."""
    if isinstance(exc, EdgeLoraError):
        return exc.code.name
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code().name
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
        return grpc.StatusCode.CANCELLED.name
    return grpc.StatusCode.UNKNOWN.name


class _Union(Collector):
    def __init__(self, collectors: Iterable[Collector]) -> None:
        self.collectors = list(collectors)

    def collect(self) -> Iterator[Metric]:
        for collector in self.collectors:
            yield from collector.collect()


def combined_registry(*registries: Collector) -> CollectorRegistry:
    """One registry showing every metric of `registries` (their names must not collide: the
    router's start with edgelora_router_, a worker's with edgelora_worker_)."""
    union = CollectorRegistry(auto_describe=False)
    union.register(_Union(registries))
    return union


class MetricsApp:
    """The ASGI app of /metrics (Prometheus text format, gzip when asked). An ASGI callable,
    not a function, so Starlette's `Route("/metrics", MetricsApp(...))` and FastAPI's
    `app.add_route("/metrics", ...)` hand it the raw request: no /metrics/ redirect as a Mount
    would give."""

    def __init__(self, *registries: Collector) -> None:
        registry = registries[0] if len(registries) == 1 else combined_registry(*registries)
        self._app = make_asgi_app(registry)

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        await self._app(scope, receive, send)


def metrics_asgi_app(*registries: Collector) -> MetricsApp:
    """/metrics for the router's HTTP port: `metrics_asgi_app(router_metrics.registry)`, and
    under `serve` `metrics_asgi_app(router_metrics.registry, worker_runtime.metrics_registry)`."""
    return MetricsApp(*registries)
