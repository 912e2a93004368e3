"""The Worker gRPC servicer: validates and converts pb <-> engine messages, relays TokenEvents.

The only worker module that touches protobuf; never touches tensors.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import grpc

from common.adapter_blobs import DIGEST, BlobStore, check_digest
from common.adapter_format import read_adapter_spec
from common.errors import (
    DeadlineExceeded,
    EdgeLoraError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    refusals_abort,
)
from common.limits import check_generate, check_prompt
from edgelora.v1 import types_pb2, worker_pb2, worker_pb2_grpc
from worker.adapter_memory import AdapterMemory, TierStats
from worker.config import WorkerConfig
from worker.engine import Engine
from worker.generate_pb import event_to_pb, merge_events, sampling_from_pb
from worker.json_constraint import JsonConstraint, JsonGrammars
from worker.metrics import WorkerMetrics
from worker.sequence import Abort, AddRequest, SamplingOptions, TenantLimits, TokenEvent
from worker.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerInfo:
    model: str
    device: str
    dtype: str
    max_model_len: int  # tokens, already capped by the KV cache and the model


NO_LIMITS = TenantLimits()


def tenant_from_metadata(metadata: object, config: WorkerConfig) -> tuple[str, TenantLimits]:
    """The tenant the router says a request is for, and that tenant's share of this worker
    (the worker's own --tenant-max-* where the router sends none). Trusted: only the router,
    with the internal secret, reaches this service."""
    values = {key: value for key, value in metadata or () if key.startswith("edgelora-")}

    def limit(name: str, default: int) -> int:
        raw = values.get(name, "")
        return int(raw) if raw.isdigit() else default

    return values.get("edgelora-tenant", ""), TenantLimits(
        max_running=limit("edgelora-max-running", config.tenant_max_running),
        max_queued=limit("edgelora-max-queued", config.tenant_max_queued))


class WorkerService(worker_pb2_grpc.WorkerServicer):
    def __init__(self, config: WorkerConfig, tokenizer: Tokenizer, info: WorkerInfo) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.info = info
        self.engine: Engine | None = None
        self.metrics = WorkerMetrics(config.metrics_max_tenants)  # observed in Generate
        self._streams: dict[int, asyncio.Queue[TokenEvent]] = {}
        self._ids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        # Adapter files are untrusted: their reads and checks run here, off the event loop and
        # the engine thread, each under a deadline; a read that hangs anyway ties up only this
        # pool, never the threads that serve other requests.
        self._validator = ThreadPoolExecutor(max_workers=2, thread_name_prefix="adapter-check")
        # response_format grammars compile here, off the event loop (and the tables behind
        # JSON masks and logprobs' token bytes are built here on first use)
        self._compiler = ThreadPoolExecutor(max_workers=1, thread_name_prefix="json-compile")
        self._grammars: JsonGrammars | None = None
        self.blobs = BlobStore(config.adapter_cache_path, config.max_adapter_bytes,
                               config.adapter_cache_mb << 20)
        self.blobs.trim()  # the bound may have shrunk since the last run

    def attach(self, engine: Engine, loop: asyncio.AbstractEventLoop) -> None:
        self.engine, self._loop = engine, loop

    def emit(self, event: TokenEvent) -> None:
        """Called on the engine thread; hands the event to the request's asyncio queue."""
        self._loop.call_soon_threadsafe(self._deliver, event)

    def _deliver(self, event: TokenEvent) -> None:
        stream = self._streams.get(event.request_id)
        if stream is not None:  # None: the client already left
            stream.put_nowait(event)

    def _encode_prompt(self, request: types_pb2.GenerateRequest | worker_pb2.ScoreRequest
                       | types_pb2.TokenizeRequest) -> list[int]:
        if request.prompt and request.messages:
            raise InvalidArgument("set either prompt or messages, not both")
        if request.messages:
            return self.tokenizer.encode_chat([(m.role, m.content) for m in request.messages])
        if request.prompt:
            return self.tokenizer.encode_prompt(request.prompt)
        raise InvalidArgument("the prompt is empty: set prompt or messages")

    def _to_add_request(self, request: types_pb2.GenerateRequest, tenant: str = "",
                        limits: TenantLimits = NO_LIMITS) -> AddRequest:
        check_generate(request, self.config)  # bounds first: no tokenizing of a huge prompt
        prompt_ids = self._encode_prompt(request)
        options = sampling_from_pb(request.params, self.config.default_max_tokens)
        limit = self.info.max_model_len
        if len(prompt_ids) >= limit:
            raise InvalidArgument(f"the prompt has {len(prompt_ids)} tokens; this worker's context "
                                  f"holds {limit} (prompt + max_tokens): shorten the prompt")
        room = limit - len(prompt_ids)
        if not request.params.HasField("max_tokens"):
            options = replace(options, max_tokens=min(options.max_tokens, room))
        elif options.max_tokens > room:
            raise InvalidArgument(f"max_tokens {options.max_tokens} + prompt {len(prompt_ids)} "
                                  f"tokens exceed the context of {limit} tokens: ask for at most "
                                  f"{room}")
        return AddRequest(next(self._ids), prompt_ids, options, request.adapter_id,
                          tenant=tenant, limits=limits)

    async def Generate(self, request: types_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[types_pb2.GenerateResponse]:
        try:
            tenant, limits = tenant_from_metadata(context.invocation_metadata(), self.config)
            track = self.metrics.track(request.adapter_id, tenant)
            add = self._to_add_request(request, tenant, limits)
            add.constraint = await self._prepare_controls(request.params)
        except EdgeLoraError as exc:
            track.finish(exc.code)
            await context.abort(exc.code, str(exc))
        stream: asyncio.Queue[TokenEvent] = asyncio.Queue()
        self._streams[add.request_id] = stream
        self.engine.submit(add)
        finished = False
        try:
            while not finished:
                events = [await stream.get()]
                while not stream.empty():
                    events.append(stream.get_nowait())
                event = merge_events(events)
                track.event(event)
                if event.finish_reason == "error":
                    finished = True
                    await context.abort(grpc.StatusCode[event.error_code], event.error)
                finished = bool(event.finish_reason)
                yield event_to_pb(event, request.adapter_id, self.tokenizer)
        finally:
            track.finish()
            del self._streams[add.request_id]
            if not finished:  # cancelled or disconnected: free its KV now
                self.engine.submit(Abort(add.request_id))

    async def _prepare_controls(self, params: types_pb2.SamplingParams) -> JsonConstraint | None:
        """The request's JSON constraint (InvalidArgument for a schema that does not compile),
        or None; builds the logprobs' token table on first use. Both in the compile thread."""
        loop = asyncio.get_running_loop()
        if params.logprobs and "vocab_bytes" not in vars(self.tokenizer):
            await loop.run_in_executor(self._compiler, lambda: self.tokenizer.vocab_bytes)
        fmt = params.response_format
        if fmt.type in ("", "text"):
            return None

        if self._grammars is not None:  # a schema compiled lately: no wait behind a compile
            compiled = self._grammars.cached(fmt.type, fmt.json_schema)
            if compiled is not None:
                return self._grammars.constraint(compiled)

        def compile_grammar() -> JsonConstraint:
            if self._grammars is None:
                engine = self.engine
                self._grammars = JsonGrammars(self.tokenizer.hf,
                                              engine.runner.model.config.vocab_size,
                                              sorted(engine.eos_token_ids))
            return self._grammars.constraint(self._grammars.compile(fmt.type, fmt.json_schema))

        return await loop.run_in_executor(self._compiler, compile_grammar)

    async def Tokenize(self, request: types_pb2.TokenizeRequest,
                       context: grpc.aio.ServicerContext) -> types_pb2.TokenizeResponse:
        """The prompt's token ids as Generate would feed them (the chat template applied)."""
        async with refusals_abort(context):
            check_prompt(request, self.config)  # bounds first: no tokenizing of a huge prompt
            token_ids = self._encode_prompt(request)
        return types_pb2.TokenizeResponse(token_ids=token_ids,
                                          max_model_len=self.info.max_model_len)

    def _to_score_requests(self, request: worker_pb2.ScoreRequest) -> list[AddRequest]:
        """One prefill-only AddRequest per adapter, over the same prompt + reference tokens."""
        if not request.reference:
            raise InvalidArgument("the reference is empty: set the answer to score")
        prompt_ids = self._encode_prompt(request)
        reference_ids = encode_reference(self.tokenizer, request.reference)
        if not prompt_ids or not reference_ids:
            raise InvalidArgument("the prompt and the reference must each make at least one token")
        total, limit = len(prompt_ids) + len(reference_ids), self.info.max_model_len
        if total > limit:
            raise InvalidArgument(f"prompt ({len(prompt_ids)} tokens) + reference "
                                  f"({len(reference_ids)} tokens) exceed this worker's context "
                                  f"of {limit} tokens: shorten them")
        adapter_ids = list(request.adapter_ids) or [""]
        memory = self.engine.adapters
        for adapter_id in filter(None, adapter_ids):  # fail the whole call before queueing any
            error = (NotFound(f"adapter {adapter_id!r}: this worker serves no adapters")
                     if memory is None else memory.error(adapter_id))
            if error:
                raise error
        options = SamplingOptions(max_tokens=1)  # never read: scoring samples nothing
        return [AddRequest(next(self._ids), prompt_ids + reference_ids, options, adapter_id,
                           num_reference_tokens=len(reference_ids))
                for adapter_id in adapter_ids]

    async def Score(self, request: worker_pb2.ScoreRequest,
                    context: grpc.aio.ServicerContext) -> worker_pb2.ScoreResponse:
        """Every adapter's sequence goes through the scheduler like a Generate: they share
        forward passes (with each other and with running streams) through the multi-LoRA path."""
        async with refusals_abort(context):
            adds = self._to_score_requests(request)
        events: asyncio.Queue[TokenEvent] = asyncio.Queue()
        pending = {add.request_id for add in adds}
        results: dict[int, TokenEvent] = {}
        for add in adds:
            self._streams[add.request_id] = events
            self.engine.submit(add)
        try:
            while pending:
                event = await events.get()
                pending.discard(event.request_id)
                if event.finish_reason == "error":
                    await context.abort(grpc.StatusCode[event.error_code], event.error)
                results[event.request_id] = event
        finally:
            for add in adds:
                del self._streams[add.request_id]
            for request_id in pending:  # cancelled, or a sibling failed: free their KV now
                self.engine.submit(Abort(request_id))
        return worker_pb2.ScoreResponse(results=[
            worker_pb2.AdapterLogLikelihood(
                adapter_id=add.adapter_id, num_tokens=add.num_reference_tokens,
                log_likelihood=results[add.request_id].log_likelihood) for add in adds])

    async def Info(self, request: worker_pb2.InfoRequest,
                   context: grpc.aio.ServicerContext) -> worker_pb2.InfoResponse:
        memory, load = self.engine.adapters, self.engine.load()
        return worker_pb2.InfoResponse(
            model=self.info.model, max_model_len=self.info.max_model_len, device=self.info.device,
            dtype=self.info.dtype, num_running=load.num_running, num_waiting=load.num_waiting,
            num_free_kv_blocks=load.num_free_kv_blocks, num_kv_blocks=load.num_kv_blocks,
            adapters=[a for a in adapters_to_pb(memory) if a.tier != types_pb2.ADAPTER_TIER_DISK],
            adapter_stats=stats_to_pb(memory))

    async def RegisterAdapter(self, request: types_pb2.RegisterAdapterRequest,
                              context: grpc.aio.ServicerContext
                              ) -> types_pb2.RegisterAdapterResponse:
        async with refusals_abort(context):
            if not ADAPTER_ID.fullmatch(request.adapter_id) or request.adapter_id == "auto":
                raise InvalidArgument(f"adapter_id {request.adapter_id[:140]!r}: use 1-128 "
                                      "letters, digits, '-', '_', '.', '/' (and not 'auto')")
            spec = await self._check_adapter(request)
        return types_pb2.RegisterAdapterResponse(adapter=types_pb2.AdapterInfo(
            adapter_id=spec.adapter_id, rank=spec.rank, path=spec.path,
            description=request.description, tier=types_pb2.ADAPTER_TIER_DISK))

    async def _check_adapter(self, request: types_pb2.RegisterAdapterRequest):
        """Reads and validates the adapter's files (config, every tensor) and registers it:
        from its path, or from this worker's cache when the router names a digest."""
        memory = self.engine.adapters

        def check_and_register():
            path = request.path
            if request.digest:
                if not self.blobs.verify(check_digest(request.digest)):  # absent or corrupt
                    raise FailedPrecondition(f"adapter {request.adapter_id!r}: the files of "
                                             f"digest {request.digest} are not cached here")
                path = str(self.blobs.path(request.digest))
            spec = replace(read_adapter_spec(request.adapter_id, path,
                                             max_weights_bytes=self.config.max_adapter_bytes,
                                             num_layers=memory.num_layers),
                           digest=request.digest)
            memory.register(spec)
            return spec

        future = asyncio.get_running_loop().run_in_executor(self._validator, check_and_register)
        try:
            return await asyncio.wait_for(future, self.config.register_timeout_s)
        except TimeoutError as exc:
            raise DeadlineExceeded(
                f"adapter {request.adapter_id!r}: reading and checking its files took over "
                f"{self.config.register_timeout_s:g} s (--register-timeout-s)") from exc

    def close(self) -> None:
        self._validator.shutdown(wait=False, cancel_futures=True)
        self._compiler.shutdown(wait=False, cancel_futures=True)
        if self._grammars is not None:
            self._grammars.close()

    async def PutAdapter(self, requests: AsyncIterator[worker_pb2.PutAdapterRequest],
                         context: grpc.aio.ServicerContext) -> worker_pb2.PutAdapterResponse:
        """Writes the pushed files into the cache (off the event loop), keeping them only if
        they hash to the digest named first."""
        loop = asyncio.get_running_loop()
        async with refusals_abort(context, requests, self.config.max_adapter_bytes):
            first = await anext(aiter(requests), None)
            if first is None or first.WhichOneof("part") != "digest":
                raise InvalidArgument("PutAdapter starts with the digest")
            digest = check_digest(first.digest)
            with self.blobs.writer() as writer:
                async for message in requests:
                    if message.WhichOneof("part") != "chunk":
                        raise InvalidArgument("after the digest, PutAdapter takes file chunks")
                    await loop.run_in_executor(self._validator, writer.write,
                                               message.chunk.file_name, message.chunk.data)
                await loop.run_in_executor(self._validator, writer.commit, digest)
            removed = await loop.run_in_executor(self._validator, self.blobs.trim, digest)
            if removed:
                log.info("adapter cache over --adapter-cache-mb %d: removed %d least recently "
                         "used blobs", self.config.adapter_cache_mb, len(removed))
        return worker_pb2.PutAdapterResponse()

    async def UnregisterAdapter(self, request: types_pb2.UnregisterAdapterRequest,
                                context: grpc.aio.ServicerContext
                                ) -> types_pb2.UnregisterAdapterResponse:
        memory = self.engine.adapters
        spec = memory.registry.get(request.adapter_id)
        if spec is None or not memory.unregister(request.adapter_id):
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"adapter {request.adapter_id!r} is not registered")
        blob = Path(spec.path)
        if DIGEST.fullmatch(blob.name) and blob == self.blobs.path(blob.name) and not any(
                s.path == spec.path for s in list(memory.registry.values())):
            # the last adapter of those pushed files is gone, unless they were just pushed or
            # read for another registration under way
            self.blobs.remove_if_idle(blob.name)
        return types_pb2.UnregisterAdapterResponse()

    async def ListAdapters(self, request: types_pb2.ListAdaptersRequest,
                           context: grpc.aio.ServicerContext) -> types_pb2.ListAdaptersResponse:
        adapters = adapters_to_pb(self.engine.adapters)
        return types_pb2.ListAdaptersResponse(adapters=adapters)


def encode_reference(tokenizer: Tokenizer, reference: str) -> list[int]:
    """The reference's tokens as a continuation: tokenized alone, without BOS or other special
    tokens, then appended to the prompt's. So the scored tokens are exactly the reference text's
    own (a leading space belongs in the reference when it continues a raw prompt), not a
    re-tokenization of the joined text across the boundary; after a chat prompt the reference
    is the assistant's answer, and the end-of-turn token is not scored."""
    return list(tokenizer.hf(reference, add_special_tokens=False).input_ids)


# A worker key: a shared adapter's public id, or "tenant:id" (router.registry.worker_key).
ADAPTER_ID = re.compile(r"(?:[A-Za-z0-9][A-Za-z0-9_-]{0,63}:)?[A-Za-z0-9][A-Za-z0-9._/-]{0,127}")
_TIERS = {"disk": types_pb2.ADAPTER_TIER_DISK, "host": types_pb2.ADAPTER_TIER_HOST,
          "device": types_pb2.ADAPTER_TIER_DEVICE}


def adapters_to_pb(memory: AdapterMemory) -> list[types_pb2.AdapterInfo]:
    return [types_pb2.AdapterInfo(adapter_id=spec.adapter_id, rank=spec.rank, path=spec.path,
                                  digest=spec.digest, tier=_TIERS[tier])
            for spec, tier in memory.snapshot()]


def stats_to_pb(memory: AdapterMemory) -> worker_pb2.AdapterMemoryStats:
    def tier(t: TierStats) -> worker_pb2.TierStats:
        return worker_pb2.TierStats(hits=t.hits, misses=t.misses, evictions=t.evictions,
                                    loads=t.loads, mean_load_ms=t.mean_load_ms)

    s = memory.summary()
    return worker_pb2.AdapterMemoryStats(
        host=tier(memory.stats.host), device=tier(memory.stats.device), **s)
