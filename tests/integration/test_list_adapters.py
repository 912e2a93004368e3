"""ListAdapters a page at a time through the public API: each tenant's pages hold exactly what it
may see, once each, in (tenant, id) order; a page token a reply did not give is refused; and
`edgelora adapters list` follows every page; `edgelora adapters remove` removes what the key may."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from edgelora.client import list_adapters
from edgelora.v1 import router_pb2_grpc, types_pb2
from tests.conftest import ServeThread, write_api_keys, write_random_adapter
from worker.config import WorkerConfig

OWNED = {"acme": 7, "beta": 4, "": 2}  # "" = shared


@pytest.fixture(scope="module")
def cluster(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("list-adapters")
    keys = write_api_keys(base / "keys.json")
    folder = write_random_adapter(base / "root" / "a", tiny_model_dir, rank=4, seed=3)
    server = ServeThread(WorkerConfig(model=str(tiny_model_dir), port=0, num_threads=1,
                                      max_model_len=256, kv_cache_mb=16, max_batch_size=4),
                         api_keys=str(base / "keys.json"), adapter_root=str(base / "root"))
    with grpc.insecure_channel(server.address) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        for owner, count in OWNED.items():
            for i in range(count):
                stub.RegisterAdapter(types_pb2.RegisterAdapterRequest(
                    adapter_id=f"{owner or 'common'}-{i}", path=str(folder), tenant=owner,
                    shared=not owner, description=f"adapter {i} of {owner or 'everyone'}"),
                    metadata=bearer(keys["ops"]), timeout=60)
    server.keys = keys
    yield server
    server.stop()


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def test_each_tenant_pages_through_what_it_may_see(cluster) -> None:
    with grpc.insecure_channel(cluster.address) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        for tenant, expected in (("acme", 7 + 2), ("beta", 4 + 2), ("ops", 7 + 4 + 2)):
            pages, token = [], ""
            while True:
                reply = stub.ListAdapters(types_pb2.ListAdaptersRequest(page_size=3,
                                                                        page_token=token),
                                          metadata=bearer(cluster.keys[tenant]), timeout=30)
                pages.append(len(reply.adapters))
                token = reply.next_page_token
                if not token:
                    break
            assert pages == [3] * (expected // 3) + ([expected % 3] if expected % 3 else [])
            seen = [(a.tenant, a.adapter_id) for a in list_adapters(
                stub, bearer(cluster.keys[tenant]), page_size=4)]
            assert len(seen) == expected and seen == sorted(seen), "once each, in order"
            if tenant != "ops":
                assert {owner for owner, _ in seen} == {tenant, ""}, "its own and shared only"
            everything = stub.ListAdapters(types_pb2.ListAdaptersRequest(),
                                           metadata=bearer(cluster.keys[tenant]), timeout=30)
            assert len(everything.adapters) == expected and not everything.next_page_token


def test_a_page_token_no_reply_gave_is_refused(cluster) -> None:
    with grpc.insecure_channel(cluster.address) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.ListAdapters(types_pb2.ListAdaptersRequest(page_token="!" * 40),
                              metadata=bearer(cluster.keys["acme"]), timeout=30)
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "page_token" in refused.value.details()


def test_the_cli_lists_every_page(cluster) -> None:
    out = subprocess.run([sys.executable, "-m", "edgelora.cli", "adapters", "list",
                          "--address", cluster.address, "--api-key", cluster.keys["beta"]],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rows = out.stdout.splitlines()[1:-1]
    assert sorted(row.split()[0] for row in rows) == sorted(
        [f"beta-{i}" for i in range(4)] + [f"common-{i}" for i in range(2)])
    assert out.stdout.splitlines()[-1] == "6 adapters"
    denied = subprocess.run([sys.executable, "-m", "edgelora.cli", "adapters", "list",
                             "--address", cluster.address, "--api-key", "k-nobody-12345678"],
                            capture_output=True, text=True, timeout=120)
    assert denied.returncode == 1 and "UNAUTHENTICATED" in denied.stdout


def test_the_cli_removes_only_what_the_key_may(cluster) -> None:
    def cli(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "edgelora.cli", "adapters", *argv,
                               "--address", cluster.address], capture_output=True, text=True,
                              timeout=120)

    beta, ops = cluster.keys["beta"], cluster.keys["ops"]
    with grpc.insecure_channel(cluster.address) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        existing = next(list_adapters(stub, bearer(ops)))
        for owner in ("acme", "beta"):  # this test's own, so the others' state stays
            stub.RegisterAdapter(types_pb2.RegisterAdapterRequest(
                adapter_id="temp", path=existing.path, tenant=owner), metadata=bearer(ops),
                timeout=60)
        refused = cli("remove", "common-0", "--api-key", beta)  # shared: not beta's to remove
        assert refused.returncode == 1 and "PERMISSION_DENIED" in refused.stdout
        done = cli("remove", "temp", "--api-key", beta)  # its own, not acme's of the same id
        assert done.returncode == 0 and "removed 'temp'" in done.stdout
        again = cli("remove", "temp", "--api-key", beta)
        assert again.returncode == 1 and "NOT_FOUND" in again.stdout
        by_admin = cli("remove", "temp", "--tenant", "acme", "--api-key", ops)
        assert by_admin.returncode == 0, by_admin.stdout
        left = {(a.tenant, a.adapter_id) for a in list_adapters(stub, bearer(ops))}
    assert not {("beta", "temp"), ("acme", "temp")} & left and ("", "common-0") in left
