"""deploy/healthcheck.py, run exactly as docker-compose and the router's init container run it,
against a live router and worker: 0 only when the named service is SERVING."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

from tests.conftest import ServeThread
from tests.deploy.deploy_files import DEPLOY

SCRIPT = DEPLOY / "healthcheck.py"


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
