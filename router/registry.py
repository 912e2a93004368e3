"""The router's adapter registry: ids, paths, descriptions and example prompts, kept in sync with
every worker (which validate and hold the weights). Never reads adapter weights itself."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from common.adapter_format import CONFIG_FILE
from common.errors import EdgeLoraError, NotFound
from edgelora.v1 import types_pb2, worker_pb2
from router.workers import WorkerPool

log = logging.getLogger(__name__)
CARD_FILE = "card.json"  # optional: {"description": ..., "example_prompts": [...]}


@dataclass
class AdapterRecord:
    adapter_id: str
    path: str
    rank: int
    description: str = ""
    example_prompts: list[str] = field(default_factory=list)


class RpcError(EdgeLoraError):
    """A worker's refusal, passed on with its own status code."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class AdapterRegistry:
    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool
        self.adapters: dict[str, AdapterRecord] = {}

    async def register(self, request: types_pb2.RegisterAdapterRequest) -> AdapterRecord:
        """Registers on every worker (each validates against its base model), then here."""
        rank = 0
        for worker in self.pool.workers:
            try:
                reply = await worker.stub.RegisterAdapter(request, timeout=60)
            except grpc.aio.AioRpcError as exc:
                raise RpcError(exc.code(), exc.details() or exc.code().name) from exc
            rank = reply.adapter.rank
        record = AdapterRecord(request.adapter_id, request.path, rank, request.description,
                               list(request.example_prompts))
        self.adapters[record.adapter_id] = record
        return record

    async def unregister(self, adapter_id: str) -> None:
        if self.adapters.pop(adapter_id, None) is None:
            raise NotFound(f"adapter {adapter_id!r} is not registered")
        for worker in self.pool.workers:
            try:
                await worker.stub.UnregisterAdapter(
                    types_pb2.UnregisterAdapterRequest(adapter_id=adapter_id), timeout=30)
            except grpc.aio.AioRpcError as exc:  # gone there already: nothing left to undo
                log.warning("unregister %s on %s: %s", adapter_id, worker.address, exc.details())

    async def list(self) -> list[types_pb2.AdapterInfo]:
        """Registered adapters with the best tier any worker holds them in."""
        tiers: dict[str, int] = {}
        for worker in self.pool.workers:
            try:
                info = await worker.stub.Info(worker_pb2.InfoRequest(), timeout=10)
            except grpc.aio.AioRpcError:
                continue  # a worker that is down holds nothing
            for held in info.adapters:
                tiers[held.adapter_id] = max(tiers.get(held.adapter_id, 0), held.tier)
        return [types_pb2.AdapterInfo(
            adapter_id=r.adapter_id, rank=r.rank, path=r.path, description=r.description,
            tier=tiers.get(r.adapter_id, types_pb2.ADAPTER_TIER_DISK))
            for r in self.adapters.values()]

    async def register_dir(self, root: Path) -> int:
        """Registers every PEFT adapter directory under `root` (id = its name); -> count."""
        count = 0
        for path in sorted(p.parent for p in root.glob(f"*/{CONFIG_FILE}")):
            card_file = path / CARD_FILE
            card = json.loads(card_file.read_text()) if card_file.is_file() else {}
            await self.register(types_pb2.RegisterAdapterRequest(
                adapter_id=card.get("adapter_id", path.name), path=str(path.resolve()),
                description=card.get("description", ""),
                example_prompts=card.get("example_prompts", [])))
            count += 1
        return count
