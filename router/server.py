"""Starts the router's gRPC server (public API, health, reflection) from its config."""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from prometheus_client.registry import Collector

from common.adapter_blobs import BlobStore
from common.server import create_server, mark_serving
from edgelora.v1 import router_pb2, router_pb2_grpc
from router.adapter_paths import confine
from router.config import RouterConfig
from router.http_api import build_app
from router.http_server import HttpServer
from router.registry import AdapterRegistry
from router.registry_db import RegistryDB
from router.selector import AdapterSelector
from router.service import RouterService
from router.tenants import KeyRing
from router.workers import WorkerPool

log = logging.getLogger(__name__)
ROUTER_SERVICE = router_pb2.DESCRIPTOR.services_by_name["Router"].full_name


@dataclass
class RouterRuntime:
    server: grpc.aio.Server
    port: int
    pool: WorkerPool
    registry: AdapterRegistry | None = None
    http: HttpServer | None = None  # the OpenAI-compatible front, when --http-port is set
    selector: AdapterSelector | None = None

    @property
    def http_port(self) -> int:
        return self.http.port if self.http is not None else 0

    async def stop(self, grace_s: float = 2.0) -> None:
        if self.http is not None:  # both fronts stop taking requests before the pool closes
            await asyncio.gather(self.http.stop(grace_s), self.server.stop(grace_s))
        else:
            await self.server.stop(grace_s)
        await self.pool.close()
        if self.selector is not None:
            self.selector.close()
        if self.registry is not None and self.registry.db is not None:
            self.registry.db.close()
        elif self.registry is not None and self.registry.store is not None:
            shutil.rmtree(self.registry.store.root, ignore_errors=True)  # a temporary store


async def start_router(config: RouterConfig, metrics: Sequence[Collector] = ()) -> RouterRuntime:
    """`metrics`: more registries for the HTTP port's /metrics (`serve`'s in-process worker)."""
    keys = KeyRing(config.api_keys or None)  # a bad keys file stops the start, saying why
    if keys.is_open:
        http_note = f" (or HTTP on {config.http_bind_host}:{config.http_port})" \
            if config.http_port else ""
        log.warning("no --api-keys: one open tenant with the admin role; every client that "
                    "reaches %s:%d%s can register, use and remove any adapter. Give --api-keys "
                    "before serving beyond this machine", config.host, config.port, http_note)
    if not config.internal_secret:
        log.warning("no router <-> worker secret (EDGELORA_INTERNAL_TOKEN or "
                    "--internal-token-file): workers must accept unauthenticated calls")
    pool = WorkerPool.from_config(config)
    db = RegistryDB(config.state_dir) if config.state_dir else None
    # uploaded adapters' files: beside the database, or for this process's life
    store_dir = (Path(config.state_dir).expanduser() / "store" if config.state_dir
                 else Path(tempfile.mkdtemp(prefix="edgelora-store-")))
    store = BlobStore(store_dir, config.max_adapter_bytes)
    # before start: workers joining get its adapters, all of them, loaded first
    registry = AdapterRegistry(pool, config.register_timeout_s, db, store)
    if db is None:
        log.warning("no --state-dir: registrations live in memory and are lost when the router "
                    "restarts")
    else:
        log.info("registry %s: %d adapters", db.path, registry.load_state())
    await pool.start()
    selector = AdapterSelector.from_config(config)  # the embedder loads on first use
    service = RouterService(pool, registry, selector, config, keys)
    tls = (config.tls_cert, config.tls_key) if config.tls_cert else None
    server, port, health = create_server(
        [lambda s: router_pb2_grpc.add_RouterServicer_to_server(service, s)], [ROUTER_SERVICE],
        config.host, config.port, tls=tls)
    if config.adapters_dir:
        count = await registry.register_dir(
            Path(config.adapters_dir),
            check=lambda request: confine(request.path, "", config.max_adapter_bytes))
        log.info("registered %d adapters from %s (shared by every tenant)", count,
                 config.adapters_dir)
    if removed := registry.collect_unused():
        log.info("adapter store: removed %d contents no registration uses", removed)
    if selector.outcomes is not None and selector.outcomes.db is not None:
        log.info("outcomes %s: %d reports", selector.outcomes.db.path,
                 selector.outcomes.load(registry.adapters))
    if registry.adapters or config.selector_head:  # 'auto' will be asked for: load it now
        selector.start_warm_up(registry.adapters)
    http = None
    if config.http_port:  # bound before gRPC starts: a port in use stops the start cleanly
        http = HttpServer(build_app(service.dispatch, metrics), config.http_bind_host,
                          config.http_port, tls)
    await server.start()
    if http is not None:
        await http.start()
        log.info("OpenAI-compatible HTTP on %s://%s:%d/v1", "https" if tls else "http",
                 config.http_bind_host, http.port)
    await mark_serving(health, [ROUTER_SERVICE])
    log.info("router serving on %s:%d%s -> workers %s (%d live of %d; routing %s)",
             config.host, port, " with TLS" if tls else "", config.workers, len(pool.workers),
             len(pool.all_workers), config.routing)
    return RouterRuntime(server, port, pool, registry, http, selector)
