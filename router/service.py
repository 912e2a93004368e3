"""The public Router servicer: authenticates the caller, resolves the adapter within what that
tenant may use, forwards to a worker and relays its stream.

Never tokenizes or runs a model; worker errors reach the client with their status and message.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc

from common.errors import EdgeLoraError, InvalidArgument, PermissionDenied
from common.internal_auth import bearer_token
from common.limits import AUTO, check_adapter_id, check_card, check_generate
from edgelora.v1 import router_pb2, router_pb2_grpc, types_pb2
from router.adapter_cards import CARD_FILE, parse_card
from router.adapter_paths import confine
from router.config import RouterConfig
from router.embedder import prompt_text
from router.ownership import check_replace, listed, not_found, registration_owner, removal_target
from router.registry import AdapterRegistry, record_name
from router.selector import AdapterSelector, Selection
from router.tenants import Caller, KeyRing, TenantLimits
from router.workers import WorkerHandle, WorkerPool

log = logging.getLogger(__name__)


class RouterService(router_pb2_grpc.RouterServicer):
    def __init__(self, pool: WorkerPool, registry: AdapterRegistry,
                 selector: AdapterSelector | None = None, config: RouterConfig | None = None,
                 keys: KeyRing | None = None) -> None:
        self.pool = pool
        self.registry = registry
        self.selector = selector  # None: "auto" is the base model
        self.config = config or RouterConfig()
        self.keys = keys or KeyRing()

    async def _caller(self, context: grpc.aio.ServicerContext) -> Caller:
        try:
            return self.keys.authenticate(bearer_token(context.invocation_metadata()))
        except EdgeLoraError as exc:
            await context.abort(exc.code, str(exc))

    def _worker_metadata(self, caller: Caller) -> tuple[tuple[str, str], ...]:
        """Who asks, and that tenant's share of a worker, for its fair admission there."""
        limits = caller.limits
        running = limits.max_running if limits.max_running is not None \
            else self.config.tenant_max_running
        queued = limits.max_queued if limits.max_queued is not None \
            else self.config.tenant_max_queued
        return (("edgelora-tenant", caller.tenant), ("edgelora-max-running", str(running)),
                ("edgelora-max-queued", str(queued)))

    async def _select(self, caller: Caller, text: str) -> Selection:
        """The selector's decision among the adapters `caller` may use (worker keys)."""
        visible = self.registry.visible(caller.tenant)
        return await self.selector.select(text, self.registry.adapters,
                                          self.pool.resident_adapters(), candidates=visible)

    async def _resolve_adapter(self, request: types_pb2.GenerateRequest, caller: Caller
                               ) -> types_pb2.GenerateRequest:
        """The request as a worker takes it: adapter_id is the worker key ("" = base)."""
        check_generate(request, self.config)
        forwarded = types_pb2.GenerateRequest()
        forwarded.CopyFrom(request)
        if request.adapter_id == AUTO:
            forwarded.adapter_id = ""  # no selector, or it failed: the base model
            if self.selector is not None:
                try:
                    selection = await self._select(
                        caller, prompt_text(request.prompt, request.messages))
                    forwarded.adapter_id = selection.adapter_id
                    log.debug("auto -> %r: %s", selection.adapter_id, selection.reason)
                except Exception as exc:  # selection never fails a generation
                    log.warning("adapter selection failed, 'auto' uses the base model: %r", exc)
        elif request.adapter_id:
            check_adapter_id(request.adapter_id)
            record = self.registry.find(caller.tenant, request.adapter_id)
            if record is None:
                raise not_found(request.adapter_id)
            forwarded.adapter_id = record.key
        return forwarded

    async def GenerateStream(self, request: types_pb2.GenerateRequest,
                             context: grpc.aio.ServicerContext
                             ) -> AsyncIterator[types_pb2.GenerateResponse]:
        caller = await self._caller(context)
        try:
            forwarded = await self._resolve_adapter(request, caller)
        except EdgeLoraError as exc:
            await context.abort(exc.code, str(exc))
        public_id = record_name(forwarded.adapter_id)
        metadata = self._worker_metadata(caller)
        tried: list[str] = []
        resynced: set[str] = set()
        while True:  # another try only while nothing has reached the client
            try:
                worker = self.pool.pick(forwarded.adapter_id, exclude=tried)
            except EdgeLoraError as exc:
                await context.abort(exc.code, str(exc))
            has_started = False
            with self.pool.lease(worker):
                call = worker.stub.Generate(forwarded, metadata=metadata)
                try:
                    async for response in call:
                        has_started = True
                        response.adapter_id = public_id  # never the worker key
                        yield response
                    return
                except grpc.aio.AioRpcError as exc:
                    if exc.code() is grpc.StatusCode.UNAVAILABLE:
                        self.pool.mark_failed(worker, f"Generate: {exc.details()}")
                    if has_started or not await self._can_retry(exc, worker, forwarded,
                                                                tried, resynced):
                        await context.abort(exc.code(), self._describe(exc, worker.name))
                finally:
                    call.cancel()  # no-op when done; frees the worker's sequence if the client left

    async def _can_retry(self, exc: grpc.aio.AioRpcError, worker: WorkerHandle,
                         request: types_pb2.GenerateRequest, tried: list[str],
                         resynced: set[str]) -> bool:
        """Handles a worker's failure before the first chunk; True when worth another try.
        UNAVAILABLE: another worker is tried. NOT_FOUND for an adapter
        registered here: the worker restarted between two health polls; re-sync it once.
        FAILED_PRECONDITION: the worker's copy of the files went missing or corrupt (a flipped
        byte, its cache's bound); they are sent again, once."""
        if exc.code() is grpc.StatusCode.UNAVAILABLE:  # taken out of the pool by the caller
            log.info("worker %s failed before the first token; retrying elsewhere", worker.name)
            tried.append(worker.address)
            return True
        if worker.address in resynced or request.adapter_id not in self.registry.adapters:
            return False
        if exc.code() is grpc.StatusCode.NOT_FOUND:
            resynced.add(worker.address)
            try:
                await self.registry.sync_worker(worker)
            except grpc.aio.AioRpcError:
                return False
            return True
        if exc.code() is grpc.StatusCode.FAILED_PRECONDITION:
            resynced.add(worker.address)
            return await self.registry.repair(worker, request.adapter_id)
        return False

    async def Generate(self, request: types_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> types_pb2.GenerateResponse:
        whole = types_pb2.GenerateResponse()
        texts = []
        async for chunk in self.GenerateStream(request, context):
            texts.append(chunk.text)
            whole.token_ids.extend(chunk.token_ids)
            whole.adapter_id, whole.finish_reason = chunk.adapter_id, chunk.finish_reason
            whole.usage.CopyFrom(chunk.usage)
        whole.text = "".join(texts)
        return whole

    @staticmethod
    def _describe(exc: grpc.aio.AioRpcError, address: str) -> str:
        if exc.code() is grpc.StatusCode.UNAVAILABLE:
            return (f"worker {address} became unavailable while streaming this request "
                    f"({exc.details()}); the tokens already sent stand, retry for the rest")
        return exc.details() or exc.code().name

    async def ListAdapters(self, request: types_pb2.ListAdaptersRequest,
                           context: grpc.aio.ServicerContext) -> types_pb2.ListAdaptersResponse:
        caller = await self._caller(context)
        records = listed(caller, self.registry)
        return types_pb2.ListAdaptersResponse(
            adapters=await self.registry.list(records, with_paths=caller.is_admin))

    async def RegisterAdapter(self, request: types_pb2.RegisterAdapterRequest,
                              context: grpc.aio.ServicerContext
                              ) -> types_pb2.RegisterAdapterResponse:
        caller = await self._caller(context)
        try:
            record = await self._register(caller, request)
        except EdgeLoraError as exc:
            await context.abort(exc.code, str(exc))
        return self._registered(caller, record)

    @staticmethod
    def _registered(caller: Caller, record) -> types_pb2.RegisterAdapterResponse:
        log.info("%s registered adapter %r for %s", caller.tenant or "the open tenant",
                 record.adapter_id, record.owner or "every tenant (shared)")
        return types_pb2.RegisterAdapterResponse(adapter=record.info(caller.is_admin))

    async def UploadAdapter(self, requests: AsyncIterator[router_pb2.UploadAdapterRequest],
                            context: grpc.aio.ServicerContext
                            ) -> types_pb2.RegisterAdapterResponse:
        caller = await self._caller(context)
        try:
            record = await self._upload(caller, requests)
        except EdgeLoraError as exc:
            await context.abort(exc.code, str(exc))
        return self._registered(caller, record)

    async def _upload(self, caller: Caller,
                      requests: AsyncIterator[router_pb2.UploadAdapterRequest]):
        """Header checks first; the files go to a temporary blob (sizes checked as they come)
        that is kept only once every worker validated and registered it."""
        first = await anext(aiter(requests), None)
        if first is None or first.WhichOneof("part") != "header":
            raise InvalidArgument("UploadAdapter starts with a header message")
        header = first.header
        request = types_pb2.RegisterAdapterRequest(
            adapter_id=header.adapter_id, description=header.description,
            example_prompts=header.example_prompts, replace=header.replace,
            tenant=header.tenant, shared=header.shared)
        check_adapter_id(request.adapter_id)
        owner = registration_owner(caller, request)
        self._check_card_and_limits(caller, owner, request)
        with self.registry.store.writer() as writer:
            async for message in requests:
                if message.WhichOneof("part") != "chunk":
                    raise InvalidArgument("after the header, UploadAdapter takes file chunks")
                await asyncio.to_thread(writer.write, message.chunk.file_name,
                                        message.chunk.data)
            request.digest = await self.registry.add_content(writer.commit)  # held till done
            card = writer.card
        try:
            if card is not None and not request.description and not request.example_prompts:
                from_card = parse_card(card, f"the upload's {CARD_FILE}")
                request.description = from_card.get("description", "")
                request.example_prompts.extend(from_card.get("example_prompts", []))
                check_card(request.description, list(request.example_prompts),
                           self.config.max_card_bytes, self.config.max_example_prompts)
            return await self.registry.register(request, owner)
        finally:
            self.registry.release(request.digest)  # the blob goes unless registered

    def _check_card_and_limits(self, caller: Caller, owner: str,
                               request: types_pb2.RegisterAdapterRequest) -> None:
        config = self.config
        check_card(request.description, list(request.example_prompts), config.max_card_bytes,
                   config.max_example_prompts)
        # the owner's own limit, also when an admin registers on its behalf
        limit = self.keys.tenants().get(owner, caller.limits if owner == caller.tenant
                                        else TenantLimits()).max_adapters
        check_replace(self.registry, owner, request,
                      limit if limit is not None else config.tenant_max_adapters)

    async def _register(self, caller: Caller, request: types_pb2.RegisterAdapterRequest):
        config = self.config
        check_adapter_id(request.adapter_id)
        owner = registration_owner(caller, request)
        if not caller.is_admin:
            raise PermissionDenied("registering by path is for admin keys (the files must lie "
                                   "under the server's --adapter-root); ask an admin to "
                                   "register it for your tenant")
        if not self.keys.is_open and not config.adapter_root:
            raise PermissionDenied("this server takes no registration by path: it runs with "
                                   "--api-keys but without --adapter-root")
        self._check_card_and_limits(caller, owner, request)
        checked = types_pb2.RegisterAdapterRequest()
        checked.CopyFrom(request)
        checked.path = confine(request.path, config.adapter_root, config.max_adapter_bytes)
        return await self.registry.register(checked, owner)

    async def UnregisterAdapter(self, request: types_pb2.UnregisterAdapterRequest,
                                context: grpc.aio.ServicerContext
                                ) -> types_pb2.UnregisterAdapterResponse:
        caller = await self._caller(context)
        try:
            check_adapter_id(request.adapter_id)
            record = removal_target(caller, request, self.registry)
            await self.registry.unregister(record.key)
        except EdgeLoraError as exc:
            await context.abort(exc.code, str(exc))
        log.info("%s removed adapter %r of %s", caller.tenant or "the open tenant",
                 record.adapter_id, record.owner or "every tenant (shared)")
        return types_pb2.UnregisterAdapterResponse()

    async def SelectAdapter(self, request: router_pb2.SelectAdapterRequest,
                            context: grpc.aio.ServicerContext) -> router_pb2.SelectAdapterResponse:
        caller = await self._caller(context)
        try:
            if not request.prompt and not request.messages:
                raise InvalidArgument("SelectAdapter needs a prompt or messages")
            check_generate(types_pb2.GenerateRequest(prompt=request.prompt,
                                                     messages=request.messages), self.config)
        except EdgeLoraError as exc:
            await context.abort(exc.code, str(exc))
        if self.selector is None:
            return router_pb2.SelectAdapterResponse(
                selected_adapter_id="", reason="this router runs without the adaptive selector: "
                "'auto' uses the base model")
        try:
            selection = await self._select(caller, prompt_text(request.prompt, request.messages))
        except Exception as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"the adapter selector failed: {exc}")
        ranking = selection.ranking[:request.top_k] if request.top_k else selection.ranking
        return router_pb2.SelectAdapterResponse(
            ranking=[router_pb2.AdapterScore(adapter_id=record_name(a), score=c)
                     for a, c in ranking],
            selected_adapter_id=record_name(selection.adapter_id),
            reason=_public_reason(selection))


def _public_reason(selection: Selection) -> str:
    """The selector's reason with worker keys shown as the ids the caller knows."""
    reason = selection.reason
    for key, _ in selection.ranking:
        if ":" in key:
            reason = reason.replace(repr(key), repr(record_name(key)))
    return reason
