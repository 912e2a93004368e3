"""Adapter registration through the router: validation, serving, tiers, unregistering, isolation."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from common.errors import InvalidArgument
from edgelora.client import build_request
from edgelora.v1 import router_pb2_grpc, types_pb2
from router.adapter_cards import read_card
from tests.conftest import ServeThread, write_random_adapter, write_tiny_llama
from worker.config import WorkerConfig


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path):
    server = ServeThread(WorkerConfig(model=str(tiny_model_dir), port=0, num_threads=1,
                                      max_model_len=256, kv_cache_mb=16, max_lora_rank=16,
                                      device_adapter_slots=2, host_adapter_cache=2))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def stub(server: ServeThread) -> router_pb2_grpc.RouterStub:
    return router_pb2_grpc.RouterStub(grpc.insecure_channel(server.address))


def register(stub, adapter_id: str, path: Path, description: str = "") -> types_pb2.AdapterInfo:
    return stub.RegisterAdapter(types_pb2.RegisterAdapterRequest(
        adapter_id=adapter_id, path=str(path), description=description), timeout=30).adapter


def generate(stub, adapter_id: str, prompt: str = "Tell me a story") -> types_pb2.GenerateResponse:
    return stub.Generate(build_request(prompt, adapter_id=adapter_id, max_tokens=12,
                                       ignore_eos=True), timeout=60)


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


def test_register_serve_and_list_tiers(stub, tmp_path: Path, tiny_model_dir: Path) -> None:
    info = register(stub, "tenant-a/summarize", write_random_adapter(tmp_path / "a", tiny_model_dir,
                                                                     rank=8), "summaries")
    assert (info.rank, info.tier) == (8, types_pb2.ADAPTER_TIER_DISK)
    listed = {a.adapter_id: a for a in stub.ListAdapters(types_pb2.ListAdaptersRequest()).adapters}
    assert listed["tenant-a/summarize"].description == "summaries"
    base, tuned = generate(stub, ""), generate(stub, "tenant-a/summarize")
    assert tuned.adapter_id == "tenant-a/summarize" and base.adapter_id == ""
    assert list(tuned.token_ids) != list(base.token_ids)
    listed = {a.adapter_id: a for a in stub.ListAdapters(types_pb2.ListAdaptersRequest()).adapters}
    assert listed["tenant-a/summarize"].tier == types_pb2.ADAPTER_TIER_DEVICE


def test_more_adapters_than_slots_all_serve_correctly(stub, tmp_path: Path,
                                                      tiny_model_dir: Path) -> None:
    ids = [f"many-{i}" for i in range(5)]  # 2 device slots, 2 host entries: evictions happen
    for i, adapter_id in enumerate(ids):
        register(stub, adapter_id, write_random_adapter(tmp_path / adapter_id, tiny_model_dir,
                                                        rank=4, seed=100 + i))
    first = {a: list(generate(stub, a).token_ids) for a in ids}
    again = {a: list(generate(stub, a).token_ids) for a in reversed(ids)}
    assert first == again
    assert len({tuple(v) for v in first.values()}) == len(ids)


@pytest.mark.parametrize("problem", ["missing dir", "rank too large", "other base model",
                                     "unsupported module", "bad id"])
def test_bad_adapters_are_invalid_argument(stub, tmp_path: Path, tiny_model_dir: Path,
                                           problem: str) -> None:
    adapter_id, path = "bad", tmp_path / "bad"
    if problem == "rank too large":
        write_random_adapter(path, tiny_model_dir, rank=32)
    elif problem == "other base model":
        other = write_tiny_llama(tmp_path / "other", tiny_model_dir, hidden_size=32)
        write_random_adapter(path, other, rank=4)
    elif problem == "unsupported module":
        write_random_adapter(path, tiny_model_dir, rank=4)
        config = (path / "adapter_config.json").read_text()
        (path / "adapter_config.json").write_text(config.replace('"q_proj"', '"lm_head"'))
    elif problem == "bad id":
        write_random_adapter(path, tiny_model_dir, rank=4)
        adapter_id = "auto"
    with pytest.raises(grpc.RpcError) as info:
        register(stub, adapter_id, path)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert info.value.details()
    if adapter_id != "auto":  # nothing half-registered is left to serve
        assert code_of(lambda: generate(stub, adapter_id)) == grpc.StatusCode.NOT_FOUND


def test_files_changed_on_disk_after_registration_change_nothing(stub, tmp_path: Path,
                                                                 tiny_model_dir: Path) -> None:
    """A path registration is copied into the store: what serves is what was registered,
    whatever happens to the folder later (rewritten with another adapter, truncated, gone)."""
    folder = write_random_adapter(tmp_path / "kept", tiny_model_dir, rank=4, seed=7)
    register(stub, "kept", folder)
    expected = list(generate(stub, "kept", "Hi").token_ids)
    write_random_adapter(folder, tiny_model_dir, rank=4, seed=8)  # other weights, same place
    register(stub, "other", folder)
    assert list(generate(stub, "other", "Hi").token_ids) != expected
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    stub.UnregisterAdapter(types_pb2.UnregisterAdapterRequest(adapter_id="other"), timeout=30)
    for adapter_id in ("kept", "", "kept"):  # evicted from the 2 device slots in between
        got = generate(stub, adapter_id, "Hi")
        assert adapter_id == "" or list(got.token_ids) == expected


def test_unregister(stub, tmp_path: Path, tiny_model_dir: Path) -> None:
    register(stub, "temp", write_random_adapter(tmp_path / "t", tiny_model_dir, rank=4))
    generate(stub, "temp")
    stub.UnregisterAdapter(types_pb2.UnregisterAdapterRequest(adapter_id="temp"), timeout=30)
    assert code_of(lambda: generate(stub, "temp")) == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: stub.UnregisterAdapter(
        types_pb2.UnregisterAdapterRequest(adapter_id="temp"), timeout=30)) == \
        grpc.StatusCode.NOT_FOUND
    listed = [a.adapter_id for a in stub.ListAdapters(types_pb2.ListAdaptersRequest()).adapters]
    assert "temp" not in listed


class RecordingWorker:
    """A worker stub holding a set of adapter ids and recording what the registry asks."""

    def __init__(self, held: set[str]) -> None:
        self.held = set(held)
        self.calls: list[tuple[str, str]] = []

    async def ListAdapters(self, request, timeout=None) -> types_pb2.ListAdaptersResponse:
        return types_pb2.ListAdaptersResponse(adapters=[types_pb2.AdapterInfo(adapter_id=a)
                                                        for a in sorted(self.held)])

    async def RegisterAdapter(self, request, timeout=None) -> types_pb2.RegisterAdapterResponse:
        self.calls.append(("register", request.adapter_id))
        self.held.add(request.adapter_id)
        return types_pb2.RegisterAdapterResponse(adapter=types_pb2.AdapterInfo(
            adapter_id=request.adapter_id, rank=4))

    async def UnregisterAdapter(self, request, timeout=None):
        self.calls.append(("unregister", request.adapter_id))
        self.held.discard(request.adapter_id)
        return types_pb2.UnregisterAdapterResponse()


@pytest.mark.parametrize("durable", [False, True])
def test_sync_registers_only_missing_adapters_and_drops_stale_ones(durable: bool,
                                                                   tmp_path: Path) -> None:
    """A rejoining worker gets what it lacks and loses what was removed. With a database the
    registry is the whole truth: an id it does not hold ("old") is stale. In memory only what
    this router itself unregistered ("c") is removed: it cannot know what a predecessor held."""
    import asyncio

    from router.registry import AdapterRegistry
    from router.registry_db import RegistryDB
    from router.workers import WorkerHandle, WorkerPool

    async def scenario() -> tuple[list[tuple[str, str]], set[str]]:
        db = RegistryDB(tmp_path) if durable else None
        registry = AdapterRegistry(WorkerPool(["127.0.0.1:1"]), db=db)
        first = RecordingWorker(set())
        handle = WorkerHandle("10.0.0.1:1", "10.0.0.1:1", None, first, is_live=True)
        registry.pool._handles[handle.address] = handle
        for adapter_id in ("a", "b", "c", "d"):
            await registry.register(types_pb2.RegisterAdapterRequest(adapter_id=adapter_id,
                                                                     path="/x"))
        await registry.unregister("c")
        # a worker that kept "a" (its cached weights must stay) and "c", lacks b and d, and
        # has "old" that this registry never held
        rejoining = RecordingWorker({"a", "c", "old"})
        await registry.sync_worker(WorkerHandle("10.0.0.2:1", "10.0.0.2:1", None, rejoining))
        return rejoining.calls, rejoining.held

    calls, held = asyncio.run(scenario())
    assert calls[:2] == [("register", "b"), ("register", "d")]
    if durable:
        assert calls[2:] == [("unregister", "c"), ("unregister", "old")]
        assert held == {"a", "b", "d"}
    else:
        assert calls[2:] == [("unregister", "c")]
        assert held == {"a", "b", "d", "old"}


def test_worker_that_lost_its_registrations_is_resynced_and_serves(
        stub, server: ServeThread, tmp_path: Path, tiny_model_dir: Path) -> None:
    from edgelora.v1 import worker_pb2_grpc

    register(stub, "survivor", write_random_adapter(tmp_path / "s", tiny_model_dir, rank=4))
    expected = list(generate(stub, "survivor").token_ids)
    with grpc.insecure_channel(server.worker_address) as channel:  # as after a quick restart
        worker_pb2_grpc.WorkerStub(channel).UnregisterAdapter(
            types_pb2.UnregisterAdapterRequest(adapter_id="survivor"), timeout=10)
    assert list(generate(stub, "survivor").token_ids) == expected


def test_adapters_dir_read_before_any_worker_is_up_registers_on_join(tmp_path: Path,
                                                                    tiny_model_dir: Path) -> None:
    import asyncio

    from router.registry import AdapterRegistry
    from router.workers import WorkerHandle, WorkerPool

    for name in ("one", "two"):
        write_random_adapter(tmp_path / name, tiny_model_dir, rank=4)

    async def scenario() -> tuple[list[int], list[int], set[str]]:
        registry = AdapterRegistry(WorkerPool(["127.0.0.1:1"]))  # not started: none live
        assert await registry.register_dir(tmp_path) == 2
        before = [r.rank for r in registry.adapters.values()]
        joining = RecordingWorker(set())
        await registry.sync_worker(WorkerHandle("10.0.0.1:1", "10.0.0.1:1", None, joining))
        return before, [r.rank for r in registry.adapters.values()], joining.held

    before, after, held = asyncio.run(scenario())
    assert before == [0, 0] and after == [4, 4] and held == {"one", "two"}


def test_a_start_collects_contents_no_registration_uses(tmp_path: Path,
                                                       tiny_model_dir: Path) -> None:
    """A router killed between a blob's commit and its registration's write leaves an unused
    blob: the next start removes it and keeps every registered one."""
    from common.adapter_blobs import BlobStore
    from router.registry import AdapterRegistry
    from router.registry_db import RegistryDB, StoredAdapter
    from router.workers import WorkerPool

    store = BlobStore(tmp_path / "store")
    kept = store.add_folder(write_random_adapter(tmp_path / "kept", tiny_model_dir, rank=4))
    orphan = store.add_folder(write_random_adapter(tmp_path / "orphan", tiny_model_dir, rank=4,
                                                   seed=5))
    db = RegistryDB(tmp_path / "state")
    db.put(StoredAdapter("", "kept", "", 4, "", [], digest=kept))
    registry = AdapterRegistry(WorkerPool(["127.0.0.1:1"]), db=db, store=store)
    assert registry.load_state() == 1
    assert registry.collect_unused() == 1
    assert store.digests() == {kept} and orphan != kept


def test_a_content_being_installed_is_never_removed_under_it(tmp_path: Path,
                                                             tiny_model_dir: Path) -> None:
    """An upload installs content identical to a blob whose last registration goes meanwhile:
    the removal waits for the install, the upload holds the blob, and release() drops it
    (router/content_holds.py; here with the real store and the registry's own holds)."""
    import asyncio
    import threading

    from common.adapter_blobs import BlobStore
    from router.registry import AdapterRegistry
    from router.workers import WorkerPool

    store = BlobStore(tmp_path / "store")
    folder = write_random_adapter(tmp_path / "a", tiny_model_dir, rank=4)
    digest = store.add_folder(folder)  # the blob a removed registration leaves
    registry = AdapterRegistry(WorkerPool(["127.0.0.1:1"]), store=store)
    installing, go_on = threading.Event(), threading.Event()

    def install() -> str:
        installing.set()
        go_on.wait(10)
        return store.add_folder(folder)  # finds it there already

    async def scenario() -> tuple[bool, bool, bool]:
        upload = asyncio.create_task(registry.contents.add(install))
        await asyncio.to_thread(installing.wait, 10)
        registry.contents.drop_if_unused(digest)  # the other registration's last use ends now
        during = store.has(digest)
        go_on.set()
        assert await upload == digest
        held = store.has(digest)
        registry.contents.release(digest)
        return during, held, store.has(digest)

    assert asyncio.run(scenario()) == (True, True, False)


def test_a_card_kind_is_checked_kept_and_listed(stub, tmp_path: Path,
                                                tiny_model_dir: Path) -> None:
    path = write_random_adapter(tmp_path / "k", tiny_model_dir, rank=4)
    assert code_of(lambda: stub.RegisterAdapter(types_pb2.RegisterAdapterRequest(
        adapter_id="kinded", path=str(path), kind="topic"), timeout=30)) \
        == grpc.StatusCode.INVALID_ARGUMENT
    info = stub.RegisterAdapter(types_pb2.RegisterAdapterRequest(
        adapter_id="kinded", path=str(path), description="Maths word problems",
        example_prompts=["What is 15% of 80?"], kind="domain"), timeout=30).adapter
    assert info.kind == "domain"
    listed = {a.adapter_id: a for a in stub.ListAdapters(types_pb2.ListAdaptersRequest()).adapters}
    assert listed["kinded"].kind == "domain"
    # a card file's kind (uploads, --adapters-dir) is read and checked too
    (path / "card.json").write_text('{"description": "SQL", "kind": "domain"}')
    assert read_card(path).kind == "domain"
    (path / "card.json").write_text('{"kind": "style"}')
    with pytest.raises(InvalidArgument, match="behaviour"):
        read_card(path)
    stub.UnregisterAdapter(types_pb2.UnregisterAdapterRequest(adapter_id="kinded"), timeout=30)
