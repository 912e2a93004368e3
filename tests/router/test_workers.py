"""Worker placement (rendezvous stability, bounded load, policies), DNS expansion with a stubbed
resolver, and the pool's health bookkeeping with stub workers (no processes)."""

from __future__ import annotations

import asyncio
from collections import Counter

import grpc
import pytest

from common.errors import Unavailable
from edgelora.v1 import types_pb2, worker_pb2
from router.config import RouterConfig
from router.discovery import expand, format_address, parse_entries
from router.routing import load_limit, pick_affinity, pick_worker, rank_nodes
from router.workers import WorkerPool

ADAPTERS = [f"tenant-{i}/adapter" for i in range(2000)]


def homes(nodes: list[str]) -> dict[str, str]:
    return {a: rank_nodes(a, nodes)[0] for a in ADAPTERS}


@pytest.mark.parametrize("num_nodes", [2, 4, 8])
def test_adding_a_worker_moves_about_one_nth_only_to_it(num_nodes: int) -> None:
    nodes = [f"10.0.0.{i}:50052" for i in range(num_nodes)]
    before, after = homes(nodes), homes([*nodes, "10.0.0.99:50052"])
    moved = [a for a in ADAPTERS if before[a] != after[a]]
    share = len(moved) / len(ADAPTERS)
    assert abs(share - 1 / (num_nodes + 1)) < 0.05, share
    assert {after[a] for a in moved} == {"10.0.0.99:50052"}


def test_removing_a_worker_moves_only_its_adapters_spread_over_the_rest() -> None:
    nodes = [f"10.0.0.{i}:50052" for i in range(5)]
    before, after = homes(nodes), homes(nodes[:2] + nodes[3:])
    moved = [a for a in ADAPTERS if before[a] != after[a]]
    assert moved == [a for a in ADAPTERS if before[a] == nodes[2]]
    spread = Counter(after[a] for a in moved)
    assert set(spread) == set(nodes) - {nodes[2]}
    assert min(spread.values()) > len(moved) / 4 * 0.6, spread


def test_placement_is_balanced_and_deterministic() -> None:
    nodes = [f"w{i}:1" for i in range(4)]
    counts = Counter(homes(nodes).values())
    assert all(abs(c - len(ADAPTERS) / 4) < 0.15 * len(ADAPTERS) / 4 for c in counts.values())
    assert homes(list(reversed(nodes))) == homes(nodes)  # order of --workers does not matter


def test_bounded_load_spills_a_hot_adapter_and_keeps_the_bound() -> None:
    loads = {f"w{i}:1": 0 for i in range(4)}
    home = rank_nodes("hot", list(loads))[0]
    assert pick_affinity("hot", loads, 0.25) == home
    for _ in range(200):  # 200 concurrent requests for one adapter, none finishing
        limit = load_limit(loads, 0.25)
        chosen = pick_affinity("hot", loads, 0.25)
        assert loads[chosen] <= limit, (chosen, loads, limit)
        loads[chosen] += 1
    assert max(loads.values()) <= 1.25 * (sum(loads.values()) / 4) + 2, loads
    assert max(loads, key=loads.get) == home  # the home still takes the biggest share


def test_affinity_prefers_home_while_it_is_within_the_bound() -> None:
    nodes = ["a:1", "b:1", "c:1"]
    home, second = rank_nodes("x", nodes)[:2]
    loads = dict.fromkeys(nodes, 4)
    loads[home] = 6  # limit = 1.25 * 14/3 + 1 = 6.83: still home
    assert pick_affinity("x", loads, 0.25) == home
    loads[home] = 9  # limit = 1.25 * 17/3 + 1 = 8.08: the next in its ranking
    assert pick_affinity("x", loads, 0.25) == second


def test_policies() -> None:
    loads = {"a:1": 3, "b:1": 0, "c:1": 0}
    assert [pick_worker("round-robin", "x", loads, 0.25, t) for t in range(4)] == \
        ["a:1", "b:1", "c:1", "a:1"]
    assert {pick_worker("least-loaded", "x", loads, 0.25, t) for t in range(4)} == {"b:1", "c:1"}
    assert {pick_worker("affinity", "", loads, 0.25, t) for t in range(4)} == {"b:1", "c:1"}
    with pytest.raises(ValueError, match="round-robin"):
        pick_worker("random", "x", loads, 0.25, 0)
    with pytest.raises(ValueError, match="--routing"):
        RouterConfig(routing="random")


def test_parse_entries_and_addresses() -> None:
    assert parse_entries(" a:1,[::1]:2,, 10.0.0.1:3 ") == [("a", 1), ("::1", 2),
                                                            ("10.0.0.1", 3)]
    assert format_address("::1", 2) == "[::1]:2" and format_address("a", 1) == "a:1"
    for bad in ("nohost", "a:", ":5", "a:70000", "a:x"):
        with pytest.raises(ValueError, match="host:port"):
            parse_entries(bad)


class StubResolver:
    def __init__(self, answers: dict[str, list[str] | Exception]) -> None:
        self.answers = answers

    async def __call__(self, host: str, port: int) -> list[str]:
        answer = self.answers[host]
        if isinstance(answer, Exception):
            raise answer
        return list(answer)


