"""Assembles a worker from its config: model, KV cache, adapters, scheduler, engine, gRPC."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from wsgiref.simple_server import WSGIServer

import grpc
import prometheus_client
import torch

from common.internal_auth import InternalAuthInterceptor
from common.server import create_server, mark_serving
from edgelora.v1 import worker_pb2, worker_pb2_grpc
from worker import host_memory
from worker.adapter_memory import AdapterMemory
from worker.batch_invariant import BatchInvariance
from worker.config import WorkerConfig
from worker.decode_graphs import DecodeGraphs, captured_decode
from worker.engine import Engine
from worker.gguf_import import resolve_model_path
from worker.kernels import device_kernels, layer_kernels
from worker.kernels.int8_weights import SMALL_STEP_TOKENS, Int8Weights
from worker.kernels.quantized_weights import QUANTIZED
from worker.kv_cache import BlockManager, KVCache
from worker.loader import load_model
from worker.lora import LoraSlots, module_shapes
from worker.model import LlamaModel
from worker.runner import ModelRunner
from worker.scheduler import Scheduler
from worker.sequence import Detokenizer, TokenEvent
from worker.service import WorkerInfo, WorkerService
from worker.tokenizer import Tokenizer

log = logging.getLogger(__name__)
WEIGHT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.bfloat16,
                 "int4": torch.bfloat16}  # --weights -> the activations' dtype
WORKER_SERVICE = worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name
GIL_SWITCH_INTERVAL_S = 0.02


def pick_device(config: WorkerConfig) -> tuple[torch.device, torch.dtype]:
    name = config.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch sees no CUDA device")
    held = WEIGHT_DTYPES.get(config.weights)  # the dtype --weights asks for, if it says one
    if config.weights in QUANTIZED and device.type != "cpu":
        raise ValueError(f"--weights {config.weights} is for CPU workers (its kernels are CPU "
                         "kernels); on CUDA use --weights auto, bf16 or fp32")
    if config.dtype == "auto":
        return device, held or (torch.bfloat16 if native_bf16(device) else torch.float32)
    dtype = getattr(torch, config.dtype)
    if held is not None and dtype != held:
        name = str(held).removeprefix("torch.")
        raise ValueError(f"--weights {config.weights} computes in {name}: use --dtype auto or "
                         f"{name} with it, not --dtype {config.dtype}")
    return device, dtype


def native_bf16(device: torch.device) -> bool:
    """CUDA, or a CPU with AMX tiles: there bf16 runs our decode steps 1.6x and prefill 3x as
    fast as fp32 (bench/engine_throughput.py --bf16). Without AMX, fp32 kernels are the faster."""
    return device.type == "cuda" or torch.cpu._is_amx_tile_supported()


def decode_graphs(config: WorkerConfig, runner: ModelRunner, num_blocks: int,
                  max_model_len: int) -> DecodeGraphs | None:
    """Captured decode steps for `runner` (CUDA), None where they cannot be had (logged)."""
    if runner.decode_attention is None or runner.lora_slots.kernel is None:
        log.warning("CUDA graphs need the Triton kernels: decode steps run eagerly")
        return None
    block_size = config.kv_block_size
    # A step never has more rows than blocks; the start-up check puts one row in each block.
    return captured_decode(runner.model, runner.kv_cache, block_size,
                           -(-max_model_len // block_size), num_blocks,
                           min(config.max_batch_size, num_blocks), runner.decode_attention,
                           runner.lora_slots)


@dataclass
class WorkerRuntime:
    """A running worker: its gRPC server on `port` and the engine thread behind it."""

    server: grpc.aio.Server
    port: int
    engine: Engine
    service: WorkerService
    metrics_server: WSGIServer | None = None  # --metrics-port's HTTP server

    @property
    def metrics_port(self) -> int:
        """Where /metrics is served (0 = off)."""
        return self.metrics_server.server_port if self.metrics_server is not None else 0

    @property
    def metrics_registry(self) -> prometheus_client.CollectorRegistry:
        """This worker's metrics (`serve` shows them on the router's HTTP port too)."""
        return self.service.metrics.registry

    async def stop(self, grace_s: float = 2.0) -> None:
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
            self.metrics_server.server_close()
        await self.server.stop(grace_s)
        self.service.close()
        self.engine.stop()
        if self.engine.adapters is not None:
            self.engine.adapters.close()


def build_engine(config: WorkerConfig,
                 emit: Callable[[TokenEvent], None]) -> tuple[Engine, Tokenizer, WorkerInfo]:
    """Model, KV cache, scheduler and runner behind an Engine (not started); no gRPC."""
    num_threads = config.num_threads or torch.get_num_threads()
    # Load on one thread, leaving the engine's thread the first to ask OpenMP for several: a
    # thread started after another thread's multi-threaded ops runs small GEMMs 20-30% slower
    # (measured here). Whoever steps the engine sets its own count (Engine does on its thread).
    torch.set_num_threads(1)
    device, dtype = pick_device(config)
    with host_memory.loading():
        path = resolve_model_path(config.model, config.cache_path)
        model = load_model(path, device, dtype, config.weights)
        tokenizer = Tokenizer(path)
    engine, max_model_len = assemble_engine(config, model, tokenizer.detokenizer,
                                            tokenizer.eos_token_ids, emit, num_threads)
    info = WorkerInfo(model=str(path), device=str(device), dtype=str(dtype).removeprefix("torch."),
                      max_model_len=max_model_len)
    return engine, tokenizer, info


def assemble_engine(config: WorkerConfig, model: LlamaModel,
                    make_detokenizer: Callable[[tuple[str, ...]], Detokenizer],
                    eos_token_ids: Sequence[int], emit: Callable[[TokenEvent], None],
                    num_threads: int = 0) -> tuple[Engine, int]:
    """The Engine around a loaded model (on its device, in its dtype), sized by `config`.

    -> (engine, max_model_len: the prompt + completion limit after the KV cache's cap)."""
    device, dtype, cfg = model.device, model.dtype, model.config
    num_blocks = KVCache.num_blocks_for(config.kv_cache_mb, cfg, config.kv_block_size,
                                        dtype) - 1
    # One more block than the scheduler hands out: captured decode steps' padding rows write there.
    kv_cache = KVCache(cfg, num_blocks + 1, config.kv_block_size, device, dtype)
    max_model_len = min(config.max_model_len, cfg.max_position_embeddings,
                        num_blocks * config.kv_block_size)
    log.info("KV cache: %d blocks of %d tokens (%d MiB); max_model_len %d", num_blocks,
             config.kv_block_size, config.kv_cache_mb, max_model_len)
    eos = tuple(dict.fromkeys([*cfg.eos_token_ids, *eos_token_ids]))
    decode_attention, lora_kernel = device_kernels(device, dtype)
    model.use_kernels(layer_kernels(device))
    language = "Triton" if device.type == "cuda" else "C++"
    log.info("decode attention: %s; LoRA deltas: %s; norms, activation, rope: %s",
             f"paged {language} kernel" if decode_attention else "torch gather + SDPA",
             f"{language} kernel" if lora_kernel else "torch's paths",
             "C++ kernels" if model.norm.kernels is not None else "torch's ops")
    lora_slots = LoraSlots(cfg, config.device_adapter_slots, config.max_lora_rank, device, dtype,
                           lora_kernel)
    adapters = AdapterMemory(lora_slots, config.host_adapter_cache, module_shapes(cfg),
                             cfg.num_layers, pin_memory=device.type == "cuda",
                             max_adapter_bytes=config.max_adapter_bytes)
    log.info("adapter memory: %d device slots up to rank %d (%d MiB%s), host cache %d adapters",
             config.device_adapter_slots, config.max_lora_rank, lora_slots.nbytes >> 20,
             ", taken as adapters load" if device.type == "cpu" else "",
             config.host_adapter_cache)
    scheduler = Scheduler(BlockManager(num_blocks, config.kv_block_size), config.max_batch_size,
                          config.max_num_batched_tokens, config.max_queue, eos, adapters)
    invariance = (BatchInvariance.for_engine(model, lora_slots, config.max_num_batched_tokens,
                                             config.max_batch_size)
                  if config.batch_invariant else None)
    runner = ModelRunner(model, kv_cache, config.kv_block_size, device, lora_slots,
                         decode_attention, invariance)
    # Captured steps replay the default path's padded buckets: --batch-invariant runs eagerly.
    if device.type == "cuda" and config.cuda_graphs and invariance is None:
        runner.graphs = decode_graphs(config, runner, num_blocks, max_model_len)
    if config.int8_small_steps:
        runner.int8 = Int8Weights(model)
        log.info("int8 weight copies for steps of <= %d tokens (%d MiB)", SMALL_STEP_TOKENS,
                 runner.int8.nbytes >> 20)
    engine = Engine(scheduler, runner, make_detokenizer, emit, num_threads)
    return engine, max_model_len


async def start_worker(config: WorkerConfig) -> WorkerRuntime:
    # The engine thread shares the GIL with gRPC's threads, and at Python's default 5 ms switch
    # interval they trade it inside every step: 20 ms served 5-10% more tokens/s with 32 streams
    # (bench/serve_bench.py); a token waits at most that long to be streamed.
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    engine, tokenizer, info = build_engine(config, emit=lambda event: None)
    service = WorkerService(config, tokenizer, info)
    engine.emit = service.emit
    service.attach(engine, asyncio.get_running_loop())
    service.metrics.attach(engine)
    secret = config.internal_secret
    if not secret:
        log.warning("no router <-> worker secret: any process that reaches %s:%d can call this "
                    "worker's internal API (set EDGELORA_INTERNAL_TOKEN or "
                    "--internal-token-file on the router and the workers)", config.host,
                    config.port)
    server, port, health = create_server(
        [lambda s: worker_pb2_grpc.add_WorkerServicer_to_server(service, s)], [WORKER_SERVICE],
        config.host, config.port,
        interceptors=[InternalAuthInterceptor(secret)] if secret else ())
    metrics_server = start_metrics_server(config, service.metrics.registry)
    engine.start()
    await server.start()
    await mark_serving(health, [WORKER_SERVICE])
    log.info("worker serving %s on %s:%d (%s, %s)", Path(info.model).name, config.host, port,
             info.device, info.dtype)
    return WorkerRuntime(server, port, engine, service, metrics_server)


def start_metrics_server(config: WorkerConfig,
                         registry: prometheus_client.CollectorRegistry) -> WSGIServer | None:
    """prometheus_client's HTTP server for `registry` on --host:--metrics-port, in a daemon
    thread of its own (a scrape never waits on the event loop or the engine); None when off."""
    if not config.metrics_port:
        return None
    server, _ = prometheus_client.start_http_server(
        config.metrics_port, config.host.strip("[]"), registry=registry)
    log.info("metrics on http://%s:%d/metrics", config.host, config.metrics_port)
    return server
