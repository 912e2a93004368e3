"""Readers for the deploy files (Dockerfiles, compose, Kubernetes/kustomize) and the bridge from a
container's command line to the real CLI and config classes, for tests/deploy.

The config classes check that the files their flags name exist (--api-keys, --tls-cert,
--internal-token-file, --adapter-root, ...). A container's view of those paths is a
`ContainerFiles`: what its volumes and secrets mount where, with the secrets as stand-in files in a
scratch folder. `configs_for(argv, env, files)` runs the flags against that view, so a flag that
points where nothing is mounted fails as it would in the container."""

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
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from common.config import ENV_PREFIX, config_from_args
from edgelora.cli import build_parser, serve_configs
from router.config import RouterConfig
from worker.config import WorkerConfig

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
SECRETS = DEPLOY / "secrets"
KEYS_EXAMPLE = SECRETS / "keys.example.json"
OVERLAYS = ("cpu", "cuda")
IMAGE_WORKDIR = "/app"  # WORKDIR of both Dockerfiles; `COPY . .` puts the repo there
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "Job")
SECRET_VALUE = "value-of-secret "  # stands for an env var taken from a Kubernetes Secret


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


@dataclasses.dataclass(frozen=True)
class Mount:
    """What a container sees at one path."""

    host: Path  # where it is here: a repository folder (bind mounts) or a stand-in in scratch
    origin: str  # what is mounted: "secret internal_token", "pvc edgelora-adapters",
    #              "volume router-state", "emptyDir adapter-cache", ...
    read_only: bool


class ContainerFiles:
    """A container's mounts: container path -> Mount (secret files one by one, folders whole)."""

    def __init__(self) -> None:
        self.mounts: dict[str, Mount] = {}
        self._shown: dict[str, str] = {}  # host path handed to the config -> container path

    def add(self, target: str, mount: Mount) -> None:
        assert target.startswith("/"), f"mount target {target!r} is not absolute"
        assert target not in self.mounts, f"two mounts at {target}"
        self.mounts[target] = mount

    def find(self, path: str) -> tuple[str, Mount] | None:
        """The mount that holds container path `path` (the deepest one), with its target."""
        holders = [t for t in self.mounts if path == t or path.startswith(t.rstrip("/") + "/")]
        if not holders:
            return None
        target = max(holders, key=len)
        return target, self.mounts[target]

    def origin(self, path: str) -> str | None:
        found = self.find(path)
        return found[1].origin if found else None

    def host(self, value: str) -> str:
        """A flag or env value: a mounted container path -> where it is here; else unchanged."""
        found = self.find(value) if value.startswith("/") else None
        if found is None:
            return value
        target, mount = found
        here = str(mount.host) + value[len(target):]
        self._shown[here] = value
        return here

    def restore(self, config: Any) -> Any:
        """`config` with the container paths back in the fields that got host paths."""
        for field in dataclasses.fields(config):
            value = getattr(config, field.name)
            if isinstance(value, str) and value in self._shown:
                object.__setattr__(config, field.name, self._shown[value])
        return config


def configs_for(argv: list[str], env: dict[str, str],
                files: ContainerFiles | None = None) -> dict[str, Any]:
    """The configs `edgelora ARGV` would run with under `env`, built as edgelora/cli.py builds
    them (so their validation runs): {"router": RouterConfig, "worker": WorkerConfig}. With
    `files`, the paths in flags and env are looked up in the container's mounts (a path nothing
    mounts does not exist); the configs returned hold the container paths again."""
    if files is not None:
        argv = [files.host(str(a)) for a in argv]
        env = {k: files.host(str(v)) for k, v in env.items()}
    args = parse_cli(argv)
    with environment(env):
        if args.command == "worker":
            configs = {"worker": config_from_args(WorkerConfig, args)}
        elif args.command == "router":
            configs = {"router": config_from_args(RouterConfig, args)}
        elif args.command == "serve":
            worker, router = serve_configs(args)  # serve's own defaults (HTTP on, state kept)
            configs = {"worker": worker, "router": router}
        else:
            configs = {}
    if files is not None:
        configs = {name: files.restore(config) for name, config in configs.items()}
    return configs


