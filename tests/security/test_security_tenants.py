"""Tenant isolation through the public API: each tenant uses, lists and removes only its own
adapters and the shared ones; another tenant's adapter does not exist for it (NOT_FOUND, the same
answer as for an id nobody registered); "auto" never picks it; only admins register by path,
share, or act for another tenant; paths stay inside --adapter-root; the --adapters-dir entries
register as shared at start, bad ones skipped."""

from __future__ import annotations

import json
import os
from pathlib import Path

import grpc
import pytest

from edgelora.v1 import types_pb2
from tests.conftest import write_random_adapter
from tests.security.helpers import (
    BAD_AT_START,
    RANK,
    SHARED_AT_START,
    greedy,
    listed,
    register,
    rpc,
    select,
)

PROMPT = "Once upon a time"
PIRATE_CARD = json.loads((Path(__file__).resolve().parents[2] / "adapters" / "demo" / "pirate"
                          / "card.json").read_text())
PIRATE_PROMPTS = ("Talk like a pirate: what is rum?",
                  "Arr matey, answer like a pirate: why is the sea salty?",
                  "In pirate speak, explain how a compass works.")


def adapter_dir(sec, name: str, seed: int) -> Path:
    """A fresh random adapter under --adapter-root."""
    return write_random_adapter(sec.root / name, sec.base_dir, rank=RANK, seed=seed)


def ok(result) -> types_pb2.RegisterAdapterResponse:
    code, details, reply = result
    assert code == grpc.StatusCode.OK, (code, details)
    return reply


def tokens(stub, metadata, adapter_id: str, prompt: str = PROMPT) -> list[int]:
    reply = stub.Generate(greedy(prompt, adapter_id, max_tokens=8), metadata=metadata,
                          timeout=60)
    assert reply.adapter_id == adapter_id, "the response must name the public id"
    return list(reply.token_ids)


def unregister(stub, metadata, adapter_id: str, **fields):
    return rpc(stub.UnregisterAdapter, types_pb2.UnregisterAdapterRequest(
        adapter_id=adapter_id, **fields), metadata, 30)


def ids(adapters) -> set[str]:
    return {a.adapter_id for a in adapters}


def same_shape(message: str, adapter_id: str) -> str:
    return message.replace(adapter_id, "<ID>")


def test_same_id_in_two_tenants_serves_each_its_own_adapter(sec) -> None:
    stub, ops = sec.router(), sec.auth("ops")
    acme_dir, beta_dir = adapter_dir(sec, "own-acme-x", 1), adapter_dir(sec, "own-beta-x", 2)
    for tenant, path in (("acme", acme_dir), ("beta", beta_dir)):
        info = ok(register(stub, ops, "x", path, tenant=tenant)).adapter
        assert (info.adapter_id, info.tenant, info.shared, info.rank) == ("x", tenant, False,
                                                                          RANK), info
        assert Path(info.path).resolve() == path.resolve()  # an admin is shown the path
    ok(register(stub, ops, "ref-acme-x", acme_dir, shared=True))  # the same weights, shared
    ok(register(stub, ops, "ref-beta-x", beta_dir, shared=True))
    acme, beta = sec.auth("acme"), sec.auth("beta")
    acme_x, beta_x = tokens(stub, acme, "x"), tokens(stub, beta, "x")
    assert acme_x == tokens(stub, acme, "ref-acme-x") == tokens(stub, beta, "ref-acme-x")
    assert beta_x == tokens(stub, beta, "ref-beta-x") == tokens(stub, acme, "ref-beta-x")
    assert acme_x != beta_x, "two tenants' 'x' gave the same output: one serves the other's"
    assert acme_x != tokens(stub, acme, ""), "acme's 'x' is the base model"
    assert acme_x == tokens(stub, acme, "x") and beta_x == tokens(stub, beta, "x")  # repeatable
    # admins see both, with their owners and paths; tenants see theirs, without paths
    everything = listed(stub, ops)
    owners = {(a.adapter_id, a.tenant, a.shared) for a in everything}
    assert {("x", "acme", False), ("x", "beta", False), ("ref-acme-x", "", True),
            (SHARED_AT_START, "", True)} <= owners
    by_owner = {(a.adapter_id, a.tenant): a for a in everything}
    assert Path(by_owner["x", "acme"].path).resolve() == acme_dir.resolve()
    assert Path(by_owner["x", "beta"].path).resolve() == beta_dir.resolve()
    assert all(a.path for a in everything), "an admin sees every path"
    for tenant in ("acme", "beta"):
        mine = listed(stub, sec.auth(tenant))
        assert all(not a.path for a in mine), f"{tenant} sees a path: {mine}"
        xs = [a for a in mine if a.adapter_id == "x"]
        assert len(xs) == 1 and xs[0].tenant == tenant and not xs[0].shared, xs
        assert all(a.tenant in (tenant, "") for a in mine), mine
        assert {"ref-acme-x", "ref-beta-x", SHARED_AT_START} <= ids(mine)


