"""The OpenAI-compatible HTTP front (FastAPI): /v1/chat/completions, /v1/completions, /v1/models,
/tokenize, /health, and /v1/outcomes (Router.ReportOutcome: a response's "id" and a reward).
Every generation goes through the Dispatcher, the same path as gRPC's GenerateStream (auth,
checks, adapter resolution and "auto", worker choice, retries); this file only reads bodies, maps
them (router/openai_convert.py) and writes JSON or server-sent events.

Errors are OpenAI's `{"error": {...}}` with the HTTP status of the gRPC status. A streamed
request's status waits for every choice's first chunk, so refusals before any token (a bad
field, an unknown model, a full queue) keep their status; a failure after that is a last
`data: {"error": ...}` event. A client that leaves cancels its generations on the worker.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import aclosing
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from prometheus_client.registry import Collector
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException

from common.errors import EdgeLoraError, InvalidArgument, NotFound, Unavailable
from common.internal_auth import AUTHORIZATION, bearer_token
from common.limits import ADAPTER_ID, AUTO, shown
from edgelora.v1 import types_pb2
from router.adapter_record import record_name
from router.dispatch import Dispatcher, merge_chunks, new_request_id
from router.metrics import metrics_asgi_app
from router.openai_convert import (
    adapter_id_for,
    chat_completion,
    chat_messages,
    chat_request,
    choice_requests,
    completion_requests,
    error_body,
    model_card,
    status_error,
    text_completion,
)
from router.openai_schema import (
    MAX_CHOICES,
    ChatCompletionRequest,
    CompletionRequest,
    OutcomeBody,
    SamplingBody,
    TokenizeBody,
)
from router.openai_stream import SseWriter, close_all, first_items, merged, sse
from router.tenants import Caller

log = logging.getLogger(__name__)
B = TypeVar("B", bound=BaseModel)
T = TypeVar("T")
JSON = "application/json"
CLIENT_CLOSED = 499  # never sent: the client is gone (nginx's name for it)


class BodyTooLarge(Exception):
    pass


class ClientGone(Exception):
    pass


def json_response(body: dict[str, Any], status: int = 200) -> Response:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return Response(json.dumps(body, separators=(",", ":")), status, headers, media_type=JSON)


def error_response(exc: EdgeLoraError, model_param: bool = False) -> Response:
    status, body = status_error(exc, model_param)
    return json_response(body, status)


async def read_body(request: Request, model: type[B], max_bytes: int) -> B:
    """The JSON body as `model`; the size is checked before anything is parsed."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise BodyTooLarge
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise BodyTooLarge
        chunks.append(chunk)
    try:
        data = json.loads(b"".join(chunks))
    except (ValueError, RecursionError) as exc:
        raise InvalidArgument(f"the request body is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise InvalidArgument("the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        raise InvalidArgument(f"{where}: {first['msg']}") from None


async def until_disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read by then)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """`work`'s result, or ClientGone (with `work` cancelled) when the client leaves first."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(until_disconnected(request))
    try:
        await asyncio.wait((task, watch), return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        raise ClientGone
    finally:
        for pending in (task, watch):
            pending.cancel()
        # `work` has finished its cleanup (its worker calls cancelled) before this returns
        await asyncio.gather(task, watch, return_exceptions=True)


class OpenAIApi:
    def __init__(self, dispatch: Dispatcher) -> None:
        self.dispatch = dispatch
        self.max_body_bytes = dispatch.config.max_http_body_bytes

    def caller(self, request: Request) -> Caller:
        """The same API keys as gRPC, from `Authorization: Bearer <key>`."""
        header = request.headers.get(AUTHORIZATION, "")
        return self.dispatch.authenticate(bearer_token([(AUTHORIZATION, header)]))

    async def handle(self, request: Request, body_model: type[B] | None,
                     handler: Callable[..., Awaitable[Response]]) -> Response:
        """Auth, body and the mapping of refusals to OpenAI errors, around each endpoint."""
        try:
            caller = self.caller(request)
            if body_model is None:
                return await handler(caller)
            body = await read_body(request, body_model, self.max_body_bytes)
            return await handler(caller, request, body)
        except BodyTooLarge:
            return json_response(error_body(413, f"the request body is over "
                                            f"{self.max_body_bytes} bytes (3x --max-prompt-bytes"
                                            " + 1 MiB)", "request_too_large"), 413)
        except EdgeLoraError as exc:
            return error_response(exc, model_param=True)
        except ClientGone:
            return Response(status_code=CLIENT_CLOSED)

    # -- endpoints --
    async def chat_completions(self, request: Request) -> Response:
        return await self.handle(request, ChatCompletionRequest, self._generate)

    async def completions(self, request: Request) -> Response:
        return await self.handle(request, CompletionRequest, self._generate)

    async def models(self, request: Request) -> Response:
        return await self.handle(request, None, self._models)

    async def tokenize(self, request: Request) -> Response:
        return await self.handle(request, TokenizeBody, self._tokenize)

    async def outcomes(self, request: Request) -> Response:
        return await self.handle(request, OutcomeBody, self._outcome)

    async def health(self, request: Request) -> Response:
        if not self.dispatch.pool.workers:
            return error_response(Unavailable(self.dispatch.pool.unavailable_reason()))
        return json_response({"status": "ok"})

    # -- generation --
    async def _generate(self, caller: Caller, request: Request, body: SamplingBody) -> Response:
        is_chat = isinstance(body, ChatCompletionRequest)
        base = self.dispatch.base_model_name()
        adapter_id = self._adapter_id(body.model, base)
        if body.user:
            log.debug("request of user %s", shown(body.user))
        requests = ([chat_request(body, adapter_id)] if is_chat
                    else completion_requests(body, adapter_id))
        if len(requests) * body.n > MAX_CHOICES:
            raise InvalidArgument(f"{len(requests)} prompts x n={body.n} choices: at most "
                                  f"{MAX_CHOICES} generations per request")
        streams: list[AsyncIterator[types_pb2.GenerateResponse]] = []
        generation_id = new_request_id()  # one outcome per HTTP request, whatever n

        async def start() -> tuple[str, list[types_pb2.GenerateResponse | None]]:
            # "auto" selects once per prompt; its n choices share the adapter
            prepared = [await self.dispatch.prepare(caller, r, generation_id) for r in requests]
            streams.extend(self.dispatch.relay(caller, choice, generation_id)
                           for p in prepared for choice in choice_requests(p, body.n))
            return record_name(prepared[0].adapter_id) or base, await first_items(streams)

        try:
            model, firsts = await unless_disconnected(request, start())
        except BaseException:
            await close_all(streams)
            raise
        prefix = "chatcmpl-" if is_chat else "cmpl-"  # OpenAI's; /v1/outcomes takes either
        request_id, created = prefix + generation_id, int(time.time())
        params = requests[0].params
        if not body.stream:
            responses = await unless_disconnected(request, _collect(streams, firsts))
            build = chat_completion if is_chat else text_completion
            return json_response(build(request_id, created, model, responses, body.n,
                                       params.logprobs))
        options = body.stream_options
        writer = SseWriter(is_chat, request_id, created, model, body.n, params.logprobs,
                           bool(options and options.include_usage),
                           bool(options and options.continuous_usage_stats))
        return StreamingResponse(_events(writer, streams, firsts),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache",
                                          "X-Accel-Buffering": "no"})

    def _adapter_id(self, model: str | None, base: str) -> str:
        """An unknown model is a 404 (as OpenAI's), also when it could not be an adapter id."""
        adapter_id = adapter_id_for(model, base)
        if adapter_id and adapter_id != AUTO and not ADAPTER_ID.fullmatch(adapter_id):
            raise NotFound(f"model {shown(adapter_id)} does not exist: GET /v1/models lists "
                           "the ones you can use")
        return adapter_id

    # -- the rest --
    async def _models(self, caller: Caller) -> Response:
        base = self.dispatch.base_model_name()
        now = int(time.time())
        max_len = self.dispatch.max_model_len()
        cards = [model_card(base, "edgelora", now, None, max_len),
                 model_card(AUTO, "edgelora", now, base, max_len)]
        cards += [model_card(r.adapter_id, r.owner or "shared", int(r.created_s or now), base,
                             max_len)
                  for r in self.dispatch.visible_adapters(caller)]
        return json_response({"object": "list", "data": cards})

    async def _outcome(self, caller: Caller, request: Request, body: OutcomeBody) -> Response:
        reply = await self.dispatch.report_outcome(caller, body.request_id, body.reward)
        return json_response({"request_id": body.request_id,
                              "model": reply.adapter_id or self.dispatch.base_model_name(),
                              "reports_kept": reply.reports_kept})

    async def _tokenize(self, caller: Caller, request: Request, body: TokenizeBody) -> Response:
        adapter_id = self._adapter_id(body.model, self.dispatch.base_model_name())
        if adapter_id and adapter_id != AUTO and \
                self.dispatch.registry.find(caller.tenant, adapter_id) is None:
            raise NotFound(f"model {adapter_id!r} does not exist: GET /v1/models lists the ones "
                           "you can use")
        reply = await self.dispatch.tokenize(caller, types_pb2.TokenizeRequest(
            prompt=body.prompt or "", messages=chat_messages(body.messages or [])))
        return json_response({"count": len(reply.token_ids), "max_model_len":
                              reply.max_model_len, "tokens": list(reply.token_ids)})


async def _collect(streams: list[AsyncIterator[types_pb2.GenerateResponse]],
                   firsts: list[types_pb2.GenerateResponse | None]
                   ) -> list[types_pb2.GenerateResponse]:
    """Every choice whole (non-streaming): chunks merged as the unary gRPC Generate does."""
    chunks: list[list[types_pb2.GenerateResponse]] = [[f] if f else [] for f in firsts]
    try:
        async with aclosing(merged(streams)) as rest:
            async for index, chunk in rest:
                chunks[index].append(chunk)
    finally:
        await close_all(streams)
    return [merge_chunks(c) for c in chunks]


async def _events(writer: SseWriter, streams: list[AsyncIterator[types_pb2.GenerateResponse]],
                  firsts: list[types_pb2.GenerateResponse | None]) -> AsyncIterator[bytes]:
    try:
        for index, first in enumerate(firsts):
            yield writer.opening(index)
            if first is not None:
                yield writer.chunk(index, first)
        async with aclosing(merged(streams)) as rest:  # closed first: it runs the streams
            async for index, chunk in rest:
                yield writer.chunk(index, chunk)
        yield writer.closing()
    except EdgeLoraError as exc:  # after the status went out: a last event, then the end
        yield sse(status_error(exc)[1])
    finally:
        await close_all(streams)


def build_app(dispatch: Dispatcher, metrics: Sequence[Collector] = ()) -> FastAPI:
    """The ASGI app; no interactive docs (they would load scripts from a CDN). /metrics shows
    the router's metrics and `metrics` (an in-process worker's, under `serve`); like
    Prometheus' own endpoints it needs no key: it names adapters and tenants, not content."""
    api = OpenAIApi(dispatch)
    app = FastAPI(title="edgelora", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_route("/metrics", metrics_asgi_app(dispatch.metrics.registry, *metrics))
    app.add_api_route("/v1/chat/completions", api.chat_completions, methods=["POST"])
    app.add_api_route("/v1/completions", api.completions, methods=["POST"])
    app.add_api_route("/v1/models", api.models, methods=["GET"])
    app.add_api_route("/tokenize", api.tokenize, methods=["POST"])
    app.add_api_route("/v1/outcomes", api.outcomes, methods=["POST"])
    app.add_api_route("/health", api.health, methods=["GET"])

    async def http_error(request: Request, exc: HTTPException) -> Response:
        return json_response(error_body(exc.status_code, str(exc.detail)), exc.status_code)

    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        return json_response(error_body(400, str(exc.errors()[:1]), "invalid_argument"), 400)

    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.state.api = api
    return app

