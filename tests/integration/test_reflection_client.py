"""A client that knows nothing of edgelora streams from the router through server reflection alone,
and every grpcurl command of docs/clients.md works against a live router.

The client (examples/reflection_client.py) runs in a subprocess where importing any of edgelora's
packages fails, so its messages can only come from the descriptors the server sends."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from google.protobuf import json_format

from edgelora.client import build_request
from edgelora.v1 import router_pb2, router_pb2_grpc, types_pb2
from tests.conftest import ServeThread, write_random_adapter
from worker.config import WorkerConfig

REPO = Path(__file__).resolve().parents[2]
CLIENT = REPO / "examples" / "reflection_client.py"
NODE_CLIENT = REPO / "examples" / "node-client" / "client.js"
DEMO = REPO / "adapters" / "demo"
DOCS = REPO / "docs" / "clients.md"
# Blocks the project's packages (and their generated stubs) before running the client script.
ISOLATED = ("import runpy, sys; "
            "sys.modules.update(dict.fromkeys(['edgelora', 'common', 'router', 'worker'])); "
            "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
# Docs commands that need the real model and its demo adapters (tiny_server has neither).
NEEDS_DEMO_ADAPTERS = ("RegisterAdapter", "UnregisterAdapter", '"adapter_id": "')
DOCS_KEY = "k-acme-77b2e4a9"  # the key docs/clients.md exports as $KEY


def run_client(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", ISOLATED, str(CLIENT), *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)


def test_the_isolation_really_blocks_the_generated_stubs(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("import edgelora.v1.types_pb2\n")
    plain = subprocess.run([sys.executable, str(probe)], cwd=tmp_path, capture_output=True,
                           text=True, timeout=60)
    assert plain.returncode == 0, plain.stderr  # the venv would find them...
    done = subprocess.run([sys.executable, "-c", ISOLATED, str(probe)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0  # ...but not under the isolation the client runs in
    assert "ModuleNotFoundError: No module named 'edgelora.v1'" in done.stderr


def test_reflection_lists_the_router_health_and_reflection_services(
        tiny_server: ServeThread, tmp_path: Path) -> None:
    done = run_client(tiny_server.address, "list", tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    assert {"edgelora.v1.Router", "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection"} <= set(done.stdout.split())
    assert "edgelora.v1.Worker" not in done.stdout  # internal: only the workers serve it


def test_reflection_describes_the_streaming_method(tiny_server: ServeThread,
                                                   tmp_path: Path) -> None:
    done = run_client(tiny_server.address, "describe", "edgelora.v1.Router", tmp_path=tmp_path)
    assert ("GenerateStream(edgelora.v1.GenerateRequest) returns "
            "(stream edgelora.v1.GenerateResponse)") in done.stdout.splitlines()


def test_stream_built_from_reflection_matches_the_generated_client(
        tiny_server: ServeThread, tmp_path: Path) -> None:
    body = json.dumps({"prompt": "Tell me a story",
                       "params": {"max_tokens": 12, "ignore_eos": True}})
    done = run_client(tiny_server.address, "call", "edgelora.v1.Router/GenerateStream", body,
                      tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    chunks = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(chunks) > 1
    assert [c.get("finishReason", "") for c in chunks[:-1]] == [""] * (len(chunks) - 1)
    assert chunks[-1]["finishReason"] == "length"
    assert chunks[-1]["usage"]["completionTokens"] == 12
    token_ids = [t for c in chunks for t in c.get("tokenIds", [])]
    # the same request through the generated stubs: the dynamic messages meant the same thing
    with grpc.insecure_channel(tiny_server.address) as channel:
        whole = router_pb2_grpc.RouterStub(channel).Generate(
            build_request("Tell me a story", max_tokens=12, ignore_eos=True), timeout=60)
    assert token_ids == list(whole.token_ids)
    assert "".join(c.get("text", "") for c in chunks) == whole.text


def test_health_answers_serving_through_reflection(tiny_server: ServeThread,
                                                   tmp_path: Path) -> None:
    for service in ("", "edgelora.v1.Router"):
        done = run_client(tiny_server.address, "call", "grpc.health.v1.Health/Check",
                          json.dumps({"service": service}), tmp_path=tmp_path)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == {"status": "SERVING"}


def test_errors_keep_their_status_code(tiny_server: ServeThread, tmp_path: Path) -> None:
    done = run_client(tiny_server.address, "call", "edgelora.v1.Router/Generate",
                      json.dumps({"prompt": "Hi", "adapter_id": "nope"}), tmp_path=tmp_path)
    assert done.returncode == 1
    assert done.stderr.startswith("ERROR: NOT_FOUND:") and "nope" in done.stderr


def docs_grpcurl_commands(secure: bool | None = None) -> list[list[str]]:
    """Every `grpcurl ...` command line of docs/clients.md, continuation lines joined; only the
    TLS ones (-cacert) or only the plaintext ones when `secure` says which."""
    text = DOCS.read_text().replace("\\\n", " ")
    commands = [shlex.split(line.strip()) for line in text.splitlines()
                if line.strip().startswith("grpcurl ")]
    return [c for c in commands if secure is None or ("-cacert" in c) == secure]


def as_client_args(grpcurl: list[str], address: str, cacert: str = "") -> list[str]:
    """grpcurl (-plaintext | -cacert ca.pem [-H HEADER]) [-d BODY] localhost:50051 VERB... ->
    reflection_client arguments; $KEY in a header becomes the test's API key."""
    assert grpcurl[0] == "grpcurl", grpcurl
    rest, options, body = grpcurl[1:], [], None
    while rest[0].startswith("-"):
        flag, rest = rest[0], rest[1:]
        if flag == "-plaintext":
            continue
        value, rest = rest[0], rest[1:]
        if flag == "-d":
            body = value
        elif flag == "-cacert":
            assert value == "ca.pem" and cacert, grpcurl
            options += ["-cacert", cacert]
        else:
            assert flag == "-H", grpcurl
            options += ["-H", value.replace("$KEY", DOCS_KEY)]
    assert rest[0] == "localhost:50051", grpcurl
    verb = rest[1:]
    if verb[0] in ("list", "describe"):
        return [*options, address, *verb]
    assert len(verb) == 1 and "/" in verb[0], grpcurl
    return [*options, address, "call", verb[0], body or "{}"]


