"""worker.server: which device and dtype a config resolves to."""

from __future__ import annotations

import pytest
import torch

from worker.config import WorkerConfig
from worker.server import pick_device


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