def stand_in(folder: Path, name: str) -> Path:
    """A stand-in for the secret file `name` in `folder`: the example keys for a keys file (so
    it parses), a line of text for the rest (the configs only need the file to exist)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    if not path.exists():
        if name.endswith((".json", ".yaml", ".yml")):
            path.write_text(KEYS_EXAMPLE.read_text())
        else:
            path.write_text(f"stand-in for {name}\n")
    return path


def secret_paths(config: Any) -> dict[str, str]:
    """The secret files a config reads, by flag: {"--api-keys": path, ...} (set ones only)."""
    names = ("api_keys", "tls_cert", "tls_key", "internal_token_file")
    return {"--" + n.replace("_", "-"): getattr(config, n) for n in names
            if getattr(config, n, "")}


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


def load_compose(*files: str, with_others: bool = False) -> dict[str, Any]:
    """`docker compose -f deploy/A -f deploy/B ...` as one file, ${VAR:-default} replaced by its
    default (as with no .env). Its services are the edgelora ones (an edgelora:* image) unless
    `with_others`: the Prometheus service beside them runs no edgelora command
    (test_metrics_deploy.py checks it)."""
    merged: dict[str, Any] = {}
    for name in files:
        text = (DEPLOY / name).read_text()
        merged = _merge(merged, yaml.safe_load(_VARIABLE.sub(lambda m: m.group(2) or "", text)))
    if not with_others:
        merged["services"] = {name: service for name, service in merged["services"].items()
                              if is_edgelora_service(service)}
    return merged


def is_edgelora_service(service: dict[str, Any]) -> bool:
    return str(service.get("image", "")).startswith("edgelora:")


def compose_secret_mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(secret name, container path) for each secret the service mounts."""
    out = []
    for entry in service.get("secrets", []):
        source = entry if isinstance(entry, str) else entry["source"]
        target = source if isinstance(entry, str) else entry.get("target", source)
        out.append((source, target if target.startswith("/") else f"/run/secrets/{target}"))
    return out


def compose_files(compose: dict[str, Any], name: str, scratch: Path) -> ContainerFiles:
    """What compose mounts in service `name`: bind volumes (the repository folders), named
    volumes (empty folders), and its secrets as stand-ins (compose mounts the file named in the
    top-level `secrets:`)."""
    service = compose["services"][name]
    files = ContainerFiles()
    for volume in service.get("volumes", []):
        assert isinstance(volume, dict) and volume["type"] in ("bind", "volume"), \
            f"{name}: {volume}"
        if volume["type"] == "volume":  # a named volume: starts as an empty folder
            assert volume["source"] in compose.get("volumes", {}), \
                f"{name}: undefined volume {volume['source']}"
            folder = scratch / "compose-volumes" / volume["source"]
            folder.mkdir(parents=True, exist_ok=True)
            files.add(volume["target"], Mount(folder, f"volume {volume['source']}",
                                              bool(volume.get("read_only"))))
            continue
        files.add(volume["target"], Mount((DEPLOY / volume["source"]).resolve(),
                                          f"bind {volume['source']}",
                                          bool(volume.get("read_only"))))
    for secret, path in compose_secret_mounts(service):
        assert secret in compose.get("secrets", {}), f"{name}: undefined secret {secret}"
        host = stand_in(scratch / "compose-secrets" / secret, PurePosixPath(path).name)
        files.add(path, Mount(host, f"secret {secret}", True))
    return files


def compose_env(service: dict[str, Any]) -> dict[str, str]:
    return {k: str(v) for k, v in service.get("environment", {}).items()}


def compose_process_env(service: dict[str, Any]) -> dict[str, str]:
    """What the process sees: the image's ENV, then the service's `environment:` (later wins)."""
    return {**dockerfile_env(dockerfile_for_image(service["image"])), **compose_env(service)}


