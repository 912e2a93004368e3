"""worker.batch_invariant's pieces, each checked for what --batch-invariant needs of it: a row's
result bitwise the same whatever the other rows of its call and its place among them.
(tests/integration/test_batch_invariance.py checks whole requests through an engine.)"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.worker.kernels.test_paged_attention import paged_case
from tests.worker.test_lora import ADAPTERS, filled_slots
from worker.batch_invariant import (
    STRICT_TILE_ROWS,
    Probe,
    RowTiling,
    calibrate,
    gathered_attention,
    lora_probes,
    tiled_segment_delta,
)
from worker.config import WorkerConfig
from worker.kernels.paged_attention import reference_decode_attention
from worker.lora import LoraBatch, reference_delta

CPU = torch.device("cpu")


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request):
    """A BLAS or kernel may split its work by the thread count: check at 1 and 2 threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def test_row_tiling_pads_short_inputs_and_cuts_fixed_tiles() -> None:
    heights: list[int] = []

    def fn(x: torch.Tensor) -> torch.Tensor:
        heights.append(x.shape[0])
        return x * 2

    x = torch.arange(9.0)[:, None]
    assert torch.equal(RowTiling(min_rows=2).apply(fn, x[:1]), x[:1] * 2)
    assert torch.equal(RowTiling(min_rows=2).apply(fn, x[:5]), x[:5] * 2)
    assert torch.equal(RowTiling(4, tile_rows=4).apply(fn, x), x * 2)
    assert heights == [2, 5, 4, 4, 4]


def test_calibrate_takes_the_smallest_height_above_which_rows_agree() -> None:
    # rows depend on the height only at M = 1 (as oneDNN's bf16 GEMV at K = 1536 here)
    def gemv_differs(x: torch.Tensor) -> torch.Tensor:
        return x * (3.0 if x.shape[0] == 1 else 2.0)

    assert calibrate([Probe(gemv_differs, 4, 64)], CPU, torch.float32) == RowTiling(2)


def test_calibrate_never_trusts_one_row_in_16_bit_dtypes() -> None:
    """A GEMV's other summation order shows in bf16 only at rounding ties, which probes can
    miss: a row-wise fn that agrees at every height still gets at least 2 rows in bf16."""
    def row_wise(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    for dtype, want in ((torch.float32, RowTiling(1)), (torch.bfloat16, RowTiling(2)),
                        (torch.float16, RowTiling(2))):
        assert calibrate([Probe(row_wise, 4, 64)], CPU, dtype) == want, dtype


def test_calibrate_pads_to_a_multiple_of_the_tile_where_those_heights_agree() -> None:
    calls = []

    def blocked(x: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])
        return x * (1.0 if x.shape[0] % STRICT_TILE_ROWS == 0 else 1.5)

    tiling = calibrate([Probe(blocked, 4, 100)], CPU, torch.float32)
    assert tiling == RowTiling(STRICT_TILE_ROWS, STRICT_TILE_ROWS, one_call=True)
    calls.clear()
    x = torch.arange(40.0)[:, None]
    assert torch.equal(tiling.apply(blocked, x), x)
    assert calls == [48]  # one call, padded to 3 tiles


def test_calibrate_falls_back_to_fixed_tiles_where_every_height_differs() -> None:
    def blocked(x: torch.Tensor) -> torch.Tensor:
        return x * (1.0 if x.shape[0] == STRICT_TILE_ROWS else 1.5)

    tiling = calibrate([Probe(blocked, 4, 100)], CPU, torch.float32)
    assert tiling == RowTiling(STRICT_TILE_ROWS, STRICT_TILE_ROWS)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("fan_in", "fan_out"), [(1536, 576), (576, 960), (64, 128)])
def test_calibrated_linear_gives_a_row_the_same_bits_in_any_batch(
        threads: int, dtype: torch.dtype, fan_in: int, fan_out: int) -> None:
    """SmolLM2's down_proj (K = 1536: bf16 GEMV sums it in another order) and qkv_proj, the tiny
    model's gate_up_proj."""
    gen = torch.Generator().manual_seed(fan_in)
    weight = (torch.randn(fan_out, fan_in, generator=gen) * 0.05).to(dtype)

    def fn(x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight)

    tiling = calibrate([Probe(fn, fan_in, 160)], CPU, dtype)
    x = torch.randn(160, fan_in, generator=gen).to(dtype)
    alone = torch.cat([tiling.apply(fn, x[i:i + 1]) for i in range(len(x))])
    for start, size in [(0, 160), (7, 2), (3, 3), (40, 17), (1, 100), (90, 64)]:
        got = tiling.apply(fn, x[start:start + size])
        assert torch.equal(got, alone[start:start + size]), (tiling, start, size)


