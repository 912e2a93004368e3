"""SharedConfig: the settings the router and the worker both read (the router <-> worker
credential, bounds on untrusted input, per-tenant defaults). RouterConfig and WorkerConfig inherit
them, so `edgelora serve` takes each flag once and gives both processes the same value."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class SharedConfig:
    internal_token: str = field(default="", metadata=_help(
        "shared secret the router presents to workers (set it through the environment, not the "
        "command line); '' with no --internal-token-file: workers accept unauthenticated calls, "
        "which a worker allows on a loopback address only. `serve` makes one itself"))
    internal_token_file: str = field(default="", metadata=_help(
        "file holding the router <-> worker secret (wins over --internal-token)"))
    max_prompt_bytes: int = field(default=256 * 1024, metadata=_help(
        "largest prompt (or all messages' content together) in UTF-8 bytes, checked before "
        "tokenizing"))
    max_messages: int = field(default=256, metadata=_help("most chat messages in one request"))
    max_stop_strings: int = field(default=16, metadata=_help("most stop strings in one request"))
    max_stop_bytes: int = field(default=256, metadata=_help(
        "longest stop string in UTF-8 bytes"))
    max_adapter_mb: int = field(default=512, metadata=_help(
        "largest adapter weights file, MiB (adapter_config.json and card.json: 64 KiB), "
        "checked before reading"))
    register_timeout_s: float = field(default=60.0, metadata=_help(
        "deadline to read and validate an adapter being registered (its files are untrusted)"))
    tenant_max_running: int = field(default=0, metadata=_help(
        "sequences one tenant may have decoding on a worker at once (0 = the whole batch); "
        "the keys file can set it per tenant"))
    tenant_max_queued: int = field(default=0, metadata=_help(
        "requests one tenant may have waiting on a worker (0 = the worker's --max-queue); over "
        "it: RESOURCE_EXHAUSTED for that tenant only; the keys file can set it per tenant"))

    def __post_init__(self) -> None:
        checks = [
            (self.max_prompt_bytes >= 1, "--max-prompt-bytes must be at least 1"),
            (self.max_messages >= 1, "--max-messages must be at least 1"),
            (self.max_stop_strings >= 0, "--max-stop-strings must be >= 0"),
            (self.max_stop_bytes >= 1, "--max-stop-bytes must be at least 1"),
            (self.max_adapter_mb >= 1, "--max-adapter-mb must be at least 1"),
            (self.register_timeout_s > 0, "--register-timeout-s must be > 0"),
            (self.tenant_max_running >= 0, "--tenant-max-running must be >= 0 (0 = no limit)"),
            (self.tenant_max_queued >= 0, "--tenant-max-queued must be >= 0 (0 = no limit)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if self.internal_token_file and not Path(self.internal_token_file).is_file():
            raise ValueError(f"--internal-token-file {self.internal_token_file}: no such file")

    @property
    def internal_secret(self) -> str:
        """The router <-> worker secret ('' = none), read from the file when one is given."""
        if self.internal_token_file:
            return Path(self.internal_token_file).read_text().strip()
        return self.internal_token.strip()

    @property
    def max_adapter_bytes(self) -> int:
        return self.max_adapter_mb << 20


SHARED_FIELDS = tuple(SharedConfig.__dataclass_fields__)
