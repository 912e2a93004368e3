"""The router's registry database lives on storage that outlives the container: a named volume
in compose, a PersistentVolumeClaim in Kubernetes, writable by the router's user. Each worker
keeps the adapters the router pushes to it in a writable cache of its own, at the image's
EDGELORA_ADAPTER_CACHE_DIR and bounded by EDGELORA_ADAPTER_CACHE_MB: a named volume per worker in
compose, an emptyDir in Kubernetes (the router pushes everything again to a new pod)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from common.adapter_blobs import BlobStore
from tests.deploy.deploy_files import (
    COMPOSE_VARIANTS,
    DEPLOY,
    OVERLAYS,
    comment_commands,
    compose_configs,
    compose_env,
    config_env_names,
    dockerfile_env,
    dockerfile_for_image,
    dockerfile_values,
    find,
    k8s_configs,
    load_compose,
    overlay_objects,
    pod_volume,
    quantity_bytes,
    shell_commands,
)
from worker.config import WorkerConfig

CACHE_MB_DEFAULT = 4096


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


# --- the workers' adapter caches ----------------------------------------------------------------

def image_cache_dir(image: str) -> str:
    return dockerfile_env(dockerfile_for_image(image))["EDGELORA_ADAPTER_CACHE_DIR"]


def image_chowns_to_its_user(image: str, folder: str) -> bool:
    """Whether the image makes `folder` its USER's: a fresh volume mounted there copies that."""
    dockerfile = dockerfile_for_image(image)
    uid = dockerfile_values(dockerfile, "USER")[-1].split(":")[0]
    runs = " && ".join(dockerfile_values(dockerfile, "RUN"))
    return any(folder in paths.split()
               for paths in re.findall(rf"chown {uid}:\d+ ([^&;]+)", runs))


def compose_workers(compose: dict[str, Any], scratch: Path):
    for name, service in compose["services"].items():
        configs, mounts = compose_configs(compose, name, scratch)
        if "router" not in configs:
            yield name, service, configs["worker"], mounts


@pytest.mark.parametrize("files", COMPOSE_VARIANTS, ids=lambda f: "+".join(f))
def test_compose_workers_keep_their_adapter_cache_on_a_volume_of_their_own(
        files: tuple[str], tmp_path: Path) -> None:
    compose = load_compose(*files)
    volumes = []
    for name, service, worker, mounts in compose_workers(compose, tmp_path):
        assert worker.adapter_cache_dir == image_cache_dir(service["image"]), name
        found = mounts.find(worker.adapter_cache_dir)
        assert found is not None, f"{name}: its adapter cache is in the container's own layer"
        target, mount = found
        assert mount.origin.startswith("volume ") and not mount.read_only, (name, mount)
        assert image_chowns_to_its_user(service["image"], target), \
            f"{name}: a fresh volume at {target} would not be writable by the image's user"
        volumes.append(mount.origin)
    assert len(volumes) == 2 and len(set(volumes)) == 2, f"one cache per worker: {volumes}"
    router_volumes = {f"volume {v['source']}" for v in compose["services"]["router"]["volumes"]
                      if v["type"] == "volume"}
    assert not router_volumes & set(volumes)


@pytest.mark.parametrize("files", COMPOSE_VARIANTS, ids=lambda f: "+".join(f))
def test_compose_workers_bound_their_adapter_cache_from_one_variable(files: tuple[str],
                                                                     tmp_path: Path) -> None:
    raw = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())["services"]
    variables = set()
    for name, service, worker, _ in compose_workers(load_compose(*files), tmp_path):
        env = compose_env(service)
        assert set(env) <= config_env_names(), name
        assert int(env["EDGELORA_ADAPTER_CACHE_MB"]) == worker.adapter_cache_mb, name
        written = raw[name]["environment"]["EDGELORA_ADAPTER_CACHE_MB"]
        match = re.fullmatch(r"\$\{(\w+):-(\d+)\}", written)
        assert match, f"{name}: ${{VAR:-default}}, so the bound can be set per install"
        assert int(match.group(2)) == CACHE_MB_DEFAULT == WorkerConfig().adapter_cache_mb
        variables.add(match.group(1))
    assert len(variables) == 1, variables


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_workers_keep_their_adapter_cache_in_a_bounded_emptydir(overlay: str,
                                                                   tmp_path: Path) -> None:
    objects = overlay_objects(overlay)
    (workers,) = find(objects, "StatefulSet", "edgelora-worker")
    assert not workers["spec"].get("volumeClaimTemplates")
    (container,) = workers["spec"]["template"]["spec"]["containers"]
    configs, mounts = k8s_configs(workers, container, objects, tmp_path)
    worker = configs["worker"]
    assert worker.adapter_cache_dir == image_cache_dir(container["image"])
    found = mounts.find(worker.adapter_cache_dir)
    assert found is not None, "the adapter cache is in the container's own layer"
    target, mount = found
    assert mount.origin.startswith("emptyDir ") and not mount.read_only, mount
    (volume_mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == target]
    empty_dir = pod_volume(workers, volume_mount["name"])["emptyDir"]
    (config,) = find(objects, "ConfigMap", "edgelora-config")
    assert int(config["data"]["EDGELORA_ADAPTER_CACHE_MB"]) == worker.adapter_cache_mb > 0
    # kubelet evicts the pod past sizeLimit: leave room above the cache's bound
    assert quantity_bytes(empty_dir["sizeLimit"]) > (worker.adapter_cache_mb << 20)
    pod = workers["spec"]["template"]["spec"]
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsUser"]


def test_documented_cache_listings_show_a_workers_blobs(tmp_path: Path) -> None:
    """The `docker compose exec worker-N ls ...` lines list the blobs of that worker's cache."""
    compose = load_compose("docker-compose.yml")
    blobs = BlobStore(tmp_path / "cache", 1 << 20).path("0" * 64).parent
    listings = [argv for argv in [*shell_commands(DEPLOY / "README.md"),
                                  *comment_commands(DEPLOY / "docker-compose.yml", "docker")]
                if argv[:2] == ["docker", "compose"] and "exec" in argv]
    assert listings
    for argv in listings:
        service, command = argv[argv.index("exec") + 1], argv[argv.index("exec") + 2:]
        cache_dir = image_cache_dir(compose["services"][service]["image"])
        assert command[0] == "ls", argv
        assert command[1] == f"{cache_dir}/{blobs.relative_to(tmp_path / 'cache')}", argv
