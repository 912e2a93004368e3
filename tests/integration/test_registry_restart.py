"""The registry survives its router: real `edgelora router` and `edgelora worker` processes, the
router killed with SIGKILL and started again on the same --state-dir.

After the restart ListAdapters is the same and each adapter gives the same greedy tokens; the
worker never saw an unregister or a re-registration (its cached copies were kept: no new load).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from edgelora.client import build_request, upload_messages
from edgelora.v1 import router_pb2, router_pb2_grpc, types_pb2
from tests.conftest import write_random_adapter
from tests.integration.test_worker_failover import WorkerProcess, free_port

GREEDY = {"max_tokens": 8, "temperature": 0.0, "ignore_eos": True}


class RouterProcess(WorkerProcess):
    """`python -m edgelora.cli router` in front of `worker`, its registry in `state_dir`
    (started, killed and stopped as a WorkerProcess is)."""

    def __init__(self, worker: WorkerProcess, state_dir: Path, log_path: Path) -> None:
        port = free_port()
        self.port, self.address = port, f"127.0.0.1:{port}"
        self.command = [sys.executable, "-m", "edgelora.cli", "router", "--workers",
                        worker.address, "--port", str(port), "--state-dir", str(state_dir),
                        "--embedder-threads", "1", "--health-interval-s", "0.2"]
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        super().start()
        with grpc.insecure_channel(self.address) as channel:
            grpc.channel_ready_future(channel).result(timeout=120)


@pytest.fixture()
def processes(tiny_model_dir: Path, tmp_path: Path):
    worker = WorkerProcess(tiny_model_dir, free_port(), tmp_path / "worker.log")
    worker.start()
    worker.wait_ready()
    router = RouterProcess(worker, tmp_path / "state", tmp_path / "router.log")
    try:
        router.start()
        yield worker, router
    finally:
        router.stop()
        worker.stop()


def snapshot(address: str) -> tuple[list[tuple], dict[str, list[int]]]:
    """(ListAdapters as tuples, greedy tokens per adapter) through the public API."""
    with grpc.insecure_channel(address) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        listed = stub.ListAdapters(types_pb2.ListAdaptersRequest(), timeout=30).adapters
        rows = sorted((a.adapter_id, a.rank, a.description, a.tenant, a.shared, a.digest,
                       a.version, a.created_s, a.updated_s) for a in listed)
        tokens = {a.adapter_id: list(stub.Generate(build_request(
            "Tell me about the sea", adapter_id=a.adapter_id, **GREEDY), timeout=60).token_ids)
            for a in listed}
    return rows, tokens


def test_kill_9_router_then_restart_serves_the_same(processes, tiny_model_dir: Path,
                                                    tmp_path: Path) -> None:
    worker, router = processes
    with grpc.insecure_channel(router.address) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        for name, seed, rank in (("alpha", 1, 4), ("beta", 2, 8)):
            stub.RegisterAdapter(types_pb2.RegisterAdapterRequest(
                adapter_id=name, path=str(write_random_adapter(tmp_path / name, tiny_model_dir,
                                                               rank=rank, seed=seed)),
                description=f"{name} card", example_prompts=[f"{name} prompt"]), timeout=60)
        replaced = write_random_adapter(tmp_path / "beta2", tiny_model_dir, rank=4, seed=3)
        stub.RegisterAdapter(types_pb2.RegisterAdapterRequest(
            adapter_id="beta", path=str(replaced), replace=True), timeout=60)
        stub.UploadAdapter(upload_messages(
            write_random_adapter(tmp_path / "gamma", tiny_model_dir, rank=4, seed=4),
            router_pb2.UploadAdapterHeader(adapter_id="gamma", description="gamma card")),
            timeout=60)
    before = snapshot(router.address)
    assert [row[0] for row in before[0]] == ["alpha", "beta", "gamma"]
    assert before[0][1][1] == 4 and before[0][1][6] == 2, "beta: rank 4, version 2"
    assert len({tuple(t) for t in before[1].values()}) == 3
    loads = worker.info().adapter_stats.host.loads

    router.kill()
    held = {a.adapter_id for a in worker.info().adapters}
    router.start()
    after = snapshot(router.address)
    assert after == before
    info = worker.info()
    assert info.adapter_stats.num_registered == 3
    assert held <= {a.adapter_id for a in info.adapters}, "cached copies kept across the restart"
    assert info.adapter_stats.host.loads == loads, "nothing was registered again or reloaded"


def test_without_state_dir_a_starting_router_removes_nothing(tiny_model_dir: Path,
                                                             tmp_path: Path) -> None:
    """In-memory mode: a router started against a worker that holds adapters leaves them."""
    worker = WorkerProcess(tiny_model_dir, free_port(), tmp_path / "worker.log")
    worker.start()
    worker.wait_ready()
    first = RouterProcess(worker, tmp_path / "unused", tmp_path / "r1.log")
    first.command[first.command.index("--state-dir") + 1] = ""
    second = RouterProcess(worker, tmp_path / "unused", tmp_path / "r2.log")
    second.command = list(first.command)
    second.command[second.command.index("--port") + 1] = str(second.port)
    try:
        first.start()
        with grpc.insecure_channel(first.address) as channel:
            router_pb2_grpc.RouterStub(channel).RegisterAdapter(types_pb2.RegisterAdapterRequest(
                adapter_id="kept", path=str(write_random_adapter(
                    tmp_path / "kept", tiny_model_dir, rank=4))), timeout=60)
        first.kill()
        second.start()
        with grpc.insecure_channel(second.address) as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            stub.ListAdapters(types_pb2.ListAdaptersRequest(), timeout=30)
        assert worker.info().adapter_stats.num_registered == 1
    finally:
        for process in (first, second):
            process.stop()
        worker.stop()