def test_another_tenants_adapter_does_not_exist(sec) -> None:
    stub, ops, acme, beta = sec.router(), sec.auth("ops"), sec.auth("acme"), sec.auth("beta")
    ok(register(stub, ops, "acme-only-y", adapter_dir(sec, "own-acme-y", 3), tenant="acme"))
    assert "acme-only-y" in ids(listed(stub, acme))
    assert "acme-only-y" not in ids(listed(stub, beta))
    # Generate and GenerateStream: NOT_FOUND, worded exactly as for an id nobody registered
    answers = {}
    for adapter_id in ("acme-only-y", "never-registered-q"):
        code, details, _ = rpc(stub.Generate, greedy(PROMPT, adapter_id), beta, 30)
        try:
            list(stub.GenerateStream(greedy(PROMPT, adapter_id), metadata=beta, timeout=30))
            stream_answer = (grpc.StatusCode.OK, "")
        except grpc.RpcError as exc:
            stream_answer = (exc.code(), exc.details())
        answers[adapter_id] = (code, same_shape(details, adapter_id), stream_answer[0],
                               same_shape(stream_answer[1], adapter_id))
    assert answers["acme-only-y"][0] == grpc.StatusCode.NOT_FOUND, answers
    assert answers["acme-only-y"] == answers["never-registered-q"], answers
    assert "acme" not in answers["acme-only-y"][1], "the refusal names the owner"
    # removing it: NOT_FOUND, worded as for a never-registered id; acme still has it
    code, details, _ = unregister(stub, beta, "acme-only-y")
    code2, details2, _ = unregister(stub, beta, "never-registered-q")
    assert code == code2 == grpc.StatusCode.NOT_FOUND, (code, details)
    assert same_shape(details, "acme-only-y") == same_shape(details2, "never-registered-q")
    assert "acme-only-y" in ids(listed(stub, acme))
    assert tokens(stub, acme, "acme-only-y")  # still serves its owner
    # a tenant cannot reach it through the admin-only fields either
    code, _, _ = unregister(stub, beta, "acme-only-y", tenant="acme")
    assert code == grpc.StatusCode.PERMISSION_DENIED
    # the owner may remove its own; then it is gone for it too
    assert unregister(stub, acme, "acme-only-y")[0] == grpc.StatusCode.OK
    assert "acme-only-y" not in ids(listed(stub, acme))
    code, _, _ = rpc(stub.Generate, greedy(PROMPT, "acme-only-y"), acme, 30)
    assert code == grpc.StatusCode.NOT_FOUND


def test_only_admins_register_by_path_share_or_act_for_others(sec) -> None:
    stub, ops, acme = sec.router(), sec.auth("ops"), sec.auth("acme")
    path = adapter_dir(sec, "own-perm", 6)
    for fields in ({}, {"shared": True}, {"tenant": "beta"}, {"tenant": "acme"},
                   {"replace": True}):
        code, details, _ = register(stub, acme, "tenant-made", path, **fields)
        assert code == grpc.StatusCode.PERMISSION_DENIED, (fields, code, details)
    assert "tenant-made" not in ids(listed(stub, ops))
    code, _, _ = unregister(stub, acme, SHARED_AT_START, shared=True)
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert SHARED_AT_START in ids(listed(stub, acme))


