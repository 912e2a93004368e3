"""The router's adapter registry: ids, paths, descriptions and example prompts, kept in sync with
every worker (which validate and hold the weights). Never reads adapter weights itself."""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from common.adapter_format import CONFIG_FILE
from common.errors import EdgeLoraError, NotFound, Unavailable
from edgelora.v1 import types_pb2, worker_pb2
from router.workers import WorkerHandle, WorkerPool

log = logging.getLogger(__name__)
SYNC_CONCURRENCY = 16  # RegisterAdapter calls at once when a worker (re)joins
CARD_FILE = "card.json"  # optional: {"description": ..., "example_prompts": [...]}


@dataclass
class AdapterRecord:
    adapter_id: str
    path: str
    rank: int
    description: str = ""
    example_prompts: list[str] = field(default_factory=list)


class RpcError(EdgeLoraError):
    """A worker's refusal, passed on with its own status code."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class AdapterRegistry:
    """Registered adapters; every live worker holds the same set. A worker that (re)joins the
    pool is synced first: missing adapters registered, ones unregistered meanwhile removed."""

    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool
        self.adapters: dict[str, AdapterRecord] = {}
        self._requests: dict[str, types_pb2.RegisterAdapterRequest] = {}
        self._pending: set[str] = set()  # being registered: on some workers, not yet here
        pool.on_join = self.sync_worker
        pool.expected_num_registered = lambda: len(self.adapters)

    async def register(self, request: types_pb2.RegisterAdapterRequest) -> AdapterRecord:
        """Registers on every live worker at once (each validates against its base model),
        then here; a refusal by any undoes it on the others."""
        workers = self.pool.workers
        if not workers:
            raise Unavailable(self.pool.unavailable_reason())
        self._pending.add(request.adapter_id)
        try:
            results = await asyncio.gather(
                *(w.stub.RegisterAdapter(request, timeout=60) for w in workers),
                return_exceptions=True)
        finally:
            self._pending.discard(request.adapter_id)
        rank, refusal = 0, None
        for worker, result in zip(workers, results, strict=True):
            if not isinstance(result, grpc.aio.AioRpcError):
                rank = result.adapter.rank
            elif result.code() is grpc.StatusCode.UNAVAILABLE:  # synced when it rejoins
                self.pool.mark_failed(worker, f"RegisterAdapter: {result.details()}")
            else:
                refusal = refusal or RpcError(result.code(), result.details() or
                                              result.code().name)
        if refusal is None and not rank:
            refusal = RpcError(grpc.StatusCode.UNAVAILABLE, "every worker failed while "
                               "registering; retry when they are back")
        if refusal is not None:
            if request.adapter_id not in self.adapters:  # a failed re-register keeps the old
                await self._unregister_on(self.pool.workers, request.adapter_id)
            raise refusal
        return self._record(request, rank)

    def _record(self, request: types_pb2.RegisterAdapterRequest, rank: int) -> AdapterRecord:
        record = AdapterRecord(request.adapter_id, request.path, rank, request.description,
                               list(request.example_prompts))
        self.adapters[record.adapter_id] = record
        self._requests[record.adapter_id] = request
        return record

    async def unregister(self, adapter_id: str) -> None:
        if self.adapters.pop(adapter_id, None) is None:
            raise NotFound(f"adapter {adapter_id!r} is not registered")
        self._requests.pop(adapter_id, None)
        await self._unregister_on(self.pool.workers, adapter_id)

    async def _unregister_on(self, workers: list[WorkerHandle], adapter_id: str) -> None:
        request = types_pb2.UnregisterAdapterRequest(adapter_id=adapter_id)
        results = await asyncio.gather(*(w.stub.UnregisterAdapter(request, timeout=30)
                                         for w in workers), return_exceptions=True)
        for worker, result in zip(workers, results, strict=True):
            if isinstance(result, grpc.aio.AioRpcError):  # gone there already: nothing to undo
                log.warning("unregister %s on %s: %s", adapter_id, worker.name,
                            result.details())

    async def sync_worker(self, worker: WorkerHandle) -> None:
        """Makes `worker` hold exactly the registered adapters. Registers only the missing ones:
        registering again would drop the cached weights of those it has."""
        listed = await worker.stub.ListAdapters(types_pb2.ListAdaptersRequest(), timeout=30)
        held = {a.adapter_id for a in listed.adapters}
        wanted = dict(self._requests)
        limit = asyncio.Semaphore(SYNC_CONCURRENCY)

        async def register_one(adapter_id: str) -> None:
            async with limit:
                try:
                    reply = await worker.stub.RegisterAdapter(wanted[adapter_id], timeout=60)
                except grpc.aio.AioRpcError as exc:
                    if exc.code() in (grpc.StatusCode.UNAVAILABLE,
                                      grpc.StatusCode.DEADLINE_EXCEEDED):
                        raise
                    log.error("worker %s refuses adapter %s: %s", worker.name, adapter_id,
                              exc.details())
                    return
            record = self.adapters.get(adapter_id)
            if record is not None and not record.rank:  # deferred at start: now validated
                record.rank = reply.adapter.rank

        await asyncio.gather(*(register_one(a) for a in sorted(set(wanted) - held)))
        extra = held - set(wanted) - self._pending
        for adapter_id in sorted(extra):
            await self._unregister_on([worker], adapter_id)
        if wanted.keys() - held or extra:
            log.info("worker %s synced: %d adapters registered, %d removed", worker.name,
                     len(wanted.keys() - held), len(extra))

    async def list(self) -> list[types_pb2.AdapterInfo]:
        """Registered adapters with the best tier any worker holds them in."""
        tiers: dict[str, int] = {}
        workers = self.pool.workers
        infos = await asyncio.gather(*(w.stub.Info(worker_pb2.InfoRequest(), timeout=10)
                                       for w in workers), return_exceptions=True)
        for info in infos:
            if isinstance(info, BaseException):
                continue  # a worker that is down holds nothing
            for held in info.adapters:
                tiers[held.adapter_id] = max(tiers.get(held.adapter_id, 0), held.tier)
        return [types_pb2.AdapterInfo(
            adapter_id=r.adapter_id, rank=r.rank, path=r.path, description=r.description,
            tier=tiers.get(r.adapter_id, types_pb2.ADAPTER_TIER_DISK))
            for r in self.adapters.values()]

    async def register_dir(self, root: Path) -> int:
        """Registers every PEFT adapter directory under `root` (id = its name); -> count.
        With no live worker yet they are recorded and registered on each worker as it joins."""
        count = 0
        for path in sorted(p.parent for p in root.glob(f"*/{CONFIG_FILE}")):
            card_file = path / CARD_FILE
            card = json.loads(card_file.read_text()) if card_file.is_file() else {}
            request = types_pb2.RegisterAdapterRequest(
                adapter_id=card.get("adapter_id", path.name), path=str(path.resolve()),
                description=card.get("description", ""),
                example_prompts=card.get("example_prompts", []))
            if self.pool.workers:
                await self.register(request)
            else:  # workers may start after the router (compose, Kubernetes): sync on join
                self._record(request, rank=0)
            count += 1
        return count
