"""Batched multi-LoRA: the device slot pool, per-step LoRA metadata and the delta ops.

For a fused projection y = x·Wᵀ, each token t adds Σ_sub (x_t·A_{s,sub}ᵀ)·B_{s,sub}ᵀ of its slot s
(B is pre-scaled by lora_alpha / r). Slot 0 means no adapter and has no storage. Four fast
paths (DeltaPath; a fifth, TILED, serves --batch-invariant steps without a kernel) and a
reference. A kernel takes every token of a step in one call per projection: C++ on CPU
(worker.kernels.cpu), Triton on CUDA (worker.kernels.lora_triton). torch's three
serve where neither is available: pool (every slot at once, masked per token: decode steps over
many adapters), used (the same on copies of the step's slots: decode over a few of a big pool)
and segments (one matmul pair per run of same-adapter tokens: prompt chunks, or one adapter).
There a step's decode rows (the leading single-token rows) take one of the three; its prompt
chunks always take segments.
Never decides which adapter goes to which slot (adapter_memory does).
"""

from __future__ import annotations

import math
import mmap
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cached_property

import torch
import torch.nn.functional as F

from worker.batch_invariant import RowTiling, tiled_segment_delta
from worker.model import ModelConfig

# Our fused projections and the PEFT modules each is made of, in output order.
PROJECTIONS: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "o_proj": ("o_proj",),
    "gate_up_proj": ("gate_proj", "up_proj"),
    "down_proj": ("down_proj",),
}
# Segment matmuls beat the pool once runs average this many tokens (prompt chunks).
MIN_TOKENS_PER_SEGMENT = 4
# Up to this share of the pool in use, copying the used slots out beats reading every slot
# (measured at 32 slots: fp32 up to ~14 used, bf16 up to ~10).
MAX_USED_SHARE = 1 / 3
# A kernel's segments span at most this many tokens: the kernels spread work over segments (a
# Triton program or C++ task each), so a long prompt chunk is cut to keep them all busy; each
# piece reads its adapter's weights again, a few KB.
MAX_SEGMENT_TOKENS = 64
# (y, x, A, [B_j], segments [n, 4] = (start, end, slot index, rank)): adds into y in place
LoraKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor],
                       torch.Tensor], None]


