"""The deploys' protection, read from the files: the router takes API keys and TLS and binds all
interfaces, the router <-> worker secret reaches the router and every worker, the secrets are
mounted where the flags point and come from files that are never committed nor built into an
image, and the workers stay private (compose: no published port, an internal network;
Kubernetes: a NetworkPolicy that admits only router pods, on the worker port)."""

from __future__ import annotations

import re
import subprocess
import sys
from itertools import pairwise
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from tests.deploy.deploy_files import (
    COMPOSE_VARIANTS,
    DEPLOY,
    KEYS_EXAMPLE,
    OVERLAYS,
    SECRET_VALUE,
    SECRETS,
    ContainerFiles,
    Mount,
    comment_commands,
    compose_configs,
    compose_env,
    configs_for,
    container_argv,
    container_env,
    dockerignore_excludes,
    documented_k8s_secrets,
    find,
    gitignored,
    k8s_configs,
    load_compose,
    matches,
    overlay_objects,
    parse_cli,
    pod_labels,
    secret_paths,
    selects,
    shell_commands,
    stand_in,
    workload_containers,
)

SECRET_FILES = ("keys.json", "tls.crt", "tls.key", "internal_token")
COMMITTED = (".gitignore", "README.md", "keys.example.json")


def kind_of(configs: dict[str, Any]) -> str:
    return "router" if "router" in configs else "worker"


def check_secret_flags_are_mounted(router: Any, files: ContainerFiles, where: Any) -> None:
    """Off loopback: API keys and TLS, each file a read-only secret mount."""
    assert router.api_keys, f"{where}: without --api-keys anyone who reaches it is admin"
    assert router.tls_cert and router.tls_key, f"{where}: the public port needs TLS"
    for flag, path in secret_paths(router).items():
        found = files.find(path)
        assert found, f"{where}: {flag} {path}: nothing is mounted there"
        assert found[1].origin.startswith("secret "), f"{where}: {flag} {path} is not a secret"
        assert found[1].read_only, f"{where}: {flag} {path} is mounted writable"


def check_router_protection(router: Any, files: ContainerFiles, where: str) -> None:
    """All interfaces with API keys and TLS from secrets; path registration confined to the
    adapters volume."""
    assert router.host == "0.0.0.0", f"{where}: the router must be reachable in its container"
    check_secret_flags_are_mounted(router, files, where)
    assert router.adapter_root and router.adapter_root == router.adapters_dir, where


def internal_secret_origin(config: Any, env: dict[str, str], files: ContainerFiles,
                           where: str) -> str:
    """Where a process's router <-> worker secret comes from: the secret its
    --internal-token-file is, or the Kubernetes Secret its EDGELORA_INTERNAL_TOKEN is taken
    from. Never a literal in a command line or a committed file."""
    from_secret = env.get("EDGELORA_INTERNAL_TOKEN", "")
    if config.internal_token:
        assert from_secret.startswith(SECRET_VALUE) and config.internal_token == from_secret, \
            f"{where}: the internal secret is written into the deploy files"
    if config.internal_token_file:
        origin = files.origin(config.internal_token_file)
        assert origin and origin.startswith("secret "), \
            f"{where}: --internal-token-file {config.internal_token_file} is not a mounted secret"
        return origin
    assert config.internal_token, f"{where}: no internal secret"
    return "secret " + from_secret[len(SECRET_VALUE):]


# --- docker compose ----------------------------------------------------------------------------

def _compose_servers(files: tuple[str], scratch: Path):
    compose = load_compose(*files)
    for name, service in compose["services"].items():
        configs, mounts = compose_configs(compose, name, scratch)
        yield compose, name, service, configs, mounts


@pytest.mark.parametrize("files", COMPOSE_VARIANTS, ids=lambda f: "+".join(f))
def test_compose_publishes_only_the_router_and_keeps_workers_on_an_internal_network(
        files: tuple[str], tmp_path: Path) -> None:
    compose = load_compose(*files)
    networks = compose.get("networks") or {}
    published, router_networks, worker_networks = [], set(), []
    for _, name, service, configs, _ in _compose_servers(files, tmp_path):
        joined = set(service.get("networks") or ["default"])
        if kind_of(configs) == "router":
            router_networks |= joined
            if service.get("ports"):
                published.append(name)
            continue
        assert "ports" not in service, f"{name}: a worker publishes no port"
        worker = configs["worker"]
        # the gRPC port, and /metrics for the prometheus service on the same internal network
        ports = [str(p) for p in (worker.port, worker.metrics_port) if p]
        assert [str(p) for p in service["expose"]] == ports, name
        for network in joined:
            assert (networks.get(network) or {}).get("internal") is True, \
                f"{name}: network {network} is not internal"
        worker_networks.append(joined)
    assert len(published) == 1, f"only the router publishes a port: {published}"
    for joined in worker_networks:
        assert joined & router_networks, "a worker the router cannot reach"
    assert any(not (networks.get(n) or {}).get("internal") for n in router_networks), \
        "the router needs a network that is not internal to publish its port"


