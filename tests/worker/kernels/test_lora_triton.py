"""worker.kernels.lora_triton: the Triton LoRA kernels against the per-token reference, compiled
on a GPU and in Triton's interpreter on CPU (the same kernels, run by numpy; tests/conftest.py)."""

from __future__ import annotations

import logging
import random

import pytest
import torch

from tests.worker.test_lora import (
    DEVICES,
    assert_kernel_reads_only_its_slots,
    assert_matches_reference,
    filled_slots,
    popular_rows,
)
from worker.kernels import lora_triton
from worker.lora import DeltaPath, LoraBatch


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("mix", "lengths"), [("all_different", "decode"), ("zipf", "decode"),
                                              ("mostly_base", "prefill"), ("zipf", "prefill")])
def test_kernel_matches_reference(device: str, mix: str, lengths: str) -> None:
    rng = random.Random(f"{mix}-{lengths}")
    slots, ref = filled_slots(device, kernel=False)
    slots.kernel = lora_triton.lora_delta_
    row_slots = popular_rows(mix, 11, rng)
    # prefill: runs longer than a 16-token tile and than a segment (cut at 64 tokens), and
    # one-token rows between them
    row_lengths = [1 if lengths == "decode" else rng.choice([1, 5, 17, 40, 100])
                   for _ in row_slots]
    batch = LoraBatch.build(slots, row_slots, row_lengths, torch.device(device))
    assert batch is not None and batch.path == DeltaPath.KERNEL
    assert_matches_reference(batch, ref, device, seed=11, label=f"{row_slots} {row_lengths}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_reads_only_its_slots_at_odd_sizes(device: str, dtype: torch.dtype) -> None:
    # sizes off every tile: the masks of the K, N and token tiles
    assert_kernel_reads_only_its_slots(lora_triton.lora_delta_, device, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_checked_kernel_serves_a_kernel_that_agrees_and_refuses_one_that_does_not(
        device: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    for dtype in (torch.float32, torch.bfloat16):
        assert lora_triton.checked_kernel(torch.device(device), dtype) is lora_triton.lora_delta_
    good = lora_triton.lora_delta_

    def off_by_one_rank(y, x, a, bs, segments):
        segments = segments.clone()
        segments[:, 3] -= 1
        good(y, x, a, bs, segments)

    def crashes(*args):
        raise RuntimeError("no kernel image for this GPU")

    for broken, reason in ((off_by_one_rank, "off by"), (crashes, "unusable")):
        monkeypatch.setattr(lora_triton, "lora_delta_", broken)
        with caplog.at_level(logging.WARNING, logger="worker.kernels.lora_triton"):
            assert lora_triton.checked_kernel(torch.device(device), torch.float32) is None
        assert reason in caplog.text
