"""Starts the router's gRPC server (public API, health, reflection) from its config."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import grpc

from common.server import create_server, mark_serving
from edgelora.v1 import router_pb2, router_pb2_grpc
from router.config import RouterConfig
from router.registry import AdapterRegistry
from router.selector import AdapterSelector
from router.service import RouterService
from router.workers import WorkerPool

log = logging.getLogger(__name__)
ROUTER_SERVICE = router_pb2.DESCRIPTOR.services_by_name["Router"].full_name


@dataclass
class RouterRuntime:
    server: grpc.aio.Server
    port: int
    pool: WorkerPool

    async def stop(self, grace_s: float = 2.0) -> None:
        await self.server.stop(grace_s)
        await self.pool.close()


async def start_router(config: RouterConfig) -> RouterRuntime:
    pool = WorkerPool.from_config(config)
    registry = AdapterRegistry(pool)  # before start: workers joining get its adapters
    await pool.start()
    selector = AdapterSelector.from_config(config)  # the embedder loads on first use
    service = RouterService(pool, registry, selector)
    server, port, health = create_server(
        [lambda s: router_pb2_grpc.add_RouterServicer_to_server(service, s)], [ROUTER_SERVICE],
        config.host, config.port)
    if config.adapters_dir:
        count = await registry.register_dir(Path(config.adapters_dir))
        log.info("registered %d adapters from %s", count, config.adapters_dir)
    if registry.adapters or config.selector_head:  # 'auto' will be asked for: load it now
        selector.start_warm_up(registry.adapters)
    await server.start()
    await mark_serving(health, [ROUTER_SERVICE])
    log.info("router serving on %s:%d -> workers %s (%d live of %d; routing %s)", config.host,
             port, config.workers, len(pool.workers), len(pool.all_workers), config.routing)
    return RouterRuntime(server, port, pool)