@pytest.mark.parametrize("files", COMPOSE_VARIANTS, ids=lambda f: "+".join(f))
def test_compose_router_takes_api_keys_and_tls_from_secrets(files: tuple[str],
                                                            tmp_path: Path) -> None:
    routers = 0
    for _, name, _, configs, mounts in _compose_servers(files, tmp_path):
        if kind_of(configs) == "router":
            routers += 1
            check_router_protection(configs["router"], mounts, name)
    assert routers == 1


@pytest.mark.parametrize("files", COMPOSE_VARIANTS, ids=lambda f: "+".join(f))
def test_compose_internal_secret_reaches_the_router_and_every_worker(files: tuple[str],
                                                                     tmp_path: Path) -> None:
    origins = {}
    for _, name, service, configs, mounts in _compose_servers(files, tmp_path):
        config = configs[kind_of(configs)]
        # a worker on 0.0.0.0 without the secret fails its config; the router must have it too
        origins[name] = internal_secret_origin(config, compose_env(service), mounts, name)
    assert len(origins) == 3 and len(set(origins.values())) == 1, origins


def test_compose_secret_files_default_to_deploy_secrets_and_can_be_moved() -> None:
    raw = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())["secrets"]
    used = {s for service in load_compose("docker-compose.yml")["services"].values()
            for s in [e if isinstance(e, str) else e["source"] for e in service["secrets"]]}
    assert used == set(raw)
    for name, spec in raw.items():
        # a file secret: `environment:` would take the secret from the shell's variables
        assert set(spec) == {"file"}, f"secret {name}: give it as a file"
        match = re.fullmatch(r"\$\{(\w+):-([^}]+)\}", spec["file"])
        assert match, f"secret {name}: ${{VAR:-default}}, so the file can live elsewhere"
        path = (DEPLOY / match.group(2)).resolve()
        assert path.parent == SECRETS and path.name in SECRET_FILES, (name, path)


# --- the secrets folder ----------------------------------------------------------------------

def test_secrets_folder_commits_only_the_readme_and_the_example() -> None:
    for name in SECRET_FILES:
        assert gitignored(SECRETS, name), f"deploy/secrets/{name} would be committed"
    for name in COMMITTED:
        assert (SECRETS / name).is_file() and not gitignored(SECRETS, name), name
    readme = (SECRETS / "README.md").read_text()
    for name in SECRET_FILES:
        assert f"`{name}`" in readme, f"deploy/secrets/README.md does not say how to make {name}"


def test_images_leave_the_secrets_out() -> None:
    """`COPY . .` would build every secret in deploy/secrets/ into the image."""
    for name in SECRET_FILES:
        assert dockerignore_excludes(f"deploy/secrets/{name}"), \
            f"add deploy/secrets to .dockerignore: deploy/secrets/{name} goes into the image"


def test_keys_example_is_a_keys_file_the_router_loads() -> None:
    from router.tenants import ADMIN, TENANT, load_keys_file

    callers = list(load_keys_file(KEYS_EXAMPLE).values())
    assert {c.role for c in callers} == {ADMIN, TENANT}
    assert any(c.limits.max_running is not None for c in callers), "show the per-tenant limits"


# --- Kubernetes --------------------------------------------------------------------------------

