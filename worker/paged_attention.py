"""Decode attention read straight from the paged KV cache: a C++ kernel for CPUs, built once.

torch's path (worker.model) gathers each decode row's K and V into padded tensors, then runs
SDPA; on CPU that copy costs about as much as the attention. The kernel (csrc/paged_attention.cpp)
reads each row's slots where they lie. It is compiled with the machine's C++ compiler on first
use (~20 s, cached by torch under $TORCH_EXTENSIONS_DIR); without a compiler, or with
EDGELORA_PAGED_ATTENTION=0, the worker keeps torch's path.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("csrc") / "paged_attention.cpp"
# q [rows, nh, hd], k/v cache [slots, kvh, hd], kv_slots [rows, L], ctx_lens [rows], scale
DecodeAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                            float], torch.Tensor]


@functools.cache
def decode_kernel() -> DecodeAttention | None:
    """The compiled kernel, or None (disabled, or it failed to build: the reason is logged)."""
    if os.environ.get("EDGELORA_PAGED_ATTENTION", "1") == "0":
        return None
    from torch.utils.cpp_extension import load

    try:
        module = load("edgelora_paged_attention", [str(SOURCE)],
                      extra_cflags=["-O3", "-march=native", "-fopenmp"],
                      extra_ldflags=["-fopenmp"])
    except Exception as exc:  # no compiler, no headers: serve on torch's path
        log.warning("paged attention kernel unavailable, using torch's gather + SDPA: %s", exc)
        return None
    return module.paged_decode_attention


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


if __name__ == "__main__":  # `make setup` builds it ahead of the first worker start
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print("paged attention kernel:", "ready" if decode_kernel() is not None else "unavailable")