def compose_configs(compose: dict[str, Any], name: str, scratch: Path
                    ) -> tuple[dict[str, Any], ContainerFiles]:
    """The configs of compose service `name` (under its image's ENV and its environment), its
    flags checked against its mounts."""
    files = compose_files(compose, name, scratch)
    service = compose["services"][name]
    return configs_for(service["command"], compose_process_env(service), files), files


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
    """Image ENV, then envFrom ConfigMaps, then env: what the process sees (later wins). A
    variable from a Secret's key reads SECRET_VALUE + "NAME/KEY"."""
    env = dockerfile_env(dockerfile_for_image(container["image"]))
    for source in container.get("envFrom", []):
        name = source["configMapRef"]["name"]
        maps = find(objects, "ConfigMap", name)
        assert maps, f"envFrom names missing ConfigMap {name}"
        env.update({k: str(v) for k, v in maps[0]["data"].items()})
    for entry in container.get("env", []):
        if "value" in entry:
            env[entry["name"]] = str(entry["value"])
        else:  # valueFrom a Secret's key: this text stands for its value
            ref = entry["valueFrom"]["secretKeyRef"]
            env[entry["name"]] = f"{SECRET_VALUE}{ref['name']}/{ref['key']}"
    return env


def container_port(container: dict[str, Any], target: int | str) -> int:
    """A Service targetPort (number or port name) -> the container port it reaches."""
    for port in container.get("ports", []):
        if target in (port["containerPort"], port.get("name")):
            return port["containerPort"]
    raise AssertionError(f"container {container['name']} has no port {target!r}")


def _secret_items(source: dict[str, Any], volume: str) -> tuple[str, list[dict[str, str]]]:
    """(Secret name, items) of a `secret` volume or a projected volume's secret source."""
    name = source.get("secretName") or source.get("name")
    items = source.get("items")
    # items name the keys: a missing key then stops the pod, and these tests know the files
    assert items, f"volume {volume}: list the Secret's keys (items)"
    return name, items


def pod_files(workload: dict[str, Any], container: dict[str, Any],
              scratch: Path) -> ContainerFiles:
    """What the container's volumeMounts show: PVCs and emptyDirs as empty folders, Secrets'
    keys as stand-in files (one mount per file, origin "secret NAME/KEY")."""
    volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"].get("volumes", [])}
    files = ContainerFiles()
    for mount in container.get("volumeMounts", []):
        assert not mount.get("subPath"), "subPath mounts never see a Secret's updates"
        volume = volumes[mount["name"]]
        target, read_only = mount["mountPath"], bool(mount.get("readOnly"))
        if "persistentVolumeClaim" in volume:
            claim = volume["persistentVolumeClaim"]["claimName"]
            folder = scratch / "pvc" / claim
            folder.mkdir(parents=True, exist_ok=True)
            files.add(target, Mount(folder, f"pvc {claim}", read_only))
            continue
        if "emptyDir" in volume:  # the pod's own, empty at its start
            folder = scratch / "emptydir" / workload["metadata"]["name"] / mount["name"]
            folder.mkdir(parents=True, exist_ok=True)
            files.add(target, Mount(folder, f"emptyDir {mount['name']}", read_only))
            continue
        if "secret" in volume:
            sources = [volume["secret"]]
        elif "projected" in volume:
            sources = [s["secret"] for s in volume["projected"]["sources"]]
        else:
            raise AssertionError(f"volume {mount['name']}: a kind these tests do not model")
        for source in sources:
            secret, items = _secret_items(source, mount["name"])
            for item in items:
                path = f"{target.rstrip('/')}/{item['path']}"
                host = stand_in(scratch / "k8s-secrets" / secret, item["path"])
                files.add(path, Mount(host, f"secret {secret}/{item['key']}", read_only))
    return files


def workload_containers(objects: list[dict[str, Any]]) -> list[tuple[dict, dict, bool]]:
    """(workload, container, is_init) for every container of every workload."""
    out = []
    for obj in objects:
        if obj["kind"] in WORKLOAD_KINDS:
            spec = obj["spec"]["template"]["spec"]
            out += [(obj, c, True) for c in spec.get("initContainers", [])]
            out += [(obj, c, False) for c in spec["containers"]]
    return out


