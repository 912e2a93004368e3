"""The paged KV cache: torch-free block bookkeeping (BlockManager) and per-layer tensors (KVCache).

Memory is reserved in fixed blocks as a sequence grows, never for the longest possible sequence.
"""

from __future__ import annotations

import torch

from worker.model import ModelConfig


class BlockManager:
    """Free list of KV blocks; a sequence's block table lists its blocks in position order."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block: raise --kv-cache-mb")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def blocks_needed(self, block_table: list[int], num_tokens: int) -> int:
        """Blocks to add so `block_table` covers `num_tokens` positions."""
        return max(0, -(-num_tokens // self.block_size) - len(block_table))

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free)

    def allocate(self, block_table: list[int], num_tokens: int) -> None:
        needed = self.blocks_needed(block_table, num_tokens)
        if not self.can_allocate(needed):
            raise RuntimeError(f"need {needed} KV blocks, {len(self._free)} free")
        block_table.extend(self._free.pop() for _ in range(needed))

    def free(self, block_table: list[int]) -> None:
        self._free.extend(reversed(block_table))
        block_table.clear()


class KVCache:
    """k and v tensors of every layer, each [num_blocks * block_size, num_kv_heads, head_dim]."""

    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        shape = (cfg.num_layers, 2, num_blocks * block_size, cfg.num_kv_heads, cfg.head_dim)
        # One allocation at start: no allocator traffic while serving.
        self.storage = torch.zeros(shape, device=device, dtype=dtype)
        self.layers = [(self.storage[i, 0], self.storage[i, 1]) for i in range(cfg.num_layers)]

    @staticmethod
    def num_blocks_for(budget_mb: int, cfg: ModelConfig, block_size: int,
                       dtype: torch.dtype) -> int:
        return (budget_mb << 20) // (KVCache.bytes_per_token(cfg, dtype) * block_size)

    @staticmethod
    def bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
        """k and v of every layer for one token."""
        return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * dtype.itemsize
