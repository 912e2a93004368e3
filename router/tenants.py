"""Who is calling: API keys from the keys file -> (tenant, role, limits). Torch-free, no gRPC.

Keys are kept and looked up only as sha256 digests (so no comparison ever touches a stored
key's bytes) and never logged. The file is re-read when its mtime, size or inode changes (one
stat per call, a few microseconds), so adding a tenant needs no restart and takes effect on the
next call; a file that no longer parses keeps the
previous keys (logged).
Without a keys file there is one open caller with the admin role, whose adapters are the shared
ones (tenant ""): with a single tenant, "own" and "shared" are the same thing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from common.errors import Unauthenticated

log = logging.getLogger(__name__)
ADMIN, TENANT = "admin", "tenant"
OPEN_TENANT = ""
TENANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
LIMIT_FIELDS = ("max_running", "max_queued", "max_adapters")
MAX_KEYS_FILE_BYTES = 4 << 20


@dataclass(frozen=True)
class TenantLimits:
    """A tenant's limits; None = the server's default (flags)."""

    max_running: int | None = None
    max_queued: int | None = None
    max_adapters: int | None = None


@dataclass(frozen=True)
class Caller:
    tenant: str
    role: str = TENANT
    limits: TenantLimits = TenantLimits()

    @property
    def is_admin(self) -> bool:
        return self.role == ADMIN


OPEN_CALLER = Caller(OPEN_TENANT, ADMIN)


def _limits(entry: dict, where: str) -> TenantLimits:
    values = {**(entry.get("limits") or {}), **{k: entry[k] for k in LIMIT_FIELDS if k in entry}}
    for name, value in values.items():
        if name not in LIMIT_FIELDS:
            raise ValueError(f"{where}: unknown limit {name!r} (use {', '.join(LIMIT_FIELDS)})")
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{where}: {name} must be an integer >= 0 (0 = no limit)")
    return TenantLimits(**values)


def parse_keys(data: object, source: str) -> dict[bytes, Caller]:
    """The keys file's content -> {sha256(key): caller}; ValueError says what to fix."""
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise ValueError(f"{source}: expected {{\"keys\": [{{\"key\": ..., \"tenant\": ..., "
                         "\"role\": \"tenant\" | \"admin\"}, ...]}")
    callers: dict[bytes, Caller] = {}
    for index, entry in enumerate(data["keys"]):
        where = f"{source}: keys[{index}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: expected an object")
        key, tenant, role = entry.get("key"), entry.get("tenant"), entry.get("role", TENANT)
        if not isinstance(key, str) or len(key) < 8 or len(key) > 512 or key != key.strip():
            raise ValueError(f"{where}: key must be a string of 8-512 characters without "
                             "surrounding spaces")
        if not isinstance(tenant, str) or not TENANT_NAME.fullmatch(tenant):
            raise ValueError(f"{where}: tenant must be 1-64 letters, digits, '-' or '_', "
                             "starting with a letter or digit")
        if role not in (TENANT, ADMIN):
            raise ValueError(f"{where}: role must be 'tenant' or 'admin'")
        digest = hashlib.sha256(key.encode()).digest()
        if digest in callers:
            raise ValueError(f"{where}: the same key is listed twice")
        callers[digest] = Caller(tenant, role, _limits(entry, where))
    return callers


def load_keys_file(path: Path) -> dict[bytes, Caller]:
    if path.stat().st_size > MAX_KEYS_FILE_BYTES:
        raise ValueError(f"{path}: larger than {MAX_KEYS_FILE_BYTES >> 20} MiB")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text)
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    return parse_keys(data, str(path))


class KeyRing:
    """The callers the keys file names; `None` path = open mode (one admin tenant)."""

    def __init__(self, path: str | None = None) -> None:
        self.path = Path(path) if path else None
        self._callers: dict[bytes, Caller] = {}
        self._stamp: tuple[int, int, int] | None = None
        if self.path is not None:
            self._callers = load_keys_file(self.path)  # a bad file at start: refuse to start
            self._stamp = self._file_stamp()
            log.info("API keys: %d keys for %d tenants from %s", len(self._callers),
                     len(self.tenants()), self.path)

    @property
    def is_open(self) -> bool:
        return self.path is None

    def tenants(self) -> dict[str, TenantLimits]:
        """Every tenant named in the file, with its limits (the first entry that sets them)."""
        found: dict[str, TenantLimits] = {}
        for caller in self._callers.values():
            if caller.tenant not in found or found[caller.tenant] == TenantLimits():
                found[caller.tenant] = caller.limits
        return found

    def authenticate(self, token: str) -> Caller:
        """The caller a bearer token names; Unauthenticated when missing or unknown."""
        if self.path is None:
            return OPEN_CALLER
        self._reload_if_changed()
        if not token:
            raise Unauthenticated("no API key: send the metadata 'authorization: Bearer <key>'")
        # The table is keyed by digests: what a lookup's timing could reveal is about the
        # digest of the caller's own guess, never about a stored key.
        digest = hashlib.sha256(token.encode()).digest()
        caller = self._callers.get(digest)
        if caller is None:
            raise Unauthenticated("unknown API key")
        return caller

    def _file_stamp(self) -> tuple[int, int, int]:
        st = os.stat(self.path)
        return st.st_mtime_ns, st.st_size, st.st_ino

    def _reload_if_changed(self) -> None:
        try:
            stamp = self._file_stamp()
            if stamp == self._stamp:
                return
            self._callers = load_keys_file(self.path)
            self._stamp = stamp
            log.info("API keys reloaded: %d keys for %d tenants", len(self._callers),
                     len(self.tenants()))
        except (OSError, ValueError) as exc:  # keep serving with the keys we had
            log.error("keys file %s not reloaded, keeping the previous keys: %s", self.path, exc)