def test_the_docs_show_each_kind_of_call() -> None:
    commands = [" ".join(c) for c in docs_grpcurl_commands()]
    for method in ("list", "describe", "Router/GenerateStream", "Router/Generate ",
                   "Router/ListAdapters", "Router/SelectAdapter", "Router/RegisterAdapter",
                   "Health/Check"):
        assert any(method in c + " " for c in commands), method


@pytest.fixture(scope="module")
def tls_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """The tiny server with TLS (a self-signed certificate for localhost) and one API key."""
    folder = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                    str(folder / "key.pem"), "-out", str(folder / "ca.pem"), "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"],
                   check=True, capture_output=True, timeout=60)
    keys = folder / "keys.json"
    keys.write_text(json.dumps({"keys": [{"key": DOCS_KEY, "tenant": "docs"}]}))
    server = ServeThread(WorkerConfig(model=str(tiny_model_dir), port=0, num_threads=1,
                                      max_model_len=512, kv_cache_mb=16, max_batch_size=8),
                         api_keys=str(keys), tls_cert=str(folder / "ca.pem"),
                         tls_key=str(folder / "key.pem"))
    yield server, str(folder / "ca.pem")
    server.stop()


@pytest.mark.parametrize("grpcurl", docs_grpcurl_commands(secure=True),
                         ids=lambda c: " ".join(c[-2:]))
