"""The router's view of its workers: discovery, health, what each holds hot, and which one takes
the next request. Requests never wait on a poll: they read the state the background loops keep."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Awaitable, Callable, Collection, Iterator
from dataclasses import dataclass

import grpc

from common.errors import Unavailable
from common.internal_auth import secret_interceptors
from edgelora.v1 import types_pb2, worker_pb2, worker_pb2_grpc
from router.discovery import Resolver, expand, parse_entries, resolve_host
from router.routing import ROUTING_POLICIES, pick_worker

log = logging.getLogger(__name__)

# A kill -9'd worker closes its sockets and fails calls at once; keepalive pings catch a worker
# whose host vanished (no RST), and short reconnect backoff lets a restarted worker rejoin within
# about a second instead of after grpc's default backoff of up to two minutes.
CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.min_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 2_000),
    # a worker's ListAdapters (~220 bytes an adapter) passes gRPC's 4 MiB default near 20,000
    ("grpc.max_receive_message_length", 64 << 20),
]
RESIDENT_TIERS = (types_pb2.ADAPTER_TIER_HOST, types_pb2.ADAPTER_TIER_DEVICE)
MAX_SLOW_POLLS = 2  # failed polls (other than connection refused) before a worker is taken out


@dataclass
class WorkerHandle:
    address: str  # ip:port the channel connects to
    entry: str    # the --workers entry it came from (a DNS name, or the address itself)
    channel: grpc.aio.Channel
    stub: worker_pb2_grpc.WorkerStub
    num_in_flight: int = 0
    is_live: bool = False
    num_failed_polls: int = 0
    info: worker_pb2.InfoResponse | None = None  # the last answer to Info
    resident: frozenset[str] = frozenset()       # adapter ids in its host cache or device slots

    @property
    def name(self) -> str:
        """How messages name it: the address, and the DNS entry when it came from one."""
        return self.address if self.entry == self.address else f"{self.address} ({self.entry})"


JoinHook = Callable[[WorkerHandle], Awaitable[None]]


class WorkerPool:
    """Workers from `--workers`, health-checked by polling Info; only live ones get requests.

    `on_join(worker)` runs before a worker (re)joins (the registry re-registers adapters there);
    a live worker whose Info counts fewer registered adapters than `expected_num_registered()`
    lost them (a restart between two polls) and is synced again.
    """

    def __init__(self, addresses: list[str], routing: str = "affinity",
                 load_epsilon: float = 0.25, health_interval_s: float = 1.0,
                 health_timeout_s: float = 2.0, resolve_interval_s: float = 10.0,
                 resolver: Resolver = resolve_host, secret: str = "") -> None:
        if routing not in ROUTING_POLICIES:
            raise ValueError(f"routing {routing!r}: use one of {', '.join(ROUTING_POLICIES)}")
        self.entries = parse_entries(",".join(addresses))
        self.routing = routing
        self.load_epsilon = load_epsilon
        self.health_interval_s = health_interval_s
        self.health_timeout_s = health_timeout_s
        self.resolve_interval_s = resolve_interval_s
        self.resolver = resolver
        self.secret = secret  # the router <-> worker credential, sent on every call
        self.on_join: JoinHook | None = None
        self.expected_num_registered: Callable[[], int] = lambda: 0
        self._handles: dict[str, WorkerHandle] = {}
        self._watchers: dict[str, asyncio.Task] = {}
        self._background: set[asyncio.Task] = set()
        self._resident: frozenset[str] = frozenset()
        self._turn = itertools.count()
        self._is_started = False

    @classmethod
    def from_config(cls, config) -> WorkerPool:  # config: router.config.RouterConfig
        return cls(config.worker_addresses, routing=config.routing,
                   load_epsilon=config.load_epsilon,
                   health_interval_s=config.health_interval_s,
                   health_timeout_s=config.health_timeout_s,
                   resolve_interval_s=config.resolve_interval_s,
                   secret=config.internal_secret)

    # -- what callers read (cheap, no I/O) --
    @property
    def workers(self) -> list[WorkerHandle]:
        """Live workers, in address order: the ones to send RPCs to."""
        return [w for _, w in sorted(self._handles.items()) if w.is_live]

    @property
    def all_workers(self) -> list[WorkerHandle]:
        """Every discovered worker, live or not."""
        return [w for _, w in sorted(self._handles.items())]

    def resident_adapters(self) -> frozenset[str]:
        """Adapter ids held in host or device memory by any live worker, as of the last polls
        (every --health-interval-s). Cached: cheap to call on every request."""
        return self._resident

    # -- choosing a worker --
    def pick(self, adapter_id: str, exclude: Collection[str] = ()) -> WorkerHandle:
        """The live worker (not in `exclude`, by address) for a request on `adapter_id` under
        the routing policy; Unavailable with what to check when none is left."""
        candidates = {w.address: w for w in self.workers if w.address not in exclude}
        if not candidates:
            raise Unavailable(self.unavailable_reason(exclude))
        loads = {address: w.num_in_flight for address, w in candidates.items()}
        return candidates[pick_worker(self.routing, adapter_id, loads, self.load_epsilon,
                                      next(self._turn))]

    def unavailable_reason(self, tried: Collection[str] = ()) -> str:
        """Why no worker can take a request, and what to check."""
        spec = ",".join(f"{h}:{p}" for h, p in self.entries)
        if not self._handles:
            return (f"no worker found: --workers {spec} resolved to no address yet; start "
                    f"`edgelora worker` processes there (re-resolved every "
                    f"{self.resolve_interval_s:g} s)")
        if tried:
            return (f"no live worker left for this request: {', '.join(sorted(tried))} failed "
                    f"and the other {len(self._handles) - len(tried)} of {len(self._handles)} "
                    "workers are down; retry shortly or check the worker processes")
        down = ", ".join(w.name for w in self.all_workers)
        return (f"no live worker: {down} not answering health checks; check that the "
                f"`edgelora worker` processes run and are reachable from the router")

    @contextlib.contextmanager
    def lease(self, worker: WorkerHandle) -> Iterator[WorkerHandle]:
        """Counts `worker` busy with one more request until the block ends."""
        worker.num_in_flight += 1
        try:
            yield worker
        finally:
            worker.num_in_flight -= 1

    def mark_failed(self, worker: WorkerHandle, reason: str) -> None:
        """Takes `worker` out until a poll succeeds again (then it rejoins, re-synced)."""
        if worker.is_live:
            log.warning("worker %s is out: %s", worker.name, reason)
        worker.is_live = False
        self._update_resident()

    # -- discovery and health --
    async def start(self) -> None:
        """Resolves --workers, polls every worker once (joining those that answer), then keeps
        polling and re-resolving in the background."""
        await self.resolve()
        await asyncio.gather(*(self.poll(w) for w in self.all_workers))
        self._is_started = True
        for worker in self.all_workers:
            self._watch(worker)
        self._spawn(self._resolve_loop())

    async def resolve(self) -> None:
        """Re-reads the DNS names: new addresses become workers (joining at their first poll),
        vanished ones leave (their streams get a grace period)."""
        known = {address: w.entry for address, w in self._handles.items()}
        found = await expand(self.entries, self.resolver, known)
        for address, entry in found.items():
            if address not in self._handles:
                channel = grpc.aio.insecure_channel(
                    address, options=CHANNEL_OPTIONS,
                    interceptors=secret_interceptors(self.secret))
                self._handles[address] = WorkerHandle(address, entry, channel,
                                                      worker_pb2_grpc.WorkerStub(channel))
                log.info("worker %s discovered", self._handles[address].name)
                if self._is_started:
                    self._watch(self._handles[address])
        for address in set(self._handles) - set(found):
            worker = self._handles.pop(address)
            log.warning("worker %s left: no longer in DNS", worker.name)
            worker.is_live = False
            if (task := self._watchers.pop(address, None)) is not None:
                task.cancel()
            self._spawn(worker.channel.close(grace=30.0))
        self._update_resident()

    async def poll(self, worker: WorkerHandle) -> None:
        """One health check: Info answered -> live (synced first when joining); failed ->
        out at once when refused, after MAX_SLOW_POLLS in a row when slow."""
        try:
            info = await worker.stub.Info(worker_pb2.InfoRequest(), timeout=self.health_timeout_s)
        except grpc.aio.AioRpcError as exc:
            worker.num_failed_polls += 1
            if worker.info is None and worker.num_failed_polls == 1:  # never joined: say so once
                log.warning("worker %s not answering yet: %s", worker.name, exc.code().name)
            if exc.code() is grpc.StatusCode.UNAVAILABLE or \
                    worker.num_failed_polls >= MAX_SLOW_POLLS:
                self.mark_failed(worker, f"health check: {exc.code().name} {exc.details()}")
            return
        worker.num_failed_polls = 0
        lost = info.adapter_stats.num_registered < self.expected_num_registered()
        if (not worker.is_live or lost) and self.on_join is not None:
            try:
                await self.on_join(worker)
            except Exception as exc:  # whatever went wrong: stay out, retry at the next poll
                self.mark_failed(worker, f"re-registering adapters failed: {exc}")
                return
        if not worker.is_live:
            log.info("worker %s joined (%s on %s)", worker.name, info.model, info.device)
        worker.is_live = True
        worker.info = info
        worker.resident = frozenset(a.adapter_id for a in info.adapters
                                    if a.tier in RESIDENT_TIERS)
        self._update_resident()

    def _update_resident(self) -> None:
        self._resident = frozenset().union(*(w.resident for w in self.workers))

    def _watch(self, worker: WorkerHandle) -> None:
        self._watchers[worker.address] = asyncio.create_task(self._poll_loop(worker))

    async def _poll_loop(self, worker: WorkerHandle) -> None:
        while True:
            await asyncio.sleep(self.health_interval_s)
            try:
                await self.poll(worker)
            except Exception:  # a bug must not stop health checks of this worker for good
                log.exception("health check of %s", worker.name)

    async def _resolve_loop(self) -> None:
        while True:
            await asyncio.sleep(self.resolve_interval_s)
            try:
                await self.resolve()
            except Exception:  # keep the known workers; try again next interval
                log.exception("re-resolving --workers")

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close(self) -> None:
        for task in [*self._watchers.values(), *self._background]:
            task.cancel()
        await asyncio.gather(*self._watchers.values(), *self._background,
                             return_exceptions=True)
        for worker in self._handles.values():
            await worker.channel.close()
