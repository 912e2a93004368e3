"""Every worker serves the same content for an id, whatever happens to the registry: real worker
processes (each with its own, initially empty, adapter cache) behind a router with a state dir.

- 100 concurrent registrations, replacements and unregistrations of overlapping ids under a
  generation load end with one state: in the database, on every worker, in ListAdapters, and
  after a router restart;
- an id replaced while 8 streams run on it: those 8 finish on the old weights, every request
  after the acknowledgement gets the new ones, on both workers;
- a worker killed and restarted with an empty disk gets every adapter back by itself.
"""

from __future__ import annotations

import asyncio
import random
import shutil
import time
from pathlib import Path

import grpc
import pytest

from edgelora.client import build_request, upload_messages
from edgelora.v1 import router_pb2, router_pb2_grpc, types_pb2, worker_pb2_grpc
from router.config import RouterConfig
from router.registry_db import RegistryDB
from tests.conftest import write_random_adapter
from tests.integration.test_worker_failover import RouterThread, WorkerProcess, free_port

GREEDY = {"temperature": 0.0, "ignore_eos": True}
PROMPT = "Tell me about the sea"
IDS = [f"x{i}" for i in range(6)]
NUM_CHANGES = 100
OK_REFUSALS = {grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.NOT_FOUND}


class Cluster:
    def __init__(self, model_dir: Path, root: Path) -> None:
        self.root = root
        self.workers = [WorkerProcess(model_dir, free_port(), root / f"worker{i}.log")
                        for i in range(2)]
        for i, worker in enumerate(self.workers):
            worker.command[worker.command.index("--max-batch-size") + 1] = "8"
            worker.command += ["--adapter-cache-dir", str(self.cache(i))]
            worker.start()
        for worker in self.workers:
            worker.wait_ready()
        self.router: RouterThread | None = None
        self.start_router()

    def cache(self, i: int) -> Path:
        return self.root / f"cache-{i}"

    def start_router(self) -> None:
        # round-robin: consecutive requests alternate between the two workers
        self.router = RouterThread(RouterConfig(
            port=0, workers=",".join(w.address for w in self.workers), routing="round-robin",
            state_dir=str(self.root / "state"), health_interval_s=0.2, health_timeout_s=1.0))

    def stop(self) -> None:
        if self.router is not None:
            self.router.stop()
        for worker in self.workers:
            worker.stop()


