"""Batched multi-LoRA: the device slot pool, per-step LoRA metadata and the delta ops.

For a fused projection y = x·Wᵀ, each token t adds Σ_sub (x_t·A_{s,sub}ᵀ)·B_{s,sub}ᵀ of its slot s
(B is pre-scaled by lora_alpha / r). Slot 0 is all zeros: rows without an adapter. Two fast paths
and a reference: gather (BGMV-style, one batched matmul for every token, for decode steps with many
adapters) and segments (one matmul pair per run of same-adapter tokens, for prompt chunks).
Never decides which adapter goes to which slot (adapter_memory does).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from worker.model import ModelConfig

# Our fused projections and the PEFT modules each is made of, in output order.
PROJECTIONS: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "o_proj": ("o_proj",),
    "gate_up_proj": ("gate_proj", "up_proj"),
    "down_proj": ("down_proj",),
}
# Segment matmuls beat the gather once runs average this many tokens (prompt chunks).
MIN_TOKENS_PER_SEGMENT = 4


def module_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """PEFT module -> (in_features, out_features) of the base projection."""
    h, q, kv, i = (cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim,
                   cfg.intermediate_size)
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


class LoraSlots:
    """Device tensors for `num_slots` adapters of rank <= max_rank, allocated once at start.

    Per layer and fused projection: A [num_slots + 1, num_sub, max_rank, in] and, per sub-module,
    B [num_slots + 1, out_sub, max_rank]. Smaller ranks are zero-padded, which adds exact zeros.
    """

    def __init__(self, cfg: ModelConfig, num_slots: int, max_rank: int, device: torch.device,
                 dtype: torch.dtype) -> None:
        self.num_slots, self.max_rank = num_slots, max_rank
        self.ranks = [0] * (num_slots + 1)  # host copy: rank of the adapter in each slot
        shapes = module_shapes(cfg)
        self.layers: list[dict[str, tuple[torch.Tensor, list[torch.Tensor]]]] = []
        for _ in range(cfg.num_layers):
            layer = {}
            for proj, subs in PROJECTIONS.items():
                fan_in = shapes[subs[0]][0]
                a = torch.zeros(num_slots + 1, len(subs), max_rank, fan_in, device=device,
                                dtype=dtype)
                bs = [torch.zeros(num_slots + 1, shapes[s][1], max_rank, device=device,
                                  dtype=dtype) for s in subs]
                layer[proj] = (a, bs)
            self.layers.append(layer)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + sum(b.nbytes for b in bs)
                   for layer in self.layers for a, bs in layer.values())

    def write(self, slot: int, weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]],
              rank: int) -> None:
        """Copies one adapter (host tensors from read_adapter_weights) into `slot`."""
        assert 1 <= slot <= self.num_slots and rank <= self.max_rank
        for i, layer in enumerate(self.layers):
            for proj, subs in PROJECTIONS.items():
                a, bs = layer[proj]
                a[slot].zero_()
                for j, sub in enumerate(subs):
                    bs[j][slot].zero_()
                    pair = weights.get((i, sub))
                    if pair is not None:
                        # non_blocking: host tensors are pinned on CUDA, so copies overlap compute
                        a[slot, j, :rank].copy_(pair[0], non_blocking=True)
                        bs[j][slot, :, :rank].copy_(pair[1], non_blocking=True)
        self.ranks[slot] = rank


@dataclass
class LoraBatch:
    """One step's LoRA metadata: which slot each flat token uses."""

    slots: LoraSlots
    token_slots: torch.Tensor  # [T] slot per token (0 = no adapter)
    rank: int                  # max rank of the slots in this step
    segments: list[tuple[int, int, int]]  # (start, end, slot) runs of adapter tokens
    use_segments: bool

    @classmethod
    def build(cls, slots: LoraSlots, row_slots: list[int], row_lengths: list[int],
              device: torch.device) -> LoraBatch | None:
        """None when no row uses an adapter: the step then skips LoRA entirely."""
        if not any(row_slots):
            return None
        segments: list[tuple[int, int, int]] = []
        start = 0
        for slot, n in zip(row_slots, row_lengths, strict=True):
            if slot and segments and segments[-1][2] == slot and segments[-1][1] == start:
                segments[-1] = (segments[-1][0], start + n, slot)
            elif slot:
                segments.append((start, start + n, slot))
            start += n
        token_slots = torch.tensor([s for s, n in zip(row_slots, row_lengths, strict=True)
                                    for _ in range(n)], dtype=torch.long, device=device)
        num_adapter_tokens = sum(e - s for s, e, _ in segments)
        use_segments = num_adapter_tokens >= MIN_TOKENS_PER_SEGMENT * len(segments)
        rank = max(slots.ranks[s] for s in row_slots)
        return cls(slots, token_slots, rank, segments, use_segments)

    def apply(self, layer: int, proj: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y [T, out] of the base projection + each token's LoRA delta; x [T, in]."""
        a, bs = self.slots.layers[layer][proj]
        if self.use_segments:
            return segment_delta(x, y, a, bs, self.segments, self.slots.ranks)
        return y + gather_delta(x, self.token_slots, a, bs, self.rank)


def gather_delta(x: torch.Tensor, token_slots: torch.Tensor, a: torch.Tensor,
                 bs: list[torch.Tensor], rank: int) -> torch.Tensor:
    """BGMV-style: gathers every token's A and B, two batched matmuls; -> delta [T, out]."""
    num_tokens, num_sub = x.shape[0], a.shape[1]
    a_t = a[token_slots, :, :rank].reshape(num_tokens, num_sub * rank, -1)  # [T, sub * r, in]
    h = torch.bmm(a_t, x.unsqueeze(-1)).view(num_tokens, num_sub, rank, 1)  # [T, sub, r, 1]
    outs = [torch.bmm(b[token_slots, :, :rank], h[:, j]) for j, b in enumerate(bs)]  # [T, out_j, 1]
    return torch.cat(outs, dim=1).squeeze(-1)


def segment_delta(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, bs: list[torch.Tensor],
                  segments: list[tuple[int, int, int]], ranks: list[int]) -> torch.Tensor:
    """One matmul pair per run of same-adapter tokens; adds into a copy of y [T, out]."""
    y = y.clone()
    for start, end, slot in segments:
        r = ranks[slot]
        xs = x[start:end]                                           # [n, in]
        h = xs @ a[slot, :, :r].reshape(-1, xs.shape[1]).T          # [n, sub * r]
        delta = torch.cat([h[:, j * r:(j + 1) * r] @ b[slot, :, :r].T for j, b in enumerate(bs)],
                          dim=1)                                    # [n, out]
        y[start:end] += delta
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
