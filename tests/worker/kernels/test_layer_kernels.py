"""The layers' one-call C++ ops (worker.model.LayerKernels) against the torch ops they replace:
paged_decode_step = apply_rope + two cache index_copy_ + paged_decode_attention, bit for bit;
add_rms_norm = add, then rms_norm, bit for bit; silu_mul = silu(gate) * up up to one rounding
step in rare elements (its exp is not torch's). And a model takes the fused decode step only
where every token is a row of the one paged group."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.worker.kernels.test_paged_attention import paged_case
from tests.worker.test_model import Harness, new_seq
from worker.model import apply_rope

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def rope_tables(positions: torch.Tensor, head_dim: int,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin [T, 1, hd] as worker.model.LlamaModel.forward makes them."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    sin = freqs.sin()
    return (freqs.cos().repeat(1, 2)[:, None, :].to(dtype),
            torch.cat((-sin, sin), dim=-1)[:, None, :].to(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim", "lengths", "block_size"), [
    (8, 2, 64, [6, 1, 37], 4),      # GQA, AVX-512 loops, a row at position 0
    (4, 4, 12, [3, 17], 16),        # no GQA, the scalar loops
    (32, 8, 64, [72], 16),          # a 1B model's heads at batch 1
])
def test_the_decode_step_is_rope_cache_writes_and_attention(
        cpu_kernels, dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_dim: int,
        lengths: list[int], block_size: int) -> None:
    rows = len(lengths)
    _, k_cache, v_cache, tables, ctx_lens = paged_case(rows, num_heads, num_kv_heads, head_dim,
                                                       lengths, dtype, seed=len(lengths),
                                                       block_size=block_size)
    gen = torch.Generator().manual_seed(head_dim)
    qkv = torch.randn(rows, (num_heads + 2 * num_kv_heads) * head_dim, generator=gen).to(dtype)
    positions = ctx_lens - 1  # each row's new token, written at its last position
    slots = torch.stack([tables[r, p // block_size] * block_size + p % block_size
                         for r, p in enumerate(positions.tolist())])
    cos, sin = rope_tables(positions, head_dim, dtype)
    scale = head_dim ** -0.5

    # what worker.model.Attention.forward's torch ops and the paged kernel do
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    qk = apply_rope(qkv[:, :q_size + kv_size].view(rows, -1, head_dim), cos, sin)
    k_want, v_want = k_cache.clone(), v_cache.clone()
    k_want.index_copy_(0, slots, qk[:, num_heads:])
    v_want.index_copy_(0, slots, qkv[:, q_size + kv_size:].view(rows, num_kv_heads, head_dim))
    want = cpu_kernels.paged_decode_attention(qk[:, :num_heads], k_want, v_want, tables,
                                              ctx_lens, scale, block_size)

    got = cpu_kernels.paged_decode_step(qkv, cos, sin, k_cache, v_cache, slots, tables, ctx_lens,
                                        num_heads, scale, block_size)
    assert torch.equal(k_cache, k_want) and torch.equal(v_cache, v_want)
    assert got.shape == (rows, q_size) and torch.equal(got, want.view(rows, q_size))


def test_the_decode_step_refuses_what_it_cannot_do(cpu_kernels) -> None:
    _, k_cache, v_cache, tables, ctx_lens = paged_case(1, 4, 2, 16, [5], torch.float32, seed=0)
    qkv = torch.randn(1, (4 + 2 * 2) * 16)
    cos, sin = rope_tables(torch.tensor([4]), 16, torch.float32)
    args = (k_cache, v_cache, torch.tensor([3]), tables, ctx_lens)
    cpu_kernels.paged_decode_step(qkv, cos, sin, *args, 4, 0.25, 16)
    with pytest.raises(RuntimeError, match="width"):  # heads that do not add up
        cpu_kernels.paged_decode_step(qkv, cos, sin, *args, 3, 0.25, 16)
    with pytest.raises(RuntimeError, match="out of range"):  # a slot past the cache
        cpu_kernels.paged_decode_step(qkv, cos, sin, k_cache, v_cache,
                                      torch.tensor([len(k_cache)]), tables, ctx_lens, 4, 0.25, 16)
    with pytest.raises(RuntimeError, match="dtype"):
        cpu_kernels.paged_decode_step(qkv, cos.bfloat16(), sin, *args, 4, 0.25, 16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "width"), [(1, 8192), (3, 576), (20, 40), (2, 7)])
def test_silu_mul_is_the_mlps_activation(cpu_kernels, dtype: torch.dtype, rows: int,
                                         width: int) -> None:
    gate_up = (torch.randn(rows, 2 * width, generator=torch.Generator().manual_seed(rows)) * 4
               ).to(dtype)
    gate, up = gate_up.split(width, dim=-1)
    want = F.silu(gate) * up
    got = cpu_kernels.silu_mul(gate_up)
    assert got.dtype == dtype and got.shape == want.shape
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-6)
    else:  # silu rounded to the dtype, then the product: a step of either at most
        step = torch.finfo(dtype).eps * (want.float().abs() + up.float().abs())
        diff = (got.float() - want.float()).abs()
        assert bool((diff <= step + 1e-6).all())
        assert float((diff > 0).float().mean()) < 0.01
    assert torch.equal(cpu_kernels.silu_mul(gate_up[-1:]), got[-1:])  # a row alone: the same


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 3, 40])
def test_add_rms_norm_is_the_add_then_the_norm(cpu_kernels, dtype: torch.dtype,
                                               rows: int) -> None:
    gen = torch.Generator().manual_seed(rows)
    x, residual = (torch.randn(2, rows, 576, generator=gen) * 3).to(dtype)
    weight = torch.randn(576, generator=gen).to(dtype)
    total, normed = cpu_kernels.add_rms_norm(x, residual, weight, 1e-5)
    assert torch.equal(total, x + residual)
    assert torch.equal(normed, cpu_kernels.rms_norm(x + residual, weight, 1e-5))
    with pytest.raises(RuntimeError, match="residual"):
        cpu_kernels.add_rms_norm(x, residual[:, :100], weight, 1e-5)


class Spy:
    """The C++ module, counting the fused decode steps."""

    def __init__(self, kernels) -> None:
        self.kernels, self.decode_steps = kernels, 0

    def __getattr__(self, name: str):
        return getattr(self.kernels, name)

    def paged_decode_step(self, *args):
        self.decode_steps += 1
        return self.kernels.paged_decode_step(*args)


def test_a_model_fuses_decode_steps_only(tiny_model_dir: Path, cpu_kernels) -> None:
    h = Harness(tiny_model_dir, attention="fused")
    spy = Spy(cpu_kernels)
    h.model.use_kernels(spy)
    layers = h.model.config.num_layers
    # (the rows' next tokens are their prompts' rest: fed one at a time, as decode rows)
    a, b = new_seq(1, list(range(100, 130))), new_seq(2, list(range(200, 215)))
    h.logits([(a, 20)])  # a prompt chunk: torch's rope and the gathered attention
    assert spy.decode_steps == 0
    h.logits([(a, 1), (b, 5)])  # a decode row beside a chunk: two groups, not fused
    assert spy.decode_steps == 0
    h.logits([(a, 1), (b, 1)])  # decode rows only: one call a layer
    assert spy.decode_steps == layers
    h.model.use_kernels(None)  # and gone once taken away
    h.logits([(a, 1)])
    assert spy.decode_steps == layers and h.model.norm.kernels is None