def _k8s_servers(overlay: str, scratch: Path):
    objects = overlay_objects(overlay)
    for workload, container, is_init in workload_containers(objects):
        if not is_init:
            configs, mounts = k8s_configs(workload, container, objects, scratch)
            yield objects, workload, container, configs, mounts


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_router_takes_api_keys_and_tls_from_secrets(overlay: str, tmp_path: Path) -> None:
    routers = [(container, configs, mounts)
               for _, _, container, configs, mounts in _k8s_servers(overlay, tmp_path)
               if kind_of(configs) == "router"]
    assert len(routers) == 1
    for container, configs, mounts in routers:
        check_router_protection(configs["router"], mounts, container["name"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_internal_secret_reaches_the_router_and_every_worker(overlay: str,
                                                                 tmp_path: Path) -> None:
    origins = {}
    for objects, workload, container, configs, mounts in _k8s_servers(overlay, tmp_path):
        config = configs[kind_of(configs)]
        where = f"{workload['metadata']['name']}/{container['name']}"
        origins[where] = internal_secret_origin(config, container_env(container, objects),
                                                mounts, where)
    assert len(origins) == 2 and len(set(origins.values())) == 1, origins


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_secrets_are_made_by_the_readme_and_not_committed(overlay: str,
                                                              tmp_path: Path) -> None:
    """Every Secret key a pod mounts is one deploy/README.md's `kubectl create secret` lines make,
    from a file in deploy/secrets/ that git ignores; no Secret object is in the kustomization."""
    objects = overlay_objects(overlay)
    assert find(objects, "Secret") == [], "a Secret in the manifests would be committed"
    documented = documented_k8s_secrets()
    mounted = set()
    for _, _, container, _, mounts in _k8s_servers(overlay, tmp_path):
        for mount in mounts.mounts.values():
            if mount.origin.startswith("secret "):
                mounted.add(mount.origin.removeprefix("secret "))
        for value in container_env(container, objects).values():
            if value.startswith(SECRET_VALUE):
                mounted.add(value.removeprefix(SECRET_VALUE))
    assert mounted, "no secrets mounted"
    for secret_key in sorted(mounted):
        secret, key = secret_key.split("/", 1)
        assert key in documented.get(secret, {}), \
            f"deploy/README.md does not create Secret {secret} with key {key}"
        source = PurePosixPath(documented[secret][key])
        assert str(source.parent) == "deploy/secrets" and source.name in SECRET_FILES, source
        assert gitignored(SECRETS, source.name)


def _port_number(port: int | str, container: dict) -> int:
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in container["ports"] if p.get("name") == port]
    return number


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policy_admits_only_router_pods_on_the_worker_port(overlay: str,
                                                                   tmp_path: Path) -> None:
    objects = overlay_objects(overlay)
    (router,) = find(objects, "Deployment", "edgelora-router")
    (workers,) = find(objects, "StatefulSet", "edgelora-worker")
    (worker_container,) = workers["spec"]["template"]["spec"]["containers"]
    worker_port = k8s_configs(workers, worker_container, objects, tmp_path)[0]["worker"].port
    policies = [p for p in find(objects, "NetworkPolicy")
                if matches(p["spec"]["podSelector"], pod_labels(workers))]
    assert policies, "no NetworkPolicy selects the worker pods"
    for policy in find(objects, "NetworkPolicy"):
        # the router stays reachable: its Service is the way in
        assert not matches(policy["spec"]["podSelector"], pod_labels(router)), \
            policy["metadata"]["name"]
    for policy in policies:
        name, spec = policy["metadata"]["name"], policy["spec"]
        assert "Ingress" in spec["policyTypes"], name
        assert spec.get("ingress"), f"{name}: no ingress rule: the router could not reach them"
        for rule in spec["ingress"]:
            assert rule.get("from"), f"{name}: a rule without `from` admits every source"
            for peer in rule["from"]:
                assert set(peer) == {"podSelector"}, f"{name}: only pods of this namespace"
                assert matches(peer["podSelector"], pod_labels(router)), name
                assert not matches(peer["podSelector"], pod_labels(workers)), name
            assert rule.get("ports"), f"{name}: a rule without `ports` admits every port"
            for port in rule["ports"]:
                assert port.get("protocol", "TCP") == "TCP" and "endPort" not in port, name
                assert _port_number(port["port"], worker_container) == worker_port, name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_the_routers_service_is_the_only_entry(overlay: str) -> None:
    objects = overlay_objects(overlay)
    assert not find(objects, "Ingress"), "expose the router yourself (deploy/README.md)"
    (router,) = find(objects, "Deployment", "edgelora-router")
    (workers,) = find(objects, "StatefulSet", "edgelora-worker")
    assert [s for s in find(objects, "Service") if selects(s, router)]
    for service in find(objects, "Service"):
        if selects(service, workers):
            assert service["spec"].get("clusterIP") == "None", service["metadata"]["name"]
            assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    for workload, container, _ in workload_containers(objects):
        assert not any("hostPort" in p for p in container.get("ports", [])), container["name"]
        assert not workload["spec"]["template"]["spec"].get("hostNetwork"), container["name"]
        argv = container_argv(container)
        assert "--internal-token" not in argv, "the secret itself on a command line"


# --- the documented commands -----------------------------------------------------------------

def test_the_documented_commands_make_a_token_and_keys_the_router_loads(tmp_path: Path) -> None:
    """deploy/secrets/README.md's internal_token and keys.json recipes, run as written."""
    from router.tenants import ADMIN, TENANT, load_keys_file

    readme = SECRETS / "README.md"
    (token_cmd,) = [c for c in shell_commands(readme) if c[-2:] == [">", "internal_token"]]
    assert token_cmd[:2] == ["python", "-c"]
    token = subprocess.run([sys.executable, "-c", token_cmd[2]], capture_output=True, text=True,
                           check=True).stdout.strip()
    assert len(token) >= 32
    (script,) = re.findall(r"python - > keys\.json <<'EOF'\n(.*?)\nEOF\n", readme.read_text(),
                           flags=re.S)
    scripts = [script] + [c[2] for c in shell_commands(DEPLOY / "README.md")
                          if c[:2] == ["python", "-c"] and c[-2:] == [">", "keys.json"]]
    assert len(scripts) == 2
    for script in scripts:
        keys = tmp_path / "keys.json"
        keys.write_text(subprocess.run([sys.executable, "-"], input=script, capture_output=True,
                                       text=True, check=True).stdout)
        callers = list(load_keys_file(keys).values())
        # deploy/README.md's client commands take [0] as the admin's key, [1] as a tenant's
        assert [c.role for c in callers] == [ADMIN, TENANT], script


def _without_env_assignments(argv: list[str]) -> list[str]:
    while argv and re.fullmatch(r"[A-Z_]+=\S*", argv[0]):
        argv = argv[1:]
    return argv


CLIENT_COMMANDS = (["edgelora", "generate"], ["edgelora", "adapters", "upload"],
                   ["edgelora", "adapters", "list"], ["edgelora", "adapters", "remove"])


def check_client_command(argv: list[str]) -> bool:
    """An `edgelora` client line: it parses with the real CLI and dials the router over TLS,
    trusting deploy/secrets/tls.crt. -> whether `argv` is one."""
    if not any(argv[:len(c)] == c for c in CLIENT_COMMANDS):
        return False
    args = parse_cli(argv[1:])
    assert args.tls_ca == "deploy/secrets/tls.crt" and args.address, argv
    return True


def test_deploy_readme_commands_run_with_the_cli_over_tls_with_a_key(tmp_path: Path) -> None:
    """deploy/README.md's `edgelora` and `docker run` command lines parse with the real CLI (and
    build valid configs, with deploy/secrets mounted where `-v` puts it); its clients speak TLS
    with a key."""
    servers = clients = uploads = 0
    for argv in map(_without_env_assignments, shell_commands(DEPLOY / "README.md")):
        if check_client_command(argv):
            clients += 1
            uploads += argv[:3] == ["edgelora", "adapters", "upload"]
        elif argv[:2] == ["docker", "run"]:
            image = next(i for i, a in enumerate(argv) if a.startswith("edgelora:"))
            files = ContainerFiles()
            for flag, value in pairwise(argv):
                if flag == "-v":
                    source, target, *_ = value.split(":")
                    assert source.endswith("/deploy/secrets"), value
                    for name in SECRET_FILES:
                        files.add(f"{target}/{name}",
                                  Mount(stand_in(tmp_path / "run", name), "secret " + name, True))
            if argv[image + 1:]:
                configs = configs_for(argv[image + 1:], {}, files)
                if configs["router"].host != "127.0.0.1":
                    check_secret_flags_are_mounted(configs["router"], files, argv)
                    servers += 1
        elif argv[0] == "grpcurl":
            assert "-plaintext" not in argv, argv
            assert argv[argv.index("-cacert") + 1] == "deploy/secrets/tls.crt", argv
            assert argv[argv.index("-H") + 1].startswith("authorization: Bearer "), argv
            clients += 1
    assert servers >= 1 and clients >= 3 and uploads >= 1


def test_compose_header_commands_run_with_the_cli_over_tls_with_a_key() -> None:
    """The client lines in docker-compose.yml's header comment, an upload among them."""
    commands = comment_commands(DEPLOY / "docker-compose.yml", "edgelora")
    assert [c for c in commands if check_client_command(c)] == commands
    assert any(c[:3] == ["edgelora", "adapters", "upload"] for c in commands)
    assert all("--api-key" in c for c in commands), "the router wants a key"
