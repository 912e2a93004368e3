"""WorkerConfig: every setting of a worker, from flags and EDGELORA_* env; validation only."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from common.shared_config import LOOPBACK_HOSTS, SharedConfig

DEFAULT_MODEL = "default"
WEIGHT_FORMATS = ("auto", "fp32", "bf16", "int8", "int4")


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class WorkerConfig(SharedConfig):
    model: str = field(default=DEFAULT_MODEL, metadata=_help(
        "'default' (embedded SmolLM2-135M-Instruct), a Llama- or Qwen2-family .gguf file (F16, "
        "Q8_0, Q4_0, Q4_K_M, ...; its tokenizer and chat template from the file), or an HF "
        "checkpoint directory"))
    cache_dir: str = field(default="", metadata=_help(
        "where the default model and --model .gguf files are dequantized once (empty = "
        "~/.cache/edgelora)"))
    adapter_cache_dir: str = field(default="", metadata=_help(
        "where adapters pushed by the router (uploads) are kept by digest (empty = "
        "<cache dir>/adapters); no folder is shared with the router or other workers"))
    adapter_cache_mb: int = field(default=4096, metadata=_help(
        "most MiB of pushed adapter files kept in --adapter-cache-dir; the least recently "
        "used go first and are pushed again when next needed (0 = no bound)"))
    host: str = field(default="127.0.0.1", metadata=_help("address the worker gRPC server binds"))
    port: int = field(default=50052, metadata=_help("worker gRPC port (0 = pick a free one)"))
    metrics_port: int = field(default=0, metadata=_help(
        "serve Prometheus /metrics over plain HTTP on --host at this port (0 = off; the deploy "
        "files use 9402). Unauthenticated, it shows adapter ids and tenant names: keep it on "
        "the internal network, as the worker port (docs/metrics.md)"))
    metrics_max_tenants: int = field(default=100, metadata=_help(
        "distinct tenant label values in this worker's metrics; later tenants count as "
        "'_other' (bounds the series count)"))
    device: str = field(default="auto", metadata=_help("'auto', 'cpu', 'cuda' or 'cuda:N'"))
    dtype: str = field(default="auto", metadata=_help(
        "'auto' (bfloat16 on CUDA and on CPUs with AMX, else float32), 'float32', 'bfloat16' "
        "or 'float16'"))
    num_threads: int = field(default=0, metadata=_help(
        "torch CPU threads (0 = torch default); 1 keeps its speed when processes share cores"))
    max_batch_size: int = field(default=64, metadata=_help(
        "most sequences in one forward pass (more amortize each step's weight reads)"))
    max_num_batched_tokens: int = field(default=512, metadata=_help(
        "token budget of one step: decodes take one each, prompt chunks fill the rest"))
    max_model_len: int = field(default=2048, metadata=_help(
        "longest prompt + completion in tokens (capped by the model's own limit)"))
    kv_block_size: int = field(default=16, metadata=_help("tokens per KV-cache block"))
    kv_cache_mb: int = field(default=512, metadata=_help("memory reserved for the KV cache, MiB"))
    max_queue: int = field(default=256, metadata=_help(
        "requests waiting for admission before new ones get RESOURCE_EXHAUSTED"))
    max_lora_rank: int = field(default=16, metadata=_help(
        "largest LoRA rank served; device slots are sized for it"))
    device_adapter_slots: int = field(default=8, metadata=_help(
        "adapters held on the device at once (allocated at start; on CPU a slot becomes resident "
        "when its first adapter loads)"))
    host_adapter_cache: int = field(default=64, metadata=_help(
        "adapters kept loaded in host memory (LRU); pinned on CUDA"))
    int8_small_steps: bool = field(default=False, metadata=_help(
        "CPU, bfloat16: also keep int8 copies of the weights (+50%% weight memory) for steps of "
        "at most 4 tokens, which then read half the bytes (single-stream decode); their outputs "
        "differ slightly from bf16's"))
    weights: str = field(default="auto", metadata=_help(
        "how the projection, embedding and output-head weights are held: 'auto' (in --dtype), "
        "'fp32', 'bf16', or kept quantized for every step with no full-precision copy: 'int8' "
        "(per output row) or 'int4' (groups of 32); int8/int4 are for CPU workers and compute "
        "in bfloat16 (docs/weights.md)"))
    batch_invariant: bool = field(default=False, metadata=_help(
        "every reduction on the prefill and decode path in an order that does not depend on "
        "the batch: a greedy request gives the same tokens alone, in any batch, chunked or not "
        "(on one machine and dtype); costs some throughput (docs/batch_invariance.md)"))
    cuda_graphs: bool = field(default=True, metadata=_help(
        "replay decode steps from CUDA graphs on CUDA (checked against eager steps at start)"))
    default_max_tokens: int = field(default=128, metadata=_help(
        "max_tokens for requests that do not set it"))
    log_level: str = field(default="INFO", metadata=_help("DEBUG, INFO, WARNING or ERROR"))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.host not in LOOPBACK_HOSTS and not self.internal_secret:
            raise ValueError(f"--host {self.host} exposes the worker's internal API beyond this "
                             "machine: set the router <-> worker secret (EDGELORA_INTERNAL_TOKEN "
                             "or --internal-token-file, the same on the router) or bind "
                             "127.0.0.1")
        checks = [
            (self.max_batch_size >= 1, "--max-batch-size must be at least 1"),
            (self.max_num_batched_tokens >= self.max_batch_size,
             "--max-num-batched-tokens must be >= --max-batch-size (each decode takes one token)"),
            (self.kv_block_size >= 1, "--kv-block-size must be at least 1"),
            (self.kv_cache_mb >= 1, "--kv-cache-mb must be at least 1"),
            (self.adapter_cache_mb >= 0, "--adapter-cache-mb must be >= 0 (0 = no bound)"),
            (self.max_model_len >= 2, "--max-model-len must be at least 2"),
            (self.max_queue >= 1, "--max-queue must be at least 1"),
            (self.max_lora_rank >= 1, "--max-lora-rank must be at least 1"),
            (self.device_adapter_slots >= 1, "--device-adapter-slots must be at least 1"),
            (self.host_adapter_cache >= 1, "--host-adapter-cache must be at least 1"),
            (self.num_threads >= 0, "--num-threads must be >= 0 (0 = torch default)"),
            (0 <= self.port < 65536, "--port must be in [0, 65535]"),
            (0 <= self.metrics_port < 65536, "--metrics-port must be in [0, 65535] (0 = off)"),
            (not self.metrics_port or self.metrics_port != self.port,
             "--metrics-port must differ from --port"),
            (self.metrics_max_tenants >= 1, "--metrics-max-tenants must be at least 1"),
            (self.dtype in ("auto", "float32", "bfloat16", "float16"),
             "--dtype must be auto, float32, bfloat16 or float16"),
            (self.weights in WEIGHT_FORMATS,
             f"--weights must be one of {', '.join(WEIGHT_FORMATS)}"),
            (not (self.int8_small_steps and self.weights in ("int8", "int4")),
             f"--int8-small-steps adds int8 copies beside full weights; --weights "
             f"{self.weights} already holds them quantized: use one of the two"),
            (self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
             "--device must be auto, cpu, cuda or cuda:N"),
            (not (self.batch_invariant and self.int8_small_steps),
             "--int8-small-steps gives steps of at most 4 tokens other weights: drop it, or "
             "--batch-invariant"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def adapter_cache_path(self) -> Path:
        return Path(self.adapter_cache_dir or self.cache_path / "adapters").expanduser()

    @property
    def cache_path(self) -> Path:
        return Path(self.cache_dir or os.path.join(Path.home(), ".cache", "edgelora"))
