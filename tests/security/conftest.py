"""One real `edgelora serve` process for the black-box security suite (tests/security).

The server runs on the tiny random model with API keys (admin 'ops'; tenants 'acme', 'beta', the
tightly limited 'gamma' (max_running 1, max_queued 1, max_adapters 2) and 'fuzz' for the property
tests), TLS on the public ports (gRPC, and HTTP for the OpenAI-compatible API; a self-signed
certificate made by openssl), --adapter-root holding good and hostile adapters, and
--adapters-dir holding one good shared adapter and two bad entries. Tests talk to it only
through the public Router API (gRPC and HTTP), the health and reflection services, and the
worker's port.

Session-scoped: the suite's modules share one server (starting one takes ~10 s of the budget).
Each test uses its own adapter ids, so the tests do not depend on their order.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import write_random_adapter
from tests.security.helpers import (
    MAX_ADAPTER_MB,
    RANK,
    REPO,
    SecurityServer,
    free_port,
    make_cert,
    wait_ready,
    write_hostile_adapters,
    write_start_dir,
)


@pytest.fixture(scope="session")
def sec(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("security")
    cert, key = make_cert(base)
    root, outside, start_dir = base / "root", base / "outside", base / "start"
    for d in (root, outside, start_dir):
        d.mkdir()
    keys = {name: f"k-{name}-{secrets.token_urlsafe(16)}"
            for name in ("ops", "acme", "beta", "gamma", "fuzz")}
    entries = [{"key": keys["ops"], "tenant": "ops", "role": "admin"},
               {"key": keys["acme"], "tenant": "acme", "role": "tenant"},
               {"key": keys["beta"], "tenant": "beta", "role": "tenant"},
               {"key": keys["gamma"], "tenant": "gamma", "role": "tenant", "max_running": 1,
                "max_queued": 1, "max_adapters": 2},
               {"key": keys["fuzz"], "tenant": "fuzz", "role": "tenant"}]
    keys_file = base / "keys.json"
    keys_file.write_text(json.dumps({"keys": entries}))
    write_random_adapter(outside / "adapter", tiny_model_dir, rank=RANK, seed=90)
    hostile = write_hostile_adapters(root, tiny_model_dir)
    write_start_dir(start_dir, tiny_model_dir)
    port, worker_port, http_port = free_port(), free_port(), free_port()
    log_path = base / "serve.log"
    command = [sys.executable, "-m", "edgelora.cli", "serve", "--model", str(tiny_model_dir),
               "--num-threads", "1", "--dtype", "float32", "--max-model-len", "256",
               "--kv-cache-mb", "16", "--embedder-threads", "1", "--port", str(port),
               "--worker-port", str(worker_port), "--http-port", str(http_port),
               "--api-keys", str(keys_file),
               "--tls-cert", str(cert), "--tls-key", str(key), "--adapter-root", str(root),
               "--adapters-dir", str(start_dir), "--max-adapter-mb", str(MAX_ADAPTER_MB),
               "--max-lora-rank", "16", "--register-timeout-s", "5",
               "--state-dir", str(base / "state")]
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGELORA_")}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
    server = SecurityServer(proc, port, worker_port, cert.read_bytes(), keys, root, outside,
                            start_dir, hostile, tiny_model_dir, log_path, http_port)
    try:
        wait_ready(server)
        yield server
    finally:
        server.close()
