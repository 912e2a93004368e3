"""Typed errors carrying the gRPC status a client should see; mapped to gRPC only in services."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc


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
async def refusals_abort(context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
    """In a servicer method: an EdgeLoraError raised inside ends the call with its status and
    message."""
    try:
        yield
    except EdgeLoraError as exc:
        await context.abort(exc.code, str(exc))
