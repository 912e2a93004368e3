"""The router's adapter registry: owner, id, path, description and example prompts, kept in sync
with every worker (which validate and hold the weights). Never reads adapter weights itself.

Every adapter has an owner: a tenant, or SHARED (registered by an admin for every tenant). A
worker knows an adapter by its `worker_key` ("tenant:id", or the plain id for a shared one), so
the same id in two tenants is two adapters that can never collide in a worker's caches.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from common.adapter_blobs import BlobStore

from common.adapter_format import CONFIG_FILE, WEIGHTS_FILE
from common.errors import EdgeLoraError, InvalidArgument, NotFound, Unavailable
from edgelora.v1 import types_pb2, worker_pb2
from router.registry_db import RegistryDB, StoredAdapter
from router.workers import WorkerHandle, WorkerPool

log = logging.getLogger(__name__)
SYNC_CONCURRENCY = 16  # RegisterAdapter calls at once when a worker (re)joins
PUSH_CHUNK_BYTES = 1 << 20  # well under gRPC's 4 MiB message limit
CARD_FILE = "card.json"  # optional: {"description": ..., "example_prompts": [...]}
MAX_CARD_FILE_BYTES = 64 << 10
SHARED = ""  # the owner of shared adapters


def worker_key(owner: str, adapter_id: str) -> str:
    """How workers know the adapter `adapter_id` of `owner`. ':' is in no public id."""
    return f"{owner}:{adapter_id}" if owner else adapter_id


@dataclass
class AdapterRecord:
    adapter_id: str  # the public id, unique within its owner
    path: str
    rank: int
    description: str = ""
    example_prompts: list[str] = field(default_factory=list)
    owner: str = SHARED
    version: int = 1  # +1 at each replacement
    digest: str = ""  # an uploaded adapter's content in the store ("" = registered by path)

    @property
    def key(self) -> str:
        return worker_key(self.owner, self.adapter_id)

    @property
    def is_shared(self) -> bool:
        return self.owner == SHARED


class RpcError(EdgeLoraError):
    """A worker's refusal, passed on with its own status code."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class AdapterRegistry:
    """Registered adapters; every live worker holds the same set. A worker that (re)joins the
    pool is synced first: missing adapters registered, ones unregistered meanwhile removed.

    With a RegistryDB every change is on disk before it is acknowledged, and load_state()
    brings them back before any worker is touched; the database is then the whole truth, so a
    worker's adapters it does not hold were really removed. Without one (in memory), a sync
    removes only what this router itself unregistered.
    """

    def __init__(self, pool: WorkerPool, register_timeout_s: float = 60.0,
                 db: RegistryDB | None = None, store: BlobStore | None = None) -> None:
        self.pool = pool
        self.store = store  # uploaded adapters' files, pushed to each worker that lacks them
        self.register_timeout_s = register_timeout_s
        self.db = db
        self.adapters: dict[str, AdapterRecord] = {}  # by worker key
        self._requests: dict[str, types_pb2.RegisterAdapterRequest] = {}
        self._pending: set[str] = set()  # being registered: on some workers, not yet here
        self._removed: set[str] = set()  # unregistered by this router (in-memory mode)
        pool.on_join = self.sync_worker
        pool.expected_num_registered = lambda: len(self.adapters)

    def load_state(self) -> int:
        """The registrations the database holds (call before the pool starts); -> count."""
        if self.db is None:
            return 0
        for stored in self.db.load():
            forwarded = types_pb2.RegisterAdapterRequest(
                adapter_id=worker_key(stored.owner, stored.adapter_id), path=stored.path,
                description=stored.description, example_prompts=stored.example_prompts,
                digest=stored.digest)
            self._record(forwarded, stored.rank, stored.adapter_id, stored.owner,
                         stored.version)
        return len(self.adapters)

    async def _register_on(self, worker: WorkerHandle,
                           forwarded: types_pb2.RegisterAdapterRequest
                           ) -> types_pb2.RegisterAdapterResponse:
        """RegisterAdapter on one worker; an uploaded adapter's files are pushed there first
        when the worker lacks them (or its copy is corrupt), then registered again."""
        try:
            return await worker.stub.RegisterAdapter(forwarded, timeout=self.register_timeout_s)
        except grpc.aio.AioRpcError as exc:
            if not (forwarded.digest and self.store is not None
                    and exc.code() is grpc.StatusCode.FAILED_PRECONDITION):
                raise
        await worker.stub.PutAdapter(self._chunks(forwarded.digest),
                                     timeout=self.register_timeout_s)
        return await worker.stub.RegisterAdapter(forwarded, timeout=self.register_timeout_s)

    async def _chunks(self, digest: str) -> AsyncIterator[worker_pb2.PutAdapterRequest]:
        yield worker_pb2.PutAdapterRequest(digest=digest)
        folder = self.store.path(digest)
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            with open(folder / name, "rb") as f:  # our own store: read a chunk at a time
                while chunk := await asyncio.to_thread(f.read, PUSH_CHUNK_BYTES):
                    yield worker_pb2.PutAdapterRequest(chunk=types_pb2.AdapterFileChunk(
                        file_name=name, data=chunk))

    def drop_blob_if_unused(self, digest: str) -> None:
        """Removes an uploaded content from the store once no registration uses it."""
        if digest and self.store is not None and not any(
                r.digest == digest for r in self.adapters.values()) and not any(
                r.digest == digest for r in self._requests.values()):
            self.store.remove(digest)

    async def _persist(self, forwarded: types_pb2.RegisterAdapterRequest, rank: int,
                       adapter_id: str, owner: str) -> int:
        """Writes the registration durably (off the event loop); -> its version."""
        if self.db is None:
            old = self.adapters.get(worker_key(owner, adapter_id))
            return old.version + 1 if old else 1
        stored = await asyncio.to_thread(self.db.put, StoredAdapter(
            owner, adapter_id, forwarded.path, rank, forwarded.description,
            list(forwarded.example_prompts), digest=forwarded.digest))
        return stored.version

    # -- what a tenant sees --
    def find(self, tenant: str, adapter_id: str) -> AdapterRecord | None:
        """The adapter `adapter_id` as `tenant` sees it: its own, else a shared one."""
        return (self.adapters.get(worker_key(tenant, adapter_id))
                or self.adapters.get(worker_key(SHARED, adapter_id)))

    def visible(self, tenant: str) -> dict[str, AdapterRecord]:
        """Worker key -> record of every adapter `tenant` may use (its own shadow shared ones
        of the same id)."""
        own = {r.adapter_id for r in self.adapters.values() if r.owner == tenant}
        return {key: r for key, r in self.adapters.items()
                if r.owner == tenant or (r.is_shared and r.adapter_id not in own)}

    def count(self, owner: str) -> int:
        """Adapters `owner` holds, counting registrations under way."""
        return (sum(1 for r in self.adapters.values() if r.owner == owner)
                + sum(1 for key in self._pending
                      if key.partition(":")[0] == owner and key not in self.adapters))

    def is_pending(self, key: str) -> bool:
        return key in self._pending

    async def register(self, request: types_pb2.RegisterAdapterRequest,
                       owner: str = SHARED) -> AdapterRecord:
        """Registers `request` (its adapter_id public, its path already checked) for `owner` on
        every live worker at once (each validates it against its base model), then here; a
        refusal by any undoes it on the others."""
        workers = self.pool.workers
        if not workers:
            raise Unavailable(self.pool.unavailable_reason())
        key = worker_key(owner, request.adapter_id)
        forwarded = types_pb2.RegisterAdapterRequest(
            adapter_id=key, path=request.path, description=request.description,
            example_prompts=request.example_prompts, digest=request.digest)
        self._pending.add(key)
        try:
            results = await asyncio.gather(
                *(self._register_on(w, forwarded) for w in workers), return_exceptions=True)
        finally:
            self._pending.discard(key)
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
        if refusal is None:
            try:
                version = await self._persist(forwarded, rank, request.adapter_id, owner)
            except Exception as exc:  # not on disk: not registered, say why
                log.exception("writing registration %s", key)
                refusal = RpcError(grpc.StatusCode.UNAVAILABLE, "the registry could not be "
                                   f"written ({exc}); nothing was registered, retry")
        if refusal is not None:
            if key not in self.adapters:  # a failed re-register keeps the old
                await self._unregister_on(self.pool.workers, key)
            raise refusal
        self._removed.discard(key)
        old = self.adapters.get(key)
        record = self._record(forwarded, rank, request.adapter_id, owner, version)
        if old is not None and old.digest != record.digest:
            self.drop_blob_if_unused(old.digest)
        return record

    def _record(self, forwarded: types_pb2.RegisterAdapterRequest, rank: int, adapter_id: str,
                owner: str, version: int = 1) -> AdapterRecord:
        record = AdapterRecord(adapter_id, forwarded.path, rank, forwarded.description,
                               list(forwarded.example_prompts), owner, version, forwarded.digest)
        self.adapters[record.key] = record
        self._requests[record.key] = forwarded
        return record

    async def unregister(self, key: str) -> None:
        """Removes the adapter of worker key `key` here and on every live worker."""
        record = self.adapters.get(key)
        if record is None:
            raise NotFound(f"adapter {record_name(key)!r} is not registered")
        if self.db is not None:  # durably gone first: a restart never brings it back
            await asyncio.to_thread(self.db.delete, record.owner, record.adapter_id)
        del self.adapters[key]
        self._requests.pop(key, None)
        self._removed.add(key)
        await self._unregister_on(self.pool.workers, key)
        self.drop_blob_if_unused(record.digest)

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
                    reply = await self._register_on(worker, wanted[adapter_id])
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
                if self.db is not None:
                    await asyncio.to_thread(self.db.set_rank, record.owner, record.adapter_id,
                                            record.rank)

        await asyncio.gather(*(register_one(a) for a in sorted(set(wanted) - held)))
        extra = held - set(wanted) - self._pending
        if self.db is None:  # in memory, a starting router knows nothing: remove only its own
            extra &= self._removed
        for adapter_id in sorted(extra):
            await self._unregister_on([worker], adapter_id)
        if wanted.keys() - held or extra:
            log.info("worker %s synced: %d adapters registered, %d removed", worker.name,
                     len(wanted.keys() - held), len(extra))

    async def list(self, records: list[AdapterRecord],
                   with_paths: bool = False) -> list[types_pb2.AdapterInfo]:
        """`records` with the best tier any worker holds them in; paths only when asked (admins:
        a path says where another tenant's files live)."""
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
            adapter_id=r.adapter_id, rank=r.rank, path=r.path if with_paths else "",
            description=r.description, tenant=r.owner, shared=r.is_shared, digest=r.digest,
            tier=tiers.get(r.key, types_pb2.ADAPTER_TIER_DISK))
            for r in records]

    async def register_dir(self, root: Path, check: Callable[[types_pb2.RegisterAdapterRequest],
                                                             None] = lambda request: None) -> int:
        """Registers every PEFT adapter directory under `root` (id = its name) as shared;
        -> count. A bad entry (card, files, refused by a worker) is skipped with one log line.
        With no live worker yet they are recorded and registered on each worker as it joins."""
        count = 0
        for path in sorted(p.parent for p in root.glob(f"*/{CONFIG_FILE}")):
            try:
                request = read_card(path)
                if worker_key(SHARED, request.adapter_id) in self.adapters:
                    count += 1  # held already (the database): merged, never replaced or dropped
                    continue
                check(request)
                if self.pool.workers:
                    await self.register(request)
                else:  # workers may start after the router (compose, Kubernetes): sync on join
                    version = await self._persist(request, 0, request.adapter_id, SHARED)
                    self._record(request, 0, request.adapter_id, SHARED, version)
            except (EdgeLoraError, OSError) as exc:
                log.error("skipping adapter %s: %s", path, exc)
                continue
            count += 1
        return count


