"""Readers for the deploy files (Dockerfiles, compose, Kubernetes/kustomize) and the bridge from a
container's command line to the real CLI and config classes, for tests/deploy."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fnmatch
import io
import json
import os
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from common.config import ENV_PREFIX, config_from_args
from edgelora.cli import build_parser
from router.config import RouterConfig
from worker.config import WorkerConfig

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
OVERLAYS = ("cpu", "cuda")
IMAGE_WORKDIR = "/app"  # WORKDIR of both Dockerfiles; `COPY . .` puts the repo there
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "Job")


class CliError(Exception):
    """A command line the real `edgelora` parser refuses."""


def parse_cli(argv: list[str]) -> argparse.Namespace:
    """`edgelora ARGV` parsed by the real parser; raises CliError with argparse's message."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return build_parser().parse_args([str(a) for a in argv])
    except SystemExit as exc:
        raise CliError(f"edgelora {shlex.join(argv)}: {err.getvalue().strip()}") from exc


@contextlib.contextmanager
def environment(env: dict[str, str]) -> Iterator[None]:
    """Only `env` among EDGELORA_* variables while inside (the config classes read them)."""
    saved = {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIX)}
    for key in saved:
        del os.environ[key]
    os.environ.update({k: str(v) for k, v in env.items() if k.startswith(ENV_PREFIX)})
    try:
        yield
    finally:
        for key in [k for k in os.environ if k.startswith(ENV_PREFIX)]:
            del os.environ[key]
        os.environ.update(saved)


def configs_for(argv: list[str], env: dict[str, str]) -> dict[str, Any]:
    """The configs `edgelora ARGV` would run with under `env`, built as edgelora/cli.py builds
    them (so their validation runs): {"router": RouterConfig, "worker": WorkerConfig}."""
    args = parse_cli(argv)
    with environment(env):
        if args.command == "worker":
            return {"worker": config_from_args(WorkerConfig, args)}
        if args.command == "router":
            return {"router": config_from_args(RouterConfig, args)}
        if args.command == "serve":
            return {"worker": config_from_args(WorkerConfig, args, host="127.0.0.1",
                                               port=args.worker_port),
                    "router": config_from_args(RouterConfig, args,
                                               workers=f"127.0.0.1:{args.worker_port}")}
    return {}


def config_env_names() -> set[str]:
    return {ENV_PREFIX + f.name.upper()
            for cls in (RouterConfig, WorkerConfig) for f in dataclasses.fields(cls)}


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


# --- Dockerfiles -----------------------------------------------------------------------------

def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, rest) in order, continuation lines joined, comments dropped."""
    logical, pending = [], ""
    for line in path.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, f"{path.name}: dangling line continuation"
    out = []
    for text in logical:
        word, _, rest = text.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def dockerfile_values(path: Path, instruction: str) -> list[str]:
    return [rest for word, rest in dockerfile_instructions(path) if word == instruction]


def dockerfile_env(path: Path) -> dict[str, str]:
    """ENV key=value pairs (the multi-pair form used here)."""
    env = {}
    for rest in dockerfile_values(path, "ENV"):
        for pair in shlex.split(rest):
            key, sep, value = pair.partition("=")
            assert sep, f"{path.name}: ENV {pair!r} is not KEY=value"
            env[key] = value
    return env


def dockerfile_exec_form(path: Path, instruction: str) -> list[str]:
    values = dockerfile_values(path, instruction)
    assert len(values) == 1, f"{path.name}: expected one {instruction}, found {len(values)}"
    form = json.loads(values[0])  # exec form: a JSON array, no shell in between
    assert isinstance(form, list) and all(isinstance(a, str) for a in form)
    return form


def dockerfile_for_image(image: str) -> Path:
    """edgelora:<variant> is built from deploy/Dockerfile.<variant>."""
    name, _, tag = image.partition(":")
    assert name == "edgelora", f"unexpected image {image!r}"
    return DEPLOY / f"Dockerfile.{tag}"


def dockerignore_excludes(relative: str) -> bool:
    """Whether .dockerignore keeps `relative` (or a parent folder of it) out of the context."""
    patterns = [p.strip() for p in (REPO / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    parts = relative.split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        glob = pattern.lstrip("!").strip("/")
        if any(fnmatch.fnmatch(c, glob) or fnmatch.fnmatch(c, glob.replace("**/", ""))
               for c in candidates):
            excluded = not negate
    return excluded


def image_path_to_repo(path: str) -> Path:
    """A path inside the image under WORKDIR -> the repository file it was copied from."""
    assert path.startswith(IMAGE_WORKDIR + "/"), f"{path} is not under {IMAGE_WORKDIR}"
    return REPO / path[len(IMAGE_WORKDIR) + 1:]


# --- docker-compose ----------------------------------------------------------------------------

_VARIABLE = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


COMPOSE_VARIANTS = (("docker-compose.yml",), ("docker-compose.yml", "docker-compose.cuda.yml"))


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Compose's merge for what our files use: mappings merge, everything else is replaced."""
    merged = dict(base)
    for key, value in override.items():
        both_dicts = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = _merge(merged[key], value) if both_dicts else value
    return merged


