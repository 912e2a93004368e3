"""What the security suite's tests share: the `edgelora serve` process they run against, the
adapters (good and hostile) it is given, and small call helpers over the public API."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from safetensors.torch import load_file, save_file

from edgelora.v1 import router_pb2, router_pb2_grpc, types_pb2
from tests.conftest import write_random_adapter

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 180.0
RANK = 4
MAX_ADAPTER_MB = 1
SHARED_AT_START = "common-json"  # the good adapter of --adapters-dir
BAD_AT_START = ("toobig-rank64", "badcard")  # the bad entries of --adapters-dir
# target_modules regexes that backtrack exponentially on module names such as
# "model.layers.1.self_attn.q_proj": the first in Python's `re`, the second in `regex`.
CATASTROPHIC_REGEXES = (r"(.|\w)*(.|\w)*(.|\w)*(.|\w)*#",
                        r"(\w|[a-z]|[a-z0-9_]|\.)*(\.|\w|[a-z])*\W\W")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_cert(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for localhost / 127.0.0.1 -> (cert.pem, key.pem)."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                    str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    return cert, key


def adapter_config(rank: int, alpha: object, modules: object, base_dir: Path) -> dict:
    return {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": modules,
            "lora_dropout": 0.0, "bias": "none", "use_rslora": False,
            "base_model_name_or_path": str(base_dir), "task_type": "CAUSAL_LM"}


def write_hostile_adapters(root: Path, base_dir: Path) -> dict[str, Path]:
    """Adapter directories (under --adapter-root) whose files are hostile; name -> directory."""
    made: dict[str, Path] = {}
    for i, pattern in enumerate(CATASTROPHIC_REGEXES):  # valid weights, a backtracking regex
        d = write_random_adapter(root / f"hostile-regex-{i}", base_dir, rank=RANK, seed=100 + i)
        (d / "adapter_config.json").write_text(
            json.dumps(adapter_config(RANK, 8.0, pattern, base_dir)))
        made[f"regex-{i}"] = d
    d = write_random_adapter(root / "hostile-nan-alpha", base_dir, rank=RANK, seed=110)
    text = json.dumps(adapter_config(RANK, 12345.0, list(_modules()), base_dir))
    (d / "adapter_config.json").write_text(text.replace("12345.0", "NaN"))  # literally NaN
    assert "NaN" in (d / "adapter_config.json").read_text()
    made["nan-alpha"] = d
    d = write_random_adapter(root / "hostile-nan-weights", base_dir, rank=RANK, seed=111)
    tensors = load_file(str(d / "adapter_model.safetensors"))
    first = sorted(tensors)[0]
    tensors[first][0, 0] = float("nan")
    save_file(tensors, str(d / "adapter_model.safetensors"))
    made["nan-weights"] = d
    d = write_random_adapter(root / "hostile-int-dtype", base_dir, rank=RANK, seed=112)
    tensors = load_file(str(d / "adapter_model.safetensors"))
    save_file({k: (v * 100).to(torch.int32) for k, v in tensors.items()},
              str(d / "adapter_model.safetensors"))
    made["int-dtype"] = d
    d = write_random_adapter(root / "hostile-fifo", base_dir, rank=RANK, seed=113)
    (d / "adapter_model.safetensors").unlink()
    os.mkfifo(d / "adapter_model.safetensors")  # open() would block until a writer comes
    made["fifo"] = d
    d = write_random_adapter(root / "hostile-oversized", base_dir, rank=RANK, seed=114)
    with open(d / "adapter_model.safetensors", "r+b") as f:  # sparse: over --max-adapter-mb
        f.truncate((MAX_ADAPTER_MB << 20) + (1 << 20))
    made["oversized"] = d
    return made


def _modules() -> tuple[str, ...]:
    return ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_start_dir(directory: Path, base_dir: Path) -> None:
    """--adapters-dir: one good adapter with a card, one of rank 64 (over --max-lora-rank 16),
    one whose card.json is malformed."""
    good = write_random_adapter(directory / SHARED_AT_START, base_dir, rank=RANK, seed=50)
    (good / "card.json").write_text(json.dumps({
        "description": "Answers every question as a compact JSON object.",
        "example_prompts": ["Reply in JSON: what is the capital of France?",
                            "Give me the answer as a JSON object: how tall is Everest?"]}))
    write_random_adapter(directory / BAD_AT_START[0], base_dir, rank=64, seed=51)
    bad = write_random_adapter(directory / BAD_AT_START[1], base_dir, rank=RANK, seed=52)
    (bad / "card.json").write_text('{"description": "unterminated, "example_prompts": [')


@dataclass
class SecurityServer:
    """The running `edgelora serve` and what the tests need to reach it."""

    proc: subprocess.Popen
    port: int
    worker_port: int
    cert: bytes
    keys: dict[str, str]  # tenant name -> API key ('ops' is the admin)
    root: Path  # --adapter-root
    outside: Path  # a folder outside the root, holding a valid adapter
    start_dir: Path  # --adapters-dir
    hostile: dict[str, Path]
    base_dir: Path
    log_path: Path
    http_port: int = 0  # the OpenAI-compatible HTTP front (HTTPS, the same certificate)
    _channels: list[grpc.Channel] = field(default_factory=list)

    @property
    def target(self) -> str:
        return f"localhost:{self.port}"

    def channel(self) -> grpc.Channel:
        """The suite's TLS channel to the public port (calls on it run concurrently)."""
        if not self._channels:
            self.new_channel()
        return self._channels[0]

    def new_channel(self) -> grpc.Channel:
        """A fresh TLS channel to the public port (closed at teardown)."""
        channel = grpc.secure_channel(self.target, grpc.ssl_channel_credentials(self.cert))
        self._channels.append(channel)
        return channel

    def router(self) -> router_pb2_grpc.RouterStub:
        return router_pb2_grpc.RouterStub(self.channel())

    def health(self, timeout: float = 5.0, service: str = "") -> int:
        stub = health_pb2_grpc.HealthStub(self.channel())
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout).status

    def auth(self, tenant: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.keys[tenant]}"),)

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def close(self) -> None:
        for channel in self._channels:
            channel.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)


