"""Adapter memory across three tiers: disk (registered specs) -> host LRU cache -> device slots.

The facade is two verbs, acquire(adapter_id) -> slot and release(slot): a slot referenced by a
running sequence is never evicted. Disk -> host loads run on a background thread (prefetch) so
they overlap compute; host -> device copies happen on acquire. Thread-safe behind one lock.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common.adapter_blobs import digest_files
from common.adapter_format import MAX_WEIGHTS_BYTES, AdapterSpec, read_adapter_weights
from common.errors import (
    Aborted,
    EdgeLoraError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from worker.lora import LoraSlots
from worker.slot_table import SlotTable

log = logging.getLogger(__name__)
HostWeights = dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]
MAX_LOAD_ATTEMPTS = 3  # consecutive failed reads (EIO, a file mid-rewrite) before giving up
LOAD_RETRY_S = 30.0  # then requests fail fast for this long, and the next one tries again


@dataclass(frozen=True)
class LoadError:
    """Why an adapter failed to load. Kept as a message, not an exception: raising one instance
    again and again would grow its traceback."""

    message: str
    retry_at: float | None = None  # time.monotonic() when it expires; None: until re-registered
    kind: type[EdgeLoraError] = InvalidArgument

    def to_error(self) -> EdgeLoraError:
        return self.kind(self.message) if self.retry_at is None else Unavailable(self.message)


@dataclass
class TierStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    loads: int = 0
    load_ms_total: float = 0.0

    @property
    def mean_load_ms(self) -> float:
        return self.load_ms_total / self.loads if self.loads else 0.0


@dataclass
class AdapterStats:
    host: TierStats = field(default_factory=TierStats)    # disk -> host
    device: TierStats = field(default_factory=TierStats)  # host -> device slot


class AdapterMemory:
    def __init__(self, slots: LoraSlots, host_capacity: int, shapes: dict[str, tuple[int, int]],
                 num_layers: int, pin_memory: bool = False, *,
                 max_adapter_bytes: int = MAX_WEIGHTS_BYTES) -> None:
        self.slots = slots
        self.host_capacity = host_capacity
        self.shapes, self.num_layers, self.pin_memory = shapes, num_layers, pin_memory
        self.max_adapter_bytes = max_adapter_bytes  # for every read: files change after register
        self.registry: dict[str, AdapterSpec] = {}
        self.host: OrderedDict[str, HostWeights] = OrderedDict()  # least recently used first
        self.table: SlotTable[AdapterSpec] = SlotTable(slots.num_slots)  # device slots
        self.stats = AdapterStats()
        # Called with (tier, seconds) after each disk -> host read ("host") and host -> device
        # copy ("device"), on the thread that did it, maybe under the lock: keep it quick
        # (worker.metrics observes a histogram).
        self.on_load: Callable[[str, float], None] | None = None
        self._loading: dict[str, Future[HostWeights]] = {}
        self._from_disk: set[str] = set()  # read from disk, not yet acquired: a host-tier miss
        self._errors: dict[str, LoadError] = {}
        self._num_failures: dict[str, int] = {}  # consecutive transient load failures
        self._lock = threading.RLock()
        # one torch thread: loads are copies and casts; more threads would fight the engine's
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adapter-load",
                                          initializer=torch.set_num_threads, initargs=(1,))

    # -- registry (disk tier) --
    def register(self, spec: AdapterSpec) -> None:
        """Validates the adapter against this base model, reading every weight, and makes it
        servable. Reading it all here (off the event loop: the service calls this on a thread)
        refuses NaN, overflow and duplicate tensors now, not at a tenant's first request."""
        self._check_rank(spec)
        self._read_checked(spec)
        with self._lock:
            self._forget(spec.adapter_id)
            self.registry[spec.adapter_id] = spec

    def register_loaded(self, spec: AdapterSpec, weights: HostWeights) -> None:
        """Registers an adapter whose weights are already in host memory, in
        read_adapter_weights' format, with no file behind them (bench/gpu_decode.py's random
        adapters of an 8B model). The host tier must keep them: a later disk read would fail."""
        self._check_rank(spec)
        with self._lock:
            self._forget(spec.adapter_id)
            self.registry[spec.adapter_id] = spec
            self._keep_in_host(spec.adapter_id,
                               self.slots.host_layout(weights, pin=self.pin_memory))

    def _read_checked(self, spec: AdapterSpec) -> HostWeights:
        """read_adapter_weights' float32 weights, refused where the slots' dtype cannot hold
        them: an inf in one slot becomes NaN in every row the pool path masks with 0."""
        weights = read_adapter_weights(spec, self.shapes, self.num_layers, self.max_adapter_bytes)
        limit = torch.finfo(self.slots.dtype).max
        if limit >= torch.finfo(torch.float32).max:
            return weights  # read_adapter_weights checked that every value is finite
        for (layer, module), pair in weights.items():
            if any(bound.abs() > limit for t in pair for bound in torch.aminmax(t)):
                raise InvalidArgument(f"adapter {spec.adapter_id!r}: layer {layer} {module} "
                                      f"holds values beyond {limit:g}, the largest this worker's "
                                      f"{self.slots.dtype} adapter slots can hold")
        return weights

    def _check_rank(self, spec: AdapterSpec) -> None:
        if spec.rank > self.slots.max_rank:
            raise InvalidArgument(f"adapter {spec.adapter_id!r} has rank {spec.rank}; this worker "
                                  f"serves ranks up to {self.slots.max_rank} (--max-lora-rank)")

    def unregister(self, adapter_id: str) -> bool:
        with self._lock:
            if adapter_id not in self.registry:
                return False
            self._forget(adapter_id)
            del self.registry[adapter_id]
            return True

    def _forget(self, adapter_id: str) -> None:
        """Drops cached copies; a slot still in use keeps serving its sequences, then frees."""
        self.host.pop(adapter_id, None)
        self._from_disk.discard(adapter_id)
        self._errors.pop(adapter_id, None)
        self._num_failures.pop(adapter_id, None)
        loading = self._loading.pop(adapter_id, None)
        if loading is not None:
            loading.cancel()  # unless started: a stale read would only delay the next ones
        self.table.forget(adapter_id)

    # -- host tier --
    def prefetch(self, adapter_id: str) -> None:
        """Starts the disk -> host load in the background unless it is cached or under way."""
        with self._lock:
            if (adapter_id in self.host or adapter_id in self._loading
                    or self._load_error(adapter_id) or adapter_id not in self.registry):
                return
            self._loading[adapter_id] = self._loader.submit(self._read, self.registry[adapter_id])

    def _read(self, spec: AdapterSpec) -> HostWeights:
        started = time.perf_counter()
        if spec.digest:
            self._check_content(spec)
        weights = self.slots.host_layout(self._read_checked(spec), pin=self.pin_memory)
        with self._lock:
            self._record_load("host", time.perf_counter() - started)
        return weights

    def _record_load(self, tier: str, seconds: float) -> None:
        stats = self.stats.host if tier == "host" else self.stats.device
        stats.loads += 1
        stats.load_ms_total += seconds * 1e3
        if self.on_load is not None:
            self.on_load(tier, seconds)

    def _check_content(self, spec: AdapterSpec) -> None:
        """Files from a content store must still hash to their digest: a flipped byte or a
        blob evicted from the cache fails FAILED_PRECONDITION, which the router answers by
        sending the files again and retrying the request."""
        try:
            intact = digest_files(Path(spec.path), self.max_adapter_bytes) == spec.digest
        except Exception:  # missing, unreadable or grown past the caps
            intact = False
        if not intact:
            raise FailedPrecondition(f"adapter {spec.adapter_id!r}: the files of digest "
                                     f"{spec.digest} are missing or corrupt on this worker")
        os.utime(spec.path)  # the cache's least-recently-used clock (BlobStore.trim)

    def _collect(self, adapter_id: str) -> HostWeights | None:
        """The host copy if ready (moving a finished load into the LRU), else None."""
        if adapter_id in self.host:
            self.host.move_to_end(adapter_id)
            return self.host[adapter_id]
        future = self._loading.get(adapter_id)
        if future is None or not future.done():
            return None
        del self._loading[adapter_id]
        try:
            weights = future.result()
        except Exception as exc:  # a bad file, EIO, out of memory: this adapter only
            self._record_failure(adapter_id, exc)
            return None
        self._num_failures.pop(adapter_id, None)
        self._keep_in_host(adapter_id, weights)
        self._from_disk.add(adapter_id)
        return weights

    def _record_failure(self, adapter_id: str, exc: Exception) -> None:
        """A bad file stays refused until re-registered; a read that may work next time (OSError,
        Unavailable, out of memory) is retried by the next prefetch, MAX_LOAD_ATTEMPTS times, then
        refused for LOAD_RETRY_S only."""
        if isinstance(exc, EdgeLoraError) and not isinstance(exc, Unavailable):
            self._errors[adapter_id] = LoadError(str(exc), kind=type(exc))
            return
        attempts = self._num_failures.get(adapter_id, 0) + 1
        log.warning("adapter %r: load attempt %d failed: %s", adapter_id, attempts, exc)
        if attempts < MAX_LOAD_ATTEMPTS:
            self._num_failures[adapter_id] = attempts
            return
        self._num_failures.pop(adapter_id, None)
        self._errors[adapter_id] = LoadError(
            f"adapter {adapter_id!r} could not be read after {attempts} attempts: {exc}; "
            f"retrying in {LOAD_RETRY_S:g} s", retry_at=time.monotonic() + LOAD_RETRY_S)

    def _load_error(self, adapter_id: str) -> LoadError | None:
        """The adapter's load error unless it has expired (which forgets it)."""
        error = self._errors.get(adapter_id)
        if error is not None and error.retry_at is not None and time.monotonic() >= error.retry_at:
            del self._errors[adapter_id]
            return None
        return error

    def _keep_in_host(self, adapter_id: str, weights: HostWeights) -> None:
        """Newest in the host LRU; the least recently used go beyond host_capacity."""
        self.host[adapter_id] = weights
        while len(self.host) > self.host_capacity:
            evicted, _ = self.host.popitem(last=False)
            self._from_disk.discard(evicted)
            self.stats.host.evictions += 1

    # -- device tier --
    def error(self, adapter_id: str) -> EdgeLoraError | None:
        """Why this adapter cannot serve (not registered, failed to load), else None."""
        with self._lock:
            if adapter_id not in self.registry:
                return NotFound(f"adapter {adapter_id!r} is not registered on this worker")
            error = self._load_error(adapter_id)
            return error.to_error() if error else None

    @property
    def slot_spec(self) -> list[AdapterSpec | None]:
        """By slot: the registration whose weights it holds (a sequence keeps its version)."""
        return self.table.spec

    def is_resident(self, adapter_id: str) -> bool:
        return self.table.slot_of(adapter_id) is not None

    def has_no_idle_slot(self) -> bool:
        return not self.table.has_idle()

    def can_acquire(self, adapter_id: str) -> bool:
        """True when acquire() would succeed now without waiting."""
        with self._lock:
            if self.is_resident(adapter_id):
                return True
            if not self.table.has_idle():
                return False
            if adapter_id not in self.host:
                self.prefetch(adapter_id)
            return self._collect(adapter_id) is not None

    def acquire(self, adapter_id: str, pinned: AdapterSpec | None = None) -> int:
        """Pins the adapter in a device slot (loading it there if needed); -> slot, whose
        weights are those of `slot_spec[slot]`. A request that ran on `pinned` (then was
        preempted) must not go on with other weights: replaced since, it ends (Aborted)."""
        with self._lock:
            if pinned is not None and self.registry.get(adapter_id) != pinned:
                raise Aborted(f"adapter {adapter_id!r} was replaced or unregistered while this "
                              "request ran; its output so far came from the old weights, retry")
            slot = self.table.slot_of(adapter_id)
            if slot is not None:
                self.stats.device.hits += 1
            else:
                weights = self._host_copy_to_acquire(adapter_id)
                self.stats.device.misses += 1
                # A copy read from disk for this request (even if prefetched) is a host miss.
                cached = adapter_id not in self._from_disk
                self.stats.host.hits += cached
                self.stats.host.misses += not cached
                slot, evicted = self.table.take_idle()
                self.stats.device.evictions += evicted is not None
                started = time.perf_counter()
                self.slots.write(slot, weights, self.registry[adapter_id].rank)
                self._from_disk.discard(adapter_id)
                self._record_load("device", time.perf_counter() - started)
                self.table.place(slot, adapter_id, self.registry[adapter_id])
            self.table.pin(slot)
            return slot

    def _host_copy_to_acquire(self, adapter_id: str) -> HostWeights:
        """The host copy acquire() was promised by can_acquire(). Another thread may have
        unregistered or replaced the adapter since: that fails this request, not the step."""
        if adapter_id not in self.registry:
            raise NotFound(f"adapter {adapter_id!r} was unregistered while this request was "
                           "being admitted")
        weights = self._collect(adapter_id)
        if weights is None:  # re-registered (or evicted from the host tier) since can_acquire
            self.prefetch(adapter_id)
            raise Unavailable(f"adapter {adapter_id!r} was replaced or left host memory while "
                              "this request was being admitted; retry")
        if not self.table.has_idle():
            raise RuntimeError(f"acquire({adapter_id!r}) before can_acquire() was true: no "
                               "idle slot")
        return weights

    def release(self, slot: int) -> None:
        with self._lock:
            self.table.unpin(slot)

    def tier(self, adapter_id: str) -> str:
        with self._lock:
            if self.is_resident(adapter_id):
                return "device"
            return "host" if adapter_id in self.host else "disk"

    def snapshot(self) -> list[tuple[AdapterSpec, str]]:
        """Every registered adapter with its tier ("device", "host" or "disk")."""
        with self._lock:
            return [(spec, self.tier(spec.adapter_id)) for spec in self.registry.values()]

    def summary(self) -> dict[str, int]:
        with self._lock:
            return {"num_device_slots": self.slots.num_slots,
                    "num_device_slots_in_use": self.table.num_in_use(),
                    "host_capacity": self.host_capacity, "num_host_cached": len(self.host),
                    "num_registered": len(self.registry)}

    def close(self) -> None:
        self._loader.shutdown(wait=False, cancel_futures=True)
