"""Two real worker processes behind one router: kill -9 one under a streaming load, restart it.

No request hangs; requests not yet started on the killed worker finish on the other; streams
already running there end with UNAVAILABLE naming it; the restarted worker rejoins with every
adapter registered again and serves requests.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from edgelora.client import build_request
from edgelora.v1 import router_pb2_grpc, types_pb2, worker_pb2, worker_pb2_grpc
from router.config import RouterConfig
from tests.conftest import write_random_adapter

REPO = Path(__file__).resolve().parents[2]
ADAPTER_IDS = [f"tenant-{i}" for i in range(4)]
MAX_TOKENS = 160
NUM_REQUESTS = 20
DEADLINE_S = 120.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WorkerProcess:
    """`python -m edgelora.cli worker` on the tiny model; small batches so requests queue."""

    def __init__(self, model_dir: Path, port: int, log_path: Path) -> None:
        self.port, self.address = port, f"127.0.0.1:{port}"
        self.command = [sys.executable, "-m", "edgelora.cli", "worker", "--model", str(model_dir),
                        "--port", str(port), "--num-threads", "1", "--max-model-len", "256",
                        "--kv-cache-mb", "16", "--max-batch-size", "2",
                        "--device-adapter-slots", "2", "--host-adapter-cache", "4"]
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.command, cwd=REPO, stdout=log,
                                         stderr=subprocess.STDOUT)

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        stub = worker_pb2_grpc.WorkerStub(grpc.insecure_channel(self.address))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log_path.read_text()[-2000:]
            try:
                stub.Info(worker_pb2.InfoRequest(), timeout=2)
                return
            except grpc.RpcError:
                time.sleep(0.3)
        raise TimeoutError(f"worker {self.address} not ready: {self.log_path.read_text()[-2000:]}")

    def info(self) -> worker_pb2.InfoResponse:
        with grpc.insecure_channel(self.address) as channel:
            return worker_pb2_grpc.WorkerStub(channel).Info(worker_pb2.InfoRequest(), timeout=10)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


class RouterThread:
    """The router in-process on its own asyncio loop."""

    def __init__(self, config: RouterConfig) -> None:
        from router.server import start_router

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.runtime = self.call(start_router(config))
        self.address = f"127.0.0.1:{self.runtime.port}"

    def call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=60)

    def live(self) -> list[str]:
        return [w.address for w in self.runtime.pool.workers]

    def stop(self) -> None:
        self.call(self.runtime.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


class RetryLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture()
def cluster(tiny_model_dir: Path, tmp_path: Path):
    workers = [WorkerProcess(tiny_model_dir, free_port(), tmp_path / f"worker{i}.log")
               for i in range(2)]
    for worker in workers:
        worker.start()
    router = None
    try:
        for worker in workers:
            worker.wait_ready()
        router = RouterThread(RouterConfig(
            port=0, workers=",".join(w.address for w in workers), health_interval_s=0.3,
            health_timeout_s=1.0))
        yield workers, router
    finally:
        if router is not None:
            router.stop()
        for worker in workers:
            worker.stop()


async def stream_one(stub, request: types_pb2.GenerateRequest, chunks: list[int]) -> tuple:
    """-> (status code, details, generated tokens); chunks[0] counts chunks as they arrive."""
    tokens = 0
    try:
        async for chunk in stub.GenerateStream(request, timeout=DEADLINE_S):
            chunks[0] += 1
            tokens += len(chunk.token_ids)
        return grpc.StatusCode.OK, "", tokens
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details(), tokens


async def load_with_kill(address: str, victim: WorkerProcess) -> tuple[list, list[int]]:
    """NUM_REQUESTS concurrent streams over the adapters and the base model; kill -9 `victim`
    once a few have started. -> (results, chunks received before the kill per request)."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        counts = [[0] for _ in range(NUM_REQUESTS)]
        requests = [build_request(f"Request {i}: tell me a long story",
                                  adapter_id=([*ADAPTER_IDS, ""])[i % 5], max_tokens=MAX_TOKENS,
                                  ignore_eos=True) for i in range(NUM_REQUESTS)]
        tasks = [asyncio.create_task(stream_one(stub, r, c))
                 for r, c in zip(requests, counts, strict=True)]
        while sum(c[0] > 0 for c in counts) < 4:  # both workers are streaming by now
            await asyncio.sleep(0.02)
        before_kill = [c[0] for c in counts]
        victim.kill()
        _, pending = await asyncio.wait(tasks, timeout=DEADLINE_S)
        assert not pending, f"{len(pending)} requests hang after the kill"
        return [t.result() for t in tasks], before_kill


