"""What the router knows of one registered adapter, and how workers name it.

Every adapter has an owner: a tenant, or SHARED (registered by an admin for every tenant). A
worker knows an adapter by its `worker_key` ("tenant:id", or the plain id for a shared one), so
the same id in two tenants is two adapters that can never collide in a worker's caches.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from edgelora.v1 import types_pb2

SHARED = ""  # the owner of shared adapters


def worker_key(owner: str, adapter_id: str) -> str:
    """How workers know the adapter `adapter_id` of `owner`. ':' is in no public id."""
    return f"{owner}:{adapter_id}" if owner else adapter_id


@dataclass
class AdapterRecord:
    adapter_id: str  # the public id, unique within its owner
    path: str
    rank: int
    description: str = ""
    example_prompts: list[str] = field(default_factory=list)
    owner: str = SHARED
    version: int = 1  # +1 at each replacement
    digest: str = ""  # its content in the store ("" = a path registration from before the store)
    created_s: float = 0.0  # first registered (Unix time)
    updated_s: float = 0.0  # last replaced
    kind: str = ""  # the card's declared kind: behaviour / domain / "" (told from its examples)

    @property
    def key(self) -> str:
        return worker_key(self.owner, self.adapter_id)

    @property
    def is_shared(self) -> bool:
        return self.owner == SHARED

    def info(self, with_path: bool, tier: int = types_pb2.ADAPTER_TIER_DISK
             ) -> types_pb2.AdapterInfo:
        """As clients see it; the path only for admins (it says where files live)."""
        return types_pb2.AdapterInfo(
            adapter_id=self.adapter_id, rank=self.rank, path=self.path if with_path else "",
            description=self.description, tenant=self.owner, shared=self.is_shared,
            digest=self.digest, version=self.version, created_s=self.created_s,
            updated_s=self.updated_s, tier=tier, kind=self.kind)


def record_name(key: str) -> str:
    """The public id inside a worker key."""
    return key.partition(":")[2] or key
