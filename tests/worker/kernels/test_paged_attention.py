"""worker.kernels.paged_attention's kernels against gather + SDPA: C++ (worker.kernels.cpu) and
Triton (worker.kernels.paged_attention_triton: compiled on a GPU, else in Triton's interpreter)."""

from __future__ import annotations

import pytest
import torch

from worker.kernels.paged_attention import reference_decode_attention


def paged_case(rows: int, num_heads: int, num_kv_heads: int, head_dim: int, lengths: list[int],
               dtype: torch.dtype, seed: int, block_size: int = 16):
    """A cache whose blocks are shuffled, each row's block table, its queries and lengths."""
    gen = torch.Generator().manual_seed(seed)
    max_len = max(lengths)
    blocks_per_row = -(-max_len // block_size)
    num_blocks = rows * blocks_per_row + 3
    k = torch.randn(num_blocks * block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    v = torch.randn(num_blocks * block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    tables = torch.randperm(num_blocks, generator=gen)[:rows * blocks_per_row].view(rows, -1)
    q = torch.randn(rows, num_heads, head_dim, generator=gen).to(dtype)
    return q, k, v, tables, torch.tensor(lengths)


def on_triton_device(*args):
    """The Triton kernel on CUDA when there is one (else the interpreter, on CPU tensors)."""
    from worker.kernels.paged_attention_triton import paged_decode_attention

    device = "cuda" if torch.cuda.is_available() else "cpu"
    moved = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
    return paged_decode_attention(*moved).cpu()


@pytest.fixture(scope="module", params=["cpp", "triton"])
def kernel(request, cpu_kernels):
    return cpu_kernels.paged_decode_attention if request.param == "cpp" else on_triton_device


# head_dim 64 takes the C++ AVX-512 loops where the CPU has them, 8 and 12 the scalar loops;
# 12 and groups of 3 are padded to powers of two in Triton
@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"),
                         [(9, 3, 64), (4, 4, 64), (8, 2, 8), (6, 1, 32), (6, 2, 12)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size", [16, 1, 5])
def test_kernel_matches_gather_and_sdpa(kernel, num_heads: int, num_kv_heads: int,
                                        head_dim: int, dtype: torch.dtype,
                                        block_size: int) -> None:
    # lengths: a single token, under, at and over block borders, and long rows
    lengths = [1, 2, 15, 16, 17, 33, 100, 257]
    q, k, v, tables, lens = paged_case(len(lengths), num_heads, num_kv_heads, head_dim, lengths,
                                       dtype, seed=num_heads * head_dim, block_size=block_size)
    scale = head_dim ** -0.5
    got = kernel(q, k, v, tables, lens, scale, block_size)
    ref = reference_decode_attention(q.float(), k.float(), v.float(), tables, lens, scale,
                                     block_size)
    assert got.shape == q.shape and got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: the output's own rounding
    err = (got.float() - ref).abs().max().item()
    assert err <= tol, f"max abs error {err:.3g}"


def test_positions_past_a_rows_length_are_never_read(kernel) -> None:
    block_size = 8
    q, k, v, tables, lens = paged_case(3, 4, 2, 64, [5, 40, 9], torch.float32, seed=3,
                                       block_size=block_size)
    before = kernel(q, k, v, tables, lens, 0.125, block_size)
    used = [-(-n // block_size) for n in lens.tolist()]
    spare = min(set(range(k.shape[0] // block_size))
                - {b for row, n in enumerate(used) for b in tables[row, :n].tolist()})
    padded = tables.clone()
    for row, n in enumerate(lens.tolist()):
        padded[row, used[row]:] = spare  # the runner pads with block 0, which may be anyone's
        last = int(tables[row, used[row] - 1]) * block_size
        # the last block's slots past the row's length: stale in a real cache
        stale = slice(last + (n - 1) % block_size + 1, last + block_size)
        k[stale], v[stale] = float("nan"), float("nan")
    k[spare * block_size:(spare + 1) * block_size] = float("nan")
    v[spare * block_size:(spare + 1) * block_size] = float("nan")
    assert torch.equal(kernel(q, k, v, padded, lens, 0.125, block_size), before)


def test_bad_lengths_are_refused_by_the_cpp_kernel(cpu_kernels) -> None:
    # (Triton's would have to sync the device to check: its caller, the runner, makes them)
    kernel = cpu_kernels.paged_decode_attention
    q, k, v, tables, _ = paged_case(2, 4, 2, 16, [4, 4], torch.float32, seed=0, block_size=4)
    with pytest.raises(RuntimeError, match="ctx_lens"):
        kernel(q, k, v, tables, torch.tensor([0, 4]), 0.25, 4)
    with pytest.raises(RuntimeError, match="ctx_lens"):
        kernel(q, k, v, tables, torch.tensor([4, 5]), 0.25, 4)  # past the one block
    with pytest.raises(RuntimeError, match="block_size"):
        kernel(q, k, v, tables, torch.tensor([4, 4]), 0.25, 0)