def wait_ready(server: SecurityServer) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"edgelora serve exited with {server.proc.returncode}:\n"
                               f"{server.log_tail()}")
        try:
            if server.health(timeout=2) == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"edgelora serve not ready in {START_TIMEOUT_S:g} s:\n{server.log_tail()}")




def rpc(method, request, metadata=(), timeout: float = 30.0):
    """-> (status code, details, response or None) of a unary call; never raises RpcError."""
    try:
        return grpc.StatusCode.OK, "", method(request, metadata=metadata, timeout=timeout)
    except grpc.RpcError as exc:
        return exc.code(), exc.details(), None


def stream(stub: router_pb2_grpc.RouterStub, request: types_pb2.GenerateRequest, metadata=(),
           timeout: float = 60.0, on_chunk=None) -> tuple[grpc.StatusCode, str, list[int], str]:
    """-> (status code, details, generated token ids, text) of a GenerateStream."""
    tokens: list[int] = []
    text: list[str] = []
    try:
        for chunk in stub.GenerateStream(request, metadata=metadata, timeout=timeout):
            tokens.extend(chunk.token_ids)
            text.append(chunk.text)
            if on_chunk is not None:
                on_chunk(chunk)
        return grpc.StatusCode.OK, "", tokens, "".join(text)
    except grpc.RpcError as exc:
        return exc.code(), exc.details(), tokens, "".join(text)


def greedy(prompt: str, adapter_id: str = "", max_tokens: int = 8) -> types_pb2.GenerateRequest:
    """Greedy (temperature 0), ignore_eos: a deterministic request of exactly max_tokens."""
    return types_pb2.GenerateRequest(prompt=prompt, adapter_id=adapter_id, params=types_pb2.
                                     SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                                    ignore_eos=True))


def register(stub, metadata, adapter_id: str, path: Path | str, timeout: float = 30.0,
             **fields) -> tuple[grpc.StatusCode, str, types_pb2.RegisterAdapterResponse | None]:
    return rpc(stub.RegisterAdapter, types_pb2.RegisterAdapterRequest(
        adapter_id=adapter_id, path=str(path), **fields), metadata, timeout)


def listed(stub, metadata) -> list[types_pb2.AdapterInfo]:
    return list(stub.ListAdapters(types_pb2.ListAdaptersRequest(), metadata=metadata,
                                  timeout=30).adapters)


def select(stub, metadata, prompt: str) -> router_pb2.SelectAdapterResponse:
    return stub.SelectAdapter(router_pb2.SelectAdapterRequest(prompt=prompt), metadata=metadata,
                              timeout=60)


class SteadyStream:
    """The same greedy stream, run back to back on a thread until stop(): a bystander whose
    every run must give the tokens it gives alone, whatever a hostile caller does meanwhile."""

    def __init__(self, stub, metadata, request: types_pb2.GenerateRequest) -> None:
        self.stub, self.metadata, self.request = stub, metadata, request
        self.runs: list[tuple[grpc.StatusCode, str, list[int], float, float]] = []
        self.chunks = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _count(self, chunk) -> None:
        self.chunks += 1

    def _loop(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            code, details, tokens, _ = stream(self.stub, self.request, self.metadata,
                                              timeout=120, on_chunk=self._count)
            self.runs.append((code, details, tokens, started, time.monotonic()))

    def __enter__(self) -> SteadyStream:
        self._thread.start()
        deadline = time.monotonic() + 60
        while self.chunks == 0 and time.monotonic() < deadline and self._thread.is_alive():
            time.sleep(0.005)
        assert self.chunks > 0, f"the bystander stream never started: {self.runs}"
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=150)
        assert not self._thread.is_alive(), "the bystander stream hangs"
