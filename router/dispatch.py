"""The router's request path, whatever the protocol: authenticate the caller, check the request,
resolve its adapter within what that tenant may use ("auto" included), pick a worker, retry
elsewhere before the first chunk, relay the chunks with the public adapter id.

The gRPC servicer (router/service.py) and the HTTP front (router/http_api.py) both call it, so
selection, routing and retries have one home. No grpc ServicerContext here: refusals are
EdgeLoraErrors carrying the status a client should see (a worker's own status included).
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc

from common.errors import EdgeLoraError, FailedPrecondition, InvalidArgument
from common.limits import AUTO, check_adapter_id, check_generate, check_prompt, shown
from edgelora.v1 import router_pb2, types_pb2
from router.adapter_record import AdapterRecord, record_name
from router.config import RouterConfig
from router.embedder import prompt_text
from router.metrics import NO_SELECTOR, SELECTOR_FAILED, RouterMetrics
from router.ownership import not_found
from router.pending_outcomes import Pending, PendingOutcomes, clip
from router.registry import AdapterRegistry, RpcError
from router.selector import AdapterSelector, Selection
from router.tenants import Caller, KeyRing
from router.workers import WorkerHandle, WorkerPool

log = logging.getLogger(__name__)
TOKENIZE_TIMEOUT_S = 30.0
MAX_REQUEST_ID = 128  # ours are 32 hex digits, plus an HTTP prefix
UNKNOWN_BASE_NAME = "base"  # before any worker answered and without --served-model-name


class Dispatcher:
    def __init__(self, pool: WorkerPool, registry: AdapterRegistry,
                 selector: AdapterSelector | None = None, config: RouterConfig | None = None,
                 keys: KeyRing | None = None) -> None:
        self.pool = pool
        self.registry = registry
        self.selector = selector  # None: "auto" is the base model
        self.config = config or RouterConfig()
        self.keys = keys or KeyRing()
        self.metrics = RouterMetrics(lambda key: key in registry.adapters)
        self.pending = PendingOutcomes(window_s=self.config.outcome_window_s)

    @property
    def learns_outcomes(self) -> bool:
        return self.selector is not None and self.selector.outcomes is not None

    def authenticate(self, token: str) -> Caller:
        """The caller a bearer token names (Unauthenticated when the keys file knows none)."""
        return self.keys.authenticate(token)

    def base_model_name(self) -> str:
        """What clients call the base model: --served-model-name, else the name of the model
        directory the workers serve (e.g. SmolLM2-135M-Instruct)."""
        if self.config.served_model_name:
            return self.config.served_model_name
        for worker in self.pool.all_workers:  # the last Info of any worker, live or not
            if worker.info is not None and worker.info.model:
                return Path(worker.info.model).name
        return UNKNOWN_BASE_NAME

    def max_model_len(self) -> int:
        """Prompt + completion tokens the workers take (0 = no worker answered yet)."""
        lengths = [w.info.max_model_len for w in self.pool.all_workers if w.info is not None]
        return min(lengths, default=0)

    def visible_adapters(self, caller: Caller) -> list[AdapterRecord]:
        """The adapters `caller` may generate with (its own and the shared ones), by id."""
        return sorted(self.registry.visible(caller.tenant).values(), key=lambda r: r.adapter_id)

    def worker_metadata(self, caller: Caller) -> tuple[tuple[str, str], ...]:
        """Who asks, and that tenant's share of a worker, for its fair admission there."""
        limits = caller.limits
        running = limits.max_running if limits.max_running is not None \
            else self.config.tenant_max_running
        queued = limits.max_queued if limits.max_queued is not None \
            else self.config.tenant_max_queued
        return (("edgelora-tenant", caller.tenant), ("edgelora-max-running", str(running)),
                ("edgelora-max-queued", str(queued)))

    async def select(self, caller: Caller, text: str, explore: bool = False) -> Selection:
        """The selector's decision among the adapters `caller` may use (worker keys), with
        that tenant's reported outcomes."""
        visible = self.registry.visible(caller.tenant)
        return await self.selector.select(text, self.registry.adapters,
                                          self.pool.resident_adapters(), candidates=visible,
                                          tenant=caller.tenant, explore=explore)

    async def prepare(self, caller: Caller, request: types_pb2.GenerateRequest,
                      request_id: str = "") -> types_pb2.GenerateRequest:
        """The checked request as a worker takes it: adapter_id is the worker key ("" = base).
        `record_name(result.adapter_id)` is the id the client is told. A refusal is counted
        in the metrics here, a generation by relay(). With a `request_id` (new_request_id()),
        its outcome can be reported (several prompts may share one id)."""
        try:
            check_generate(request, self.config)
            forwarded = types_pb2.GenerateRequest()
            forwarded.CopyFrom(request)
            embedding = None
            if request.adapter_id == AUTO:
                forwarded.adapter_id, embedding = await self._auto(caller, request)
            elif request.adapter_id:
                check_adapter_id(request.adapter_id)
                record = self.registry.find(caller.tenant, request.adapter_id)
                if record is None:
                    raise not_found(request.adapter_id)
                forwarded.adapter_id = record.key
        except EdgeLoraError as exc:
            self.metrics.refused(request.adapter_id, caller.tenant, exc.code)
            raise
        if request_id and self.learns_outcomes:
            self.pending.expect(request_id, Pending(
                caller.tenant, forwarded.adapter_id, embedding,
                "" if embedding is not None else clip(prompt_text(request.prompt,
                                                                  request.messages))))
        return forwarded

    async def _auto(self, caller: Caller, request: types_pb2.GenerateRequest
                    ) -> tuple[str, object]:
        """The worker key "auto" means for `request` ("" = base), and the prompt's embedding
        (None without one). Selection never fails a generation: without a selector, or when it
        fails, the base model."""
        if self.selector is None:
            self.metrics.selection("", NO_SELECTOR)
            return "", None
        try:
            selection = await self.select(caller, prompt_text(request.prompt, request.messages),
                                          explore=True)
        except Exception as exc:
            log.warning("adapter selection failed, 'auto' uses the base model: %r", exc)
            self.metrics.selection("", SELECTOR_FAILED)
            return "", None
        log.debug("auto -> %r: %s", selection.adapter_id, selection.reason)
        self.metrics.selection(selection.adapter_id, selection.kind)
        return selection.adapter_id, selection.embedding

    async def report_outcome(self, caller: Caller, request_id: str, reward: float
                             ) -> router_pb2.ReportOutcomeResponse:
        """Learns `reward` for the adapter that served `request_id`, for this tenant."""
        if not self.learns_outcomes:
            raise FailedPrecondition("this router does not learn outcomes (no selector, or "
                                     "--outcome-max-reports 0)")
        if not math.isfinite(reward) or not 0.0 <= reward <= 1.0:
            raise InvalidArgument(f"reward must be a number in [0, 1], got {reward!r}")
        if not request_id or len(request_id) > MAX_REQUEST_ID:
            raise InvalidArgument(f"request_id must be 1..{MAX_REQUEST_ID} characters (the "
                                  "request_id of a GenerateResponse), got "
                                  f"{shown(request_id)}")
        assert self.selector is not None and self.selector.outcomes is not None
        outcomes = self.selector.outcomes
        pendings = self.pending.take(caller.tenant, request_id.removeprefix(
            "chatcmpl-").removeprefix("cmpl-"))
        for pending in pendings:
            embedding = pending.embedding
            if embedding is None:  # an explicit adapter: its prompt is embedded now
                embedding = (await self.selector.batcher.embed_segments(pending.text))[0]
            outcomes.add(caller.tenant, pending.adapter_key, embedding, reward)
            self.metrics.outcome(pending.adapter_key, reward)
        return router_pb2.ReportOutcomeResponse(adapter_id=record_name(pendings[0].adapter_key),
                                                reports_kept=outcomes.count(caller.tenant))

    def relay(self, caller: Caller, forwarded: types_pb2.GenerateRequest, request_id: str = ""
              ) -> AsyncIterator[types_pb2.GenerateResponse]:
        """Streams a prepared request from a worker, counted and timed in the metrics. Before
        the first chunk a failed worker is replaced (or re-synced) and the request tried
        again; after it, the failure is the client's (RpcError with the worker's status).
        Closing the iterator early (the client left) cancels the worker's call, which frees
        its sequence."""
        return self.metrics.observe(self._relay(caller, forwarded, request_id),
                                    forwarded.adapter_id, caller.tenant)

    async def _relay(self, caller: Caller, forwarded: types_pb2.GenerateRequest,
                     request_id: str) -> AsyncIterator[types_pb2.GenerateResponse]:
        public_id = record_name(forwarded.adapter_id)
        metadata = self.worker_metadata(caller)
        tried: list[str] = []
        resynced: set[str] = set()
        while True:  # another try only while nothing has reached the client
            worker = self.pool.pick(forwarded.adapter_id, exclude=tried)
            has_started = False
            with self.pool.lease(worker):
                call = worker.stub.Generate(forwarded, metadata=metadata)
                try:
                    async for response in call:
                        has_started = True
                        response.adapter_id = public_id  # never the worker key
                        response.request_id = request_id
                        yield response
                    return
                except grpc.aio.AioRpcError as exc:
                    if exc.code() is grpc.StatusCode.UNAVAILABLE:
                        self.pool.mark_failed(worker, f"Generate: {exc.details()}")
                    if has_started or not await self._can_retry(exc, worker, forwarded,
                                                                tried, resynced):
                        raise RpcError(exc.code(), _describe(exc, worker.name)) from None
                finally:
                    call.cancel()  # no-op when done; frees the worker's sequence if the client left

    async def generate(self, caller: Caller, request: types_pb2.GenerateRequest
                       ) -> AsyncIterator[types_pb2.GenerateResponse]:
        """prepare() then relay(): one generation as the client asked for it."""
        request_id = new_request_id()
        forwarded = await self.prepare(caller, request, request_id)
        async for response in self.relay(caller, forwarded, request_id):
            yield response

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

    async def tokenize(self, caller: Caller, request: types_pb2.TokenizeRequest
                       ) -> types_pb2.TokenizeResponse:
        """The token ids a worker would generate from (every worker holds the same tokenizer;
        a dead one is skipped)."""
        check_prompt(request, self.config)
        tried: list[str] = []
        while True:
            worker = self.pool.pick("", exclude=tried)
            try:
                return await worker.stub.Tokenize(request, metadata=self.worker_metadata(caller),
                                                  timeout=TOKENIZE_TIMEOUT_S)
            except grpc.aio.AioRpcError as exc:
                if exc.code() is not grpc.StatusCode.UNAVAILABLE:
                    raise RpcError(exc.code(), exc.details() or exc.code().name) from None
                self.pool.mark_failed(worker, f"Tokenize: {exc.details()}")
                tried.append(worker.address)


def new_request_id() -> str:
    """Unguessable: a tenant can report only on ids it was given."""
    return uuid.uuid4().hex


def merge_chunks(chunks: list[types_pb2.GenerateResponse]) -> types_pb2.GenerateResponse:
    """A stream's chunks as one response: all text, tokens and logprobs; the last chunk's adapter,
    finish_reason and usage."""
    whole = types_pb2.GenerateResponse()
    for chunk in chunks:
        whole.token_ids.extend(chunk.token_ids)
        whole.logprobs.extend(chunk.logprobs)
        whole.adapter_id, whole.finish_reason = chunk.adapter_id, chunk.finish_reason
        whole.request_id = chunk.request_id
        whole.usage.CopyFrom(chunk.usage)
    whole.text = "".join(chunk.text for chunk in chunks)
    return whole


def _describe(exc: grpc.aio.AioRpcError, address: str) -> str:
    if exc.code() is grpc.StatusCode.UNAVAILABLE:
        return (f"worker {address} became unavailable while streaming this request "
                f"({exc.details()}); the tokens already sent stand, retry for the rest")
    return exc.details() or exc.code().name