def test_register_again_needs_replace(sec) -> None:
    stub, ops, acme = sec.router(), sec.auth("ops"), sec.auth("acme")
    first, second = adapter_dir(sec, "own-re-1", 7), adapter_dir(sec, "own-re-2", 8)
    ok(register(stub, ops, "re", first, tenant="acme"))
    before = tokens(stub, acme, "re")
    code, details, _ = register(stub, ops, "re", second, tenant="acme")
    assert code == grpc.StatusCode.ALREADY_EXISTS, (code, details)
    assert tokens(stub, acme, "re") == before, "a refused re-register changed the adapter"
    ok(register(stub, ops, "re", second, tenant="acme", replace=True))
    after = tokens(stub, acme, "re")
    assert after != before, "replace did not take effect"
    ok(register(stub, ops, "re", second, shared=True))  # another owner: not a re-register
    code, _, _ = register(stub, ops, "re", first, shared=True)
    assert code == grpc.StatusCode.ALREADY_EXISTS
    assert tokens(stub, acme, "re") == after, "a shared adapter shadowed the tenant's own"


def test_shared_adapter_is_visible_to_all_and_removable_only_by_admin(sec) -> None:
    stub, ops, acme, beta = sec.router(), sec.auth("ops"), sec.auth("acme"), sec.auth("beta")
    ok(register(stub, ops, "shared-z", adapter_dir(sec, "own-shared-z", 5), shared=True))
    for tenant in (acme, beta):
        entry = [a for a in listed(stub, tenant) if a.adapter_id == "shared-z"]
        assert len(entry) == 1 and entry[0].shared and entry[0].tenant == "", entry
        assert not entry[0].path
    assert tokens(stub, acme, "shared-z") == tokens(stub, beta, "shared-z")
    for tenant in (acme, beta):
        code, details, _ = unregister(stub, tenant, "shared-z")
        assert code == grpc.StatusCode.PERMISSION_DENIED, (code, details)
    assert "shared-z" in ids(listed(stub, beta))
    assert unregister(stub, ops, "shared-z", shared=True)[0] == grpc.StatusCode.OK
    assert "shared-z" not in ids(listed(stub, acme)) | ids(listed(stub, ops))


def test_auto_never_picks_another_tenants_adapter(sec) -> None:
    stub, ops, acme, beta = sec.router(), sec.auth("ops"), sec.auth("acme"), sec.auth("beta")
    ok(register(stub, ops, "acme-pirate", adapter_dir(sec, "own-pirate", 4), tenant="acme",
                description=PIRATE_CARD["description"],
                example_prompts=PIRATE_CARD["example_prompts"]))
    for prompt in PIRATE_PROMPTS:
        mine = select(stub, acme, prompt)
        assert mine.selected_adapter_id == "acme-pirate", (prompt, mine)
        assert mine.ranking[0].adapter_id == "acme-pirate", mine
        theirs = select(stub, beta, prompt)
        assert "acme-pirate" not in {s.adapter_id for s in theirs.ranking}, theirs
        assert theirs.selected_adapter_id != "acme-pirate"
        assert "acme-pirate" not in theirs.reason and "acme:" not in theirs.reason, theirs.reason
        visible = ids(listed(stub, beta)) | {""}
        assert {s.adapter_id for s in theirs.ranking} <= visible
        served = stub.Generate(greedy(prompt, "auto", max_tokens=2), metadata=beta, timeout=60)
        assert served.adapter_id != "acme-pirate" and served.adapter_id in visible, served
        assert ":" not in served.adapter_id, "an internal worker key reached the client"
        served = stub.Generate(greedy(prompt, "auto", max_tokens=2), metadata=acme, timeout=60)
        assert served.adapter_id == "acme-pirate", served


@pytest.mark.parametrize("how", ["outside", "dotdot", "relative-dotdot", "dir-symlink",
                                 "file-symlink"])
