"""worker.server: which device, dtype, kernels and decode steps a config resolves to."""

from __future__ import annotations

import pytest
import torch

from worker.config import WorkerConfig
from worker.engine import Engine
from worker.loader import load_model
from worker.server import assemble_engine, device_kernels, pick_device


@pytest.mark.parametrize(("amx", "expected"), [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_dtype_on_cpu_is_bf16_only_with_amx(monkeypatch, amx: bool,
                                                 expected: torch.dtype) -> None:
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert pick_device(WorkerConfig(device="cpu")) == (torch.device("cpu"), expected)


@pytest.mark.parametrize("amx", [True, False])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_an_explicit_dtype_wins(monkeypatch, amx: bool, dtype: str) -> None:
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert pick_device(WorkerConfig(device="cpu", dtype=dtype))[1] == getattr(torch, dtype)


def test_cuda_without_a_gpu_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no CUDA device"):
        pick_device(WorkerConfig(device="cuda"))
    assert pick_device(WorkerConfig())[0] == torch.device("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_on_cuda_is_bf16() -> None:
    assert pick_device(WorkerConfig(device="cuda")) == (torch.device("cuda"), torch.bfloat16)


def test_cpu_workers_take_the_cpp_kernels(cpu_kernels, monkeypatch) -> None:
    attention, lora = device_kernels(torch.device("cpu"), torch.bfloat16)
    assert attention is cpu_kernels.paged_decode_attention and lora is cpu_kernels.lora_delta_
    monkeypatch.setattr("worker.kernels.cpu.load", lambda: None)  # no compiler
    assert device_kernels(torch.device("cpu"), torch.bfloat16) == (None, None)
    assert device_kernels(torch.device("meta"), torch.float32) == (None, None)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_workers_take_the_triton_kernels() -> None:
    from worker.kernels import lora_triton, paged_attention_triton

    assert device_kernels(torch.device("cuda"), torch.bfloat16) == (
        paged_attention_triton.paged_decode_attention, lora_triton.lora_delta_)


def engine_on(device: str, path, dtype: torch.dtype = torch.float32, **overrides) -> Engine:
    model = load_model(path, torch.device(device), dtype)
    config = WorkerConfig(device=device, kv_cache_mb=4, max_batch_size=8, **overrides)
    engine, _ = assemble_engine(config, model, lambda stop: None, (), lambda event: None)
    return engine


def test_the_kv_cache_keeps_a_scratch_block_the_scheduler_never_hands_out(
        tiny_model_dir) -> None:
    engine = engine_on("cpu", tiny_model_dir)
    blocks = engine.scheduler.blocks
    assert engine.runner.kv_cache.storage.shape[2] == (blocks.num_blocks + 1) * blocks.block_size
    assert blocks.num_free_blocks == blocks.num_blocks
    assert engine.runner.graphs is None  # CPU steps stay eager
    assert engine.runner.int8 is None  # the int8 copies are opt-in


def test_int8_small_steps_gives_the_runner_int8_copies(tiny_model_dir) -> None:
    int8 = engine_on("cpu", tiny_model_dir, torch.bfloat16, int8_small_steps=True).runner.int8
    assert int8 is not None and len(int8.layers) == 2


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_workers_replay_captured_decode_steps(tiny_model_dir) -> None:
    graphs = engine_on("cuda", tiny_model_dir).runner.graphs
    assert graphs is not None and sorted(graphs.graphs) == graphs.buckets == [1, 2, 4, 8]
    assert engine_on("cuda", tiny_model_dir, cuda_graphs=False).runner.graphs is None


def test_batch_invariant_reaches_the_runner(tiny_model_dir) -> None:
    assert engine_on("cpu", tiny_model_dir).runner.invariance is None  # off by default
    runner = engine_on("cpu", tiny_model_dir, torch.bfloat16, batch_invariant=True).runner
    assert runner.invariance is not None and runner.invariance.tiling.min_rows >= 1


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_batch_invariant_steps_are_never_replayed(tiny_model_dir) -> None:
    """Captured steps pad decode rows to buckets on the default path: they stay off."""
    assert engine_on("cuda", tiny_model_dir, batch_invariant=True).runner.graphs is None
