"""Prometheus pieces the router and the worker share: bounded label values and the
per-request families (requests, tokens, TTFT / inter-token / end-to-end latency).

Label values are bounded so that 10,000 adapters do not explode the series count (docs/metrics.md):
- adapter: "" (the base model), an id the process has registered, else OTHER. Only counters carry
  it, and an adapter's series are dropped at the next scrape once it is unregistered: at any
  moment at most (registered adapters in use) x tenants x statuses request series.
- tenant: the first `max_tenants` distinct values seen, then OTHER (LabelCap). Histograms carry
  only this label, never the adapter: buckets x adapters would be the explosion.
- status: a grpc.StatusCode name (17 values).
OTHER starts with "_", which no adapter id nor tenant name may (common.limits, router.tenants),
so it never merges with a real one.

Never touches protobuf or the engine: callers hand in plain numbers.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence

import grpc
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.metrics_core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

OTHER = "_other"
STATUSES = frozenset(code.name for code in grpc.StatusCode)
# Seconds. Prompt processing on a CPU takes up to seconds, on a GPU milliseconds: both ends covered.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)


def status_name(status: grpc.StatusCode | str) -> str:
    """A grpc.StatusCode (or its name) -> its name; anything else -> "UNKNOWN"."""
    name = status.name if isinstance(status, grpc.StatusCode) else str(status)
    return name if name in STATUSES else "UNKNOWN"


class LabelCap:
    """The first `limit` distinct values keep their own label; later ones read OTHER.

    First come, first kept: a value once admitted stays admitted for the process's life, so a
    series never changes label mid-way. Racing callers may admit one or two past the limit."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("a label cap must admit at least one value")
        self.limit = limit
        self._seen: set[str] = set()

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        if len(self._seen) >= self.limit:
            return OTHER
        self._seen.add(value)
        return value


class AdapterCounter(Collector):
    """A counter whose first label is `adapter`: "" (base), a known adapter id, else OTHER.

    Kept here rather than in prometheus_client's Counter so that the series of an adapter
    no longer known (unregistered) are dropped at scrape time: registration churn cannot grow
    the series count for ever. `is_known` is called from the scraping thread: it must be a
    cheap read (a dict lookup)."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str],
                 is_known: Callable[[str], bool], registry: CollectorRegistry) -> None:
        self.name, self.documentation = name, documentation
        self.labelnames = ("adapter", *labelnames)
        self.is_known = is_known
        self._values: dict[tuple[str, ...], float] = {}
        self._lock = threading.Lock()
        registry.register(self)

    def adapter_label(self, adapter_id: str) -> str:
        return adapter_id if not adapter_id or self.is_known(adapter_id) else OTHER

    def inc(self, adapter_id: str, *labels: str, amount: float = 1.0) -> None:
        self.add((self.adapter_label(adapter_id), *labels), amount)

    def add(self, key: tuple[str, ...], amount: float) -> None:
        """`inc` with the labels already resolved: (adapter_label(...), *labels)."""
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def describe(self) -> list[Metric]:
        return [CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)]

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        with self._lock:
            gone = [k for k in self._values if k[0] not in ("", OTHER) and not self.is_known(k[0])]
            for key in gone:
                del self._values[key]
            items = list(self._values.items())
        for key, value in items:
            family.add_metric(list(key), value)
        yield family


class RequestMetrics:
    """One process's per-request families, named `<prefix>_requests_total` and so on."""

    def __init__(self, registry: CollectorRegistry, prefix: str,
                 is_adapter: Callable[[str], bool], max_tenants: int) -> None:
        self.tenant_label = LabelCap(max_tenants)
        self.requests = AdapterCounter(
            f"{prefix}_requests", "Generate requests that ended, by adapter, tenant and gRPC "
            "status", ("tenant", "status"), is_adapter, registry)
        self.prompt_tokens = AdapterCounter(
            f"{prefix}_prompt_tokens", "Prompt tokens of requests that produced output",
            ("tenant",), is_adapter, registry)
        self.generated_tokens = AdapterCounter(
            f"{prefix}_generated_tokens", "Tokens generated and streamed", ("tenant",), is_adapter,
            registry)
        self.ttft = Histogram(f"{prefix}_time_to_first_token_seconds",
                              "From the request's arrival to its first generated token",
                              ["tenant"], buckets=TTFT_BUCKETS, registry=registry)
        self.itl = Histogram(f"{prefix}_inter_token_latency_seconds",
                             "Between consecutive generated tokens of one request (a chunk of "
                             "several tokens spreads its gap evenly over them)",
                             ["tenant"], buckets=ITL_BUCKETS, registry=registry)
        self.e2e = Histogram(f"{prefix}_request_duration_seconds",
                             "From the request's arrival to its end, whatever its status",
                             ["tenant"], buckets=E2E_BUCKETS, registry=registry)

    def track(self, adapter_id: str, tenant: str) -> RequestTrack:
        """Starts the clock of one request."""
        return RequestTrack(self, adapter_id, self.tenant_label(tenant))


class RequestTrack:
    """One request's observations. Feed it the cumulative usage of each chunk (`usage`), then
    call `finish` once (later calls do nothing). Single-threaded: the request's own task."""

    def __init__(self, metrics: RequestMetrics, adapter_id: str, tenant: str) -> None:
        self.metrics, self.tenant = metrics, tenant
        # labels resolved once: a chunk costs ~2 us then (a lookup per chunk made it ~4.5)
        self._tokens_key = (metrics.generated_tokens.adapter_label(adapter_id), tenant)
        self._ttft, self._itl = metrics.ttft.labels(tenant), metrics.itl.labels(tenant)
        self.started = self._last = time.perf_counter()
        self.num_prompt_tokens = self.num_output_tokens = 0
        self.status = ""  # set by the caller once the outcome is known ("OK", an error code)
        self._has_first_token = self._finished = False

    def usage(self, num_prompt_tokens: int, num_output_tokens: int, num_new_tokens: int) -> None:
        """A chunk went out: usage so far (cumulative, as in GenerateResponse.usage) and the
        number of tokens the chunk itself carries (its timing unit)."""
        m, now = self.metrics, time.perf_counter()
        if num_prompt_tokens > self.num_prompt_tokens:
            m.prompt_tokens.add(self._tokens_key, num_prompt_tokens - self.num_prompt_tokens)
            self.num_prompt_tokens = num_prompt_tokens
        if num_output_tokens > self.num_output_tokens:
            m.generated_tokens.add(self._tokens_key, num_output_tokens - self.num_output_tokens)
            self.num_output_tokens = num_output_tokens
        if num_new_tokens <= 0:
            return
        if self._has_first_token:
            gap_s = (now - self._last) / num_new_tokens
            for _ in range(num_new_tokens):
                self._itl.observe(gap_s)
        else:  # tokens that came with the first one have no gap of their own to measure
            self._has_first_token = True
            self._ttft.observe(now - self.started)
        self._last = now

    def finish(self, status: grpc.StatusCode | str | None = None) -> None:
        """Counts the request under `status`, else the one set on the track, else CANCELLED
        (the stream ended without an outcome: the client left)."""
        if self._finished:
            return
        self._finished = True
        status = status_name(status or self.status or grpc.StatusCode.CANCELLED)
        self.metrics.requests.add((*self._tokens_key, status), 1.0)
        self.metrics.e2e.labels(self.tenant).observe(time.perf_counter() - self.started)
