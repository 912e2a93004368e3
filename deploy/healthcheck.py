"""Exit 0 when a gRPC server's standard health service says SERVING, else 1 (with the reason).

Docker health checks and init containers use it, and the router's Kubernetes probes (kubelet's
native gRPC probe cannot speak TLS); the health service answers without an API key or the
internal secret, so a check needs neither. Needs only grpcio and grpcio-health-checking:

    python deploy/healthcheck.py 127.0.0.1:50052 edgelora.v1.Worker
    python deploy/healthcheck.py edgelora-worker:50052 --wait-s 600   # until one answers SERVING
    # a TLS port: trust the server's own certificate (or its CA), check it against a name it holds
    python deploy/healthcheck.py 127.0.0.1:50051 edgelora.v1.Router \\
        --tls-ca /run/secrets/tls.crt --tls-server-name localhost
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def open_channel(address: str, tls_ca: str = "", tls_server_name: str = "") -> grpc.Channel:
    """Plaintext, or TLS trusting the PEM in `tls_ca` (a self-signed certificate can be its own
    CA) and checking the server's certificate against `tls_server_name` ('' = the address's
    host)."""
    if not tls_ca:
        return grpc.insecure_channel(address)
    credentials = grpc.ssl_channel_credentials(root_certificates=Path(tls_ca).read_bytes())
    options = [("grpc.ssl_target_name_override", tls_server_name)] if tls_server_name else []
    return grpc.secure_channel(address, credentials, options=options)


def check(address: str, service: str, timeout_s: float, tls_ca: str = "",
          tls_server_name: str = "") -> str:
    """-> the health status name ("SERVING", ...), the gRPC error code name, or why the TLS CA
    could not be read."""
    try:
        channel = open_channel(address, tls_ca, tls_server_name)
    except OSError as exc:
        return f"--tls-ca unreadable ({exc})"
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s,
                               wait_for_ready=True)
        except grpc.RpcError as exc:
            return exc.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("address", help="host:port of the gRPC server")
    parser.add_argument("service", nargs="?", default="",
                        help="service name, e.g. edgelora.v1.Router ('' = the whole server)")
    parser.add_argument("--timeout-s", type=float, default=3.0, help="deadline of one check")
    parser.add_argument("--wait-s", type=float, default=0.0,
                        help="keep checking this long until SERVING (init containers)")
    parser.add_argument("--tls-ca", default="",
                        help="connect with TLS, trusting this PEM file (the server's certificate "
                             "or its CA); '' = plaintext")
    parser.add_argument("--tls-server-name", default="",
                        help="with --tls-ca: the name the server's certificate must hold "
                             "('' = the host in ADDRESS)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.tls_server_name and not args.tls_ca:
        print("--tls-server-name needs --tls-ca", file=sys.stderr)
        return 2
    give_up = time.monotonic() + args.wait_s
    while True:
        status = check(args.address, args.service, args.timeout_s, args.tls_ca,
                       args.tls_server_name)
        if status == "SERVING":
            return 0
        if time.monotonic() >= give_up:
            print(f"{args.address} {args.service or '(server)'}: {status}", file=sys.stderr)
            return 1
        time.sleep(1.0)


if __name__ == "__main__":
    sys.exit(main())