@pytest.fixture(scope="module")
def cluster(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    cluster = Cluster(tiny_model_dir, tmp_path_factory.mktemp("cluster"))
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def folders(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("adapters")
    return [write_random_adapter(root / f"a{i}", tiny_model_dir, rank=4, seed=40 + i)
            for i in range(3)]


def router_state(address: str) -> dict[str, str]:
    """id -> digest as ListAdapters shows it."""
    with grpc.insecure_channel(address) as channel:
        listed = router_pb2_grpc.RouterStub(channel).ListAdapters(
            types_pb2.ListAdaptersRequest(), timeout=30).adapters
    return {a.adapter_id: a.digest for a in listed}


def worker_state(worker: WorkerProcess) -> dict[str, str]:
    with grpc.insecure_channel(worker.address) as channel:
        listed = worker_pb2_grpc.WorkerStub(channel).ListAdapters(
            types_pb2.ListAdaptersRequest(), timeout=30).adapters
    return {a.adapter_id: a.digest for a in listed}


def database_state(state_dir: Path) -> dict[str, str]:
    db = RegistryDB(state_dir)
    try:
        return {a.adapter_id: a.digest for a in db.load()}
    finally:
        db.close()


def tokens(stub, adapter_id: str, max_tokens: int = 8, prompt: str = PROMPT) -> list[int]:
    return list(stub.Generate(build_request(prompt, adapter_id=adapter_id,
                                            max_tokens=max_tokens, **GREEDY),
                              timeout=60).token_ids)


def wait_until(condition, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


async def change(stub, rng: random.Random, folders: list[Path]) -> grpc.StatusCode:
    """One random change of one of IDS: upload, register by path or unregister."""
    adapter_id, folder, replace = rng.choice(IDS), rng.choice(folders), rng.random() < 0.5
    kind = rng.choice(["upload", "path", "unregister"])
    try:
        if kind == "upload":
            header = router_pb2.UploadAdapterHeader(adapter_id=adapter_id, replace=replace)
            await stub.UploadAdapter(aiter_of(upload_messages(folder, header)), timeout=120)
        elif kind == "path":
            await stub.RegisterAdapter(types_pb2.RegisterAdapterRequest(
                adapter_id=adapter_id, path=str(folder), replace=replace), timeout=120)
        else:
            await stub.UnregisterAdapter(types_pb2.UnregisterAdapterRequest(
                adapter_id=adapter_id), timeout=120)
        return grpc.StatusCode.OK
    except grpc.aio.AioRpcError as exc:
        assert exc.code() in OK_REFUSALS, f"{kind} {adapter_id}: {exc.code()} {exc.details()}"
        return exc.code()


async def aiter_of(messages):
    for message in messages:
        yield message


async def base_load(stub, stop: asyncio.Event) -> int:
    """Base-model generations back to back until `stop`; -> how many finished."""
    done = 0
    while not stop.is_set():
        await stub.Generate(build_request(f"load {done}", max_tokens=16, **GREEDY), timeout=60)
        done += 1
    return done


def test_concurrent_changes_end_in_one_state_everywhere(cluster: Cluster, folders: list[Path]
                                                        ) -> None:
    async def run() -> list[grpc.StatusCode]:
        async with grpc.aio.insecure_channel(cluster.router.address) as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            stop = asyncio.Event()
            load = [asyncio.create_task(base_load(stub, stop)) for _ in range(2)]
            rng = random.Random(7)
            outcomes = await asyncio.gather(*(change(stub, rng, folders)
                                              for _ in range(NUM_CHANGES)))
            stop.set()
            assert all(n > 0 for n in await asyncio.gather(*load)), "the load never ran"
            return outcomes

    outcomes = asyncio.run(run())
    assert outcomes.count(grpc.StatusCode.OK) >= NUM_CHANGES // 4, outcomes
    final = {k: v for k, v in router_state(cluster.router.address).items() if k in IDS}
    assert final, "every id ended unregistered: nothing left to compare"
    assert {k: v for k, v in database_state(cluster.root / "state").items()
            if k in IDS} == final
    for worker in cluster.workers:
        assert {k: v for k, v in worker_state(worker).items() if k in IDS} == final

    cluster.router.stop()
    cluster.start_router()
    assert {k: v for k, v in router_state(cluster.router.address).items() if k in IDS} == final
    with grpc.insecure_channel(cluster.router.address) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        for adapter_id in final:  # round-robin: one request on each worker
            assert tokens(stub, adapter_id) == tokens(stub, adapter_id), adapter_id
    for worker in cluster.workers:
        assert {k: v for k, v in worker_state(worker).items() if k in IDS} == final


async def stream(stub, adapter_id: str, prompt: str, max_tokens: int, started: list[int],
                 index: int) -> list[int]:
    out: list[int] = []
    async for chunk in stub.GenerateStream(build_request(
            prompt, adapter_id=adapter_id, max_tokens=max_tokens, **GREEDY), timeout=120):
        out += chunk.token_ids
        started[index] = len(out)
    return out


def test_replacing_an_id_under_running_streams(cluster: Cluster, folders: list[Path]) -> None:
    old, new = folders[0], folders[1]
    prompts = [f"Story {i} about the sea" for i in range(8)]
    max_tokens = 160
    with grpc.insecure_channel(cluster.router.address) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        for adapter_id, folder in (("swap", old), ("swap-new", new)):
            stub.UploadAdapter(upload_messages(folder, router_pb2.UploadAdapterHeader(
                adapter_id=adapter_id, replace=True)), timeout=60)
        expected_old = [tokens(stub, "swap", max_tokens, p) for p in prompts]
        expected_new = tokens(stub, "swap-new")
        assert tokens(stub, "swap") != expected_new

    async def run() -> tuple[list[list[int]], list[int]]:
        async with grpc.aio.insecure_channel(cluster.router.address) as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            started = [0] * len(prompts)
            streams = [asyncio.create_task(stream(stub, "swap", p, max_tokens, started, i))
                       for i, p in enumerate(prompts)]
            while not all(started):  # all 8 are running, on both workers
                await asyncio.sleep(0.01)
            reply = await stub.UploadAdapter(aiter_of(upload_messages(
                new, router_pb2.UploadAdapterHeader(adapter_id="swap", replace=True))),
                timeout=60)
            at_ack = list(started)
            assert reply.adapter.version >= 2
            return await asyncio.gather(*streams), at_ack

    outputs, at_ack = asyncio.run(run())
    assert any(n < max_tokens for n in at_ack), "the streams ended before the replacement"
    assert outputs == expected_old, "a running stream changed weights mid-way"
    with grpc.insecure_channel(cluster.router.address) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        after = [tokens(stub, "swap") for _ in range(4)]  # round-robin: both workers, twice
    assert after == [expected_new] * 4
    digest = router_state(cluster.router.address)["swap"]
    assert digest == router_state(cluster.router.address)["swap-new"]
    for worker in cluster.workers:
        assert worker_state(worker)["swap"] == digest


def test_a_worker_restarted_with_an_empty_disk_gets_its_adapters_back(
        cluster: Cluster, folders: list[Path]) -> None:
    with grpc.insecure_channel(cluster.router.address) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        stub.UploadAdapter(upload_messages(folders[2], router_pb2.UploadAdapterHeader(
            adapter_id="back", replace=True)), timeout=60)
        before = tokens(stub, "back")
    registered = router_state(cluster.router.address)
    victim = cluster.workers[1]
    victim.kill()
    shutil.rmtree(cluster.cache(1))
    wait_until(lambda: victim.address not in cluster.router.live(), "the router to drop it")
    victim.start()
    victim.wait_ready()
    wait_until(lambda: victim.address in cluster.router.live(), "the worker to rejoin")
    assert worker_state(victim) == registered
    with grpc.insecure_channel(cluster.router.address) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        assert [tokens(stub, "back") for _ in range(2)] == [before] * 2  # both workers