def test_admin_paths_stay_inside_the_adapter_root(sec, how: str) -> None:
    stub, ops = sec.router(), sec.auth("ops")
    outside = sec.outside / "adapter"
    if how == "outside":
        path = str(outside)
    elif how == "dotdot":
        path = f"{sec.root}/../{sec.outside.name}/adapter"
    elif how == "relative-dotdot":
        path = f"../{sec.outside.name}/adapter"
    elif how == "dir-symlink":
        link = sec.root / "escape-dir"
        if not link.is_symlink():
            link.symlink_to(outside, target_is_directory=True)
        path = str(link)
    else:  # a real folder inside the root whose weights file links out of it
        folder = sec.root / "escape-file"
        if not folder.exists():
            folder.mkdir()
            (folder / "adapter_config.json").write_bytes(
                (outside / "adapter_config.json").read_bytes())
            os.symlink(outside / "adapter_model.safetensors",
                       folder / "adapter_model.safetensors")
        path = str(folder)
    code, details, _ = register(stub, ops, f"escape-{how}", path)
    assert code == grpc.StatusCode.PERMISSION_DENIED, (path, code, details)
    assert f"escape-{how}" not in ids(listed(stub, ops))


def test_adapters_dir_bad_entries_are_skipped_at_start(sec) -> None:
    stub = sec.router()
    everything = listed(stub, sec.auth("ops"))
    found = [a for a in everything if a.adapter_id == SHARED_AT_START]
    assert len(found) == 1 and found[0].shared and found[0].tenant == "", found
    assert found[0].rank == RANK and "JSON" in found[0].description
    assert not ids(everything) & set(BAD_AT_START), everything
    for tenant in ("acme", "beta"):
        assert SHARED_AT_START in ids(listed(stub, sec.auth(tenant)))
    log = sec.log_path.read_text(errors="replace")
    for name in BAD_AT_START:  # each skipped with a line saying so
        assert any(name in line and ("ERROR" in line or "WARNING" in line)
                   for line in log.splitlines()), f"no log line about skipping {name}"
    code, _, _ = rpc(stub.Generate, greedy(PROMPT, BAD_AT_START[0]), sec.auth("acme"), 30)
    assert code == grpc.StatusCode.NOT_FOUND


def test_tenant_max_adapters_from_the_keys_file(sec) -> None:
    """gamma's keys-file entry says max_adapters 2: a third adapter of gamma's, registered for
    it by an admin, is RESOURCE_EXHAUSTED; replacing one, or shared adapters, do not count."""
    stub, ops, gamma = sec.router(), sec.auth("ops"), sec.auth("gamma")
    path = adapter_dir(sec, "own-cap", 9)
    ok(register(stub, ops, "cap-1", path, tenant="gamma"))
    ok(register(stub, ops, "cap-2", path, tenant="gamma"))
    code, details, _ = register(stub, ops, "cap-3", path, tenant="gamma")
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (code, details)
    assert "cap-3" not in ids(listed(stub, gamma))
    ok(register(stub, ops, "cap-1", path, tenant="gamma", replace=True))
    ok(register(stub, ops, "cap-3", path, tenant="acme"))  # another tenant's count
    assert unregister(stub, gamma, "cap-2")[0] == grpc.StatusCode.OK
    ok(register(stub, ops, "cap-3", path, tenant="gamma"))
    assert {"cap-1", "cap-3"} <= ids(listed(stub, gamma))


@pytest.mark.parametrize("adapter_id", ["auto", "a:b", "x" * 129, "-x", ".x", "", "a b",
                                        "caf\u00e9", "a\x00b"])
def test_adapter_ids_are_checked(sec, adapter_id: str) -> None:
    stub, ops = sec.router(), sec.auth("ops")
    code, details, _ = register(stub, ops, adapter_id, adapter_dir(sec, "own-ids", 10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
    assert adapter_id not in ids(listed(stub, ops)) or adapter_id == ""


def test_adapter_ids_at_the_edges_are_accepted(sec) -> None:
    stub, ops = sec.router(), sec.auth("ops")
    path = adapter_dir(sec, "own-ids-ok", 11)
    for adapter_id in ("y" * 128, "A1._/-z", "0"):
        reply = ok(register(stub, ops, adapter_id, path, tenant="beta"))
        assert reply.adapter.adapter_id == adapter_id
        assert tokens(stub, sec.auth("beta"), adapter_id)