def k8s_configs(workload: dict[str, Any], container: dict[str, Any],
                objects: list[dict[str, Any]], scratch: Path
                ) -> tuple[dict[str, Any], ContainerFiles]:
    """The configs of a server container, its flags checked against its mounts."""
    files = pod_files(workload, container, scratch)
    argv = container_argv(container)
    assert argv[0] == "edgelora", argv
    return configs_for(argv[1:], container_env(container, objects), files), files


def pod_volume(workload: dict[str, Any], name: str) -> dict[str, Any]:
    """The pod's volume `name` (as its volumeMounts name it)."""
    (volume,) = [v for v in workload["spec"]["template"]["spec"].get("volumes", [])
                 if v["name"] == name]
    return volume


_QUANTITY = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
             "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def quantity_bytes(quantity: str | int) -> int:
    """A Kubernetes storage quantity ("6Gi", "512M", 1024) in bytes."""
    match = re.fullmatch(r"(\d+)([kMGT]i?|Ki)?", str(quantity))
    assert match, f"quantity {quantity!r}: a whole number with a unit these tests know"
    return int(match.group(1)) * _QUANTITY[match.group(2) or ""]


def pod_labels(workload: dict[str, Any]) -> dict[str, str]:
    return workload["spec"]["template"]["metadata"]["labels"]


def matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A label selector (matchLabels, and matchExpressions In/NotIn/Exists/DoesNotExist)."""
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions") or []:
        key, op, values = expression["key"], expression["operator"], expression.get("values", [])
        ok = {"In": labels.get(key) in values, "NotIn": labels.get(key) not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return True


# --- the documents ------------------------------------------------------------------------------

def shell_commands(markdown: Path) -> list[list[str]]:
    """Every command line of the ```bash blocks of a markdown file (continuations joined, split
    at pipes), as argv lists."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", markdown.read_text(), flags=re.S):
        heredoc_end = None
        for line in block.replace("\\\n", " ").splitlines():
            if heredoc_end is not None:  # a here-document's body is not commands
                heredoc_end = None if line.strip() == heredoc_end else heredoc_end
                continue
            words = shlex.split(line, comments=True)
            heredoc = re.search(r"<<-?\s*'?(\w+)'?", line)
            if heredoc:
                heredoc_end = heredoc.group(1)
            part: list[str] = []
            for word in [*words, "|"]:
                if word in ("|", "&&", ";"):
                    if part:
                        commands.append(part)
                    part = []
                else:
                    part.append(word)
    return commands


def comment_commands(path: Path, program: str) -> list[list[str]]:
    """The `program ...` command lines shown in a file's leading comment block (continuation
    lines joined, a trailing "  (remark)" dropped), as argv lists."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line[1:].strip())
    commands, pending = [], ""
    for line in lines:
        line = pending + line
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        line = re.sub(r"\s{2,}\(.*\)$", "", line)
        if line.startswith(program + " "):
            commands.append(shlex.split(line))
    return commands


def documented_k8s_secrets() -> dict[str, dict[str, str]]:
    """The Secrets deploy/README.md creates: {name: {key: file it is made from}}."""
    secrets: dict[str, dict[str, str]] = {}
    for argv in shell_commands(DEPLOY / "README.md"):
        if argv[:3] != ["kubectl", "create", "secret"]:
            continue
        kind, name, options = argv[3], argv[4], argv[5:]
        keys = secrets.setdefault(name, {})
        for option in options:
            flag, _, value = option.partition("=")
            if kind == "generic" and flag == "--from-file":
                key, _, path = value.rpartition("=")
                keys[key or Path(path).name] = path
            elif kind == "tls" and flag in ("--cert", "--key"):
                keys["tls.crt" if flag == "--cert" else "tls.key"] = value
    return secrets


def gitignored(folder: Path, name: str) -> bool:
    """Whether `folder`/.gitignore ignores the file `name` in it (last matching pattern wins)."""
    ignored = False
    for pattern in (folder / ".gitignore").read_text().splitlines():
        pattern = pattern.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        if fnmatch.fnmatch(name, pattern.lstrip("!").strip("/")):
            ignored = not negate
    return ignored
