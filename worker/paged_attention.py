"""Decode attention read straight from the paged KV cache: the kernel's signature and reference.

The kernel itself is C++ (csrc/paged_attention.cpp, built by worker.cpu_kernels); torch's path
(worker.model) gathers each decode row's K and V into padded tensors, then runs SDPA.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

# q [rows, nh, hd], k/v cache [slots, kvh, hd], kv_slots [rows, L], ctx_lens [rows], scale
DecodeAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                            float], torch.Tensor]


def reference_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               kv_slots: torch.Tensor, ctx_lens: torch.Tensor,
                               scale: float) -> torch.Tensor:
    """What the kernel computes, in torch: -> [rows, nh, hd]."""
    rows, num_heads, head_dim = q.shape
    length = kv_slots.shape[1]
    k = k_cache.index_select(0, kv_slots.reshape(-1)).view(rows, length, -1, head_dim)
    v = v_cache.index_select(0, kv_slots.reshape(-1)).view(rows, length, -1, head_dim)
    mask = torch.arange(length, device=q.device)[None, :] < ctx_lens[:, None]   # [rows, L]
    out = F.scaled_dot_product_attention(q[:, :, None], k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask[:, None, None], scale=scale,
                                         enable_gqa=True)
    return out.view(rows, num_heads, head_dim)
