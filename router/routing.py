"""Which worker takes a request: rendezvous hashing with bounded load, round-robin, least-loaded.

Pure functions over {worker address: requests in flight}; no gRPC, no clock, no randomness, so
the same inputs always give the same worker (tests pin the placement properties here).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

ROUTING_POLICIES = ("affinity", "round-robin", "least-loaded")


def rendezvous_weight(key: str, node: str) -> int:
    """A stable 64-bit weight of (key, node): blake2b, so every router process agrees."""
    digest = hashlib.blake2b(f"{key}\x00{node}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def rank_nodes(key: str, nodes: list[str]) -> list[str]:
    """Nodes by descending rendezvous weight for `key`: the first is its home, the next ones
    take it when the home is gone or too busy. Adding or removing a node moves only the keys
    whose first choice it is (about 1/n of them)."""
    return sorted(nodes, key=lambda node: rendezvous_weight(key, node), reverse=True)


def load_limit(loads: Mapping[str, int], epsilon: float) -> float:
    """Most requests in flight a worker may hold and still take affinity traffic:
    (1 + epsilon) * mean + 1. The least loaded worker is always under it."""
    mean = sum(loads.values()) / len(loads)
    return (1.0 + epsilon) * mean + 1.0


def pick_affinity(key: str, loads: Mapping[str, int], epsilon: float) -> str:
    """The highest-ranked worker for `key` whose load does not exceed the limit."""
    limit = load_limit(loads, epsilon)
    for node in rank_nodes(key, list(loads)):
        if loads[node] <= limit:
            return node
    return pick_least_loaded(loads, 0)  # unreachable: the least loaded is under the limit


def pick_least_loaded(loads: Mapping[str, int], turn: int) -> str:
    """The worker with fewest requests in flight; ties go round in address order by `turn`,
    so an idle pool spreads its requests instead of piling them on the first address."""
    fewest = min(loads.values())
    tied = sorted(node for node, load in loads.items() if load == fewest)
    return tied[turn % len(tied)]


def pick_round_robin(loads: Mapping[str, int], turn: int) -> str:
    """Worker number `turn` (mod n) in address order, whatever its load."""
    nodes = sorted(loads)
    return nodes[turn % len(nodes)]


def pick_worker(policy: str, adapter_id: str, loads: Mapping[str, int], epsilon: float,
                turn: int) -> str:
    """Dispatches on `policy`; with affinity, base-model requests ("") go to the least loaded."""
    if not loads:
        raise ValueError("no worker to pick from")
    if policy == "round-robin":
        return pick_round_robin(loads, turn)
    if policy == "least-loaded" or not adapter_id:
        return pick_least_loaded(loads, turn)
    if policy == "affinity":
        return pick_affinity(adapter_id, loads, epsilon)
    raise ValueError(f"routing policy {policy!r}: use one of {', '.join(ROUTING_POLICIES)}")
