"""Shared fixtures: a tiny random Llama with the real SmolLM2 tokenizer, the real default model, the
compiled CPU kernels, and in-process worker/router servers on ephemeral ports."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from worker import cpu_kernels as kernels
from worker.config import WorkerConfig
from worker.gguf_import import ensure_default_checkpoint

# Tests run several processes at once on 2 cores: torch with 2 threads collapses then.
torch.set_num_threads(1)
# Without a GPU the Triton kernels (worker/*_triton.py) run in Triton's interpreter, which reads
# this when they are decorated and again when they run.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def built_cpu_kernels():
    """worker.cpu_kernels' module. CPU workers need it, so a failed build fails the tests."""
    module = kernels.load()
    assert module is not None, "the CPU kernels did not build (see the log)"
    return module


@pytest.fixture(scope="session", autouse=True)
def adapter_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Workers' pushed adapter files go under the session's temporary folder, never to the
    user's ~/.cache: in-process workers (ServeThread) and worker processes (the environment)."""
    folder = tmp_path_factory.mktemp("adapter-cache")
    os.environ.setdefault("EDGELORA_ADAPTER_CACHE_DIR", str(folder))
    return Path(os.environ["EDGELORA_ADAPTER_CACHE_DIR"])


@pytest.fixture(scope="session")
def cpu_kernels():
    return built_cpu_kernels()


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The real SmolLM2-135M-Instruct checkpoint (imported once by `make setup`)."""
    return ensure_default_checkpoint(WorkerConfig().cache_path)


def write_tiny_llama(target: Path, tokenizer_dir: Path, seed: int = 0, **overrides) -> Path:
    """A 2-layer random Llama (~3 M parameters) with the SmolLM2 tokenizer, saved as an HF dir."""
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = {"vocab_size": 49152, "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
              "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2}
    fields.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**fields)).eval()
    with torch.no_grad():  # random init is near-uniform; sharpen it so greedy choices are clear
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    model.save_pretrained(target, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, target / name)
    return target


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), default_model_dir)


class ServeThread:
    """Worker + router running in-process on ephemeral ports, on an asyncio loop in a thread."""

    def __init__(self, worker_config: WorkerConfig, **router_fields) -> None:
        import asyncio
        import dataclasses
        import threading

        if not worker_config.adapter_cache_dir and "EDGELORA_ADAPTER_CACHE_DIR" in os.environ:
            worker_config = dataclasses.replace(
                worker_config, adapter_cache_dir=os.environ["EDGELORA_ADAPTER_CACHE_DIR"])

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.worker, self.router = self._call(self._start(worker_config, router_fields))
        self.address = f"127.0.0.1:{self.router.port}"
        self.worker_address = f"127.0.0.1:{self.worker.port}"

    def _call(self, coro):
        import asyncio

        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=120)

    @staticmethod
    async def _start(worker_config: WorkerConfig, router_fields: dict):
        from router.config import RouterConfig
        from router.server import start_router
        from worker.server import start_worker

        worker = await start_worker(worker_config)
        router = await start_router(RouterConfig(port=0, workers=f"127.0.0.1:{worker.port}",
                                                 **router_fields),
                                    [worker.metrics_registry])  # as `serve`: one /metrics
        return worker, router

    def stop(self) -> None:
        self._call(self.router.stop(0))
        self._call(self.worker.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def tiny_server(tiny_model_dir: Path):
    """Router + worker on the tiny model: small context so limits are quick to reach."""
    server = ServeThread(WorkerConfig(model=str(tiny_model_dir), port=0, num_threads=1,
                                      max_model_len=512, kv_cache_mb=16, max_batch_size=8))
    yield server
    server.stop()


def run_engine(engine, requests: list[tuple[list[int], object]],
               adapter_ids: list[str] | None = None) -> list[list[int]]:
    """Adds every (prompt_ids, SamplingOptions) at once, steps the engine synchronously until all
    finish; -> generated token ids per request, in order."""
    from worker.sequence import Sequence

    outputs: dict[int, list[int]] = {i: [] for i in range(len(requests))}
    done: set[int] = set()

    def collect(event) -> None:
        assert event.finish_reason != "error", event.error
        outputs[event.request_id].extend(event.token_ids)
        if event.finish_reason:
            done.add(event.request_id)

    engine.emit = collect
    for i, (ids, options) in enumerate(requests):
        engine.scheduler.add(Sequence(i, list(ids), options,
                                      adapter_ids[i] if adapter_ids else "",
                                      detok=engine.make_detokenizer(options.stop)))
    while len(done) < len(requests):
        engine.step()
    return [outputs[i] for i in range(len(requests))]


ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")


def write_random_adapter(target: Path, base_dir: Path, rank: int = 8, alpha: float = 16.0,
                         modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj",
                                                     "gate_proj", "up_proj", "down_proj"),
                         seed: int = 0, dtype: torch.dtype = torch.float32,
                         use_rslora: bool = False, std: float = 0.2) -> Path:
    """A PEFT-format LoRA adapter with random A and B (B is zero in a fresh PEFT adapter, which
    would test nothing) for the checkpoint in base_dir."""
    import json

    from safetensors.torch import save_file

    from worker.loader import read_model_config
    from worker.lora import module_shapes

    cfg = read_model_config(base_dir)
    shapes = module_shapes(cfg)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(cfg.num_layers):
        for module in modules:
            fan_in, fan_out = shapes[module]
            kind = "self_attn" if module in ATTN_MODULES else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{kind}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = (torch.randn(rank, fan_in, generator=gen)
                                                  * std).to(dtype)
            tensors[f"{prefix}.lora_B.weight"] = (torch.randn(fan_out, rank, generator=gen)
                                                  * std).to(dtype)
    target.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(target / "adapter_model.safetensors"))
    (target / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": list(modules),
        "lora_dropout": 0.0, "bias": "none", "use_rslora": use_rslora,
        "base_model_name_or_path": str(base_dir), "task_type": "CAUSAL_LM"}))
    return target
