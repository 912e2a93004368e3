"""RouterConfig: every setting of the router process, filled from flags and EDGELORA_* env."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from common.shared_config import SharedConfig
from router.routing import ROUTING_POLICIES

HTTP_OFF = 0  # as --metrics-port: 0 = off
SERVE_HTTP_PORT = 8000  # `edgelora serve`'s default --http-port: vLLM's, so clients' defaults fit


@dataclass(frozen=True)
class RouterConfig(SharedConfig):
    host: str = field(default="127.0.0.1", metadata={
        "help": "address the public gRPC API binds (without --api-keys keep it on loopback: "
                "anyone who reaches the port is admin)"})
    port: int = field(default=50051, metadata={"help": "public gRPC port (0 = pick a free one)"})
    http_port: int = field(default=HTTP_OFF, metadata={
        "help": "OpenAI-compatible HTTP port (/v1/chat/completions, /v1/completions, /v1/models, "
                "/tokenize, /health) with the same API keys and TLS as gRPC; 0 = off (`serve` "
                f"defaults to {SERVE_HTTP_PORT})"})
    http_host: str = field(default="", metadata={
        "help": "address the HTTP port binds ('' = the same as --host)"})
    served_model_name: str = field(default="", metadata={
        "help": "the base model's name in the HTTP API's `model` field and /v1/models ('' = the "
                "name of the workers' model directory, e.g. SmolLM2-135M-Instruct)"})
    workers: str = field(default="127.0.0.1:50052", metadata={
        "help": "comma-separated worker addresses host:port (IPv6 as [addr]:port); a DNS name "
                "that resolves to several addresses (a Kubernetes headless Service) is one "
                "worker per address, re-resolved every --resolve-interval-s"})
    routing: str = field(default="affinity", metadata={
        "help": "how a worker is picked: 'affinity' (rendezvous hash of adapter_id with bounded "
                "load, base model to the least loaded), 'round-robin' or 'least-loaded'"})
    load_epsilon: float = field(default=0.25, metadata={
        "help": "affinity skips a worker with more than (1 + eps) * mean + 1 requests in flight"})
    health_interval_s: float = field(default=1.0, metadata={
        "help": "seconds between health polls (Info) of each worker"})
    health_timeout_s: float = field(default=2.0, metadata={
        "help": "deadline of one health poll; a worker that misses two in a row is taken out"})
    resolve_interval_s: float = field(default=10.0, metadata={
        "help": "seconds between DNS re-resolutions of the --workers names"})
    adapters_dir: str = field(default="", metadata={
        "help": "register every PEFT adapter directory under this folder at start"})
    selector_head: str = field(default="", metadata={
        "help": "trained selector head (`edgelora router train --out`); reloaded when the file "
                "changes; '' or missing = zero-shot from adapter descriptions and examples"})
    selector_threshold: float = field(default=0.5, metadata={
        "help": "'auto' uses the base model when no adapter's confidence reaches this (0..1)"})
    selector_margin: float = field(default=0.1, metadata={
        "help": "'auto' prefers an adapter resident on a worker over a better one on disk when "
                "its confidence is at most this much lower"})
    selector_top_k: int = field(default=3, metadata={
        "help": "how many of the most confident adapters 'auto' chooses among"})
    embedder_threads: int = field(default=1, metadata={
        "help": "torch threads of the prompt embedder (1 keeps its latency steady on a shared "
                "CPU)"})
    embedder_dtype: str = field(default="auto", metadata={
        "help": "prompt embedder weights: auto (bfloat16 where the CPU has it natively), "
                "float32 or bfloat16"})
    outcome_exploration: float = field(default=0.05, metadata={
        "help": "most share of a tenant's 'auto' requests (once it has reported outcomes) that "
                "try the plausible adapter its rewards know least about near the prompt instead "
                "of the pick, less where the pick is well known (0..1; 0 = never explore)"})
    outcome_max_reports: int = field(default=4096, metadata={
        "help": "reported outcomes (ReportOutcome) kept per tenant, the oldest dropped first, "
                "in memory and under --state-dir; 0 = outcomes are not learned"})
    outcome_window_s: float = field(default=3600.0, metadata={
        "help": "how long after a request its outcome can be reported (the router keeps "
                "the most recent 16384 requests' prompts that long)"})
    api_keys: str = field(default="", metadata={
        "help": "keys file (JSON, or YAML by its .yaml/.yml name): {\"keys\": [{\"key\": ..., "
                "\"tenant\": ..., \"role\": \"tenant\"|\"admin\", optional max_running, "
                "max_queued, max_adapters}]}; re-read when it changes. '' = one open admin "
                "tenant (local use)"})
    tls_cert: str = field(default="", metadata={
        "help": "PEM certificate chain of the public port (with --tls-key): clients connect "
                "with TLS"})
    tls_key: str = field(default="", metadata={"help": "PEM private key of --tls-cert"})
    adapter_root: str = field(default="", metadata={
        "help": "admins may register adapters by path only inside this folder (real path, no "
                "symlink escape); '' = path registration refused when --api-keys is set, any "
                "local path in open mode"})
    state_dir: str = field(default="", metadata={
        "help": "folder of the registry database (SQLite): every registration is written there "
                "before it is acknowledged and served again after a restart. '' = in memory, "
                "lost at restart (`serve` defaults to ~/.local/state/edgelora)"})
    tenant_max_adapters: int = field(default=100, metadata={
        "help": "adapters one tenant may register (the keys file can set it per tenant)"})
    max_card_bytes: int = field(default=4096, metadata={
        "help": "longest adapter description and longest example prompt, UTF-8 bytes"})
    max_example_prompts: int = field(default=64, metadata={
        "help": "most example prompts in one adapter card"})
    log_level: str = field(default="INFO", metadata={"help": "DEBUG, INFO, WARNING or ERROR"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("--tls-cert and --tls-key go together: give both PEM files or "
                             "neither")
        for flag, path in (("--api-keys", self.api_keys), ("--tls-cert", self.tls_cert),
                           ("--tls-key", self.tls_key)):
            if path and not Path(path).is_file():
                raise ValueError(f"{flag} {path}: no such file")
        if self.adapter_root and not Path(self.adapter_root).is_dir():
            raise ValueError(f"--adapter-root {self.adapter_root}: no such folder")
        if self.tenant_max_adapters < 0 or self.max_example_prompts < 0:
            raise ValueError("--tenant-max-adapters and --max-example-prompts must be >= 0")
        if self.max_card_bytes < 1:
            raise ValueError("--max-card-bytes must be at least 1")
        if not self.worker_addresses:
            raise ValueError("--workers must name at least one worker as host:port")
        for address in self.worker_addresses:
            host, _, port = address.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"--workers entry {address!r} is not host:port")
        if not 0 <= self.port < 65536:
            raise ValueError("--port must be in [0, 65535]")
        if not 0 <= self.http_port < 65536:
            raise ValueError("--http-port must be in [0, 65535] (0 = no HTTP)")
        if self.http_port and self.http_port == self.port:
            raise ValueError("--http-port must differ from --port")
        if not 0.0 <= self.selector_threshold <= 1.0 or self.selector_margin < 0:
            raise ValueError("--selector-threshold must be in [0, 1] and --selector-margin >= 0")
        if self.selector_top_k < 1 or self.embedder_threads < 1:
            raise ValueError("--selector-top-k and --embedder-threads must be >= 1")
        if self.embedder_dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"--embedder-dtype {self.embedder_dtype!r}: use auto, float32 or "
                             "bfloat16")
        if not 0.0 <= self.outcome_exploration <= 1.0:
            raise ValueError("--outcome-exploration must be in [0, 1]")
        if self.outcome_max_reports < 0 or self.outcome_window_s <= 0:
            raise ValueError("--outcome-max-reports must be >= 0 and --outcome-window-s > 0")
        if self.routing not in ROUTING_POLICIES:
            raise ValueError(f"--routing {self.routing!r}: use one of "
                             f"{', '.join(ROUTING_POLICIES)}")
        if self.load_epsilon < 0:
            raise ValueError("--load-epsilon must be >= 0")
        if self.health_interval_s <= 0 or self.health_timeout_s <= 0:
            raise ValueError("--health-interval-s and --health-timeout-s must be > 0")
        if self.resolve_interval_s <= 0:
            raise ValueError("--resolve-interval-s must be > 0")

    @property
    def http_bind_host(self) -> str:
        return self.http_host or self.host

    @property
    def max_http_body_bytes(self) -> int:
        """Largest HTTP request body read: the prompt as JSON (3x covers the escape of every
        printable character, e.g. an ASCII-escaped emoji is 12 bytes for its 4) plus 1 MiB for
        the rest (stop strings, a JSON schema, field names)."""
        return 3 * self.max_prompt_bytes + (1 << 20)

    @property
    def worker_addresses(self) -> list[str]:
        return [a.strip() for a in self.workers.split(",") if a.strip()]
