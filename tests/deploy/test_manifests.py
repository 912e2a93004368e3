"""The deploy files against the real CLI: every container command parses with edgelora's own
parser and builds a valid config (against the files the container mounts), and ports, probes,
Services, volumes and images line up. Keys, TLS, the internal secret and the workers' privacy:
test_security.py."""

from __future__ import annotations

import importlib.util
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from edgelora.v1 import router_pb2, worker_pb2
from router.config import RouterConfig
from tests.deploy.deploy_files import (
    COMPOSE_VARIANTS,
    DEPLOY,
    K8S,
    OVERLAYS,
    REPO,
    CliError,
    compose_configs,
    config_env_names,
    configs_for,
    container_argv,
    container_port,
    dockerfile_env,
    dockerfile_exec_form,
    dockerfile_for_image,
    dockerfile_values,
    dockerignore_excludes,
    find,
    image_path_to_repo,
    k8s_configs,
    load_compose,
    overlay_objects,
    parse_cli,
    pod_volume,
    selects,
    split_address,
    workload_containers,
)
from worker.config import WorkerConfig

SERVICE_OF = {"router": router_pb2.DESCRIPTOR.services_by_name["Router"].full_name,
              "worker": worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name}
DOCKERFILES = sorted(DEPLOY.glob("Dockerfile.*"))


