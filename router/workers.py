"""The router's view of its workers: one channel each, and which one takes the next request."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import grpc

from edgelora.v1 import worker_pb2_grpc


@dataclass
class WorkerHandle:
    address: str
    channel: grpc.aio.Channel
    stub: worker_pb2_grpc.WorkerStub
    num_in_flight: int = 0


class WorkerPool:
    def __init__(self, addresses: list[str]) -> None:
        self.workers = []
        for address in addresses:
            channel = grpc.aio.insecure_channel(address)
            self.workers.append(WorkerHandle(address, channel, worker_pb2_grpc.WorkerStub(channel)))

    @contextlib.contextmanager
    def lease(self) -> Iterator[WorkerHandle]:
        """The least busy worker, counted busy until the request ends."""
        worker = min(self.workers, key=lambda w: w.num_in_flight)
        worker.num_in_flight += 1
        try:
            yield worker
        finally:
            worker.num_in_flight -= 1

    async def close(self) -> None:
        for worker in self.workers:
            await worker.channel.close()
