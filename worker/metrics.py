"""The worker's Prometheus metrics, in a registry of its own (not prometheus_client's global one:
`edgelora serve` and the tests run a router and a worker in one process).

- Per request (worker.service Generate calls `track`): `edgelora_worker_requests_total{adapter,
  tenant,status}`, `..._prompt_tokens_total{adapter,tenant}`, `..._generated_tokens_total{adapter,
  tenant}`, and the TTFT, inter-token and end-to-end latency histograms by tenant only.
- Read at scrape time, no cost on the hot path (EngineCollector): queue depth, running
  sequences, KV blocks used/free, adapter tier hits/misses/evictions/loads and residency.
- Adapter load times per tier (`edgelora_worker_adapter_load_seconds{tier}`): AdapterMemory
  reports each load through its `on_load` hook.

Bounds (common.metrics): the adapter label is "" (base), an id registered on this worker (the
worker key, "tenant:id" for a tenant's own adapter), else "_other", and an unregistered
adapter's series go at the next scrape; the tenant label (the router's `edgelora-tenant`
header) keeps the first --metrics-max-tenants values, then "_other"; histograms never carry the
adapter. With 10,000 registered adapters the histograms stay at tenants x buckets series.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import grpc
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from common.metrics import RequestMetrics, RequestTrack

if TYPE_CHECKING:  # no import cycle at run time, and no torch for readers of this module
    from worker.adapter_memory import AdapterMemory
    from worker.engine import Engine
    from worker.sequence import TokenEvent

PREFIX = "edgelora_worker"
# Seconds: a host -> device copy takes milliseconds, a disk read of a large adapter seconds.
LOAD_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
TIERS = ("host", "device")


class WorkerMetrics:
    def __init__(self, max_tenants: int) -> None:
        self.registry = CollectorRegistry()
        self.adapters: AdapterMemory | None = None
        self.requests = RequestMetrics(self.registry, PREFIX, self._is_registered, max_tenants)
        self.adapter_load = Histogram(
            f"{PREFIX}_adapter_load_seconds", "Adapter loads by tier: 'host' = disk -> host "
            "memory (read and checked), 'device' = host -> a device slot", ["tier"],
            buckets=LOAD_BUCKETS, registry=self.registry)
        for tier in TIERS:  # both series from the start, so rate() sees the first load
            self.adapter_load.labels(tier)

    def _is_registered(self, adapter_id: str) -> bool:
        return self.adapters is not None and adapter_id in self.adapters.registry

    def attach(self, engine: Engine) -> None:
        """Reads the engine's state at scrape time and times its adapter loads."""
        self.adapters = engine.adapters
        self.registry.register(EngineCollector(engine))
        if self.adapters is not None:
            self.adapters.on_load = self.adapter_loaded

    def adapter_loaded(self, tier: str, seconds: float) -> None:
        self.adapter_load.labels(tier).observe(seconds)

    def track(self, adapter_id: str, tenant: str) -> GenerateTrack:
        """Starts one Generate request's clock: call `event` on each merged TokenEvent before
        it goes out, `finish` when the stream ends (an error code for a refused request)."""
        return GenerateTrack(self.requests.track(adapter_id, tenant))


class GenerateTrack:
    """A RequestTrack fed with the engine's TokenEvents."""

    def __init__(self, track: RequestTrack) -> None:
        self._track = track

    def event(self, event: TokenEvent) -> None:
        if event.finish_reason == "error":  # the stream is aborted with this code
            self._track.status = event.error_code
            return
        self._track.usage(event.num_prompt_tokens, event.num_output_tokens, len(event.token_ids))
        if event.finish_reason:
            self._track.status = grpc.StatusCode.OK.name

    def finish(self, status: grpc.StatusCode | str | None = None) -> None:
        """Without a status: the last event's outcome, else CANCELLED (the client left)."""
        self._track.finish(status)


class EngineCollector(Collector):
    """Gauges and adapter counters read from the engine when Prometheus scrapes (Engine.load:
    lengths and plain ints the engine thread writes, a snapshot that may be a step old)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        load = self.engine.load()
        yield _gauge("queue_depth", "Requests waiting for admission", load.num_waiting)
        yield _gauge("running_sequences", "Sequences admitted and decoding", load.num_running)
        yield _gauge("kv_blocks_used", "KV-cache blocks held by sequences",
                     load.num_kv_blocks - load.num_free_kv_blocks)
        yield _gauge("kv_blocks_free", "KV-cache blocks free", load.num_free_kv_blocks)
        if self.engine.adapters is not None:
            yield from adapter_families(self.engine.adapters)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{PREFIX}_{name}", documentation, value=value)


def adapter_families(memory: AdapterMemory) -> Iterator[Metric]:
    """AdapterStats per tier ("host": the disk -> host LRU; "device": host -> device slots) and
    what each tier holds now."""
    counts = {"hits": "Acquires that found the adapter in this tier",
              "misses": "Acquires that had to fill this tier from the one below",
              "evictions": "Adapters this tier dropped to make room",
              "loads": "Adapters loaded into this tier"}
    for field, documentation in counts.items():
        family = CounterMetricFamily(f"{PREFIX}_adapter_{field}", documentation, labels=["tier"])
        for tier in TIERS:
            family.add_metric([tier], getattr(getattr(memory.stats, tier), field))
        yield family
    summary = memory.summary()
    yield _gauge("adapters_registered", "Adapters registered (servable) on this worker",
                 summary["num_registered"])
    yield _gauge("adapter_host_cached", "Adapters held in host memory",
                 summary["num_host_cached"])
    yield _gauge("adapter_host_capacity", "Host memory tier capacity (--host-adapter-cache)",
                 summary["host_capacity"])
    yield _gauge("adapter_device_slots_in_use", "Device slots pinned by running sequences",
                 summary["num_device_slots_in_use"])
    yield _gauge("adapter_device_slots", "Device adapter slots (--device-adapter-slots)",
                 summary["num_device_slots"])
