"""The public Router servicer: resolves the adapter, forwards to a worker and relays its stream.

Never tokenizes or runs a model; worker errors reach the client with their status and message.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc

from common.errors import EdgeLoraError
from edgelora.v1 import router_pb2, router_pb2_grpc, types_pb2
from router.embedder import prompt_text
from router.registry import AdapterRegistry
from router.selector import AdapterSelector
from router.workers import WorkerHandle, WorkerPool

log = logging.getLogger(__name__)
AUTO = "auto"


class RouterService(router_pb2_grpc.RouterServicer):
    def __init__(self, pool: WorkerPool, registry: AdapterRegistry,
                 selector: AdapterSelector | None = None) -> None:
        self.pool = pool
        self.registry = registry
        self.selector = selector  # None: "auto" is the base model

    async def _resolve_adapter(self, request: types_pb2.GenerateRequest,
                               context: grpc.aio.ServicerContext) -> types_pb2.GenerateRequest:
        if request.adapter_id == AUTO:
            forwarded = types_pb2.GenerateRequest()
            forwarded.CopyFrom(request)
            forwarded.adapter_id = ""  # no selector, or it failed: the base model
            if self.selector is not None:
                try:
                    selection = await self.selector.select(
                        prompt_text(request.prompt, request.messages), self.registry.adapters,
                        self.pool.resident_adapters())
                    forwarded.adapter_id = selection.adapter_id
                    log.debug("auto -> %r: %s", selection.adapter_id, selection.reason)
                except Exception as exc:  # selection never fails a generation
                    log.warning("adapter selection failed, 'auto' uses the base model: %r", exc)
            return forwarded
        if request.adapter_id and request.adapter_id not in self.registry.adapters:
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"adapter {request.adapter_id!r} is not registered "
                                "(ListAdapters shows the registered ones)")
        return request

    async def GenerateStream(self, request: types_pb2.GenerateRequest,
                             context: grpc.aio.ServicerContext
                             ) -> AsyncIterator[types_pb2.GenerateResponse]:
        forwarded = await self._resolve_adapter(request, context)
        tried: list[str] = []
        resynced: set[str] = set()
        while True:  # another try only while nothing has reached the client
            try:
                worker = self.pool.pick(forwarded.adapter_id, exclude=tried)
            except EdgeLoraError as exc:
                await context.abort(exc.code, str(exc))
            has_started = False
            with self.pool.lease(worker):
                call = worker.stub.Generate(forwarded)
                try:
                    async for response in call:
                        has_started = True
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
        registered here: the worker restarted between two health polls; re-sync it once."""
        if exc.code() is grpc.StatusCode.UNAVAILABLE:  # taken out of the pool by the caller
            log.info("worker %s failed before the first token; retrying elsewhere", worker.name)
            tried.append(worker.address)
            return True
        if (exc.code() is grpc.StatusCode.NOT_FOUND and worker.address not in resynced
                and request.adapter_id in self.registry.adapters):
            resynced.add(worker.address)
            try:
                await self.registry.sync_worker(worker)
            except grpc.aio.AioRpcError:
                return False
            return True
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
        return types_pb2.ListAdaptersResponse(adapters=await self.registry.list())

    async def RegisterAdapter(self, request: types_pb2.RegisterAdapterRequest,
                              context: grpc.aio.ServicerContext
                              ) -> types_pb2.RegisterAdapterResponse:
        try:
            record = await self.registry.register(request)
        except EdgeLoraError as exc:
            await context.abort(exc.code, str(exc))
        return types_pb2.RegisterAdapterResponse(adapter=types_pb2.AdapterInfo(
            adapter_id=record.adapter_id, rank=record.rank, path=record.path,
            description=record.description, tier=types_pb2.ADAPTER_TIER_DISK))

    async def UnregisterAdapter(self, request: types_pb2.UnregisterAdapterRequest,
                                context: grpc.aio.ServicerContext
                                ) -> types_pb2.UnregisterAdapterResponse:
        try:
            await self.registry.unregister(request.adapter_id)
        except EdgeLoraError as exc:
            await context.abort(exc.code, str(exc))
        return types_pb2.UnregisterAdapterResponse()

    async def SelectAdapter(self, request: router_pb2.SelectAdapterRequest,
                            context: grpc.aio.ServicerContext) -> router_pb2.SelectAdapterResponse:
        if not request.prompt and not request.messages:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "SelectAdapter needs a prompt or messages")
        if self.selector is None:
            return router_pb2.SelectAdapterResponse(
                selected_adapter_id="", reason="this router runs without the adaptive selector: "
                "'auto' uses the base model")
        try:
            selection = await self.selector.select(
                prompt_text(request.prompt, request.messages), self.registry.adapters,
                self.pool.resident_adapters())
        except Exception as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"the adapter selector failed: {exc}")
        ranking = selection.ranking[:request.top_k] if request.top_k else selection.ranking
        return router_pb2.SelectAdapterResponse(
            ranking=[router_pb2.AdapterScore(adapter_id=a, score=c) for a, c in ranking],
            selected_adapter_id=selection.adapter_id, reason=selection.reason)