def read_card(path: Path) -> types_pb2.RegisterAdapterRequest:
    """The registration of the adapter directory `path`: id, description and example prompts
    from its optional card.json (id = the directory's name unless the card says otherwise)."""
    card_file = path / CARD_FILE
    card: object = {}
    if card_file.is_file():
        if card_file.stat().st_size > MAX_CARD_FILE_BYTES:
            raise InvalidArgument(f"{card_file} is over {MAX_CARD_FILE_BYTES >> 10} KiB")
        try:
            card = json.loads(card_file.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidArgument(f"{card_file} is not valid JSON ({exc})") from exc
    examples = card.get("example_prompts", []) if isinstance(card, dict) else None
    if not isinstance(card, dict) or not isinstance(card.get("adapter_id", ""), str) or \
            not isinstance(card.get("description", ""), str) or \
            not isinstance(examples, list) or not all(isinstance(e, str) for e in examples):
        raise InvalidArgument(f"{card_file}: expected {{\"adapter_id\": str, \"description\": "
                              "str, \"example_prompts\": [str, ...]} (each optional)")
    return types_pb2.RegisterAdapterRequest(
        adapter_id=card.get("adapter_id", path.name), path=str(path.resolve()),
        description=card.get("description", ""), example_prompts=examples)


def record_name(key: str) -> str:
    """The public id inside a worker key."""
    return key.partition(":")[2] or key
