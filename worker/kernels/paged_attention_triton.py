"""Decode attention read straight from the paged KV cache, in Triton: the GPU counterpart of
csrc/paged_attention.cpp, with its call (worker.kernels.paged_attention.DecodeAttention).

torch's path gathers each decode row's K and V into padded tensors, writes them and reads them
again in SDPA: about three times the cache bytes a step must read. Here a program per (row, KV
head) reads that row's slots once, for all the query heads sharing the KV head (GQA), with an
online softmax over blocks of positions (flash decoding, without splitting a row's positions).
Row lengths stay on the device: no sync per step.

Without a GPU the same kernel runs in Triton's interpreter (TRITON_INTERPRET=1, the tests).
"""

from __future__ import annotations

import logging

import torch
import triton
import triton.language as tl

from worker.kernels.paged_attention import DecodeAttention, reference_decode_attention
from worker.kernels.self_check import agrees

log = logging.getLogger(__name__)
BLOCK_N = 64  # positions per block of the online softmax


@triton.jit
def _decode(q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr, out_ptr, scale, tables_stride, block_size,
            num_kv,
            GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, GROUP_PAD: tl.constexpr,
            DIM_PAD: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    row, kv = tl.program_id(0), tl.program_id(1)
    length = tl.load(lens_ptr + row)
    heads = tl.arange(0, GROUP_PAD)
    dims = tl.arange(0, DIM_PAD)
    head_ok = heads < GROUP
    dim_ok = dims < HEAD_DIM
    # q [rows, num_kv * GROUP, HEAD_DIM]: this KV head's GROUP query heads
    q_rows = (row * num_kv * GROUP + kv * GROUP + heads) * HEAD_DIM
    q = tl.load(q_ptr + q_rows[:, None] + dims[None, :],
                mask=head_ok[:, None] & dim_ok[None, :], other=0.0).to(tl.float32) * scale
    m = tl.full((GROUP_PAD,), float("-inf"), dtype=tl.float32)
    total = tl.zeros((GROUP_PAD,), dtype=tl.float32)
    acc = tl.zeros((GROUP_PAD, DIM_PAD), dtype=tl.float32)
    for n0 in range(0, length, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        pos_ok = pos < length
        block = tl.load(tables_ptr + row * tables_stride + pos // block_size, mask=pos_ok, other=0)
        slot = block * block_size + pos % block_size
        # cache [slots, num_kv, HEAD_DIM]
        at = (slot * num_kv + kv) * HEAD_DIM
        kv_mask = pos_ok[:, None] & dim_ok[None, :]
        k = tl.load(k_ptr + at[:, None] + dims[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + at[:, None] + dims[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION)        # [GROUP_PAD, BLOCK_N]
        scores = tl.where(pos_ok[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        p = tl.exp(scores - m_new[:, None])
        correction = tl.exp(m - m_new)
        total = total * correction + tl.sum(p, axis=1)
        acc = acc * correction[:, None] + tl.dot(p, v, input_precision=PRECISION)
        m = m_new
    out = acc / total[:, None]
    tl.store(out_ptr + q_rows[:, None] + dims[None, :], out.to(out_ptr.dtype.element_ty),
             mask=head_ok[:, None] & dim_ok[None, :])


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, ctx_lens: torch.Tensor, scale: float,
                           block_size: int) -> torch.Tensor:
    """q [rows, nh, hd]; caches [slots, kvh, hd] contiguous; block_tables [rows, B] int64;
    ctx_lens [rows] int64 in [1, B * block_size] (not checked here: that would sync the device)
    -> [rows, nh, hd]. Every shape and argument is fixed by the batch size and the table width,
    so a CUDA graph can capture the launch (worker.decode_graphs)."""
    rows, num_heads, head_dim = q.shape
    num_kv = k_cache.shape[1]
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and num_heads % num_kv == 0
    q, block_tables = q.contiguous(), block_tables.contiguous()
    out = torch.empty_like(q)
    if rows == 0:
        return out
    group = num_heads // num_kv
    # The query heads of a KV head are padded to 16 rows for tl.dot (tensor cores: idle rows cost
    # no bytes, and decode is bound by reading K and V). Tiles multiply as fp32, TF32 on the
    # tensor cores: bf16/fp16 K and V are exact there, and Triton's interpreter has no bf16 dot.
    _decode[(rows, num_kv)](
        q, k_cache, v_cache, block_tables, ctx_lens.contiguous(), out, scale,
        block_tables.stride(0), block_size, num_kv, GROUP=group, HEAD_DIM=head_dim,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),
        DIM_PAD=max(16, triton.next_power_of_2(head_dim)), BLOCK_N=BLOCK_N,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32")
    return out


def checked_kernel(device: torch.device, dtype: torch.dtype) -> DecodeAttention | None:
    """paged_decode_attention once it matches the reference on a small case on `device`, else
    None (logged): the worker then keeps torch's gather + SDPA."""
    gen = torch.Generator().manual_seed(0)
    rows, num_heads, num_kv, head_dim, lengths, block_size = 3, 6, 2, 64, [1, 70, 130], 16
    q = torch.randn(rows, num_heads, head_dim, generator=gen).to(device, dtype)
    k = torch.randn(480, num_kv, head_dim, generator=gen).to(device, dtype)
    v = torch.randn(480, num_kv, head_dim, generator=gen).to(device, dtype)
    tables = torch.randperm(480 // block_size, generator=gen)[:rows * 9].view(rows, 9).to(device)
    lens = torch.tensor(lengths, device=device)
    args = (tables, lens, 0.125, block_size)
    expected = reference_decode_attention(q.float(), k.float(), v.float(), *args)

    def error() -> float:
        return float((paged_decode_attention(q, k, v, *args).float() - expected).abs().max())

    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    return (paged_decode_attention if agrees(log, "Triton decode attention",
                                             "using torch's gather + SDPA", error, tolerance)
            else None)
