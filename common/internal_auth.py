"""The router <-> worker credential: a shared secret the router sends as `authorization: Bearer`
on every Worker call, and the worker-side interceptor that refuses calls without it.

Health and reflection stay open (probes and tooling); every other method needs the secret, so a
client that reaches a worker's port directly gets UNAUTHENTICATED. Knows no service logic.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from typing import Any

import grpc

AUTHORIZATION = "authorization"
BEARER = "bearer "
OPEN_SERVICE_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def bearer_token(metadata: Any) -> str:
    """The token of an `authorization: Bearer <token>` entry in gRPC metadata ('' if none)."""
    for key, value in metadata or ():
        if key == AUTHORIZATION and isinstance(value, str) and value.lower().startswith(BEARER):
            return value[len(BEARER):].strip()
    return ""


def digest(secret: str) -> bytes:
    """Fixed-length digest: comparing digests in constant time hides the secret's length too."""
    return hashlib.sha256(secret.encode()).digest()


class InternalAuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every call but health and reflection unless it carries the shared secret."""

    def __init__(self, secret: str) -> None:
        self._digest = digest(secret)

    async def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_SERVICE_PREFIXES):
            return handler
        if hmac.compare_digest(digest(bearer_token(details.invocation_metadata)), self._digest):
            return handler
        return _refusal(handler)


async def _abort(request: Any, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                        "this is a worker's internal API: only the router, with the router <-> "
                        "worker secret, may call it; clients call the router")


async def _abort_stream(request: Any, context: grpc.aio.ServicerContext):
    await _abort(request, context)
    yield  # pragma: no cover - never reached: makes this an async generator


def _refusal(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that answers UNAUTHENTICATED."""
    codec = {"request_deserializer": handler.request_deserializer,
             "response_serializer": handler.response_serializer}
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(_abort_stream, **codec)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(_abort, **codec)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(_abort_stream, **codec)
    return grpc.unary_unary_rpc_method_handler(_abort, **codec)


class _WithSecret:
    """Adds the secret to the call's metadata (shared by the client interceptor kinds)."""

    def __init__(self, secret: str) -> None:
        self._entry = (AUTHORIZATION, f"Bearer {secret}")

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()), self._entry)
        return details._replace(metadata=metadata)


class _UnaryUnary(_WithSecret, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(self._details(details), request)


class _UnaryStream(_WithSecret, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(self._details(details), request)


class _StreamUnary(_WithSecret, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, details, request_iterator):
        return await continuation(self._details(details), request_iterator)


class _StreamStream(_WithSecret, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, details, request_iterator):
        return await continuation(self._details(details), request_iterator)


def secret_interceptors(secret: str) -> list[grpc.aio.ClientInterceptor]:
    """Client interceptors for a channel to a worker ([] when there is no secret)."""
    if not secret:
        return []
    return [_UnaryUnary(secret), _UnaryStream(secret), _StreamUnary(secret), _StreamStream(secret)]
