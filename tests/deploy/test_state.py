"""The router's registry database lives on storage that outlives the container: a named volume
in compose, a PersistentVolumeClaim in Kubernetes, writable by the router's user."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.deploy.deploy_files import (
    COMPOSE_VARIANTS,
    DEPLOY,
    compose_configs,
    dockerfile_env,
    find,
    k8s_configs,
    load_compose,
    overlay_objects,
)


@pytest.mark.parametrize("files", COMPOSE_VARIANTS, ids=lambda f: "+".join(f))
def test_compose_router_keeps_its_registry_on_a_named_volume(files: tuple[str],
                                                             tmp_path: Path) -> None:
    compose = load_compose(*files)
    configs, mounts = compose_configs(compose, "router", tmp_path)
    state_dir = configs["router"].state_dir
    assert state_dir, "the router must run with --state-dir"
    found = mounts.find(state_dir)
    assert found is not None and found[1].origin.startswith("volume "), found
    assert not found[1].read_only


@pytest.mark.parametrize("overlay", ["cpu", "cuda"])
def test_k8s_router_keeps_its_registry_on_a_pvc(overlay: str, tmp_path: Path) -> None:
    objects = overlay_objects(overlay)
    [router] = [d for d in find(objects, "Deployment")
                if d["metadata"]["name"] == "edgelora-router"]
    container = router["spec"]["template"]["spec"]["containers"][0]
    configs, mounts = k8s_configs(router, container, objects, tmp_path)
    found = mounts.find(configs["router"].state_dir)
    assert found is not None and found[1].origin == "pvc edgelora-router-state", found
    assert not found[1].read_only
    assert find(objects, "PersistentVolumeClaim", "edgelora-router-state")
    assert router["spec"]["replicas"] == 1, "one writer of the database"
    assert router["spec"]["template"]["spec"]["securityContext"]["fsGroup"] == 10001


@pytest.mark.parametrize("dockerfile", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_images_give_serve_and_workers_writable_state(dockerfile: str) -> None:
    env = dockerfile_env(DEPLOY / dockerfile)
    assert env["EDGELORA_STATE_DIR"] == "/var/lib/edgelora"
    assert env["EDGELORA_ADAPTER_CACHE_DIR"].startswith("/var/lib/edgelora/")
    assert "chown 10001:10001 /var/lib/edgelora" in (DEPLOY / dockerfile).read_text()