def test_expand_a_headless_service_name_to_every_address() -> None:
    resolver = StubResolver({"workers.ns.svc": ["10.1.0.7", "10.1.0.5", "10.1.0.6"],
                             "10.2.0.1": ["10.2.0.1"], "gone": OSError("NXDOMAIN")})
    found = asyncio.run(expand(parse_entries("workers.ns.svc:50052,10.2.0.1:7,gone:1"),
                               resolver, {"10.9.9.9:1": "gone:1"}))
    assert found == {"10.1.0.5:50052": "workers.ns.svc:50052",
                     "10.1.0.6:50052": "workers.ns.svc:50052",
                     "10.1.0.7:50052": "workers.ns.svc:50052", "10.2.0.1:7": "10.2.0.1:7",
                     "10.9.9.9:1": "gone:1"}  # a failed lookup keeps what it had


def rpc_error(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), "stub says no")


class StubWorker:
    """Answers Info with the adapters given per tier, or fails with `error`."""

    def __init__(self) -> None:
        self.error: grpc.StatusCode | None = None
        self.tiers: dict[str, int] = {}
        self.num_registered = 0

    async def Info(self, request, timeout=None) -> worker_pb2.InfoResponse:
        if self.error is not None:
            raise rpc_error(self.error)
        return worker_pb2.InfoResponse(
            model="stub", adapters=[types_pb2.AdapterInfo(adapter_id=a, tier=t)
                                    for a, t in self.tiers.items()],
            adapter_stats=worker_pb2.AdapterMemoryStats(num_registered=self.num_registered))


def make_pool(answers: dict[str, list[str] | Exception], spec: str, **kwargs) -> WorkerPool:
    return WorkerPool([spec], resolver=StubResolver(answers), **kwargs)


def test_pool_follows_dns_changes() -> None:
    async def scenario() -> None:
        answers = {"svc": ["10.0.0.1", "10.0.0.2"]}
        pool = make_pool(answers, "svc:50052")
        await pool.resolve()
        assert [w.address for w in pool.all_workers] == ["10.0.0.1:50052", "10.0.0.2:50052"]
        assert pool.all_workers[0].name == "10.0.0.1:50052 (svc:50052)"
        answers["svc"] = ["10.0.0.2", "10.0.0.3"]  # a pod replaced
        await pool.resolve()
        assert [w.address for w in pool.all_workers] == ["10.0.0.2:50052", "10.0.0.3:50052"]
        answers["svc"] = OSError("SERVFAIL")
        await pool.resolve()
        assert len(pool.all_workers) == 2
        await pool.close()

    asyncio.run(scenario())


def test_health_polls_take_out_rejoin_and_resync() -> None:
    async def scenario() -> None:
        pool = make_pool({"svc": ["10.0.0.1", "10.0.0.2"]}, "svc:1")
        await pool.resolve()
        stubs = {w.address: StubWorker() for w in pool.all_workers}
        for w in pool.all_workers:
            w.stub = stubs[w.address]
        joins: list[str] = []

        async def on_join(worker) -> None:
            joins.append(worker.address)
            stubs[worker.address].num_registered = 3

        pool.on_join = on_join
        pool.expected_num_registered = lambda: 3
        a, b = pool.all_workers
        stubs[a.address].tiers = {"x": types_pb2.ADAPTER_TIER_DEVICE,
                                  "y": types_pb2.ADAPTER_TIER_HOST}
        stubs[b.address].tiers = {"z": types_pb2.ADAPTER_TIER_HOST}
        for w in (a, b):
            await pool.poll(w)
        assert joins == [a.address, b.address] and pool.workers == [a, b]
        assert pool.resident_adapters() == {"x", "y", "z"}

        stubs[a.address].error = grpc.StatusCode.UNAVAILABLE  # killed: refused at once
        await pool.poll(a)
        assert pool.workers == [b] and pool.resident_adapters() == {"z"}
        assert {pool.pick(adapter).address for adapter in ("x", "y", "", "q")} == {b.address}

        stubs[b.address].error = grpc.StatusCode.DEADLINE_EXCEEDED  # slow: one miss is allowed
        await pool.poll(b)
        assert pool.workers == [b]
        await pool.poll(b)
        assert pool.workers == []
        with pytest.raises(Unavailable, match="not answering health checks"):
            pool.pick("x")

        stubs[a.address].error = None  # restarted: joins again, synced first
        stubs[a.address].num_registered = 0
        await pool.poll(a)
        assert joins[-1] == a.address and pool.workers == [a]
        stubs[a.address].num_registered = 1  # lost registrations between two polls: re-synced
        await pool.poll(a)
        assert joins.count(a.address) == 3
        await pool.poll(a)
        assert joins.count(a.address) == 3
        with pytest.raises(Unavailable, match="no live worker left"):
            pool.pick("x", exclude=[a.address])
        await pool.close()

    asyncio.run(scenario())


def test_a_pool_that_resolves_nothing_says_what_to_do() -> None:
    async def scenario() -> None:
        pool = make_pool({"svc": OSError("NXDOMAIN")}, "svc:50052")
        await pool.start()
        with pytest.raises(Unavailable, match="svc:50052 resolved to no address"):
            pool.pick("")
        await pool.close()

    asyncio.run(scenario())