def _healthcheck_parser():
    spec = importlib.util.spec_from_file_location("healthcheck", DEPLOY / "healthcheck.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_parser()


def parse_healthcheck(argv: list[str]) -> Any:
    """`python /app/deploy/healthcheck.py ...` -> its parsed arguments."""
    assert argv[0] == "python", argv
    assert image_path_to_repo(argv[1]) == DEPLOY / "healthcheck.py", argv
    try:
        return _healthcheck_parser().parse_args(argv[2:])
    except SystemExit as exc:
        raise CliError(f"healthcheck {shlex.join(argv)}") from exc


def check_health_probe(argv: list[str], configs: dict[str, Any], where: str) -> None:
    """A healthcheck.py command checking this process from inside its container: its own port
    on loopback, its own service, over TLS (trusting its certificate) exactly when it serves
    TLS."""
    check = parse_healthcheck(argv)
    kind = process_kind(configs)
    assert check.address == f"127.0.0.1:{listen_port(configs)}", where
    assert check.service == SERVICE_OF[kind], where
    tls_cert = getattr(configs[kind], "tls_cert", "")
    assert check.tls_ca == tls_cert, f"{where}: the check must trust the port's own certificate"


def process_kind(configs: dict[str, Any]) -> str:
    """What serves the container's port: the router (router, serve) or a bare worker."""
    return "router" if "router" in configs else "worker"


def listen_port(configs: dict[str, Any]) -> int:
    config = configs[process_kind(configs)]
    assert config.host == "0.0.0.0", "in a container the server must bind 0.0.0.0 to be reached"
    return config.port


def test_the_parser_refuses_a_flag_that_does_not_exist() -> None:
    """Guards the whole file: a renamed or mistyped flag must fail, not be ignored."""
    assert parse_cli(["worker", "--port", "50052"]).port == 50052
    with pytest.raises(CliError, match="--adapters-dom"):
        parse_cli(["router", "--adapters-dom", "/adapters"])
    with pytest.raises(ValueError, match="--device"):
        configs_for(["worker", "--device", "gpu"], {})


# --- Dockerfiles -----------------------------------------------------------------------------

@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_runs_a_valid_edgelora_command(dockerfile: Path) -> None:
    assert dockerfile_exec_form(dockerfile, "ENTRYPOINT") == ["edgelora"]
    argv = dockerfile_exec_form(dockerfile, "CMD")
    env = dockerfile_env(dockerfile)
    configs = configs_for(argv, env)
    assert configs, f"CMD {argv} starts no server"
    exposed = {int(p) for rest in dockerfile_values(dockerfile, "EXPOSE") for p in rest.split()}
    assert exposed == {listen_port(configs), configs["router"].http_port, WorkerConfig().port}
    assert configs["router"].http_port, "serve answers HTTP too"
    adapters_dir = configs["router"].adapters_dir
    assert (image_path_to_repo(adapters_dir) / "shout" / "adapter_config.json").is_file()
    assert {n for n in env if n.startswith("EDGELORA_")} <= config_env_names()
    assert env["EDGELORA_CACHE_DIR"].startswith("/opt/"), "model cache outside the app folder"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_builds_stubs_and_model_and_runs_as_non_root(dockerfile: Path) -> None:
    runs = " && ".join(dockerfile_values(dockerfile, "RUN"))
    assert "make proto" in runs and "edgelora import-default" in runs
    assert any(rest.startswith("TORCH_SPEC=") for rest in dockerfile_values(dockerfile, "ARG"))
    assert "${TORCH_SPEC}" in runs
    user = dockerfile_values(dockerfile, "USER")[-1]
    uid = user.split(":")[0]
    # numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd
    assert uid.isdigit() and int(uid) != 0
    assert dockerfile_values(dockerfile, "WORKDIR") == ["/app"]
    assert "COPY . ." in [f"COPY {rest}" for rest in dockerfile_values(dockerfile, "COPY")]


def test_dockerignore_keeps_what_the_images_need() -> None:
    needed = ["pyproject.toml", "Makefile", "proto/edgelora/v1/router.proto", "common/config.py",
              "router/server.py", "worker/server.py", "edgelora/cli.py", "deploy/healthcheck.py",
              "adapters/demo/shout/adapter_model.safetensors"]
    assert [p for p in needed if dockerignore_excludes(p)] == []
    # a host venv or stale stubs in the image would shadow what the build makes
    assert dockerignore_excludes(".venv/bin/python")
    assert dockerignore_excludes("edgelora/v1/router_pb2.py")


# --- docker-compose ----------------------------------------------------------------------------

@pytest.mark.parametrize("files", COMPOSE_VARIANTS, ids=lambda f: "+".join(f))
def test_compose_router_reaches_both_workers_and_publishes_its_port(files: tuple[str],
                                                                   tmp_path: Path) -> None:
    compose = load_compose(*files)
    services = compose["services"]
    configs = {name: compose_configs(compose, name, tmp_path)[0] for name in services}
    routers = [n for n, c in configs.items() if process_kind(c) == "router"]
    workers = [n for n, c in configs.items() if process_kind(c) == "worker" and c]
    assert len(routers) == 1 and len(workers) == 2
    router = configs[routers[0]]["router"]
    targets = [split_address(a) for a in router.worker_addresses]
    assert sorted(host for host, _ in targets) == sorted(workers)
    for host, port in targets:
        assert port == listen_port(configs[host])
        assert str(port) in [str(p) for p in services[host]["expose"]]
        assert services[routers[0]]["depends_on"][host]["condition"] == "service_healthy"
    assert f"{router.port}:{router.port}" in services[routers[0]]["ports"]


@pytest.mark.parametrize("files", COMPOSE_VARIANTS, ids=lambda f: "+".join(f))
def test_compose_health_checks_ask_each_process_its_own_service(files: tuple[str],
                                                                tmp_path: Path) -> None:
    compose = load_compose(*files)
    for name, service in compose["services"].items():
        configs, mounts = compose_configs(compose, name, tmp_path)
        test = service["healthcheck"]["test"]
        assert test[0] == "CMD"
        check_health_probe(test[1:], configs, name)
        check = parse_healthcheck(test[1:])
        if check.tls_ca:  # the CA file is there in the container, where the check reads it
            assert mounts.find(check.tls_ca), f"{name}: nothing mounted at {check.tls_ca}"


@pytest.mark.parametrize("files", COMPOSE_VARIANTS, ids=lambda f: "+".join(f))
def test_compose_mounts_the_adapters_read_only_in_the_router_alone(files: tuple[str],
                                                                   tmp_path: Path) -> None:
    """The router reads the adapters folder (--adapters-dir, --adapter-root) and pushes what it
    registers to the workers: no worker mounts it, or any host folder."""
    compose = load_compose(*files)
    services = compose["services"]
    router_name = next(n for n, s in services.items() if s["command"][0] == "router")
    router = compose_configs(compose, router_name, tmp_path)[0]["router"]
    assert router.adapters_dir and router.adapter_root == router.adapters_dir
    adapter_sources = set()
    for name, service in services.items():
        assert (REPO / service["build"]["dockerfile"]) == dockerfile_for_image(service["image"])
        binds = [v for v in service.get("volumes", []) if v["type"] == "bind"]
        if name != router_name:
            assert binds == [], f"{name}: a worker mounts no host folder (the router pushes)"
            assert not any(v["target"] == router.adapters_dir
                           for v in service.get("volumes", [])), name
            continue
        (mount,) = [v for v in binds if v["target"] == router.adapters_dir]
        assert mount["read_only"] is True
        source = (DEPLOY / mount["source"]).resolve()
        assert any(source.glob("*/adapter_config.json")), f"{name}: {source} has no adapters"
        adapter_sources.add(mount["source"])
    assert len(adapter_sources) == 1
    raw = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    anchor = raw["x-edgelora"]  # what every service starts from
    assert "volumes" not in anchor, "the shared anchor would mount the adapters in the workers"


@pytest.mark.parametrize("files", COMPOSE_VARIANTS, ids=lambda f: "+".join(f))
def test_compose_workers_get_the_gpu_only_with_the_cuda_override(files: tuple[str],
                                                                 tmp_path: Path) -> None:
    cuda = "docker-compose.cuda.yml" in files
    compose = load_compose(*files)
    for name, service in compose["services"].items():
        configs = compose_configs(compose, name, tmp_path)[0]
        devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get(
            "devices", [])
        gpus = [d for d in devices if "gpu" in d["capabilities"]]
        if cuda and process_kind(configs) == "worker":
            assert gpus and configs["worker"].device == "cuda", name
            assert service["image"] == "edgelora:cuda"
        else:
            assert not gpus and service["image"] == "edgelora:cpu", name
            assert configs.get("worker") is None or configs["worker"].device == "cpu"


# --- Kubernetes ----------------------------------------------------------------------------------

def test_every_k8s_file_is_listed_by_a_kustomization() -> None:
    listed = set()
    for overlay in OVERLAYS:
        for obj in overlay_objects(overlay):
            listed.add((obj["kind"], obj["metadata"]["name"]))
    on_disk = [p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml"]
    for path in on_disk:
        for doc in yaml.safe_load_all(path.read_text()):
            assert (doc["kind"], doc["metadata"]["name"]) in listed, path


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_containers_run_valid_commands_with_matching_ports_and_probes(overlay: str,
                                                                         tmp_path: Path) -> None:
    objects = overlay_objects(overlay)
    servers = 0
    for workload, container, is_init in workload_containers(objects):
        argv = container_argv(container)
        if is_init:
            parse_healthcheck(argv)  # checked against the workers' Service below
            continue
        configs, mounts = k8s_configs(workload, container, objects, tmp_path)
        assert configs, container["name"]
        port = listen_port(configs)
        servers += 1
        kind = process_kind(configs)
        metrics_port = getattr(configs[kind], "metrics_port", 0)  # a worker's /metrics
        http_port = getattr(configs[kind], "http_port", 0)  # the router's HTTP and /metrics
        assert [p["containerPort"] for p in container["ports"]] == \
            [p for p in (port, http_port, metrics_port) if p]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            where = f"{container['name']} {probe}"
            if getattr(configs[kind], "tls_cert", ""):
                # kubelet's gRPC probe speaks plaintext only: a TLS port is probed by exec
                assert "grpc" not in container[probe], where
                command = container[probe]["exec"]["command"]
                check_health_probe(command, configs, where)
                check = parse_healthcheck(command)
                assert mounts.find(check.tls_ca), f"{where}: nothing mounted at {check.tls_ca}"
                assert container[probe]["timeoutSeconds"] > check.timeout_s, where
            else:
                grpc_probe = container[probe]["grpc"]
                assert grpc_probe["port"] == port, where
                assert grpc_probe["service"] == SERVICE_OF[kind], where
        services = [s for s in find(objects, "Service") if selects(s, workload)]
        assert services, f"no Service selects {workload['metadata']['name']}"
        for service in services:  # each Service port reaches a port the process listens on
            served = {svc_port["port"] for svc_port in service["spec"]["ports"]}
            for svc_port in service["spec"]["ports"]:
                assert container_port(container, svc_port["targetPort"]) == svc_port["port"]
            assert port in served and served <= {port, http_port}, (served, port, http_port)
    assert servers == 2


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_router_finds_workers_through_their_headless_service(overlay: str,
                                                             tmp_path: Path) -> None:
    objects = overlay_objects(overlay)
    (router_deploy,) = find(objects, "Deployment", "edgelora-router")
    (workers,) = find(objects, "StatefulSet", "edgelora-worker")
    router_container = router_deploy["spec"]["template"]["spec"]["containers"][0]
    router = k8s_configs(router_deploy, router_container, objects, tmp_path)[0]["router"]
    (address,) = router.worker_addresses
    host, port = split_address(address)
    (headless,) = find(objects, "Service", host)
    assert headless["spec"]["clusterIP"] == "None"
    assert selects(headless, workers)
    assert workers["spec"]["serviceName"] == host
    assert port in [p["port"] for p in headless["spec"]["ports"]]
    worker_container = workers["spec"]["template"]["spec"]["containers"][0]
    assert k8s_configs(workers, worker_container, objects, tmp_path)[0]["worker"].port == port
    (wait,) = router_deploy["spec"]["template"]["spec"]["initContainers"]
    check = parse_healthcheck(container_argv(wait))
    assert (check.address, check.service) == (address, SERVICE_OF["worker"])
    assert check.wait_s > 0


def test_cuda_workers_request_a_gpu_and_cpu_workers_do_not(tmp_path: Path) -> None:
    for overlay in OVERLAYS:
        objects = overlay_objects(overlay)
        (workers,) = find(objects, "StatefulSet", "edgelora-worker")
        (container,) = workers["spec"]["template"]["spec"]["containers"]
        worker = k8s_configs(workers, container, objects, tmp_path)[0]["worker"]
        resources = container["resources"]
        gpus = int(resources.get("limits", {}).get("nvidia.com/gpu", 0))
        assert dockerfile_for_image(container["image"]).is_file()
        if overlay == "cuda":
            assert gpus >= 1 and worker.device.startswith("cuda")
            assert container["image"] == "edgelora:cuda"
        else:
            assert gpus == 0 and worker.device == "cpu"
            # torch threads beyond the cores the pod gets collapse throughput
            assert 1 <= worker.num_threads <= int(resources["limits"]["cpu"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_adapters_volume_is_read_only_at_the_routers_adapters_dir_and_nowhere_else(
        overlay: str, tmp_path: Path) -> None:
    objects = overlay_objects(overlay)
    (router_deploy,) = find(objects, "Deployment", "edgelora-router")
    router_container = router_deploy["spec"]["template"]["spec"]["containers"][0]
    router = k8s_configs(router_deploy, router_container, objects, tmp_path)[0]["router"]
    adapters_dir = router.adapters_dir
    # admins register by path only inside the volume the router reads
    assert router.adapter_root == adapters_dir
    (mount,) = [m for m in router_container["volumeMounts"] if m["mountPath"] == adapters_dir]
    assert mount["readOnly"] is True
    claim = pod_volume(router_deploy, mount["name"])["persistentVolumeClaim"]["claimName"]
    (pvc,) = find(objects, "PersistentVolumeClaim", claim)
    # one pod reads it: any storage class will do, no ReadWriteMany
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    for workload, container, _ in workload_containers(objects):
        if workload is router_deploy:
            continue
        where = f"{workload['metadata']['name']}/{container['name']}"
        mounts = container.get("volumeMounts", [])
        assert not any(m["mountPath"] == adapters_dir for m in mounts), where
        claims = {pod_volume(workload, m["name"]).get("persistentVolumeClaim", {})
                  .get("claimName") for m in mounts}
        assert claim not in claims, f"{where} mounts {claim}: the router pushes the adapters"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_run_as_the_images_user_without_service_links_or_tokens(overlay: str) -> None:
    objects = overlay_objects(overlay)
    for workload, container, _ in workload_containers(objects):
        pod = workload["spec"]["template"]["spec"]
        # Kubernetes would inject <SERVICE>_PORT=tcp://...; edgelora reads EDGELORA_* as flags.
        assert pod["enableServiceLinks"] is False
        # nothing here calls the Kubernetes API: no token for an intruder to use
        assert pod["automountServiceAccountToken"] is False
        user = dockerfile_values(dockerfile_for_image(container["image"]), "USER")[-1]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert str(pod["securityContext"]["runAsUser"]) == user.split(":")[0]


def test_config_map_keys_are_edgelora_settings() -> None:
    (config,) = find(overlay_objects("cpu"), "ConfigMap", "edgelora-config")
    assert set(config["data"]) <= config_env_names()
    assert "EDGELORA_PORT" not in config["data"], "router and worker would share one port"
    # the values are valid for both processes
    configs_for(["worker"], config["data"])
    configs_for(["router"], config["data"])
    assert RouterConfig().port != WorkerConfig().port
