"""Tests for worker.lora: the slot pool, per-step LoraBatch metadata and every fast delta path
(the C++ kernel of worker.kernels.cpu on CPU) against the per-token reference (Punica-style:
mixed ranks, module subsets and popularity)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.conftest import built_cpu_kernels, resident_anon_mib
from worker.loader import read_model_config
from worker.lora import (
    MAX_SEGMENT_TOKENS,
    MIN_TOKENS_PER_SEGMENT,
    PROJECTIONS,
    DeltaPath,
    LoraBatch,
    LoraKernel,
    LoraSlots,
    kernel_segments,
    module_shapes,
    reference_delta,
)
from worker.model import ModelConfig

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])]
CFG = ModelConfig(vocab_size=32, hidden_size=64, intermediate_size=128, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=16)
NUM_SLOTS, MAX_RANK = 5, 16
ALL = tuple(m for subs in PROJECTIONS.values() for m in subs)
# slot -> (rank, PEFT modules the adapter targets): different ranks and module subsets.
ADAPTERS: dict[int, tuple[int, tuple[str, ...]]] = {
    1: (1, ALL),
    2: (4, ("q_proj", "v_proj")),
    3: (8, ("o_proj", "gate_proj", "down_proj")),
    4: (16, ALL),
    5: (4, ("k_proj", "up_proj")),
}
Weights = dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]
Reference = dict[tuple[int, str], dict[int, list[tuple[torch.Tensor, torch.Tensor]]]]


def random_adapter(rank: int, modules: tuple[str, ...], seed: int,
                   cfg: ModelConfig = CFG) -> Weights:
    """{(layer, module): (A [r, in], B_scaled [out, r])} for every layer of cfg."""
    gen = torch.Generator().manual_seed(seed)
    shapes = module_shapes(cfg)
    return {(layer, m): (torch.randn(rank, shapes[m][0], generator=gen) * 0.1,
                         torch.randn(shapes[m][1], rank, generator=gen) * 0.1)
            for layer in range(cfg.num_layers) for m in modules}


def reference_weights(adapters: dict[int, Weights], cfg: ModelConfig = CFG) -> Reference:
    """reference[(layer, proj)][slot] = per sub-module (A, B), rank 0 where not targeted."""
    shapes = module_shapes(cfg)
    ref: Reference = {}
    for layer in range(cfg.num_layers):
        for proj, subs in PROJECTIONS.items():
            per_slot = ref.setdefault((layer, proj), {})
            for slot in range(NUM_SLOTS + 1):
                pairs = []
                for sub in subs:
                    fan_in, fan_out = shapes[sub]
                    empty = (torch.zeros(0, fan_in), torch.zeros(fan_out, 0))
                    pairs.append(adapters.get(slot, {}).get((layer, sub), empty))
                per_slot[slot] = pairs
    return ref


def filled_slots(device: str, kernel: bool = True) -> tuple[LoraSlots, Reference]:
    """Slots 1..5 filled with ADAPTERS; on CPU with the C++ kernel unless kernel=False (then
    build() picks among torch's paths)."""
    slots = LoraSlots(CFG, NUM_SLOTS, MAX_RANK, torch.device(device), torch.float32,
                      built_cpu_kernels().lora_delta_ if kernel and device == "cpu" else None)
    adapters = {slot: random_adapter(rank, modules, seed=slot)
                for slot, (rank, modules) in ADAPTERS.items()}
    for slot, weights in adapters.items():
        slots.write(slot, weights, ADAPTERS[slot][0])
    ref = reference_weights(adapters)
    moved = {key: {s: [(a.to(device), b.to(device)) for a, b in pairs]
                   for s, pairs in per_slot.items()} for key, per_slot in ref.items()}
    return slots, moved


def popular_rows(mix: str, num_rows: int, rng: random.Random) -> list[int]:
    slots = list(range(1, NUM_SLOTS + 1))
    if mix == "same":
        return [3] * num_rows
    if mix == "all_different":
        return [slots[i % NUM_SLOTS] for i in range(num_rows)]
    if mix == "zipf":
        return rng.choices(slots, weights=[1 / k for k in range(1, NUM_SLOTS + 1)], k=num_rows)
    if mix == "mostly_base":
        rows = [0 if rng.random() < 0.7 else rng.choice(slots) for _ in range(num_rows)]
        rows[rng.randrange(num_rows)] = rng.choice(slots)  # at least one adapter row
        return rows
    raise AssertionError(mix)


def paths(slots: LoraSlots) -> list[DeltaPath]:
    return [p for p in DeltaPath if p != DeltaPath.KERNEL or slots.kernel is not None]


def assert_matches_reference(batch: LoraBatch, ref: Reference, device: str, seed: int,
                             label: str) -> None:
    """apply() == y + reference_delta() for every layer and fused projection, every fast path
    (the kernel where the slots have it)."""
    token_slots = batch.token_slots.tolist()
    shapes = module_shapes(CFG)
    gen = torch.Generator().manual_seed(seed)
    for layer in range(CFG.num_layers):
        for proj, subs in PROJECTIONS.items():
            fan_in = shapes[subs[0]][0]
            fan_out = sum(shapes[s][1] for s in subs)
            x = torch.randn(len(token_slots), fan_in, generator=gen).to(device)
            y = torch.randn(len(token_slots), fan_out, generator=gen).to(device)
            expected = y + reference_delta(x, token_slots, ref[(layer, proj)])
            for path in paths(batch.slots):
                batch.path = path
                got = batch.apply(layer, proj, x, y.clone())
                err = (got - expected).abs().amax(dim=1)
                bad = [(t, token_slots[t], float(err[t])) for t in range(len(token_slots))
                       if err[t] > 1e-5]
                assert not bad, (f"{label} layer {layer} {proj} path {path}: "
                                 f"(token, slot, max error) {bad[:8]}")
                assert got.shape == y.shape and got.dtype == y.dtype


# --- the fast paths against the reference -----------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mix", ["same", "all_different", "zipf", "mostly_base"])
@pytest.mark.parametrize("num_rows", [1, 3, 7, 17])
@pytest.mark.parametrize("lengths", ["decode", "prefill"])
def test_fast_paths_match_reference(device: str, mix: str, num_rows: int, lengths: str) -> None:
    rng = random.Random(f"{mix}-{num_rows}-{lengths}")
    slots, ref = filled_slots(device)
    row_slots = popular_rows(mix, num_rows, rng)
    row_lengths = [1 if lengths == "decode" else rng.randint(1, 40) for _ in range(num_rows)]
    batch = LoraBatch.build(slots, row_slots, row_lengths, torch.device(device))
    assert batch is not None
    assert_matches_reference(batch, ref, device, seed=num_rows,
                             label=f"rows={row_slots} lengths={row_lengths}")


@pytest.mark.parametrize("device", DEVICES)
def test_single_token(device: str) -> None:
    slots, ref = filled_slots(device)
    for slot in range(1, NUM_SLOTS + 1):
        batch = LoraBatch.build(slots, [slot], [1], torch.device(device))
        assert batch is not None and batch.rank == ADAPTERS[slot][0]
        assert_matches_reference(batch, ref, device, seed=slot, label=f"slot {slot}")


@pytest.mark.parametrize("device", DEVICES)
def test_every_row_length_up_to_40(device: str) -> None:
    slots, ref = filled_slots(device)
    row_lengths = list(range(1, 41))
    row_slots = [i % (NUM_SLOTS + 1) for i in range(40)]  # every slot, base rows included
    batch = LoraBatch.build(slots, row_slots, row_lengths, torch.device(device))
    assert batch is not None
    assert_matches_reference(batch, ref, device, seed=40, label="lengths 1..40")


def test_base_rows_get_exactly_y() -> None:
    slots, _ = filled_slots("cpu")
    batch = LoraBatch.build(slots, [0, 2, 0], [3, 2, 4], torch.device("cpu"))
    assert batch is not None
    x, y = torch.randn(9, 64), torch.randn(9, 256)  # gate_up: 2 x intermediate
    for path in paths(slots):
        batch.path = path
        got = batch.apply(0, "gate_up_proj", x, y.clone())
        assert torch.equal(got[[0, 1, 2, 5, 6, 7, 8]], y[[0, 1, 2, 5, 6, 7, 8]]), path


def test_apply_adds_into_y_in_place() -> None:
    # The model hands apply() the fresh output of the base matmul: no copy is needed.
    slots, _ = filled_slots("cpu")
    batch = LoraBatch.build(slots, [4, 4], [5, 5], torch.device("cpu"))
    assert batch is not None
    x, y = torch.randn(10, 64), torch.randn(10, 128)
    for path in paths(slots):
        batch.path = path
        before = y.clone()
        got = batch.apply(1, "qkv_proj", x, y)
        assert got is y and not torch.equal(y, before), path


# --- the CPU kernel --------------------------------------------------------------------------


def test_kernel_takes_every_step_when_the_slots_have_it() -> None:
    slots, _ = filled_slots("cpu")
    for row_slots, row_lengths in (([1, 2, 3, 4, 5, 0], [1] * 6), ([1, 2], [4, 30]),
                                   ([3, 3, 1, 0, 2], [1, 1, 1, 9, 5]), ([4], [1])):
        batch = LoraBatch.build(slots, row_slots, row_lengths, torch.device("cpu"))
        assert batch is not None and batch.path == DeltaPath.KERNEL, (row_slots, row_lengths)
    # (start, end, storage index, the slot's own rank): padding ranks are never multiplied
    assert batch.segment_table.tolist() == [[0, 1, 3, 16]]
    mixed = LoraBatch.build(slots, [3, 3, 1, 0, 2], [1, 1, 1, 9, 5], torch.device("cpu"))
    assert mixed.segment_table.tolist() == [[0, 2, 2, 8], [2, 3, 0, 1], [12, 17, 1, 4]]


def assert_kernel_reads_only_its_slots(kernel: LoraKernel, device: str,
                                       dtype: torch.dtype) -> None:
    """`kernel` (a LoraKernel) against the reference at sizes off every 16-lane width and tile,
    every slot no token uses NaN, so a single read of one would show in the output."""
    cfg = ModelConfig(vocab_size=32, hidden_size=40, intermediate_size=72, num_layers=1,
                      num_heads=3, num_kv_heads=1, head_dim=12)
    slots = LoraSlots(cfg, 6, 8, torch.device(device), dtype, kernel)
    for layer in slots.layers:
        for a, bs in layer.values():
            for t in (a, *bs):
                t.fill_(float("nan"))
    adapters = {slot: random_adapter(rank, ALL, seed=slot, cfg=cfg)
                for slot, rank in ((2, 8), (5, 3))}
    for slot, weights in adapters.items():
        slots.write(slot, {k: (a.to(dtype), b.to(dtype)) for k, (a, b) in weights.items()},
                    8 if slot == 2 else 3)
    ref = reference_weights({s: {k: (a.to(dtype).float().to(device), b.to(dtype).float().to(device))
                                 for k, (a, b) in w.items()} for s, w in adapters.items()}, cfg)
    row_slots, row_lengths = [2, 5, 5, 0, 2, 5], [1, 1, 1, 1, 7, 19]
    batch = LoraBatch.build(slots, row_slots, row_lengths, torch.device(device))
    assert batch is not None and batch.path == DeltaPath.KERNEL
    token_slots = batch.token_slots.tolist()
    shapes, gen = module_shapes(cfg), torch.Generator().manual_seed(0)
    for proj, subs in PROJECTIONS.items():
        x = torch.randn(len(token_slots), shapes[subs[0]][0], generator=gen).to(device, dtype)
        y = torch.randn(len(token_slots), sum(shapes[s][1] for s in subs),
                        generator=gen).to(device, dtype)
        expected = y.float() + reference_delta(x.float(), token_slots, ref[(0, proj)])
        got = batch.apply(0, proj, x, y.clone())
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        assert got.dtype == dtype and torch.allclose(got.float(), expected, atol=tol, rtol=tol), \
            (proj, (got.float() - expected).abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_reads_only_its_slots_at_odd_sizes(dtype: torch.dtype) -> None:
    # sizes off the 16-lane width take the C++ kernel's scalar tails
    assert_kernel_reads_only_its_slots(built_cpu_kernels().lora_delta_, "cpu", dtype)


def test_kernel_refuses_bad_segments() -> None:
    slots, _ = filled_slots("cpu")
    a, bs = slots.layers[0]["qkv_proj"]
    x, y = torch.randn(6, 64), torch.randn(6, 128)
    for bad in ([[3, 6, 0, 1], [0, 3, 1, 1]],   # out of order
                [[0, 7, 0, 1]],                 # past the last token
                [[0, 2, NUM_SLOTS, 1]],         # no such slot
                [[0, 2, 0, MAX_RANK + 1]]):     # rank over the pool's
        with pytest.raises(RuntimeError):
            slots.kernel(y, x, a, bs, torch.tensor(bad))


# --- LoraBatch.build metadata ------------------------------------------------------------------


@pytest.mark.parametrize(("row_slots", "row_lengths"), [
    ([0], [1]), ([0, 0, 0], [3, 1, 7]), ([], []),
])
def test_build_returns_none_without_adapter_rows(row_slots: list[int],
                                                 row_lengths: list[int]) -> None:
    slots, _ = filled_slots("cpu")
    assert LoraBatch.build(slots, row_slots, row_lengths, torch.device("cpu")) is None


def test_kernel_segments_cut_long_runs() -> None:
    ranks = [0, 8, 4]
    assert kernel_segments([(0, 3, 2), (3, 200, 1), (200, 264, 2)], ranks) == [
        (0, 3, 1, 4), (3, 67, 0, 8), (67, 131, 0, 8), (131, 195, 0, 8), (195, 200, 0, 8),
        (200, 264, 1, 4)]
    assert MAX_SEGMENT_TOKENS == 64 and kernel_segments([], ranks) == []


def test_segments_merge_adjacent_same_slot_rows() -> None:
    slots, _ = filled_slots("cpu")
    batch = LoraBatch.build(slots, [2, 2, 0, 2, 3, 3, 2], [1, 2, 3, 4, 5, 6, 1],
                            torch.device("cpu"))
    assert batch is not None
    # the decode row (the leading length-1 row) never joins the prompt chunk after it
    assert batch.num_decode_tokens == 1
    assert batch.segments == [(0, 1, 2), (1, 3, 2), (6, 10, 2), (10, 21, 3), (21, 22, 2)], \
        batch.segments
    expected = [2] * 3 + [0] * 3 + [2] * 4 + [3] * 11 + [2]
    assert batch.token_slots.tolist() == expected
    assert batch.token_slots.dtype == torch.long


@pytest.mark.parametrize(("row_slots", "rank"), [
    ([1], 1), ([0, 1], 1), ([2, 5], 4), ([1, 2, 3], 8), ([3, 4, 0], 16), ([4, 1], 16),
])
def test_rank_is_max_rank_of_slots_present(row_slots: list[int], rank: int) -> None:
    slots, _ = filled_slots("cpu")
    batch = LoraBatch.build(slots, row_slots, [2] * len(row_slots), torch.device("cpu"))
    assert batch is not None and batch.rank == rank, (row_slots, batch and batch.rank)


def test_segments_for_long_runs_pool_for_decode_over_many_slots() -> None:
    slots, _ = filled_slots("cpu", kernel=False)
    decode = LoraBatch.build(slots, [1, 2, 3, 4, 5, 0], [1] * 6, torch.device("cpu"))
    prefill = LoraBatch.build(slots, [1, 2], [MIN_TOKENS_PER_SEGMENT, 30], torch.device("cpu"))
    assert decode is not None and decode.path == DeltaPath.POOL
    assert prefill is not None and prefill.path == DeltaPath.SEGMENTS
    one_hot = decode.one_hot(DeltaPath.POOL)
    assert one_hot.shape == (6, NUM_SLOTS)  # no column for slot 0: it has no storage
    assert one_hot[:5].argmax(dim=1).tolist() == [0, 1, 2, 3, 4] and one_hot.sum().item() == 5


@pytest.mark.parametrize("device", DEVICES)
def test_decode_rows_take_the_pool_while_prompt_chunks_take_segments(device: str) -> None:
    # A prompt chunk sharing a step with decode rows over many adapters: one matmul pair per
    # decode row (all segments) cost 3x the step here, and the pool would run the chunk's
    # tokens through every slot.
    slots, ref = filled_slots(device, kernel=False)
    batch = LoraBatch.build(slots, [1, 2, 3, 4, 5, 0, 2, 3, 1], [1] * 7 + [30, 12],
                            torch.device(device))
    assert batch is not None and batch.path == DeltaPath.POOL and batch.num_decode_tokens == 7
    assert batch.prompt_segments == [(7, 37, 3), (37, 49, 1)]
    assert batch.one_hot(DeltaPath.POOL).shape == (7, NUM_SLOTS)
    assert_matches_reference(batch, ref, device, seed=9, label="decode rows + prompt chunks")


def test_decode_over_few_slots_of_a_big_pool_copies_the_used_ones() -> None:
    # The pool path reads every slot: for 2 adapters in a pool of 32 it would read 16x the
    # weights the step needs; one adapter alone takes the segment path.
    slots = LoraSlots(CFG, 32, 4, torch.device("cpu"), torch.float32)
    for slot in (7, 20):
        slots.write(slot, random_adapter(4, ALL, seed=slot), 4)
    one = LoraBatch.build(slots, [7, 0, 7], [1, 1, 1], torch.device("cpu"))
    two = LoraBatch.build(slots, [20, 0, 7, 20], [1, 1, 1, 1], torch.device("cpu"))
    assert one is not None and one.path == DeltaPath.SEGMENTS
    assert two is not None and two.path == DeltaPath.USED and two.used == [7, 20]
    one_hot = two.one_hot(DeltaPath.USED)  # columns: slot 7, slot 20
    assert one_hot.tolist() == [[0, 1], [0, 0], [1, 0], [0, 1]]
    assert two.used_index.tolist() == [6, 19]
    many = LoraBatch.build(slots, list(range(1, 12)), [1] * 11, torch.device("cpu"))
    assert many is not None and many.path == DeltaPath.POOL  # 11 of 32: over MAX_USED_SHARE


# --- LoraSlots ---------------------------------------------------------------------------------


def test_slot_views_and_sizes() -> None:
    slots, _ = filled_slots("cpu")
    shapes = module_shapes(CFG)
    for layer in range(CFG.num_layers):
        for module in ALL:
            fan_in, fan_out = shapes[module]
            for slot in range(1, NUM_SLOTS + 1):
                a, b = slots.read(slot, layer, module)
                assert a.shape == (MAX_RANK, fan_in) and b.shape == (fan_out, MAX_RANK), module
    assert slots.ranks == [0] + [ADAPTERS[s][0] for s in range(1, NUM_SLOTS + 1)]
    numel = sum(a.numel() + sum(b.numel() for b in bs)
                for layer in slots.layers for a, bs in layer.values())
    assert slots.nbytes == numel * 4


def test_slots_hold_what_was_written() -> None:
    slots = LoraSlots(CFG, NUM_SLOTS, MAX_RANK, torch.device("cpu"), torch.float32)
    weights = random_adapter(8, ("k_proj", "down_proj"), seed=3)
    slots.write(2, weights, 8)
    for layer in range(CFG.num_layers):
        for module in ALL:
            a, b = slots.read(2, layer, module)
            if (layer, module) in weights:
                a_ref, b_ref = weights[(layer, module)]
                assert torch.equal(a[:8], a_ref) and torch.equal(b[:, :8], b_ref), module
                assert not a[8:].any() and not b[:, 8:].any(), f"padding of {module}"
            else:
                assert not a.any() and not b.any(), f"untargeted {module}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_host_layout_writes_the_same_slots_by_plain_copies(device: str,
                                                           dtype: torch.dtype) -> None:
    weights = random_adapter(8, ("k_proj", "gate_proj", "down_proj"), seed=4)
    pin = device == "cuda"  # pinned memory needs a GPU
    staged = LoraSlots(CFG, 2, MAX_RANK, torch.device(device), dtype).host_layout(weights, pin)
    for (a, b), (a_in, b_in) in zip(staged.values(), weights.values(), strict=True):
        # what write() copies, A and Bᵀ, are contiguous in the slots' dtype: no temporaries
        assert a.dtype == b.dtype == dtype and a.is_contiguous() and b.T.is_contiguous()
        assert a.is_pinned() == b.is_pinned() == pin
        assert torch.equal(a, a_in.to(dtype)) and torch.equal(b, b_in.to(dtype))
    plain, laid_out = (LoraSlots(CFG, 2, MAX_RANK, torch.device(device), dtype)
                       for _ in range(2))
    plain.write(1, weights, 8)
    laid_out.write(1, staged, 8)
    if device == "cuda":
        torch.cuda.synchronize()
    assert all(torch.equal(x, y) for p, q in zip(plain.layers, laid_out.layers, strict=True)
               for proj in p for x, y in zip([p[proj][0], *p[proj][1]],
                                             [q[proj][0], *q[proj][1]], strict=True))


@pytest.mark.parametrize("device", DEVICES)
def test_smaller_rank_overwrite_leaves_no_stale_values(device: str) -> None:
    slots, ref = filled_slots(device)
    small = random_adapter(2, ("q_proj",), seed=99)
    slots.write(4, small, 2)  # slot 4 held a rank-16 adapter on every module
    assert slots.ranks[4] == 2
    for layer in range(CFG.num_layers):
        for module in ALL:
            a, b = slots.read(4, layer, module)
            if module == "q_proj":
                assert not a[2:].any() and not b[:, 2:].any(), f"stale ranks of {module}"
            else:
                assert not a.any() and not b.any(), f"stale {module}"
    # The pool path pads to the step's max rank (16 here): padding must add exact zeros.
    new_ref = reference_weights({**{s: {} for s in ADAPTERS}, 4: small})
    for key, per_slot in ref.items():
        per_slot[4] = [(a.to(device), b.to(device)) for a, b in new_ref[key][4]]
    batch = LoraBatch.build(slots, [4, 1, 4, 2], [3, 1, 5, 2], torch.device(device))
    assert batch is not None and batch.rank == 4
    batch2 = LoraBatch.build(slots, [4, 3], [2, 2], torch.device(device))
    assert batch2 is not None and batch2.rank == 8
    assert_matches_reference(batch, ref, device, seed=5, label="overwritten slot 4")
    assert_matches_reference(batch2, ref, device, seed=6, label="overwritten slot 4 + rank 8")


def test_write_rejects_slot_zero_and_too_big_rank() -> None:
    slots = LoraSlots(CFG, 2, 4, torch.device("cpu"), torch.float32)
    with pytest.raises(AssertionError):
        slots.write(0, random_adapter(2, ("q_proj",), seed=0), 2)
    with pytest.raises(AssertionError):
        slots.write(1, random_adapter(8, ("q_proj",), seed=0), 8)
    with pytest.raises(AssertionError):
        slots.write(3, random_adapter(2, ("q_proj",), seed=0), 2)


def test_module_shapes_match_hf_linear_shapes(tiny_model_dir: Path) -> None:
    cfg = read_model_config(tiny_model_dir)
    shapes = module_shapes(cfg)
    assert set(shapes) == set(ALL)
    files = sorted(tiny_model_dir.glob("*.safetensors"))
    hf: dict[str, tuple[int, ...]] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                hf[name] = tuple(f.get_slice(name).get_shape())
    for layer in range(cfg.num_layers):
        for module, (fan_in, fan_out) in shapes.items():
            kind = "mlp" if module in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            weight = hf[f"model.layers.{layer}.{kind}.{module}.weight"]  # nn.Linear: [out, in]
            assert weight == (fan_out, fan_in), (module, weight, (fan_in, fan_out))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads Linux's /proc")
def test_cpu_slots_take_memory_only_as_adapters_load() -> None:
    """An idle slot costs no resident memory on CPU; loading an adapter commits about its own
    share of the pool, and the other slots still read as exact zeros."""
    cfg = ModelConfig(vocab_size=32, hidden_size=2048, intermediate_size=8192, num_layers=10,
                      num_heads=32, num_kv_heads=8, head_dim=64)
    before = resident_anon_mib()
    slots = LoraSlots(cfg, 8, 16, torch.device("cpu"), torch.bfloat16)
    pool_mib = slots.nbytes / 2**20
    assert pool_mib > 100
    assert resident_anon_mib() - before < 16
    slots.write(3, random_adapter(16, ALL, seed=3, cfg=cfg), 16)
    grown = resident_anon_mib() - before
    # slot 3's A rows and its B rows' pages (B rows of 4 neighbouring slots can share a page)
    assert 0.5 * pool_mib / 8 < grown < 0.6 * pool_mib, (grown, pool_mib)
    for s in (1, 2, 4, 8):
        for module in ALL:
            a, b = slots.read(s, 2, module)
            assert not a.any() and not b.any(), (s, module)
    a, b = slots.read(3, 2, "down_proj")
    assert a.any() and b.any()
