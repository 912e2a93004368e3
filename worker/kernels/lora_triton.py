"""Segmented multi-LoRA delta as Triton kernels: the GPU counterpart of csrc/lora_delta.cpp.

Same call and meaning as the CPU kernel (worker.lora.LoraKernel): for each segment (start, end,
slot index, rank) of the step's segment table, a run of tokens on one adapter, and each
sub-module j of a fused projection,
    y[t, off_j : off_j + out_j] += (x[t] · A[:rank, slot, j]ᵀ) · B_j[:rank, slot]
Two launches per projection (Punica's SGMV shape): shrink, a program per (segment, sub-module)
writing h [T, sub, R] in fp32; expand, a program per (segment, column tile) and sub-module adding
h · B_j into y. Each program walks its segment's tokens a 16-token tile at a time and reads its
slot's weights only, so a step never reads an adapter it does not use.

The grid never needs the segments' lengths on the host (that would cost a device sync every
projection): it has one row per segment, and a program runs as many tiles as its segment has.
A segment table cuts long runs (worker.lora.MAX_SEGMENT_TOKENS) so that a long prompt chunk still
spreads over many programs.

Without a GPU the same kernels run in Triton's interpreter (TRITON_INTERPRET=1, the tests).
"""

from __future__ import annotations

import logging

import torch
import triton
import triton.language as tl

from worker.kernels.self_check import agrees
from worker.lora import LoraKernel, segment_delta

log = logging.getLogger(__name__)
BLOCK_M, BLOCK_K, BLOCK_N = 16, 64, 64  # tl.dot needs every side >= 16


@triton.jit
def _segment(seg_ptr, seg):
    """-> the segment's (first token, end, slot index, rank)."""
    return (tl.load(seg_ptr + seg * 4), tl.load(seg_ptr + seg * 4 + 1),
            tl.load(seg_ptr + seg * 4 + 2), tl.load(seg_ptr + seg * 4 + 3))