def load_compose(*files: str) -> dict[str, Any]:
    """`docker compose -f deploy/A -f deploy/B ...` as one file, ${VAR:-default} replaced by its
    default (as with no .env)."""
    merged: dict[str, Any] = {}
    for name in files:
        text = (DEPLOY / name).read_text()
        merged = _merge(merged, yaml.safe_load(_VARIABLE.sub(lambda m: m.group(2) or "", text)))
    return merged


# --- Kubernetes --------------------------------------------------------------------------------

def _kustomize_files(folder: Path) -> list[Path]:
    spec = yaml.safe_load((folder / "kustomization.yaml").read_text())
    assert set(spec) <= {"apiVersion", "kind", "resources"}, \
        f"{folder}: this reader only follows resources:"
    files: list[Path] = []
    for entry in spec["resources"]:
        target = (folder / entry).resolve()
        assert target.exists(), f"{folder}/kustomization.yaml lists missing {entry}"
        files += _kustomize_files(target) if target.is_dir() else [target]
    return files


def overlay_objects(overlay: str) -> list[dict[str, Any]]:
    """Every object `kubectl apply -k deploy/k8s/<overlay>` would create."""
    objects = []
    for path in _kustomize_files(K8S / overlay):
        objects += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    names = [(o["kind"], o["metadata"]["name"]) for o in objects]
    assert len(names) == len(set(names)), f"{overlay}: duplicate objects {names}"
    return objects


def find(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict]:
    return [o for o in objects
            if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def selects(service: dict[str, Any], workload: dict[str, Any]) -> bool:
    labels = workload["spec"]["template"]["metadata"]["labels"]
    selector = service["spec"].get("selector") or {}
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def container_argv(container: dict[str, Any]) -> list[str]:
    """The process a container runs: the image ENTRYPOINT (edgelora) unless `command` replaces
    it, then `args`."""
    command = container.get("command")
    args = [str(a) for a in container.get("args", [])]
    return ([str(c) for c in command] + args) if command else ["edgelora", *args]


def container_env(container: dict[str, Any], objects: list[dict[str, Any]]) -> dict[str, str]:
    """Image ENV, then envFrom ConfigMaps, then env: what the process sees (later wins)."""
    env = dockerfile_env(dockerfile_for_image(container["image"]))
    for source in container.get("envFrom", []):
        name = source["configMapRef"]["name"]
        maps = find(objects, "ConfigMap", name)
        assert maps, f"envFrom names missing ConfigMap {name}"
        env.update({k: str(v) for k, v in maps[0]["data"].items()})
    env.update({e["name"]: str(e["value"]) for e in container.get("env", [])})
    return env


def container_port(container: dict[str, Any], target: int | str) -> int:
    """A Service targetPort (number or port name) -> the container port it reaches."""
    for port in container.get("ports", []):
        if target in (port["containerPort"], port.get("name")):
            return port["containerPort"]
    raise AssertionError(f"container {container['name']} has no port {target!r}")
