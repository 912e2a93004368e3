"""router.tenants: keys file parsing, lookup, reload on change, and open mode."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from common.errors import Unauthenticated
from router.tenants import ADMIN, OPEN_CALLER, KeyRing, TenantLimits, parse_keys

KEYS = {"keys": [
    {"key": "k-admin-0001", "tenant": "ops", "role": "admin"},
    {"key": "k-acme-0001", "tenant": "acme", "role": "tenant", "max_running": 2,
     "limits": {"max_queued": 5}},
    {"key": "k-beta-0001", "tenant": "beta"},
]}


def write(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data))
    return path


def test_keys_name_tenant_role_and_limits(tmp_path: Path) -> None:
    ring = KeyRing(str(write(tmp_path / "keys.json", KEYS)))
    admin, acme, beta = (ring.authenticate(k) for k in
                         ("k-admin-0001", "k-acme-0001", "k-beta-0001"))
    assert (admin.tenant, admin.role, admin.is_admin) == ("ops", ADMIN, True)
    assert (acme.tenant, acme.is_admin) == ("acme", False)
    assert acme.limits == TenantLimits(max_running=2, max_queued=5)
    assert beta.limits == TenantLimits()
    assert set(ring.tenants()) == {"ops", "acme", "beta"}


@pytest.mark.parametrize("token", ["", "k-acme-0002", "k-acme-000", "K-ACME-0001", " k-acme-0001"])
def test_missing_or_unknown_keys_are_unauthenticated(tmp_path: Path, token: str) -> None:
    ring = KeyRing(str(write(tmp_path / "keys.json", KEYS)))
    with pytest.raises(Unauthenticated):
        ring.authenticate(token)


def test_open_mode_is_one_admin_caller() -> None:
    ring = KeyRing(None)
    assert ring.is_open
    assert ring.authenticate("") is OPEN_CALLER and ring.authenticate("anything").is_admin


@pytest.mark.parametrize("entry, says", [
    ({"key": "short", "tenant": "a"}, "8-512"),
    ({"key": "k-long-enough", "tenant": "bad name"}, "tenant must be"),
    ({"key": "k-long-enough", "tenant": "a:b"}, "tenant must be"),
    ({"key": "k-long-enough", "tenant": "a", "role": "root"}, "role"),
    ({"key": "k-long-enough", "tenant": "a", "max_running": -1}, "max_running"),
    ({"key": "k-long-enough", "tenant": "a", "max_running": True}, "max_running"),
    ({"key": "k-long-enough", "tenant": "a", "limits": {"max_gpus": 1}}, "unknown limit"),
])
def test_bad_entries_say_what_to_fix(entry: dict, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        parse_keys({"keys": [entry]}, "keys.json")


def test_duplicate_keys_and_wrong_shape_are_refused() -> None:
    with pytest.raises(ValueError, match="twice"):
        parse_keys({"keys": [KEYS["keys"][0], KEYS["keys"][0]]}, "k")
    with pytest.raises(ValueError, match="expected"):
        parse_keys([], "k")


def test_reload_on_change_keeps_old_keys_when_the_new_file_is_bad(tmp_path: Path) -> None:
    path = write(tmp_path / "keys.json", KEYS)
    ring = KeyRing(str(path))
    with pytest.raises(Unauthenticated):
        ring.authenticate("k-gamma-0001")
    write(path, {"keys": [*KEYS["keys"], {"key": "k-gamma-0001", "tenant": "gamma"}]})
    assert ring.authenticate("k-gamma-0001").tenant == "gamma"  # at the next call
    path.write_text("{not json")
    assert ring.authenticate("k-gamma-0001").tenant == "gamma"  # kept
    write(path, {"keys": KEYS["keys"][:1]})  # a key removed is refused at once
    with pytest.raises(Unauthenticated):
        ring.authenticate("k-acme-0001")


def test_a_file_replaced_by_rename_is_read_again(tmp_path: Path) -> None:
    path = write(tmp_path / "keys.json", KEYS)
    ring = KeyRing(str(path))
    renamed = {"keys": [{"key": "k-beta-0002", "tenant": "beta"}]}  # same size as nothing else
    os.replace(write(tmp_path / "new.json", renamed), path)
    assert ring.authenticate("k-beta-0002").tenant == "beta"


def test_yaml_keys_file(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text("keys:\n  - key: k-yaml-00001\n    tenant: acme\n    role: admin\n")
    assert KeyRing(str(path)).authenticate("k-yaml-00001").is_admin


def test_a_bad_file_at_start_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    path.write_text("[]")
    with pytest.raises(ValueError):
        KeyRing(str(path))