def test_kill_worker_during_load_then_rejoin(cluster, tiny_model_dir: Path, tmp_path: Path,
                                             ) -> None:
    workers, router = cluster
    victim, survivor = workers
    stub = router_pb2_grpc.RouterStub(grpc.insecure_channel(router.address))
    for i, adapter_id in enumerate(ADAPTER_IDS):
        stub.RegisterAdapter(types_pb2.RegisterAdapterRequest(
            adapter_id=adapter_id, path=str(write_random_adapter(
                tmp_path / adapter_id, tiny_model_dir, rank=4, seed=i))), timeout=30)
    retries, service_log = RetryLog(), logging.getLogger("router.dispatch")
    service_log.addHandler(retries)
    level = service_log.level
    service_log.setLevel(logging.INFO)
    try:
        started = time.monotonic()
        results, before_kill = asyncio.run(load_with_kill(router.address, victim))
        elapsed_s = time.monotonic() - started
    finally:
        service_log.removeHandler(retries)
        service_log.setLevel(level)

    failed = [(r, n) for r, n in zip(results, before_kill, strict=True)
              if r[0] != grpc.StatusCode.OK]
    for (code, details, tokens), _ in failed:  # only streams cut mid-way, each naming the worker
        assert code == grpc.StatusCode.UNAVAILABLE, details
        assert victim.address in details and "retry" in details, details
        assert 0 < tokens < MAX_TOKENS
    assert all(n > 0 for _, n in failed), "a request not yet streaming was lost"
    completed = [r for r in results if r[0] == grpc.StatusCode.OK]
    assert all(tokens == MAX_TOKENS for _, _, tokens in completed)
    print(f"{len(completed)} completed, {len(failed)} cut, "
          f"{sum('retrying' in m for m in retries.messages)} retried, {elapsed_s:.1f} s")
    assert failed, "no stream was running on the killed worker: the kill came too late"
    assert any("retrying elsewhere" in m for m in retries.messages), \
        "no request queued on the killed worker was retried on the other"
    assert len(completed) + len(failed) == NUM_REQUESTS and elapsed_s < DEADLINE_S
    assert router.live() == [survivor.address]

    victim.start()  # same port: the pool notices it, re-registers the adapters, routes to it
    victim.wait_ready()
    deadline = time.monotonic() + 30
    while victim.address not in router.live() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert sorted(router.live()) == sorted(w.address for w in workers)
    with grpc.insecure_channel(victim.address) as channel:
        held = worker_pb2_grpc.WorkerStub(channel).ListAdapters(types_pb2.ListAdaptersRequest(),
                                                                timeout=10)
    assert sorted(a.adapter_id for a in held.adapters) == ADAPTER_IDS
    # Affinity pins each adapter to one worker, and all 4 land on the survivor 1 time in 16:
    # 12 aliases of the same files make that 1 in 65536.
    aliases = [f"{adapter_id}-alias{k}" for k in range(3) for adapter_id in ADAPTER_IDS]
    for alias in aliases:
        stub.RegisterAdapter(types_pb2.RegisterAdapterRequest(
            adapter_id=alias, path=str(tmp_path / alias.split("-alias")[0])), timeout=30)
    for adapter_id in ADAPTER_IDS + aliases:
        reply = stub.Generate(build_request("Hello", adapter_id=adapter_id, max_tokens=4,
                                            ignore_eos=True), timeout=60)
        assert reply.adapter_id == adapter_id and len(reply.token_ids) == 4
    stats = victim.info().adapter_stats
    assert stats.device.hits + stats.device.misses > 0, "the rejoined worker got no request"
