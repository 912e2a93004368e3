"""csrc/argmax.cpp against torch's max(dim=-1).indices, which greedy sampling used: the same
index for every row, ties (the first), NaN (the first NaN) and all -inf rows included."""

from __future__ import annotations

import pytest
import torch

from worker.sampler import argmax


@pytest.mark.parametrize(("rows", "vocab"), [(1, 128256), (4, 49152), (3, 17), (20, 1000)])
def test_argmax_rows_is_torchs_first_index_argmax(cpu_kernels, rows: int, vocab: int) -> None:
    x = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(vocab))
    x[0, vocab // 3] = x[0, vocab - 1] = x[0].max() + 1  # a tie: the first of the two
    if rows > 1:
        x[1, vocab // 2] = x[1, vocab - 1] = float("nan")  # NaN wins, the first one
        x[-1] = float("-inf")  # nothing larger than -inf: index 0
    want = x.max(dim=-1).indices
    assert torch.equal(cpu_kernels.argmax_rows(x), want)
    assert torch.equal(argmax(x), want)  # what the sampler calls, on CPU
    assert torch.equal(cpu_kernels.argmax_rows(x[1:].contiguous()), want[1:])  # rows alone


def test_argmax_rows_refuses_other_inputs(cpu_kernels) -> None:
    for bad in (torch.randn(3), torch.randn(2, 5).bfloat16(), torch.randn(2, 0)):
        with pytest.raises(RuntimeError, match="float32"):
            cpu_kernels.argmax_rows(bad)
