"""Builds a grpc.aio server with standard health checking and reflection; knows no service logic."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

log = logging.getLogger(__name__)


def create_server(register: list[Callable[[grpc.aio.Server], None]], service_names: list[str],
                  host: str, port: int, tls: tuple[str, str] | None = None,
                  interceptors: Sequence[grpc.aio.ServerInterceptor] = ()
                  ) -> tuple[grpc.aio.Server, int, health.aio.HealthServicer]:
    """-> (server, bound port, health servicer); the caller starts the server.
    tls = (certificate chain PEM file, private key PEM file): the port speaks TLS only."""
    server = grpc.aio.server(interceptors=list(interceptors), options=[
        ("grpc.so_reuseport", 0),
        # The router's channels ping to notice a dead worker fast; without these, a quiet stream
        # (a long prompt chunk) could be cut by gRPC's ping-abuse rule.
        ("grpc.http2.min_ping_interval_without_data_ms", 5000),
        ("grpc.keepalive_permit_without_calls", 1),
    ])
    for add in register:
        add(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME], server)
    if tls is not None:
        cert, key = (Path(p).read_bytes() for p in tls)
        credentials = grpc.ssl_server_credentials([(key, cert)])
        bound = server.add_secure_port(f"{host}:{port}", credentials)
    else:
        bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port}: is the port in use?")
    return server, bound, health_servicer


async def mark_serving(health_servicer: health.aio.HealthServicer,
                       service_names: list[str]) -> None:
    for name in ["", *service_names]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