@triton.jit
def _shrink(x_ptr, a_ptr, h_ptr, seg_ptr, fan_in, x_stride, num_slots,
            SUB: tl.constexpr, RANK: tl.constexpr, BLOCK_M: tl.constexpr,
            BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    seg, j = tl.program_id(0), tl.program_id(1)
    start, end, slot, rank = _segment(seg_ptr, seg)
    ranks = tl.arange(0, RANK)
    cols = tl.arange(0, BLOCK_K)
    # A[k, slot, j, :] lies at ((k * num_slots + slot) * SUB + j) * fan_in
    a_rows = ((ranks * num_slots + slot) * SUB + j) * fan_in
    for row0 in range(start, end, BLOCK_M):
        rows = row0 + tl.arange(0, BLOCK_M)
        acc = tl.zeros((BLOCK_M, RANK), dtype=tl.float32)
        for k0 in range(0, fan_in, BLOCK_K):
            d = k0 + cols
            xt = tl.load(x_ptr + rows[:, None] * x_stride + d[None, :],
                         mask=(rows[:, None] < end) & (d[None, :] < fan_in), other=0.0)
            at = tl.load(a_ptr + a_rows[None, :] + d[:, None],
                         mask=(ranks[None, :] < rank) & (d[:, None] < fan_in), other=0.0)
            acc += tl.dot(xt.to(tl.float32), at.to(tl.float32), input_precision=PRECISION)
        # h [T, SUB, RANK]
        tl.store(h_ptr + (rows[:, None] * SUB + j) * RANK + ranks[None, :], acc,
                 mask=rows[:, None] < end)


@triton.jit
def _expand(y_ptr, h_ptr, b_ptr, seg_ptr, y_stride, offset, fan_out, num_slots, j,
            SUB: tl.constexpr, RANK: tl.constexpr, BLOCK_M: tl.constexpr,
            BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    seg, col_tile = tl.program_id(0), tl.program_id(1)
    start, end, slot, rank = _segment(seg_ptr, seg)
    ranks = tl.arange(0, RANK)
    cols = col_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    # B_j[k, slot, :] lies at (k * num_slots + slot) * fan_out; read once for every tile
    bt = tl.load(b_ptr + ((ranks[:, None] * num_slots + slot) * fan_out + cols[None, :]),
                 mask=(ranks[:, None] < rank) & (cols[None, :] < fan_out), other=0.0)
    for row0 in range(start, end, BLOCK_M):
        rows = row0 + tl.arange(0, BLOCK_M)
        row_ok = rows[:, None] < end
        ht = tl.load(h_ptr + (rows[:, None] * SUB + j) * RANK + ranks[None, :],
                     mask=row_ok & (ranks[None, :] < rank), other=0.0)
        delta = tl.dot(ht, bt.to(tl.float32), input_precision=PRECISION)
        ptrs = y_ptr + rows[:, None] * y_stride + offset + cols[None, :]
        mask = row_ok & (cols[None, :] < fan_out)
        y = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(ptrs, (y + delta).to(y_ptr.dtype.element_ty), mask=mask)


def lora_delta_(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, bs: list[torch.Tensor],
                segments: torch.Tensor) -> None:
    """worker.lora.LoraKernel: y [T, sum(out_j)] += every segment's delta, in place.

    x [T, in]; a [R, S, sub, in]; bs[j] [R, S, out_j]; segments [n, 4] int64 on x's device."""
    num_tokens, fan_in = x.shape
    max_rank, num_slots, sub, _ = a.shape
    if num_tokens == 0 or segments.shape[0] == 0:
        return
    assert x.stride(1) == 1 and y.stride(1) == 1 and a.is_contiguous()
    rank_pad = max(16, triton.next_power_of_2(max_rank))
    # Tiles are multiplied as fp32 on the tensor cores (TF32): bf16 and fp16 values are exact
    # there (h, in fp32, is rounded to TF32's 10 bits, finer than torch's bf16 h), and Triton's
    # interpreter has no bf16 dot. fp32 weights: IEEE products, exact as the CPU paths.
    precision = "ieee" if a.dtype == torch.float32 else "tf32"
    h = torch.empty(num_tokens, sub, rank_pad, device=x.device, dtype=torch.float32)
    _shrink[(segments.shape[0], sub)](
        x, a, h, segments, fan_in, x.stride(0), num_slots,
        SUB=sub, RANK=rank_pad, BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K, PRECISION=precision)
    offset = 0
    for j, b in enumerate(bs):
        assert b.is_contiguous()
        fan_out = b.shape[2]
        _expand[(segments.shape[0], triton.cdiv(fan_out, BLOCK_N))](
            y, h, b, segments, y.stride(0), offset, fan_out, num_slots, j,
            SUB=sub, RANK=rank_pad, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, PRECISION=precision)
        offset += fan_out


def checked_kernel(device: torch.device, dtype: torch.dtype) -> LoraKernel | None:
    """lora_delta_ once it reproduces the per-token reference on a small case on `device`, else
    None (the reason is logged): a kernel that fails to compile or disagrees on this GPU leaves
    the worker on torch's paths rather than serving wrong deltas."""
    gen = torch.Generator().manual_seed(0)
    num_slots, max_rank, sub, fan_in, outs = 3, 8, 2, 80, (72, 24)
    a = (torch.randn(max_rank, num_slots, sub, fan_in, generator=gen) * 0.1).to(device, dtype)
    bs = [(torch.randn(max_rank, num_slots, n, generator=gen) * 0.1).to(device, dtype)
          for n in outs]
    x = torch.randn(21, fan_in, generator=gen).to(device, dtype)
    y = torch.randn(21, sum(outs), generator=gen).to(device, dtype)
    table = [(0, 1, 2, 8), (1, 3, 0, 3), (4, 21, 1, 5)]  # token 3 has no adapter
    ranks = [0] * (num_slots + 1)  # by 1-based slot, as torch's segment path reads them
    for _, _, index, rank in table:
        ranks[index + 1] = rank
    expected = segment_delta(x.float(), y.float().clone(), a.float(), [b.float() for b in bs],
                             [(start, end, index + 1) for start, end, index, _ in table], ranks)

    def error() -> float:
        lora_delta_(y, x, a, bs, torch.tensor(table, device=device))
        return float((y.float() - expected).abs().max())

    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    return (lora_delta_ if agrees(log, "Triton LoRA kernel", "using torch's paths", error,
                                  tolerance) else None)
