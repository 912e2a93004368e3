"""Typed errors carrying the gRPC status a client should see; mapped to gRPC only in services."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc
from google.protobuf.message import Message


class EdgeLoraError(Exception):
    """Base error: `str(err)` is a message a person can act on."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidArgument(EdgeLoraError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(EdgeLoraError):
    code = grpc.StatusCode.NOT_FOUND


class ResourceExhausted(EdgeLoraError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(EdgeLoraError):
    code = grpc.StatusCode.UNAVAILABLE


class Unimplemented(EdgeLoraError):
    code = grpc.StatusCode.UNIMPLEMENTED


class Unauthenticated(EdgeLoraError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(EdgeLoraError):
    code = grpc.StatusCode.PERMISSION_DENIED


class AlreadyExists(EdgeLoraError):
    code = grpc.StatusCode.ALREADY_EXISTS


class Aborted(EdgeLoraError):
    code = grpc.StatusCode.ABORTED


class DeadlineExceeded(EdgeLoraError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class FailedPrecondition(EdgeLoraError):
    code = grpc.StatusCode.FAILED_PRECONDITION


@asynccontextmanager
async def refusals_abort(context: grpc.aio.ServicerContext,
                         requests: AsyncIterator[Message] | None = None,
                         drain_bytes: int = 0) -> AsyncIterator[None]:
    """In a servicer method: an EdgeLoraError raised inside ends the call with its status and
    message. In one that reads a client stream (`requests`), up to `drain_bytes` of what the
    client still sends are read and dropped first: an asyncio client whose write fails as the
    call ends reports INTERNAL in place of the server's status (grpc/grpc#36066), so, like an
    HTTP server's lingering close, the client may finish writing and read why it was refused."""
    try:
        yield
    except EdgeLoraError as exc:
        if requests is not None:
            await _drain(requests, drain_bytes)
        await context.abort(exc.code, str(exc))


async def _drain(requests: AsyncIterator[Message], limit_bytes: int) -> None:
    seen = 0
    async for message in requests:
        seen += message.ByteSize()
        if seen > limit_bytes:
            return
