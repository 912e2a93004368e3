"""Who may do what to which adapter: pure decisions over a Caller and the registry, no I/O.

A tenant lists and uses its own adapters and the shared ones, and registers, replaces and
removes only its own; an admin manages every tenant's and the shared ones. Another tenant's
adapter does not exist for a caller: NOT_FOUND, exactly as for an id nobody registered.
"""

from __future__ import annotations

from common.errors import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
)
from common.limits import shown
from edgelora.v1 import types_pb2
from router.adapter_record import SHARED, AdapterRecord, worker_key
from router.registry import AdapterRegistry
from router.tenants import TENANT_NAME, Caller


def not_found(adapter_id: str) -> NotFound:
    return NotFound(f"adapter {adapter_id!r} is not registered (ListAdapters shows the ones you "
                    "can use)")


def registration_owner(caller: Caller, request: types_pb2.RegisterAdapterRequest) -> str:
    """The owner a registration is for: the caller's tenant, or (admins) `tenant` / shared."""
    if request.shared or request.tenant:
        if not caller.is_admin:
            raise PermissionDenied("only an admin key may register shared adapters or "
                                   "register for another tenant")
        if request.shared and request.tenant:
            raise InvalidArgument("set shared or tenant, not both")
        if request.shared:
            return SHARED
        if not TENANT_NAME.fullmatch(request.tenant):
            raise InvalidArgument(f"tenant {shown(request.tenant)} is not a tenant name")
        return request.tenant
    return caller.tenant


def check_replace(registry: AdapterRegistry, owner: str, request: types_pb2.RegisterAdapterRequest,
                  max_adapters: int) -> None:
    """ALREADY_EXISTS without `replace`; RESOURCE_EXHAUSTED over the owner's adapter limit."""
    key = worker_key(owner, request.adapter_id)
    if registry.is_pending(key) and not request.replace:  # a replacement waits its turn
        raise AlreadyExists(f"adapter {request.adapter_id!r} is being registered right now; "
                            "retry when that finishes")
    if key in registry.adapters:
        if not request.replace:
            raise AlreadyExists(f"adapter {request.adapter_id!r} is already registered; set "
                                "replace to replace it")
        return
    if owner != SHARED and max_adapters and registry.count(owner) >= max_adapters:
        raise ResourceExhausted(f"tenant {owner!r} has {registry.count(owner)} adapters, its "
                                f"limit (max_adapters {max_adapters}): unregister one first")


def removal_target(caller: Caller, request: types_pb2.UnregisterAdapterRequest,
                   registry: AdapterRegistry) -> AdapterRecord:
    """The adapter an UnregisterAdapter removes, if the caller may remove it."""
    if (request.tenant or request.shared) and not caller.is_admin:
        raise PermissionDenied("only an admin key may remove another tenant's or a shared "
                               "adapter")
    if request.shared:
        key = worker_key(SHARED, request.adapter_id)
    elif request.tenant:
        key = worker_key(request.tenant, request.adapter_id)
    else:
        record = registry.find(caller.tenant, request.adapter_id)
        if record is not None and record.is_shared and not caller.is_admin:
            raise PermissionDenied(f"adapter {request.adapter_id!r} is shared by an admin: only "
                                   "an admin key may remove it")
        key = record.key if record is not None else ""
    record = registry.adapters.get(key)
    if record is None:
        raise not_found(request.adapter_id)
    return record


def listed(caller: Caller, registry: AdapterRegistry) -> list[AdapterRecord]:
    """What ListAdapters shows: an admin sees every adapter, a tenant its own and shared ones."""
    if caller.is_admin:
        return list(registry.adapters.values())
    return list(registry.visible(caller.tenant).values())
