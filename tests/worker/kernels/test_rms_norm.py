"""csrc/rms_norm.cpp against worker.model.RMSNorm's torch ops: the same casts and arithmetic,
so equal up to the order of the squares' sum (float32: ~1e-7; bf16 / fp16: one rounding step
in rare elements), per row whatever the rows around it; and a model uses it once set."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from worker.model import RMSNorm


def torch_norm(dim: int, dtype: torch.dtype, seed: int) -> RMSNorm:
    norm = RMSNorm(dim, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(dim, generator=torch.Generator().manual_seed(seed)))
    return norm


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(("rows", "dim"), [(1, 2048), (7, 576), (40, 100), (3, 1)])
def test_the_kernel_is_torchs_rms_norm(cpu_kernels, dtype: torch.dtype, rows: int,
                                       dim: int) -> None:
    norm = torch_norm(dim, dtype, seed=rows)
    x = (torch.randn(rows, dim, generator=torch.Generator().manual_seed(dim)) * 3).to(dtype)
    want = norm(x)
    got = cpu_kernels.rms_norm(x, norm.weight.detach(), norm.eps)
    assert got.dtype == dtype and got.shape == want.shape
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    else:  # a one-ulp rounding difference at most, in few elements
        step = torch.finfo(dtype).eps * want.float().abs()
        diff = (got.float() - want.float()).abs()
        assert bool((diff <= step + 1e-6).all())
        assert float((diff > 0).float().mean()) < 0.02
    # each row alone is the same row: nothing depends on the batch around it
    assert torch.equal(cpu_kernels.rms_norm(x[-1:].contiguous(), norm.weight.detach(), norm.eps),
                       got[-1:])


def test_a_model_runs_its_norms_through_the_kernel_once_set(cpu_kernels) -> None:
    norm = torch_norm(64, torch.bfloat16, seed=0)
    calls = []

    def kernel(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        calls.append(x.shape)
        return cpu_kernels.rms_norm(x, weight, eps)

    x = torch.randn(5, 64).to(torch.bfloat16)
    want = norm(x)
    norm.kernels = SimpleNamespace(rms_norm=kernel)
    assert torch.allclose(norm(x).float(), want.float(), rtol=1e-2, atol=1e-2)
    assert calls == [(5, 64)]
    norm(x.float())  # another dtype than the weight's: torch's ops, as before
    assert len(calls) == 1