def attention_rows(lengths: list[int], dtype: torch.dtype, block_size: int = 16):
    """paged_case with each row's table cut to the blocks its own length spans (as
    BatchInvariance.attention_groups cuts them for gathered_attention), grouped by that count."""
    q, k, v, tables, lens = paged_case(len(lengths), 9, 3, 64, lengths, dtype, seed=3,
                                       block_size=block_size)
    blocks = [-(-n // block_size) for n in lengths]
    return q, k, v, tables, lens, blocks


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("which", ["cpp", "gathered"])
def test_attention_computes_each_row_alone(threads: int, which: str, dtype: torch.dtype,
                                           request) -> None:
    """The paged C++ kernel and gathered_attention: a row's output is bitwise the same alone
    and among any rows; and it is attention (close to gather + SDPA)."""
    lengths = [1, 5, 16, 17, 40, 64, 65, 100, 7, 33]
    q, k, v, tables, lens, blocks = attention_rows(lengths, dtype)
    if which == "cpp":
        kernel = request.getfixturevalue("cpu_kernels").paged_decode_attention

        def run(rows: list[int]) -> torch.Tensor:
            return kernel(q[rows], k, v, tables[rows], lens[rows], 0.125, 16)
    else:
        def run(rows: list[int]) -> torch.Tensor:  # rows of one block count at a time
            out = torch.empty_like(q[rows])
            for n in {blocks[r] for r in rows}:
                part = [i for i, r in enumerate(rows) if blocks[r] == n]
                sel = [rows[i] for i in part]
                out[part] = gathered_attention(q[sel], k, v, tables[sel, :n], lens[sel], 0.125,
                                               16)
            return out

    alone = torch.cat([run([r]) for r in range(len(lengths))])
    expected = reference_decode_attention(q.float(), k.float(), v.float(), tables, lens, 0.125,
                                          16)
    torch.testing.assert_close(alone.float(), expected, atol=2e-2 if dtype == torch.bfloat16
                               else 1e-5, rtol=0)
    gen = torch.Generator().manual_seed(0)
    for size in (2, 3, 6, 10):
        rows = torch.randperm(len(lengths), generator=gen)[:size].tolist()
        assert torch.equal(run(rows), alone[rows]), rows


@pytest.mark.parametrize("kernel", [True, False], ids=["cpp-kernel", "tiled"])
def test_a_tokens_lora_delta_does_not_depend_on_the_other_tokens(kernel: bool) -> None:
    """The paths --batch-invariant steps take: the C++ kernel, or TILED (torch, max rank)."""
    slots, ref = filled_slots("cpu", kernel=kernel)
    tiling = calibrate(lora_probes(slots, 64), CPU, torch.float32)
    layer, proj = 1, "qkv_proj"
    fan_in = slots.layers[layer][proj][0].shape[-1]
    token_slots = [1, 1, 2, 0, 3, 4, 4, 4, 5, 2, 1, 3]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(len(token_slots), fan_in, generator=gen)
    width = sum(b.shape[-1] for b in slots.layers[layer][proj][1])
    y = torch.randn(len(token_slots), width, generator=gen)

    def delta(tokens: list[int]) -> torch.Tensor:
        batch = LoraBatch.build(slots, [token_slots[t] for t in tokens], [1] * len(tokens),
                                CPU, tiling)
        assert batch.path == ("kernel" if kernel else "tiled")
        return batch.apply(layer, proj, x[tokens], y[tokens].clone())

    alone = torch.cat([delta([t]) if token_slots[t] else y[t:t + 1] for t in range(len(x))])
    expected = y + reference_delta(x, token_slots, ref[(layer, proj)])
    torch.testing.assert_close(alone, expected, atol=1e-5, rtol=0)
    for tokens in ([0, 1, 2], [4, 5, 6, 7, 8], list(range(12)), [11, 0, 7, 3, 9]):
        assert torch.equal(delta(tokens), alone[tokens]), tokens


def test_tiled_delta_runs_every_adapter_at_max_rank() -> None:
    """Slot 3 holds a rank-8 adapter in rank-16 storage: its zero padding adds nothing."""
    slots, ref = filled_slots("cpu", kernel=False)
    assert ADAPTERS[3][0] < slots.max_rank and "o_proj" in ADAPTERS[3][1]
    a, bs = slots.layers[0]["o_proj"]
    x = torch.randn(3, a.shape[-1])
    y = tiled_segment_delta(x, torch.zeros(3, bs[0].shape[-1]), a, bs, [(0, 3, 3)], RowTiling())
    torch.testing.assert_close(y, reference_delta(x, [3] * 3, ref[(0, "o_proj")]), atol=1e-5,
                               rtol=0)


def test_batch_invariant_refuses_int8_small_steps() -> None:
    with pytest.raises(ValueError, match="int8-small-steps"):
        WorkerConfig(batch_invariant=True, int8_small_steps=True)