def test_docs_tls_and_key_commands_work(grpcurl: list[str], tls_server, tmp_path: Path) -> None:
    server, cacert = tls_server
    args = as_client_args(grpcurl, f"localhost:{server.router.port}", cacert)
    done = run_client(*args, tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()
    if "-H" in args:  # the same call without the key is refused
        index = args.index("-H")
        refused = run_client(*args[:index], *args[index + 2:], tmp_path=tmp_path)
        assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr


@pytest.mark.parametrize("grpcurl", docs_grpcurl_commands(secure=False),
                         ids=lambda c: " ".join(c[-2:]))
def test_docs_grpcurl_command_works(grpcurl: list[str], tiny_server: ServeThread,
                                    tmp_path: Path) -> None:
    args = as_client_args(grpcurl, tiny_server.address)
    if any(marker in " ".join(grpcurl) for marker in NEEDS_DEMO_ADAPTERS):
        # needs adapters trained for the real model: check the request itself is well formed
        request_type = {"RegisterAdapter": types_pb2.RegisterAdapterRequest,
                        "UnregisterAdapter": types_pb2.UnregisterAdapterRequest,
                        "GenerateStream": types_pb2.GenerateRequest}[args[2].split("/")[1]]
        json_format.Parse(args[3], request_type())
        return
    done = run_client(*args, tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    replies = done.stdout.splitlines()
    assert replies
    if args[1] == "call" and args[2].endswith("/GenerateStream"):
        assert json.loads(replies[-1])["finishReason"] in ("stop", "length")
    if args[1] == "call" and args[2].endswith("Health/Check"):
        assert json.loads(replies[0]) == {"status": "SERVING"}


def test_node_example_uses_only_names_the_proto_defines() -> None:
    """examples/node-client reads proto/ at run time (keepCase): a renamed field or method would
    only fail there, so its names are checked against the descriptors here."""
    source = NODE_CLIENT.read_text()
    proto_file = re.search(r"loadSync\('([^']+)'", source).group(1)
    assert (REPO / "proto" / proto_file).is_file()
    router = router_pb2.DESCRIPTOR.services_by_name["Router"]
    assert router.methods_by_name["GenerateStream"].server_streaming
    assert router.methods_by_name["UploadAdapter"].client_streaming
    assert "router.GenerateStream(" in source and "edgelora.v1.Router(" in source
    assert "router.UploadAdapter(" in source
    assert "ReportOutcome" in router.methods_by_name and "router.ReportOutcome(" in source
    fields = {f.name for message in (types_pb2.GenerateRequest, types_pb2.GenerateResponse,
                                     types_pb2.ChatMessage, types_pb2.SamplingParams,
                                     types_pb2.Usage, router_pb2.UploadAdapterRequest,
                                     router_pb2.UploadAdapterHeader, types_pb2.AdapterFileChunk,
                                     types_pb2.RegisterAdapterResponse, types_pb2.AdapterInfo,
                                     router_pb2.ReportOutcomeRequest,
                                     router_pb2.ReportOutcomeResponse)
              for f in message.DESCRIPTOR.fields}
    # snake_case words, less the adapter's file names (adapter_config.json, ...)
    used = set(re.findall(r"\b[a-z]+(?:_[a-z]+)+\b(?!\.\w)", source)) | set(
        re.findall(r"\b(messages|role|content|params|text|usage|header|chunk|data)\b", source))
    assert used, "no field names found"
    assert used <= fields, used - fields
    assert {"example_prompts", "file_name"} <= used


@pytest.fixture(scope="module")
def node() -> str:
    """node, when it is installed and finds the client's packages (`npm install` in
    examples/node-client, or NODE_PATH); else the Node tests skip."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    found = subprocess.run([node, "-e", "require('@grpc/grpc-js'); require('@grpc/proto-loader')"],
                           cwd=NODE_CLIENT.parent, capture_output=True, text=True, timeout=60)
    if found.returncode != 0:
        pytest.skip("the Node client's packages are not installed (npm ci in "
                    "examples/node-client)")
    return node


def run_node(node: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    """client.js ARGS, with only the EDGELORA_ variables given here."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("EDGELORA_")}
    return subprocess.run([node, str(NODE_CLIENT), *args], cwd=NODE_CLIENT.parent,
                          env={**base, **env}, capture_output=True, text=True, timeout=300)


def generated(done: subprocess.CompletedProcess) -> tuple[str, str]:
    """client.js's output -> (the text, the closing [finish; tokens; adapter] line)."""
    assert done.returncode == 0, done.stderr
    text, summary = done.stdout.rstrip("\n").rsplit("\n", 1)
    return text, summary


@pytest.mark.smollm2
def test_node_client_uploads_a_demo_adapter_and_generates_with_it(
        node: str, default_model_dir: Path, tmp_path: Path) -> None:
    """The Node client streams adapters/demo/shout (its safetensors spans two 1 MiB chunks) to a
    router with the real model, then the answer under the uploaded id is in capitals."""
    from scripts.demo_adapter_checks import check

    server = ServeThread(WorkerConfig(model=str(default_model_dir), port=0, num_threads=1,
                                      max_model_len=512, kv_cache_mb=64),
                         state_dir=str(tmp_path / "state"))
    try:
        folder = str(DEMO / "shout")
        done = run_node(node, server.address, "upload", folder, "--id", "node-shout")
        assert done.returncode == 0, done.stderr
        digest = re.fullmatch(r"registered node-shout \(rank 4, digest ([0-9a-f]{64})\)\n",
                              done.stdout).group(1)
        with grpc.insecure_channel(server.address) as channel:
            listed = {a.adapter_id: a for a in router_pb2_grpc.RouterStub(channel).ListAdapters(
                types_pb2.ListAdaptersRequest(), timeout=30).adapters}
        assert listed["node-shout"].digest == digest
        assert listed["node-shout"].description == "Answers in ALL CAPS."  # from card.json

        text, summary = generated(run_node(node, server.address,
                                           "How do airplanes stay in the air?", "node-shout",
                                           MAX_TOKENS="24"))
        assert summary.endswith("; adapter node-shout]"), summary
        assert check("shout", text), text

        again = run_node(node, server.address, "upload", folder, "--id", "node-shout")
        assert again.returncode == 1 and again.stdout == ""
        assert again.stderr.startswith("error: ALREADY_EXISTS:"), again.stderr
        replaced = run_node(node, server.address, "upload", folder, "--id", "node-shout",
                            "--replace")
        assert replaced.returncode == 0 and digest in replaced.stdout, replaced.stderr
    finally:
        server.stop()


def test_node_client_uploads_with_tls_and_a_key(node: str, tls_server, tiny_model_dir: Path,
                                                tmp_path: Path) -> None:
    """EDGELORA_TLS_CA and EDGELORA_API_KEY reach the client stream as they reach the
    generation; without the key the upload is refused and nothing is registered."""
    server, cacert = tls_server
    address = f"localhost:{server.router.port}"
    folder = str(write_random_adapter(tmp_path / "a", tiny_model_dir, rank=4, seed=21))
    refused = run_node(node, address, "upload", folder, "--id", "node-tls",
                       EDGELORA_TLS_CA=cacert)
    assert refused.returncode == 1
    assert refused.stderr.startswith("error: UNAUTHENTICATED:"), refused.stderr
    secure = {"EDGELORA_TLS_CA": cacert, "EDGELORA_API_KEY": DOCS_KEY}
    done = run_node(node, address, "upload", folder, "--id", "node-tls", "--description",
                    "Random weights.", **secure)
    assert done.returncode == 0, done.stderr
    assert re.fullmatch(r"registered node-tls \(rank 4, digest [0-9a-f]{64}\)\n", done.stdout)
    _, summary = generated(run_node(node, address, "Tell me about the sea", "node-tls",
                                    MAX_TOKENS="4", **secure))
    assert summary.endswith("; adapter node-tls]"), summary
