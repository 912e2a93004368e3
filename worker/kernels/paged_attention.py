"""Decode attention read straight from the paged KV cache: the kernel's signature and reference.

The kernels are C++ (csrc/paged_attention.cpp, built by worker.kernels.cpu) and Triton
(worker.kernels.paged_attention_triton); torch's path (worker.model) gathers each decode row's K
and V into padded tensors, then runs SDPA.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

# q [rows, nh, hd], k/v cache [slots, kvh, hd], block_tables [rows, B], ctx_lens [rows], scale,
# block_size: row r's position t lies at slot block_tables[r, t // block_size] * block_size
# + t % block_size -> [rows, nh, hd]
DecodeAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                            float, int], torch.Tensor]


def table_slots(block_tables: torch.Tensor, block_size: int,
                length: int | None = None) -> torch.Tensor:
    """[rows, B] block tables -> [rows, length] the cache slot of each of the first `length`
    positions (default: all B * block_size)."""
    length = block_tables.shape[1] * block_size if length is None else length
    positions = torch.arange(length, device=block_tables.device)
    return block_tables[:, positions // block_size] * block_size + positions % block_size


def reference_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               block_tables: torch.Tensor, ctx_lens: torch.Tensor, scale: float,
                               block_size: int) -> torch.Tensor:
    """What the kernels compute, in torch: -> [rows, nh, hd]."""
    rows, num_heads, head_dim = q.shape
    kv_slots = table_slots(block_tables, block_size)
    length = kv_slots.shape[1]
    k = k_cache.index_select(0, kv_slots.reshape(-1)).view(rows, length, -1, head_dim)
    v = v_cache.index_select(0, kv_slots.reshape(-1)).view(rows, length, -1, head_dim)
    mask = torch.arange(length, device=q.device)[None, :] < ctx_lens[:, None]   # [rows, L]
    out = F.scaled_dot_product_attention(q[:, :, None], k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask[:, None, None], scale=scale,
                                         enable_gqa=True)
    return out.view(rows, num_heads, head_dim)
