"""RouterConfig: every setting of the router process, filled from flags and EDGELORA_* env."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class RouterConfig:
    host: str = field(default="127.0.0.1", metadata={"help": "address the public gRPC API binds"})
    port: int = field(default=50051, metadata={"help": "public gRPC port (0 = pick a free one)"})
    workers: str = field(default="127.0.0.1:50052", metadata={
        "help": "comma-separated worker addresses host:port"})
    adapters_dir: str = field(default="", metadata={
        "help": "register every PEFT adapter directory under this folder at start"})
    log_level: str = field(default="INFO", metadata={"help": "DEBUG, INFO, WARNING or ERROR"})

    def __post_init__(self) -> None:
        if not self.worker_addresses:
            raise ValueError("--workers must name at least one worker as host:port")
        for address in self.worker_addresses:
            host, _, port = address.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"--workers entry {address!r} is not host:port")
        if not 0 <= self.port < 65536:
            raise ValueError("--port must be in [0, 65535]")

    @property
    def worker_addresses(self) -> list[str]:
        return [a.strip() for a in self.workers.split(",") if a.strip()]
