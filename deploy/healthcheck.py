"""Exit 0 when a gRPC server's standard health service says SERVING, else 1 (with the reason).

Docker health checks and init containers use it; Kubernetes probes speak gRPC health natively.
Needs only grpcio and grpcio-health-checking:

    python deploy/healthcheck.py 127.0.0.1:50052 edgelora.v1.Worker
    python deploy/healthcheck.py edgelora-worker:50052 --wait-s 600   # until one answers SERVING
"""

from __future__ import annotations

import argparse
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(address: str, service: str, timeout_s: float) -> str:
    """-> the health status name ("SERVING", ...), or the gRPC error code name."""
    with grpc.insecure_channel(address) as channel:
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    give_up = time.monotonic() + args.wait_s
    while True:
        status = check(args.address, args.service, args.timeout_s)
        if status == "SERVING":
            return 0
        if time.monotonic() >= give_up:
            print(f"{args.address} {args.service or '(server)'}: {status}", file=sys.stderr)
            return 1
        time.sleep(1.0)


if __name__ == "__main__":
    sys.exit(main())
