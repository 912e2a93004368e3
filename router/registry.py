"""The router's adapter registry: owner, id, card and content digest of every adapter, kept in
sync with every worker (which validate and hold the weights). Reads no adapter weights itself:
it copies files into its content-addressed store (router/content_holds.py says when a content
goes) and streams them to workers. Adapters are known by owner and id (router/adapter_record.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import grpc

from common.adapter_blobs import BlobStore
from common.adapter_format import CONFIG_FILE, WEIGHTS_FILE
from common.errors import AlreadyExists, EdgeLoraError, NotFound, Unavailable
from edgelora.v1 import types_pb2, worker_pb2
from router.adapter_cards import read_card
from router.adapter_record import SHARED, AdapterRecord, record_name, worker_key
from router.content_holds import ContentHolds
from router.registry_db import RegistryDB, StoredAdapter
from router.workers import WorkerHandle, WorkerPool

log = logging.getLogger(__name__)
SYNC_CONCURRENCY = 16  # RegisterAdapter calls at once when a worker (re)joins
SYNC_ROUNDS = 3  # a sync runs again while registrations change under it, this often at most
PUSH_CHUNK_BYTES = 1 << 20  # well under gRPC's 4 MiB message limit


class RpcError(EdgeLoraError):
    """A worker's refusal, passed on with its own status code."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class AdapterRegistry:
    """Registered adapters; every live worker holds the same set, each id with the same content
    (digest). A worker that (re)joins the pool is synced first: what it lacks or holds with
    other content registered, what was removed meanwhile removed.

    With a RegistryDB every change is on disk before it is acknowledged, and load_state()
    brings them back before any worker is touched; the database is then the whole truth, so a
    worker's adapters it does not hold were really removed. Without one (in memory), a sync
    removes only what this router itself unregistered.

    Changes to one id (register, replace, unregister, a worker's sync of it) run one at a time
    under that id's lock, so every worker ends with the same winner.
    """

    def __init__(self, pool: WorkerPool, register_timeout_s: float = 60.0,
                 db: RegistryDB | None = None, store: BlobStore | None = None) -> None:
        self.pool = pool
        self.store = store  # every adapter's files, pushed to each worker that lacks them
        self.contents = ContentHolds(store, lambda digest: any(
            r.digest == digest for r in self.adapters.values()))
        self.register_timeout_s = register_timeout_s
        self.db = db
        self.adapters: dict[str, AdapterRecord] = {}  # by worker key
        self._requests: dict[str, types_pb2.RegisterAdapterRequest] = {}
        self._pending: Counter[str] = Counter()  # keys being registered
        self._removed: set[str] = set()  # unregistered by this router (in-memory mode)
        self._locks: dict[str, tuple[asyncio.Lock, list[int]]] = {}  # by key: lock, users
        self._generation = 0  # +1 at each change: a sync that saw an older one runs again
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
                digest=stored.digest, kind=stored.kind)
            self._record(forwarded, stored)
        return len(self.adapters)

    @asynccontextmanager
    async def _exclusive(self, key: str) -> AsyncIterator[None]:
        lock, users = self._locks.setdefault(key, (asyncio.Lock(), [0]))
        users[0] += 1
        try:
            async with lock:
                yield
        finally:
            users[0] -= 1
            if not users[0]:
                del self._locks[key]

    async def _register_on(self, worker: WorkerHandle,
                           forwarded: types_pb2.RegisterAdapterRequest
                           ) -> types_pb2.RegisterAdapterResponse:
        """RegisterAdapter on one worker; the adapter's files are pushed there first when the
        worker lacks them (or its copy is corrupt), then registered again."""
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

    def collect_unused(self) -> int:
        """Removes every stored content no registration uses: a crash between a blob's commit
        and its registration's leaves one. Call at start, before any request; -> count."""
        return self.contents.collect_unused({r.digest for r in self.adapters.values()})

    async def _persist(self, forwarded: types_pb2.RegisterAdapterRequest, rank: int,
                       adapter_id: str, owner: str) -> StoredAdapter:
        """Writes the registration durably (off the event loop); -> it with version, times."""
        stored = StoredAdapter(owner, adapter_id, forwarded.path, rank, forwarded.description,
                               list(forwarded.example_prompts), digest=forwarded.digest,
                               kind=forwarded.kind)
        if self.db is not None:
            return await asyncio.to_thread(self.db.put, stored)
        old, now = self.adapters.get(worker_key(owner, adapter_id)), time.time()
        stored.version = old.version + 1 if old else 1
        stored.created_s, stored.updated_s = (old.created_s if old else now), now
        return stored

    async def repair(self, worker: WorkerHandle, key: str) -> bool:
        """Sends `key`'s files to `worker` again (its copy went missing or corrupt: the worker
        answered FAILED_PRECONDITION) and registers them there; -> whether that worked."""
        async with self._exclusive(key):
            request = self._requests.get(key)
            if request is None or not request.digest:
                return False
            try:
                await self._register_on(worker, request)
            except grpc.aio.AioRpcError as exc:
                log.warning("restoring adapter %s on %s: %s", key, worker.name, exc.details())
                return False
        log.info("adapter %s: files sent again to %s (missing or corrupt there)", key,
                 worker.name)
        return True

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
        """Registers `request` (its adapter_id public; its path, if any, already confined) for
        `owner` on every live worker at once (each validates it against its base model), then
        here. A path's files are copied into the store first: workers get them by digest."""
        key = worker_key(owner, request.adapter_id)
        self._pending[key] += 1
        digest = request.digest
        try:
            async with self._exclusive(key):
                if key in self.adapters and not request.replace:
                    raise AlreadyExists(f"adapter {request.adapter_id!r} is already registered; "
                                        "set replace to replace it")
                if not digest and self.store is not None:
                    digest = await self.contents.add(partial(self.store.add_folder,
                                                             Path(request.path)))
                else:
                    self.contents.hold(digest)
                try:
                    forwarded = types_pb2.RegisterAdapterRequest(
                        adapter_id=key, path=request.path, description=request.description,
                        example_prompts=request.example_prompts, digest=digest,
                        kind=request.kind)
                    return await self._register_everywhere(forwarded, request.adapter_id, owner)
                finally:
                    self.contents.unhold(digest)
        finally:
            _decrement(self._pending, key)
            self.contents.drop_if_unused(digest)  # a refused content; kept when registered

    async def _register_everywhere(self, forwarded: types_pb2.RegisterAdapterRequest,
                                   adapter_id: str, owner: str) -> AdapterRecord:
        """On every live worker, then durably, then here; a refusal by any (or a failed write)
        puts the others back as they were: the old content, or nothing."""
        workers = self.pool.workers
        if not workers:
            raise Unavailable(self.pool.unavailable_reason())
        results = await asyncio.gather(
            *(self._register_on(w, forwarded) for w in workers), return_exceptions=True)
        rank, refusal = 0, None
        for worker, result in zip(workers, results, strict=True):
            if not isinstance(result, BaseException):
                rank = result.adapter.rank
            elif isinstance(result, grpc.aio.AioRpcError) and \
                    result.code() is grpc.StatusCode.UNAVAILABLE:  # synced when it rejoins
                self.pool.mark_failed(worker, f"RegisterAdapter: {result.details()}")
            elif isinstance(result, grpc.aio.AioRpcError):
                refusal = refusal or RpcError(result.code(), result.details() or
                                              result.code().name)
            else:  # e.g. the store unreadable while pushing: ours, not the adapter's fault
                log.error("registering %s on %s: %r", forwarded.adapter_id, worker.name, result)
                refusal = refusal or RpcError(grpc.StatusCode.UNAVAILABLE,
                                              f"registering failed on {worker.name}: {result!r}")
        if refusal is None and not rank:
            refusal = RpcError(grpc.StatusCode.UNAVAILABLE, "every worker failed while "
                               "registering; retry when they are back")
        if refusal is None:
            try:
                stored = await self._persist(forwarded, rank, adapter_id, owner)
            except Exception as exc:  # not on disk: not registered, say why
                log.exception("writing registration %s", forwarded.adapter_id)
                refusal = RpcError(grpc.StatusCode.UNAVAILABLE, "the registry could not be "
                                   f"written ({exc}); nothing was registered, retry")
        if refusal is not None:
            await self._undo(forwarded.adapter_id, [
                w for w, r in zip(workers, results, strict=True)
                if not isinstance(r, BaseException)])
            raise refusal
        self._removed.discard(forwarded.adapter_id)
        old = self.adapters.get(forwarded.adapter_id)
        record = self._record(forwarded, stored)
        if old is not None and old.digest != record.digest:
            self.contents.drop_if_unused(old.digest)
        return record

    async def _undo(self, key: str, workers: list[WorkerHandle]) -> None:
        """`workers` took a registration that failed elsewhere: back to what is registered
        here. One that cannot be put back leaves the pool and is synced when it rejoins."""
        old = self._requests.get(key)
        if old is None:
            await self._unregister_on(workers, key)
            return
        results = await asyncio.gather(*(self._register_on(w, old) for w in workers),
                                       return_exceptions=True)
        for worker, result in zip(workers, results, strict=True):
            if isinstance(result, BaseException):
                self.pool.mark_failed(worker, f"restoring adapter {key} failed: {result!r}")

    def _record(self, forwarded: types_pb2.RegisterAdapterRequest,
                stored: StoredAdapter) -> AdapterRecord:
        record = AdapterRecord(stored.adapter_id, forwarded.path, stored.rank,
                               forwarded.description, list(forwarded.example_prompts),
                               stored.owner, stored.version, forwarded.digest, stored.created_s,
                               stored.updated_s, forwarded.kind)
        self.adapters[record.key] = record
        self._requests[record.key] = forwarded
        self._generation += 1
        return record

    async def unregister(self, key: str) -> None:
        """Removes the adapter of worker key `key` here and on every live worker."""
        async with self._exclusive(key):
            record = self.adapters.get(key)
            if record is None:
                raise NotFound(f"adapter {record_name(key)!r} is not registered")
            if self.db is not None:  # durably gone first: a restart never brings it back
                await asyncio.to_thread(self.db.delete, record.owner, record.adapter_id)
            del self.adapters[key]
            self._requests.pop(key, None)
            self._removed.add(key)
            self._generation += 1
            await self._unregister_on(self.pool.workers, key)
            self.contents.drop_if_unused(record.digest)

    async def _unregister_on(self, workers: list[WorkerHandle], adapter_id: str) -> None:
        request = types_pb2.UnregisterAdapterRequest(adapter_id=adapter_id)
        results = await asyncio.gather(*(w.stub.UnregisterAdapter(request, timeout=30)
                                         for w in workers), return_exceptions=True)
        for worker, result in zip(workers, results, strict=True):
            if isinstance(result, grpc.aio.AioRpcError):  # gone there already: nothing to undo
                log.warning("unregister %s on %s: %s", adapter_id, worker.name,
                            result.details())

    async def sync_worker(self, worker: WorkerHandle) -> None:
        """Makes `worker` hold exactly the registered adapters, each with its registered
        content. Registers only what is missing or different: registering again would drop
        the cached weights of the rest. Runs again while registrations changed meanwhile."""
        for _ in range(SYNC_ROUNDS):
            generation = self._generation
            await self._sync_once(worker)
            if generation == self._generation:
                return

    async def _sync_once(self, worker: WorkerHandle) -> None:
        listed = await worker.stub.ListAdapters(types_pb2.ListAdaptersRequest(), timeout=30)
        held = {a.adapter_id: a.digest for a in listed.adapters}
        stale = sorted(key for key, request in self._requests.items()
                       if held.get(key) != request.digest)
        extra = sorted(held.keys() - self._requests.keys())
        limit = asyncio.Semaphore(SYNC_CONCURRENCY)

        async def register_one(key: str) -> None:
            async with limit, self._exclusive(key):
                request = self._requests.get(key)  # now: it may have changed while waiting
                if request is None:
                    return
                try:
                    reply = await self._register_on(worker, request)
                except grpc.aio.AioRpcError as exc:
                    if exc.code() in (grpc.StatusCode.UNAVAILABLE,
                                      grpc.StatusCode.DEADLINE_EXCEEDED):
                        raise
                    log.error("worker %s refuses adapter %s: %s", worker.name, key,
                              exc.details())
                    return
                record = self.adapters.get(key)
                if record is not None and not record.rank:  # deferred at start: now validated
                    record.rank = reply.adapter.rank
                    if self.db is not None:
                        await asyncio.to_thread(self.db.set_rank, record.owner,
                                                record.adapter_id, record.rank)

        async def remove_one(key: str) -> bool:
            async with self._exclusive(key):
                if key in self._requests or key in self._pending or (
                        self.db is None and key not in self._removed):
                    return False  # in memory, a starting router knows nothing: only its own
                await self._unregister_on([worker], key)
                return True

        await asyncio.gather(*(register_one(key) for key in stale))
        removed = [key for key in extra if await remove_one(key)]
        if stale or removed:
            log.info("worker %s synced: %d adapters registered, %d removed", worker.name,
                     len(stale), len(removed))

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
        return [r.info(with_paths, tiers.get(r.key, types_pb2.ADAPTER_TIER_DISK))
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
                    if self.store is not None:
                        request.digest = await self.contents.add(
                            partial(self.store.add_folder, Path(request.path)))
                    try:
                        self._record(request, await self._persist(request, 0,
                                                                  request.adapter_id, SHARED))
                    finally:
                        self.contents.release(request.digest)
            except (EdgeLoraError, OSError) as exc:
                log.error("skipping adapter %s: %s", path, exc)
                continue
            count += 1
        return count


def _decrement(counter: Counter[str], key: str) -> None:
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]
