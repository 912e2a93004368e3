"""A worker's adapter cache (--adapter-cache-dir) is only a cache: a blob flipped on its disk or
evicted by --adapter-cache-mb is noticed when next read (its hash), sent again by the router and
served exactly as before, without the client seeing an error."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

import common.adapter_blobs
from common.adapter_blobs import BlobStore
from edgelora.client import build_request, upload_messages
from edgelora.v1 import router_pb2, router_pb2_grpc
from tests.conftest import ServeThread, write_random_adapter
from worker.config import WorkerConfig

GREEDY = {"max_tokens": 8, "temperature": 0.0, "ignore_eos": True}


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(common.adapter_blobs, "TRIM_GRACE_S", 0.0)  # evict at once, not in 30 s
        cache = tmp_path_factory.mktemp("worker-cache")
        # one host entry and one device slot: using another adapter sends this one back to disk
        serve = ServeThread(WorkerConfig(model=str(tiny_model_dir), port=0, num_threads=1,
                                         max_model_len=256, kv_cache_mb=16, max_batch_size=4,
                                         host_adapter_cache=1, device_adapter_slots=1,
                                         adapter_cache_dir=str(cache), adapter_cache_mb=1))
        serve.cache = BlobStore(cache)
        yield serve
        serve.stop()


@pytest.fixture(scope="module")
def stub(server: ServeThread):
    with grpc.insecure_channel(server.address) as channel:
        yield router_pb2_grpc.RouterStub(channel)


def upload(stub, folder: Path, adapter_id: str) -> str:
    header = router_pb2.UploadAdapterHeader(adapter_id=adapter_id)
    return stub.UploadAdapter(upload_messages(folder, header), timeout=60).adapter.digest


def tokens(stub, adapter_id: str) -> list[int]:
    return list(stub.Generate(build_request("Tell me about the sea", adapter_id=adapter_id,
                                            **GREEDY), timeout=60).token_ids)


def test_a_flipped_byte_on_the_worker_is_caught_sent_again_and_served_right(
        server, stub, tiny_model_dir: Path, tmp_path: Path) -> None:
    digest = upload(stub, write_random_adapter(tmp_path / "a", tiny_model_dir, rank=4, seed=1),
                    "flipped")
    upload(stub, write_random_adapter(tmp_path / "b", tiny_model_dir, rank=4, seed=2), "other")
    expected = tokens(stub, "flipped")
    tokens(stub, "other")  # "flipped" leaves the host tier and its device slot
    weights = server.cache.path(digest) / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x01  # a value's low bit: the file still parses, only its hash tells
    weights.write_bytes(bytes(data))
    assert tokens(stub, "flipped") == expected
    assert server.cache.verify(digest), "the worker holds the right files again"


def test_the_cache_bound_evicts_and_evicted_adapters_still_serve(
        server, stub, tiny_model_dir: Path, tmp_path: Path) -> None:
    # rank 16 on the tiny model: 128 KiB each, so 1 MiB holds 8 of these 12
    expected = {}
    for i in range(12):
        adapter_id = f"bounded-{i}"
        upload(stub, write_random_adapter(tmp_path / adapter_id, tiny_model_dir, rank=16,
                                          seed=100 + i), adapter_id)
        expected[adapter_id] = tokens(stub, adapter_id)
        assert cache_bytes(server.cache) <= 1 << 20
    assert len(server.cache.digests()) < 12
    assert {a: tokens(stub, a) for a in expected} == expected  # the evicted ones came back


def cache_bytes(store: BlobStore) -> int:
    return sum(f.stat().st_size for d in store.digests() for f in store.path(d).iterdir())
