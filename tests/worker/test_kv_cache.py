"""Tests for worker.kv_cache: BlockManager bookkeeping and the KVCache tensors."""

from __future__ import annotations

import random

import pytest
import torch

from worker.kv_cache import BlockManager, KVCache
from worker.model import ModelConfig


def tiny_config(**overrides: int) -> ModelConfig:
    fields = {"vocab_size": 32, "hidden_size": 16, "intermediate_size": 32, "num_layers": 2,
              "num_heads": 4, "num_kv_heads": 2, "head_dim": 4}
    return ModelConfig(**{**fields, **overrides})


def assert_partition(bm: BlockManager, tables: list[list[int]]) -> None:
    """Every block is either in exactly one table or in the free list, never both or twice."""
    handed_out = [b for table in tables for b in table]
    free = list(bm._free)  # the free list itself: the point is that nothing is lost or duplicated
    everything = sorted(handed_out + free)
    assert everything == list(range(bm.num_blocks)), (
        f"blocks lost or duplicated: tables={tables} free={free}")
    assert bm.num_free_blocks == len(free)


# --- BlockManager ------------------------------------------------------------------------------


@pytest.mark.parametrize(("table_len", "num_tokens", "expected"), [
    (0, 0, 0),
    (0, 1, 1),
    (0, 4, 1),
    (0, 5, 2),
    (0, 8, 2),
    (0, 9, 3),
    (1, 4, 0),
    (1, 5, 1),
    (2, 3, 0),  # already covers more than asked: never negative
    (3, 0, 0),
])
def test_blocks_needed_rounds_up(table_len: int, num_tokens: int, expected: int) -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    table = list(range(table_len))
    got = bm.blocks_needed(table, num_tokens)
    assert got == expected, f"blocks_needed(len={table_len}, tokens={num_tokens}) = {got}"


def test_allocate_grows_table_only_when_needed() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    table: list[int] = []
    bm.allocate(table, 5)
    assert len(table) == 2 and bm.num_free_blocks == 6, (table, bm.num_free_blocks)
    first = list(table)
    bm.allocate(table, 8)  # still fits in 2 blocks
    assert table == first and bm.num_free_blocks == 6, (table, bm.num_free_blocks)
    bm.allocate(table, 9)
    assert len(table) == 3 and table[:2] == first, table
    assert len(set(table)) == 3, table
    assert_partition(bm, [table])


def test_allocate_zero_tokens_is_a_no_op() -> None:
    bm = BlockManager(num_blocks=2, block_size=4)
    table: list[int] = []
    bm.allocate(table, 0)
    assert table == [] and bm.num_free_blocks == 2


def test_can_allocate_limits() -> None:
    bm = BlockManager(num_blocks=5, block_size=2)
    assert bm.can_allocate(0)
    assert bm.can_allocate(5)
    assert not bm.can_allocate(6)
    table: list[int] = []
    bm.allocate(table, 6)  # 3 blocks
    assert bm.num_free_blocks == 2
    assert bm.can_allocate(2)
    assert not bm.can_allocate(3)


def test_free_returns_blocks_and_clears_table() -> None:
    bm = BlockManager(num_blocks=6, block_size=3)
    a: list[int] = []
    b: list[int] = []
    bm.allocate(a, 7)
    bm.allocate(b, 3)
    assert bm.num_free_blocks == 2
    bm.free(a)
    assert a == [] and bm.num_free_blocks == 5, (a, bm.num_free_blocks)
    assert_partition(bm, [b])
    bm.allocate(a, 15)  # freed blocks are handed out again
    assert len(a) == 5 and bm.num_free_blocks == 0
    assert_partition(bm, [a, b])


def test_free_of_empty_table_is_harmless() -> None:
    bm = BlockManager(num_blocks=3, block_size=2)
    table: list[int] = []
    bm.free(table)
    assert bm.num_free_blocks == 3
    assert_partition(bm, [])


def test_allocate_beyond_capacity_raises_and_changes_nothing() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    held: list[int] = []
    bm.allocate(held, 8)
    table = [held.pop()]  # a table that already owns one block
    with pytest.raises(RuntimeError, match="KV blocks"):
        bm.allocate(table, 4 * 4)  # needs 3 more, only 2 free
    assert len(table) == 1 and bm.num_free_blocks == 2, (table, bm.num_free_blocks)
    assert_partition(bm, [held, table])


