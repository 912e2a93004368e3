"""deploy/healthcheck.py, run exactly as docker-compose, the router's init container and the
router's Kubernetes probes run it, against live servers: 0 only when the named service is
SERVING; over TLS with the certificate deploy/secrets/README.md makes."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tests.conftest import ServeThread
from tests.deploy.deploy_files import (
    DEPLOY,
    KEYS_EXAMPLE,
    SECRETS,
    find,
    image_path_to_repo,
    load_compose,
    overlay_objects,
    shell_commands,
)

SCRIPT = DEPLOY / "healthcheck.py"
ROUTER_SERVICE = "edgelora.v1.Router"


def healthcheck(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=60)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_serving_router_and_worker_pass(tiny_server: ServeThread) -> None:
    for address, service in ((tiny_server.address, "edgelora.v1.Router"),
                             (tiny_server.address, ""),
                             (tiny_server.worker_address, "edgelora.v1.Worker")):
        done = healthcheck(address, service)
        assert done.returncode == 0, (address, service, done.stderr)


def test_a_service_the_server_does_not_run_fails(tiny_server: ServeThread) -> None:
    done = healthcheck(tiny_server.address, "edgelora.v1.Worker")
    assert done.returncode == 1
    assert "NOT_FOUND" in done.stderr


def test_nothing_listening_fails_within_the_deadline() -> None:
    started = time.monotonic()
    done = healthcheck(f"127.0.0.1:{free_port()}", "--timeout-s", "0.5", "--wait-s", "1.5")
    assert done.returncode == 1
    assert "DEADLINE_EXCEEDED" in done.stderr or "UNAVAILABLE" in done.stderr
    assert time.monotonic() - started < 30


# --- TLS -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def documented_cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """tls.crt and tls.key made by deploy/secrets/README.md's openssl command, as written."""
    if shutil.which("openssl") is None:
        pytest.skip("no openssl here")
    (command,) = [c for c in shell_commands(SECRETS / "README.md") if c[0] == "openssl"]
    folder = tmp_path_factory.mktemp("secrets")
    subprocess.run(command, cwd=folder, check=True, capture_output=True, timeout=120)
    return folder / "tls.crt", folder / "tls.key"


@pytest.fixture(scope="module")
def tls_server(documented_cert: tuple[Path, Path]) -> Iterator[str]:
    """A gRPC server speaking TLS only, with the certificate, whose health service says the
    router's service is SERVING (as the router's own port does)."""
    cert, key = documented_cert
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    servicer.set(ROUTER_SERVICE, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    credentials = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(None)


def test_tls_check_trusts_the_certificate_and_checks_a_name_in_it(
        tls_server: str, documented_cert: tuple[Path, Path]) -> None:
    cert = str(documented_cert[0])
    for extra in ((), ("--tls-server-name", "localhost")):
        done = healthcheck(tls_server, ROUTER_SERVICE, "--tls-ca", cert, *extra)
        assert done.returncode == 0, (extra, done.stderr)
    wrong_name = healthcheck(tls_server, ROUTER_SERVICE, "--tls-ca", cert,
                             "--tls-server-name", "elsewhere.example", "--timeout-s", "1")
    assert wrong_name.returncode == 1
    plaintext = healthcheck(tls_server, ROUTER_SERVICE, "--timeout-s", "1")
    assert plaintext.returncode == 1


def test_tls_check_without_a_readable_ca_fails_and_says_why(tmp_path: Path) -> None:
    done = healthcheck("127.0.0.1:1", ROUTER_SERVICE, "--tls-ca", str(tmp_path / "missing.crt"))
    assert done.returncode == 1 and "--tls-ca" in done.stderr
    assert healthcheck("127.0.0.1:1", "--tls-server-name", "localhost").returncode == 2


def _router_checks() -> dict[str, list[str]]:
    """The router's health checks as the deploy files write them (healthcheck.py argv)."""
    checks = {}
    router = load_compose("docker-compose.yml")["services"]["router"]
    checks["compose"] = router["healthcheck"]["test"][1:]
    (deployment,) = find(overlay_objects("cpu"), "Deployment", "edgelora-router")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        checks[f"k8s {probe}"] = container[probe]["exec"]["command"]
    return checks


@pytest.fixture(scope="module")
def keyed_tls_router(tiny_server: ServeThread, documented_cert: tuple[Path, Path]
                     ) -> Iterator[str]:
    """A real router as the deploys run it: TLS with the documented certificate, API keys (the
    example file), in front of the tiny server's worker."""
    from router.config import RouterConfig
    from router.server import start_router

    cert, key = documented_cert
    config = RouterConfig(port=0, workers=tiny_server.worker_address, api_keys=str(KEYS_EXAMPLE),
                          tls_cert=str(cert), tls_key=str(key))
    router = tiny_server._call(start_router(config))
    yield f"127.0.0.1:{router.port}"
    tiny_server._call(router.stop(0))


@pytest.mark.parametrize("where", list(_router_checks()))
def test_the_routers_deployed_checks_pass_over_tls_without_a_key(
        where: str, keyed_tls_router: str, documented_cert: tuple[Path, Path]) -> None:
    """Each check as written (compose, the Kubernetes probes), with the container's certificate
    path and the router's port pointing at a router here that wants TLS and API keys: health
    needs neither a key nor more than the certificate."""
    argv = _router_checks()[where]
    assert argv[0] == "python" and image_path_to_repo(argv[1]) == SCRIPT
    args = [keyed_tls_router if a.startswith("127.0.0.1:") else a for a in argv[2:]]
    ca = args.index("--tls-ca") + 1
    assert args[ca].endswith("/tls.crt"), args
    args[ca] = str(documented_cert[0])
    done = healthcheck(*args)
    assert done.returncode == 0, (where, args, done.stderr)