def module_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """PEFT module -> (in_features, out_features) of the base projection."""
    h, q, kv, i = (cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim,
                   cfg.intermediate_size)
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def pool_zeros(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Zeros that take host memory only where written, on CPU: an anonymous mapping reads as
    the kernel's shared zero page until a slot's adapter is copied in, so idle slots cost no
    resident memory (8 slots of rank 16 at a 1B shape are 172 MiB) and a slot's pages are
    committed when its first adapter loads. No huge pages: one write would commit 2 MiB of
    other slots' rows. Elsewhere torch.zeros (device memory is reserved at start)."""
    if device.type != "cpu":
        return torch.zeros(shape, device=device, dtype=dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    buffer = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        buffer.madvise(mmap.MADV_NOHUGEPAGE)
    # frombuffer keeps `buffer` alive as long as the tensor (and its views) are
    return torch.frombuffer(buffer, dtype=dtype).view(shape)


class LoraSlots:
    """Device tensors for `num_slots` adapters of rank <= max_rank, allocated once at start
    (on CPU, committed slot by slot as adapters load: pool_zeros).

    Per layer and fused projection: A [max_rank, num_slots, num_sub, in] and, per sub-module,
    B [max_rank, num_slots, out_sub]; slot s (1-based) is index s - 1. Rank-major on purpose: the
    first r ranks of every slot are one contiguous block, so the pool path multiplies by all slots
    in one matmul per side without a copy, while one slot's rows stay contiguous vectors for the
    segment path. Smaller ranks are zero-padded, which adds exact zeros. `kernel`: the segment
    kernel for the device (LoraKernel), which every step then takes.
    """

    def __init__(self, cfg: ModelConfig, num_slots: int, max_rank: int, device: torch.device,
                 dtype: torch.dtype, kernel: LoraKernel | None = None) -> None:
        self.num_slots, self.max_rank, self.dtype = num_slots, max_rank, dtype
        self.kernel = kernel
        self.ranks = [0] * (num_slots + 1)  # host copy: rank of the adapter in each slot
        shapes = module_shapes(cfg)
        self.layers: list[dict[str, tuple[torch.Tensor, list[torch.Tensor]]]] = []
        for _ in range(cfg.num_layers):
            layer = {}
            for proj, subs in PROJECTIONS.items():
                fan_in = shapes[subs[0]][0]
                a = pool_zeros((max_rank, num_slots, len(subs), fan_in), device, dtype)
                bs = [pool_zeros((max_rank, num_slots, shapes[s][1]), device, dtype)
                      for s in subs]
                layer[proj] = (a, bs)
            self.layers.append(layer)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + sum(b.nbytes for b in bs)
                   for layer in self.layers for a, bs in layer.values())

    def host_layout(self, weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]],
                    pin: bool) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
        """read_adapter_weights' tensors as write() copies them best: in the slots' dtype, each
        B stored [r, out] (returned as its [out, r] view), page-locked if `pin`. torch copies a
        non-contiguous host tensor through a pageable temporary, which makes a non_blocking copy
        synchronous, and one of another dtype at its own size, then converts on the device;
        these go straight to the slot by DMA."""
        def copy(t: torch.Tensor) -> torch.Tensor:
            return torch.empty(t.shape, dtype=self.dtype, pin_memory=pin).copy_(t)

        return {key: (copy(a), copy(b.T).T) for key, (a, b) in weights.items()}

    def write(self, slot: int, weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]],
              rank: int) -> None:
        """Copies one adapter (host tensors from read_adapter_weights, best in host_layout)
        into `slot`."""
        assert 1 <= slot <= self.num_slots and rank <= self.max_rank
        index = slot - 1
        for i, layer in enumerate(self.layers):
            for proj, subs in PROJECTIONS.items():
                a, bs = layer[proj]
                a[:, index].zero_()
                for j, sub in enumerate(subs):
                    bs[j][:, index].zero_()
                    pair = weights.get((i, sub))
                    if pair is not None:
                        # non_blocking: on CUDA host_layout's pinned tensors overlap compute
                        a[:rank, index, j].copy_(pair[0], non_blocking=True)
                        bs[j][:rank, index].copy_(pair[1].T, non_blocking=True)
        self.ranks[slot] = rank

    def read(self, slot: int, layer: int, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of one slot's padded weights (slot >= 1): (A [max_rank, in], B [out, max_rank])."""
        proj = next(p for p, subs in PROJECTIONS.items() if module in subs)
        a, bs = self.layers[layer][proj]
        j = PROJECTIONS[proj].index(module)
        assert 1 <= slot <= self.num_slots
        return a[:, slot - 1, j], bs[j][:, slot - 1].T


class DeltaPath(StrEnum):
    """How a step adds its LoRA deltas (LoraBatch.path)."""

    SEGMENTS = "segments"  # one matmul pair per run of same-adapter tokens
    USED = "used"          # the step's slots copied out of the pool, then the pool path on them
    POOL = "pool"          # every slot of the pool at once, the other slots masked per token
    KERNEL = "kernel"      # every segment in one kernel call, each used slot read once
    TILED = "tiled"        # segments at max rank on a RowTiling (--batch-invariant, no kernel)


@dataclass
class LoraBatch:
    """One step's LoRA metadata: which slot each flat token uses, and which path adds them.

    `path` serves the first `num_decode_tokens` tokens (the step's leading decode rows); the
    tokens after them (prompt chunks) always take segments, so that a prompt chunk sharing a
    step with many decode rows neither forces a matmul pair per decode row nor runs its tokens
    through every slot.
    """

    slots: LoraSlots
    token_slots: torch.Tensor  # [T] slot per token (0 = no adapter)
    rank: int                  # max rank of the slots in this step
    segments: list[tuple[int, int, int]]  # (start, end, slot) runs; none crosses num_decode_tokens
    used: list[int]            # the slots of the decode rows, ascending
    num_decode_tokens: int
    path: DeltaPath
    tiling: RowTiling | None = None  # the TILED path's (None: RowTiling())
    _masks: dict[tuple[DeltaPath, int], torch.Tensor] = field(default_factory=dict, repr=False)

    @cached_property
    def used_index(self) -> torch.Tensor:
        """[u] storage index of each used slot."""
        return torch.tensor([s - 1 for s in self.used], dtype=torch.long,
                            device=self.token_slots.device)

    @cached_property
    def segment_table(self) -> torch.Tensor:
        """[n, 4] the kernel's input (kernel_segments)."""
        return torch.tensor(kernel_segments(self.segments, self.slots.ranks), dtype=torch.long,
                            device=self.token_slots.device)

    @cached_property
    def kernel_delta(self) -> KernelDelta:
        return KernelDelta(self.slots, self.segment_table)

    @cached_property
    def prompt_segments(self) -> list[tuple[int, int, int]]:
        """The segments after the decode rows."""
        return [s for s in self.segments if s[0] >= self.num_decode_tokens]

    def one_hot(self, path: DeltaPath) -> torch.Tensor:
        """[D, columns]: each decode token's column among the pool's slots (POOL) or the used
        ones (USED); rows without an adapter are all zero."""
        token_slots = self.token_slots[:self.num_decode_tokens]
        if path == DeltaPath.POOL:
            columns, num_columns = token_slots, self.slots.num_slots
        else:
            lookup = torch.zeros(self.slots.num_slots + 1, dtype=torch.long,
                                 device=token_slots.device)
            lookup[self.used] = torch.arange(1, len(self.used) + 1, device=lookup.device)
            columns, num_columns = lookup[token_slots], len(self.used)
        return F.one_hot(columns, num_columns + 1)[:, 1:].to(self.slots.dtype)

    def pool_mask(self, num_sub: int) -> torch.Tensor:
        """[D, rank * columns * num_sub]: the one-hot laid out like the pool path's h.

        Expanded once per step and shape: a broadcast multiply costs 5-9x a flat one here."""
        key = (self.path, num_sub)
        mask = self._masks.get(key)
        if mask is None:
            one_hot = self.one_hot(self.path)
            t, columns = one_hot.shape
            mask = one_hot[:, None, :, None].expand(t, self.rank, columns, num_sub)
            mask = self._masks[key] = mask.reshape(t, self.rank * columns * num_sub)
        return mask

    @classmethod
    def build(cls, slots: LoraSlots, row_slots: list[int], row_lengths: list[int],
              device: torch.device, tiling: RowTiling | None = None) -> LoraBatch | None:
        """None when no row uses an adapter: the step then skips LoRA entirely.

        The leading rows of length 1 are the decode rows (the runner puts them first).
        tiling (--batch-invariant): a path that computes each token alone, the C++ kernel
        where there is one (its per-token sums never look at other tokens), else TILED."""
        if not any(row_slots):
            return None
        num_decode = next((i for i, n in enumerate(row_lengths) if n != 1), len(row_lengths))
        segments = segment_runs(row_slots, row_lengths, num_decode)
        token_slots = torch.tensor([s for s, n in zip(row_slots, row_lengths, strict=True)
                                    for _ in range(n)], dtype=torch.long, device=device)
        used = sorted(set(row_slots[:num_decode]) - {0})
        decode_segments = [end - start for start, end, _ in segments if end <= num_decode]
        # Without a kernel: decode rows over one adapter, or long runs of one, take a matmul
        # pair per run; over several adapters, the pool path, on copies of the used slots while
        # they are few (reading every slot would cost more than the copies).
        if tiling is not None and (slots.kernel is None or device.type != "cpu"):
            path = DeltaPath.TILED
        elif slots.kernel is not None:
            path = DeltaPath.KERNEL
        elif (len(used) <= 1
              or sum(decode_segments) >= MIN_TOKENS_PER_SEGMENT * len(decode_segments)):
            path = DeltaPath.SEGMENTS
        elif len(used) <= MAX_USED_SHARE * slots.num_slots:
            path = DeltaPath.USED
        else:
            path = DeltaPath.POOL
        rank = max(slots.ranks[s] for s in row_slots)
        return cls(slots, token_slots, rank, segments, used, num_decode, path, tiling)

    def apply(self, layer: int, proj: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y [T, out] of the base projection + each token's LoRA delta (in place); x [T, in]."""
        if self.path == DeltaPath.KERNEL:
            return self.kernel_delta.apply(layer, proj, x, y)
        a, bs = self.slots.layers[layer][proj]
        if self.path == DeltaPath.TILED:
            return tiled_segment_delta(x, y, a, bs, self.segments, self.tiling or RowTiling())
        if self.path == DeltaPath.SEGMENTS:
            return segment_delta(x, y, a, bs, self.segments, self.slots.ranks)
        decode = self.num_decode_tokens
        segment_delta(x, y, a, bs, self.prompt_segments, self.slots.ranks)
        if not decode:
            return y
        if self.path == DeltaPath.USED:
            a = a[:self.rank].index_select(1, self.used_index)
            bs = [b[:self.rank].index_select(1, self.used_index) for b in bs]
        pool_delta(x[:decode], y[:decode], a, bs, self.pool_mask(len(bs)), self.rank)
        return y


def segment_runs(row_slots: list[int], row_lengths: list[int],
                 num_decode: int) -> list[tuple[int, int, int]]:
    """(start, end, slot) per run of tokens on one adapter (rows without one are in none); no run
    crosses token `num_decode`, where the decode rows end and the prompt chunks begin."""
    segments: list[tuple[int, int, int]] = []
    start = 0
    for slot, n in zip(row_slots, row_lengths, strict=True):
        joins = segments and segments[-1][2] == slot and segments[-1][1] == start
        if slot and joins and start != num_decode:
            segments[-1] = (segments[-1][0], start + n, slot)
        elif slot:
            segments.append((start, start + n, slot))
        start += n
    return segments


def kernel_segments(segments: list[tuple[int, int, int]],
                    ranks: list[int]) -> list[tuple[int, int, int, int]]:
    """(start, end, storage index, rank) of each run of segment_runs, cut into pieces of at most
    MAX_SEGMENT_TOKENS tokens: a segment table's rows."""
    return [(piece, min(piece + MAX_SEGMENT_TOKENS, end), slot - 1, ranks[slot])
            for start, end, slot in segments
            for piece in range(start, end, MAX_SEGMENT_TOKENS)]


@dataclass
class KernelDelta:
    """LoraDelta of the slots' kernel on a segment table already on the device: the static
    table of a captured decode step (worker.decode_graphs)."""

    slots: LoraSlots
    segment_table: torch.Tensor  # [n, 4] (start, end, storage index, rank), as LoraBatch's

    def apply(self, layer: int, proj: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        a, bs = self.slots.layers[layer][proj]
        self.slots.kernel(y, x, a, bs, self.segment_table)
        return y


def pool_delta(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, bs: list[torch.Tensor],
               pool_mask: torch.Tensor, rank: int) -> torch.Tensor:
    """Every token through every slot's first `rank` ranks, the other slots masked out.

    Reads each slot's weights once per step (a per-token gather would copy them once per token)
    in 1 + num_sub matmuls; the wasted products with other slots are cheap at decode batch sizes.
    pool_mask [T, rank * S * sub] is LoraBatch.pool_mask.
    """
    num_tokens = x.shape[0]
    h = (x @ a[:rank].flatten(0, 2).T).mul_(pool_mask)                  # [T, r * S * sub]
    h = h.view(num_tokens, rank, -1, len(bs))                           # [T, r, S, sub]
    offset = 0
    for j, b in enumerate(bs):
        out = b.shape[-1]
        y[:, offset:offset + out].addmm_(h[..., j].reshape(num_tokens, -1), b[:rank].flatten(0, 1))
        offset += out
    return y


def segment_delta(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, bs: list[torch.Tensor],
                  segments: list[tuple[int, int, int]], ranks: list[int]) -> torch.Tensor:
    """One matmul for A and one per sub-module for B per run of same-adapter tokens; adds into
    y [T, out]."""
    for start, end, slot in segments:
        r = ranks[slot]
        xs = x[start:end]                                           # [n, in]
        h = (xs @ a[:r, slot - 1].reshape(-1, xs.shape[1]).T).view(end - start, r, -1)  # [n,r,sub]
        offset = 0
        for j, b in enumerate(bs):
            out = b.shape[-1]
            y[start:end, offset:offset + out].addmm_(h[:, :, j], b[:r, slot - 1])
            offset += out
    return y


def reference_delta(x: torch.Tensor, token_slots: list[int],
                    adapters: dict[int, list[tuple[torch.Tensor, torch.Tensor]]]) -> torch.Tensor:
    """Per-token loop over unpadded, scaled weights: the meaning the fast paths must keep.

    adapters[slot][sub] = (A [r, in], B [out, r]); a sub-module the adapter leaves alone is
    A [0, in], B [out, 0]. -> delta [T, sum(out)].
    """
    rows = [torch.cat([b @ (a @ x[t]) for a, b in adapters[slot]])
            for t, slot in enumerate(token_slots)]
    return torch.stack(rows)
