"""The public Router servicer: authenticates the caller; generation and tokenizing go through the
Dispatcher (router/dispatch.py, shared with the HTTP front); adapter registration, upload and
removal within what that tenant may do.

Never tokenizes or runs a model; worker errors reach the client with their status and message.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import aclosing

import grpc

from common.errors import InvalidArgument, PermissionDenied, refusals_abort
from common.internal_auth import bearer_token
from common.limits import check_adapter_id, check_card, check_generate
from edgelora.v1 import router_pb2, router_pb2_grpc, types_pb2
from router.adapter_cards import CARD_FILE, parse_card
from router.adapter_pages import encode_token, in_page_order, page_slice, within_bytes
from router.adapter_paths import confine
from router.adapter_record import record_name
from router.config import RouterConfig
from router.dispatch import Dispatcher, merge_chunks
from router.embedder import prompt_text
from router.ownership import check_replace, listed, registration_owner, removal_target
from router.registry import AdapterRegistry
from router.selector import AdapterSelector, Selection
from router.tenants import Caller, KeyRing, TenantLimits
from router.workers import WorkerPool

log = logging.getLogger(__name__)


class RouterService(router_pb2_grpc.RouterServicer):
    """gRPC in front of the Dispatcher (the request path the HTTP front shares) and the
    adapter registry."""

    def __init__(self, pool: WorkerPool, registry: AdapterRegistry,
                 selector: AdapterSelector | None = None, config: RouterConfig | None = None,
                 keys: KeyRing | None = None) -> None:
        self.dispatch = Dispatcher(pool, registry, selector, config, keys)
        self.registry = registry
        self.selector = selector
        self.config = self.dispatch.config
        self.keys = self.dispatch.keys

    async def _caller(self, context: grpc.aio.ServicerContext) -> Caller:
        async with refusals_abort(context):
            return self.dispatch.authenticate(bearer_token(context.invocation_metadata()))

    async def GenerateStream(self, request: types_pb2.GenerateRequest,
                             context: grpc.aio.ServicerContext
                             ) -> AsyncIterator[types_pb2.GenerateResponse]:
        caller = await self._caller(context)
        async with refusals_abort(context), \
                aclosing(self.dispatch.generate(caller, request)) as stream:
            async for response in stream:
                yield response

    async def Generate(self, request: types_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> types_pb2.GenerateResponse:
        caller = await self._caller(context)
        async with refusals_abort(context), \
                aclosing(self.dispatch.generate(caller, request)) as stream:
            return merge_chunks([chunk async for chunk in stream])

    async def Tokenize(self, request: types_pb2.TokenizeRequest,
                       context: grpc.aio.ServicerContext) -> types_pb2.TokenizeResponse:
        caller = await self._caller(context)
        async with refusals_abort(context):
            return await self.dispatch.tokenize(caller, request)

    async def ReportOutcome(self, request: router_pb2.ReportOutcomeRequest,
                            context: grpc.aio.ServicerContext
                            ) -> router_pb2.ReportOutcomeResponse:
        caller = await self._caller(context)
        async with refusals_abort(context):
            return await self.dispatch.report_outcome(caller, request.request_id, request.reward)

    async def ListAdapters(self, request: types_pb2.ListAdaptersRequest,
                           context: grpc.aio.ServicerContext) -> types_pb2.ListAdaptersResponse:
        caller = await self._caller(context)
        async with refusals_abort(context):
            records, more = page_slice(in_page_order(listed(caller, self.registry)),
                                       request.page_size, request.page_token)
        infos = await self.registry.list(records, with_paths=caller.is_admin)
        kept = within_bytes(infos)
        more = more or kept < len(infos)
        return types_pb2.ListAdaptersResponse(
            adapters=infos[:kept],
            next_page_token=encode_token(records[kept - 1]) if more else "")

    async def RegisterAdapter(self, request: types_pb2.RegisterAdapterRequest,
                              context: grpc.aio.ServicerContext
                              ) -> types_pb2.RegisterAdapterResponse:
        caller = await self._caller(context)
        async with refusals_abort(context):
            record = await self._register(caller, request)
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
        async with refusals_abort(context, requests, self.config.max_adapter_bytes):
            record = await self._upload(caller, requests)
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
            tenant=header.tenant, shared=header.shared, kind=header.kind)
        check_adapter_id(request.adapter_id)
        owner = registration_owner(caller, request)
        self._check_card_and_limits(caller, owner, request)
        with self.registry.store.writer() as writer:
            async for message in requests:
                if message.WhichOneof("part") != "chunk":
                    raise InvalidArgument("after the header, UploadAdapter takes file chunks")
                await asyncio.to_thread(writer.write, message.chunk.file_name,
                                        message.chunk.data)
            request.digest = await self.registry.contents.add(writer.commit)  # held till done
            card = writer.card
        try:
            if card is not None and not request.description and not request.example_prompts:
                from_card = parse_card(card, f"the upload's {CARD_FILE}")
                request.description = from_card.get("description", "")
                request.example_prompts.extend(from_card.get("example_prompts", []))
                request.kind = request.kind or from_card.get("kind", "")
                check_card(request.description, list(request.example_prompts),
                           self.config.max_card_bytes, self.config.max_example_prompts,
                           request.kind)
            return await self.registry.register(request, owner)
        finally:
            self.registry.contents.release(request.digest)  # the blob goes unless registered

    def _check_card_and_limits(self, caller: Caller, owner: str,
                               request: types_pb2.RegisterAdapterRequest) -> None:
        config = self.config
        check_card(request.description, list(request.example_prompts), config.max_card_bytes,
                   config.max_example_prompts, request.kind)
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
        async with refusals_abort(context):
            check_adapter_id(request.adapter_id)
            record = removal_target(caller, request, self.registry)
            await self.registry.unregister(record.key)
        log.info("%s removed adapter %r of %s", caller.tenant or "the open tenant",
                 record.adapter_id, record.owner or "every tenant (shared)")
        return types_pb2.UnregisterAdapterResponse()

    async def SelectAdapter(self, request: router_pb2.SelectAdapterRequest,
                            context: grpc.aio.ServicerContext) -> router_pb2.SelectAdapterResponse:
        caller = await self._caller(context)
        async with refusals_abort(context):
            if not request.prompt and not request.messages:
                raise InvalidArgument("SelectAdapter needs a prompt or messages")
            check_generate(types_pb2.GenerateRequest(prompt=request.prompt,
                                                     messages=request.messages), self.config)
        if self.selector is None:
            return router_pb2.SelectAdapterResponse(
                selected_adapter_id="", reason="this router runs without the adaptive selector: "
                "'auto' uses the base model")
        try:
            selection = await self.dispatch.select(caller,
                                                   prompt_text(request.prompt, request.messages))
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
