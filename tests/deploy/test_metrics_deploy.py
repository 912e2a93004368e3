"""Metrics in the deploy files: the compose file's Prometheus service and its config
(deploy/prometheus.yml) scrape the router's HTTP port and every worker's --metrics-port, at the
ports those processes really listen on; the Kubernetes workers open and announce the same port."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.deploy_files import (
    COMPOSE_VARIANTS,
    DEPLOY,
    OVERLAYS,
    compose_configs,
    compose_files,
    configs_for,
    find,
    is_edgelora_service,
    k8s_configs,
    load_compose,
    overlay_objects,
    parse_cli,
    split_address,
)

PROMETHEUS_CONFIG = DEPLOY / "prometheus.yml"


def scrape_jobs() -> dict[str, dict[str, Any]]:
    """deploy/prometheus.yml's scrape jobs by name, checked to be what this reader knows."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    jobs = {}
    for job in config["scrape_configs"]:
        assert set(job) <= {"job_name", "metrics_path", "static_configs", "scheme",
                            "tls_config", "scrape_interval"}, job["job_name"]
        jobs[job["job_name"]] = job
    return jobs


def scrape_targets() -> dict[str, list[tuple[str, int, str]]]:
    """{job: [(host, port, metrics path)]} (static targets only)."""
    return {name: [(*split_address(t), job.get("metrics_path", "/metrics"))
                   for group in job["static_configs"] for t in group["targets"]]
            for name, job in scrape_jobs().items()}


def prometheus_service(compose: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    (found,) = [(n, s) for n, s in compose["services"].items()
                if s["image"].startswith("prom/prometheus:")]
    return found


@pytest.mark.parametrize("files", COMPOSE_VARIANTS, ids=lambda f: "+".join(f))
def test_prometheus_scrapes_every_worker_at_its_metrics_port(files: tuple[str],
                                                             tmp_path: Path) -> None:
    compose = load_compose(*files, with_others=True)
    _, prometheus = prometheus_service(compose)
    scraped = {(host, port) for targets in scrape_targets().values()
               for host, port, path in targets if path == "/metrics"}
    workers = 0
    for name, service in compose["services"].items():
        if not is_edgelora_service(service):
            continue
        configs = compose_configs(compose, name, tmp_path)[0]
        if "router" in configs:
            continue
        worker = configs["worker"]
        workers += 1
        assert worker.metrics_port, f"{name}: no --metrics-port"
        assert (name, worker.metrics_port) in scraped, f"{name} is not scraped"
        assert worker.host == "0.0.0.0", f"{name}: /metrics must be reachable in its container"
        assert str(worker.metrics_port) in [str(p) for p in service["expose"]], name
        assert "ports" not in service, f"{name}: metrics stay on the internal network"
        assert set(service["networks"]) & set(prometheus["networks"]), \
            f"{name}: Prometheus shares no network with it"
    assert workers == 2


def test_prometheus_scrapes_the_routers_http_port_trusting_its_certificate(
        tmp_path: Path) -> None:
    """The router's /metrics lives on its HTTP port (--http-port, the OpenAI front), which
    speaks TLS with the gRPC port's certificate."""
    compose = load_compose("docker-compose.yml", with_others=True)
    (job,) = [j for j in scrape_jobs().values()
              if any(t.split(":")[0] == "router" for g in j["static_configs"]
                     for t in g["targets"])]
    (target,) = [t for g in job["static_configs"] for t in g["targets"]]
    host, port = split_address(target)
    assert job.get("metrics_path", "/metrics") == "/metrics"
    router_configs, router_files = compose_configs(compose, host, tmp_path)
    router = router_configs["router"]
    assert router.http_port == port, \
        f"the router's compose command must serve HTTP (--http-port {port}) for Prometheus"
    assert router.tls_cert and job.get("scheme") == "https"
    name, _ = prometheus_service(compose)
    prometheus_files = compose_files(compose, name, tmp_path)
    ca_file = job["tls_config"]["ca_file"]
    assert prometheus_files.origin(ca_file) == router_files.origin(router.tls_cert), \
        "Prometheus must trust the certificate the router serves"
    health = compose["services"][host]["healthcheck"]["test"]
    assert job["tls_config"]["server_name"] == health[health.index("--tls-server-name") + 1]


def test_every_scrape_target_is_a_compose_service() -> None:
    services = load_compose("docker-compose.yml", with_others=True)["services"]
    for job, targets in scrape_targets().items():
        assert targets, job
        for host, _, _ in targets:
            assert host in services and is_edgelora_service(services[host]), (job, host)


def test_prometheus_service_is_pinned_mounts_its_config_and_stays_local() -> None:
    compose = load_compose("docker-compose.yml", with_others=True)
    _, service = prometheus_service(compose)
    assert re.fullmatch(r"prom/prometheus:v\d+\.\d+\.\d+", service["image"]), "pin a release"
    (flag,) = [a for a in service["command"] if a.startswith("--config.file=")]
    (mount,) = [v for v in service["volumes"] if v["target"] == flag.split("=", 1)[1]]
    assert mount["type"] == "bind" and mount["read_only"] is True
    assert (DEPLOY / mount["source"]).resolve() == PROMETHEUS_CONFIG
    networks = compose["networks"]
    assert any((networks[n] or {}).get("internal") for n in service["networks"]), \
        "Prometheus must join the workers' internal network"
    for published in service.get("ports", []):
        assert str(published).startswith("127.0.0.1:"), f"{published}: this machine only"


def test_metrics_port_is_a_real_worker_flag_and_env() -> None:
    assert parse_cli(["worker", "--metrics-port", "9402"]).metrics_port == 9402
    assert configs_for(["worker"], {"EDGELORA_METRICS_PORT": "9402"})["worker"].metrics_port \
        == 9402
    assert configs_for(["worker"], {})["worker"].metrics_port == 0  # off unless asked


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_workers_open_and_announce_their_metrics_port(overlay: str, tmp_path: Path) -> None:
    objects = overlay_objects(overlay)
    (workers,) = find(objects, "StatefulSet", "edgelora-worker")
    (container,) = workers["spec"]["template"]["spec"]["containers"]
    worker = k8s_configs(workers, container, objects, tmp_path)[0]["worker"]
    assert worker.metrics_port
    (port,) = [p for p in container["ports"] if p["name"] == "metrics"]
    assert port["containerPort"] == worker.metrics_port
    annotations = workers["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(worker.metrics_port)
    assert annotations["prometheus.io/path"] == "/metrics"
    for service in find(objects, "Service"):  # scraped per pod, never load-balanced
        assert worker.metrics_port not in [p["port"] for p in service["spec"]["ports"]]
