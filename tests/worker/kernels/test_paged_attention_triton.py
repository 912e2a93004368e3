"""worker.kernels.paged_attention_triton: the start-up check that decides whether a GPU worker
serves the Triton decode attention (its results are checked in test_paged_attention.py and
test_model.py)."""

from __future__ import annotations

import logging

import pytest
import torch

from worker.kernels import paged_attention_triton

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # cpu: the interpreter


def test_checked_kernel_serves_a_kernel_that_agrees_and_refuses_one_that_does_not(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    for dtype in (torch.float32, torch.bfloat16):
        assert (paged_attention_triton.checked_kernel(DEVICE, dtype)
                is paged_attention_triton.paged_decode_attention)
    good = paged_attention_triton.paged_decode_attention

    def one_position_short(q, k, v, tables, lens, scale, block_size):
        return good(q, k, v, tables, (lens - 1).clamp(min=1), scale, block_size)

    def crashes(*args):
        raise RuntimeError("out of resource: shared memory")

    for broken, reason in ((one_position_short, "off by"), (crashes, "unusable")):
        monkeypatch.setattr(paged_attention_triton, "paged_decode_attention", broken)
        with caplog.at_level(logging.WARNING, logger="worker.kernels.paged_attention_triton"):
            assert paged_attention_triton.checked_kernel(DEVICE, torch.float32) is None
        assert reason in caplog.text