def test_needs_at_least_one_block() -> None:
    with pytest.raises(ValueError, match="kv-cache-mb"):
        BlockManager(num_blocks=0, block_size=16)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_allocate_free_never_hands_out_a_block_twice(seed: int) -> None:
    rng = random.Random(seed)
    bm = BlockManager(num_blocks=37, block_size=5)
    tables: list[list[int]] = [[] for _ in range(8)]
    tokens = [0] * len(tables)  # tokens each table is meant to cover
    for step in range(2000):
        i = rng.randrange(len(tables))
        if rng.random() < 0.2:
            bm.free(tables[i])
            tokens[i] = 0
        else:
            target = tokens[i] + rng.randint(0, 12)
            needed = bm.blocks_needed(tables[i], target)
            if bm.can_allocate(needed):
                bm.allocate(tables[i], target)
                tokens[i] = target
            else:
                free_before = bm.num_free_blocks
                with pytest.raises(RuntimeError):
                    bm.allocate(tables[i], target)
                assert bm.num_free_blocks == free_before, f"step {step}: failed allocate leaked"
        assert len(tables[i]) * bm.block_size >= tokens[i], (
            f"step {step}: table {tables[i]} too short for {tokens[i]} tokens")
        assert_partition(bm, tables)
    for table in tables:
        bm.free(table)
    assert bm.num_free_blocks == bm.num_blocks


# --- KVCache -----------------------------------------------------------------------------------


def test_num_blocks_for_arithmetic() -> None:
    cfg = tiny_config(num_layers=2, num_kv_heads=2, head_dim=8)
    # k + v, 2 layers, 2 kv heads, 8 dims: 64 values/token; 4 bytes each -> 256 B/token.
    assert KVCache.num_blocks_for(1, cfg, 16, torch.float32) == (1 << 20) // (256 * 16)
    assert KVCache.num_blocks_for(1, cfg, 16, torch.float32) == 256
    assert KVCache.num_blocks_for(1, cfg, 16, torch.bfloat16) == 512
    assert KVCache.num_blocks_for(3, cfg, 8, torch.float16) == 3 * 1024


def test_num_blocks_for_rounds_down() -> None:
    cfg = tiny_config(num_layers=2, num_kv_heads=2, head_dim=3)  # 96 B/token in fp32
    got = KVCache.num_blocks_for(1, cfg, 16, torch.float32)
    assert got == 682, got  # 1 MiB / 1536 B = 682.67
    assert got * 16 * 96 <= 1 << 20


def test_num_blocks_for_tiny_budget_can_be_zero() -> None:
    cfg = tiny_config(num_layers=64, num_kv_heads=64, head_dim=256)
    assert KVCache.num_blocks_for(1, cfg, 16, torch.float32) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_cache_shapes(dtype: torch.dtype) -> None:
    cfg = tiny_config()
    cache = KVCache(cfg, num_blocks=5, block_size=4, device=torch.device("cpu"), dtype=dtype)
    assert cache.storage.shape == (cfg.num_layers, 2, 20, cfg.num_kv_heads, cfg.head_dim)
    assert cache.storage.dtype == dtype
    assert cache.storage.device.type == "cpu"
    assert bool((cache.storage == 0).all())
    assert len(cache.layers) == cfg.num_layers
    for k, v in cache.layers:
        assert k.shape == v.shape == (20, cfg.num_kv_heads, cfg.head_dim), (k.shape, v.shape)
        assert k.dtype == v.dtype == dtype


def test_kv_cache_layers_are_views_of_one_storage() -> None:
    cfg = tiny_config(num_layers=3)
    cache = KVCache(cfg, num_blocks=2, block_size=2, device=torch.device("cpu"),
                    dtype=torch.float32)
    k1, v1 = cache.layers[1]
    k1[3].fill_(1.0)
    v1[0].fill_(2.0)
    assert bool((cache.storage[1, 0, 3] == 1.0).all())
    assert bool((cache.storage[1, 1, 0] == 2.0).all())
    assert float(cache.storage.sum()) == (1.0 + 2.0) * cfg.num_kv_heads * cfg.head_dim
