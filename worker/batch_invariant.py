"""--batch-invariant: steps whose every row is computed the same way whatever else is in the batch.

A greedy request then gives the same tokens alone, in any batch, chunked or not (on one machine,
dtype and thread count). What varies with the batch in the default steps, and the fix here
(docs/batch_invariance.md has the measurements):

- Matmuls. A BLAS picks its kernel by shape: on the CPU we measured (oneDNN bf16, MKL fp32) a
  row's result depends on M, the number of rows, below a few rows (bf16: M = 1 runs a GEMV that
  sums K = 1536 in another order; fp32: M <= 3), and not above. RowTiling pads every matmul to
  at least `min_rows` rows, or cuts it into fixed tiles where even that is not enough; which of
  the two is measured at start on the model's own shapes (calibrate).
- Attention. Prompt chunks ran SDPA over rows padded to the longest chunk of the step, whose
  blocking depends on that padding. Here every query token, prompt tokens included, attends as a
  decode row of its own (context = its position + 1) through the paged decode kernel, which
  computes each row alone; without the kernel, through gathered_attention.
- LoRA. The path (pool, used, segments) was picked by the batch; the C++ kernel computes each
  token alone, and where there is none the segments path runs on RowTiling (worker.lora).
- Norms, RoPE, activations, the residual adds and greedy sampling work row by row already
  (measured; tests/integration/test_batch_invariance.py would catch one that did not).
Not covered: the log-likelihoods of scoring requests (worker.scoring), and --int8-small-steps
(it changes the weights by step size; the config refuses the pair).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property, partial
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from worker.kernels.paged_attention import table_slots
from worker.model import AttentionGroup, LlamaModel

if TYPE_CHECKING:  # worker.lora imports this module, worker.scheduler worker.lora
    from worker.lora import LoraSlots
    from worker.scheduler import ScheduledSeq

log = logging.getLogger(__name__)
RowFn = Callable[[torch.Tensor], torch.Tensor]
# Smallest GEMM heights tried, cheapest first: padding a decode row to 2 costs nothing in bf16.
MIN_ROWS_CANDIDATES = (1, 2, 4, 8)
# ... but in 16-bit dtypes never 1: a BLAS runs M = 1 as a GEMV that sums in another order, and
# once rounded to 16 bits that shows only where a sum lies near a rounding tie. On a 64-wide
# matmul (Intel Xeon, AMX) 59 of 2M outputs differed: the probes' few hundred rows passed M = 1,
# and a greedy token's logits then differed inside a batch (tests/integration/
# test_batch_invariance.py). fp32 keeps every bit of the sum, so there a probe sees the order.
FULL_PRECISION = (torch.float32, torch.float64)
# Where no minimum height makes rows independent of M: fixed tiles of this many rows.
STRICT_TILE_ROWS = 16
# Probed heights reach at least these (projections, output head) whatever the limits of this
# worker, so that workers with other limits pick the same tiling, hence give the same tokens.
MIN_PROBED_TOKENS, MIN_PROBED_ROWS = 512, 64
# gathered_attention's rows per pass: bounds its [rows, heads, L, head_dim] product.
ATTENTION_ROWS_PER_PASS = 8


@dataclass(frozen=True)
class RowTiling:
    """How a batch-invariant matmul feeds its rows to the BLAS.

    min_rows: fewer rows are zero-padded up to this many. tile_rows: None = every other height in
    one call (calibrate found the rows' results independent of it); else calls of exactly this
    many rows, the last one zero-padded."""

    min_rows: int = 1
    tile_rows: int | None = None
    # with tile_rows: the rows padded to a multiple of it and multiplied in one call, where the
    # BLAS gives every row the same bits at every such height (calibrate): no per-tile calls
    one_call: bool = False

    def apply(self, fn: RowFn, x: torch.Tensor) -> torch.Tensor:
        """fn(x) for a row-wise fn (a projection): x [M, in] -> [M, out]."""
        num_rows = x.shape[0]
        if self.tile_rows is None and num_rows >= self.min_rows:
            return fn(x)
        tile = self.tile_rows or self.min_rows
        padded = -(-max(num_rows, 1) // tile) * tile
        if padded != num_rows:
            x = torch.cat([x, x.new_zeros(padded - num_rows, *x.shape[1:])])
        if padded == tile or self.one_call:
            return fn(x)[:num_rows]
        return torch.cat([fn(part) for part in x.split(tile)])[:num_rows]


@dataclass
class Probe:
    """A row-wise matmul that steps run, with the most rows they give it."""

    fn: RowFn
    in_features: int
    max_rows: int


def probe_heights(max_rows: int) -> list[int]:
    """Every small M, then each power of two and its neighbours, then max_rows itself: where
    BLAS libraries switch kernels."""
    heights = set(range(1, 18)) | {max_rows}
    heights |= {p + d for p in (2 ** k for k in range(5, 16)) for d in (-1, 0, 1)}
    return sorted(m for m in heights if m <= max_rows)


def agrees(tiling: RowTiling, probe: Probe, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether every probed height, at two alignments, gives each row bitwise what fixed tiles of
    tiling.min_rows rows give it (a reference that does not depend on the batch)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(probe.max_rows + 3, probe.in_features, generator=gen).to(device, dtype)
    reference = RowTiling(tiling.min_rows, tiling.min_rows).apply(probe.fn, x)
    return all(torch.equal(tiling.apply(probe.fn, x[start:start + m]),
                           reference[start:start + m])
               for m in probe_heights(probe.max_rows) for start in (0, 3))


@torch.inference_mode()
def calibrate(probes: Sequence[Probe], device: torch.device, dtype: torch.dtype) -> RowTiling:
    """The cheapest RowTiling under which every probe's rows are independent of the batch.

    Run it on the thread that steps the engine: a BLAS may split work by its thread count."""
    for min_rows in MIN_ROWS_CANDIDATES:
        if min_rows == 1 and dtype not in FULL_PRECISION:
            continue
        tiling = RowTiling(min_rows)
        if all(agrees(tiling, p, device, dtype) for p in probes):
            return tiling
    # Heights that are multiples of a tile often agree where others do not (a BLAS blocks M):
    # then one padded call per matmul, instead of one call per tile (prefill chunks: 32 calls
    # of 16 rows for 512 tokens, each reading the whole weight).
    padded = RowTiling(STRICT_TILE_ROWS, STRICT_TILE_ROWS, one_call=True)
    if all(agrees(padded, p, device, dtype) for p in probes):
        return padded
    strict = RowTiling(STRICT_TILE_ROWS, STRICT_TILE_ROWS)
    if not all(agrees(strict, p, device, dtype) for p in probes):
        log.error("batch invariance: even fixed tiles of %d rows give a row different results "
                  "by its position in the tile on this BLAS; steps stay batch-dependent",
                  STRICT_TILE_ROWS)
    return strict


def gathered_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       block_tables: torch.Tensor, ctx_lens: torch.Tensor, scale: float,
                       block_size: int) -> torch.Tensor:
    """The paged decode attention (a DecodeAttention) in torch, each row computed alone.

    Every row is padded to L = block_tables.shape[1] * block_size positions; the runner groups
    rows by the blocks their own context spans (BatchInvariance.attention_groups), so L is a
    function of the row's length. Elementwise products and reductions along one row (SDPA's
    blocking, and in fp32 its result, changed with the number of rows). -> [rows, nh, hd]."""
    rows, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    slots = table_slots(block_tables, block_size)                      # [rows, L]
    length = slots.shape[1]
    masked = torch.arange(length, device=q.device)[None, :] >= ctx_lens[:, None]  # [rows, L]
    out = torch.empty_like(q)
    for start in range(0, rows, ATTENTION_ROWS_PER_PASS):
        part = slice(start, start + ATTENTION_ROWS_PER_PASS)
        n = slots[part].shape[0]
        flat = slots[part].reshape(-1)
        # [n, kvh, 1, L, hd]; queries [n, kvh, g, 1, hd]: the g heads sharing a KV head
        k = k_cache.index_select(0, flat).view(n, length, num_kv_heads, head_dim)
        v = v_cache.index_select(0, flat).view(n, length, num_kv_heads, head_dim)
        k = k.float().transpose(1, 2)[:, :, None]
        v = v.float().transpose(1, 2)[:, :, None]
        qf = q[part].float().view(n, num_kv_heads, -1, 1, head_dim) * scale
        scores = (qf * k).sum(-1)                                       # [n, kvh, g, L]
        scores.masked_fill_(masked[part, None, None, :], float("-inf"))
        probs = scores.softmax(dim=-1)
        o = (probs[..., None] * v).sum(-2)                              # [n, kvh, g, hd]
        out[part] = o.reshape(n, num_heads, head_dim).to(q.dtype)
    return out


def tiled_segment_delta(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor,
                        bs: list[torch.Tensor], segments: list[tuple[int, int, int]],
                        tiling: RowTiling) -> torch.Tensor:
    """worker.lora.segment_delta on RowTiling, at the slots' full max_rank (smaller ranks are
    zero-padded there, which adds exact zeros): its matmuls then have the shapes lora_probes
    checked, whatever the adapter. Adds into y [T, out]; a [R, S, sub, in], bs[j] [R, S, out_j]."""
    for start, end, slot in segments:
        weight = a[:, slot - 1].reshape(-1, x.shape[1])                          # [R * sub, in]
        h = tiling.apply(partial(F.linear, weight=weight), x[start:end])         # [n, R * sub]
        h = h.view(end - start, a.shape[0], -1)                                  # [n, R, sub]
        offset = 0
        for j, b in enumerate(bs):
            out = b.shape[-1]
            delta = tiling.apply(partial(torch.matmul, other=b[:, slot - 1]),
                                 h[:, :, j].contiguous())                        # [n, out_j]
            y[start:end, offset:offset + out] += delta
            offset += out
    return y


def lora_probes(slots: LoraSlots, max_num_tokens: int) -> list[Probe]:
    """tiled_segment_delta's matmuls, one per shape, on random weights laid out as the slots'."""
    gen = torch.Generator().manual_seed(0)
    probes: dict[tuple[int, ...], Probe] = {}
    for a, bs in slots.layers[0].values():
        rank, fan_in = a.shape[0], a.shape[-1]
        weight = torch.randn(a.shape, generator=gen).to(a)[:, 0].reshape(-1, fan_in)
        probes.setdefault(tuple(weight.shape), Probe(partial(F.linear, weight=weight), fan_in,
                                                     max_num_tokens))
        for b in bs:
            b_slot = torch.randn(b.shape, generator=gen).to(b)[:, 0]            # [R, out]
            probes.setdefault((rank, -b.shape[-1]), Probe(partial(torch.matmul, other=b_slot),
                                                          rank, max_num_tokens))
    return list(probes.values())


class BatchInvariance:
    """What ModelRunner needs for batch-invariant steps: the matmul tiling (calibrated on first
    use, on the thread that steps), the attention groups, and the logits."""

    def __init__(self, model: LlamaModel, max_num_tokens: int, max_num_rows: int,
                 lora_probes: Sequence[Probe] = ()) -> None:
        self.model = model
        self.max_num_tokens = max(max_num_tokens, MIN_PROBED_TOKENS)
        self.max_num_rows = max(max_num_rows, MIN_PROBED_ROWS)
        self.lora_probes = list(lora_probes)

    @classmethod
    def for_engine(cls, model: LlamaModel, lora_slots: LoraSlots | None, max_num_tokens: int,
                   max_num_rows: int) -> BatchInvariance:
        """lora_slots' matmuls are probed where steps take the TILED path (LoraBatch.build)."""
        torch_lora = lora_slots is not None and (lora_slots.kernel is None
                                                 or model.norm.weight.device.type != "cpu")
        return cls(model, max_num_tokens, max_num_rows,
                   lora_probes(lora_slots, max(max_num_tokens, MIN_PROBED_TOKENS))
                   if torch_lora else ())

    def probes(self) -> list[Probe]:
        """Layer 0's projections (every layer has their shapes), the LoRA matmuls of torch's
        path if steps take it, and the output head (over sampled rows only), last: it is the
        dearest."""
        layer, cfg, tokens = self.model.layers[0], self.model.config, self.max_num_tokens
        attn, mlp = layer.self_attn, layer.mlp
        hidden = cfg.hidden_size
        probes = [Probe(attn.qkv_proj, hidden, tokens),
                  Probe(attn.o_proj, cfg.num_heads * cfg.head_dim, tokens),
                  Probe(mlp.gate_up_proj, hidden, tokens),
                  Probe(mlp.down_proj, cfg.intermediate_size, tokens)]
        return [*probes, *self.lora_probes,
                Probe(self.model.compute_logits, hidden, self.max_num_rows)]

    @cached_property
    def tiling(self) -> RowTiling:
        norm = self.model.norm.weight  # the activations' device and dtype (never quantized)
        tiling = calibrate(self.probes(), norm.device, norm.dtype)
        log.info("batch-invariant matmuls: %s", f"at least {tiling.min_rows} rows"
                 if tiling.tile_rows is None else f"fixed tiles of {tiling.tile_rows} rows")
        return tiling

    def warm_up(self) -> None:
        """Measures the tiling now rather than in the first step that needs it."""
        log.debug("batch invariance ready: %s", self.tiling)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """model.compute_logits on the tiling: hidden [rows, hidden] -> [rows, vocab] fp32."""
        return self.tiling.apply(self.model.compute_logits, hidden)

    @staticmethod
    def attention_groups(items: list[ScheduledSeq], offsets: list[int], block_size: int,
                         device: torch.device, paged: bool) -> list[AttentionGroup]:
        """Every query token of the step as a decode row: context = its position + 1.

        paged: one group for the paged kernel, which reads each row's own length. Otherwise
        (gathered_attention) a group per number of blocks spanned, its tables cut to it."""
        token_idx, ctx_lens, item_of_token = [], [], []
        for i, (it, offset) in enumerate(zip(items, offsets, strict=True)):
            start = it.seq.num_computed_tokens
            token_idx.extend(range(offset, offset + it.num_new_tokens))
            ctx_lens.extend(range(start + 1, start + it.num_new_tokens + 1))
            item_of_token.extend([i] * it.num_new_tokens)
        max_blocks = max(len(it.seq.block_table) for it in items)
        tables = torch.tensor([it.seq.block_table + [0] * (max_blocks - len(it.seq.block_table))
                               for it in items], dtype=torch.long, device=device)
        if paged:
            rows_by_blocks = {max_blocks: list(range(len(token_idx)))}
        else:
            rows_by_blocks = {}
            for row, n in enumerate(ctx_lens):
                rows_by_blocks.setdefault(-(-n // block_size), []).append(row)

        def as_tensor(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long, device=device)

        groups = []
        for num_blocks, rows in rows_by_blocks.items():
            idx = as_tensor([token_idx[r] for r in rows])
            block_tables = tables.index_select(0, as_tensor([item_of_token[r] for r in rows]))
            groups.append(AttentionGroup(idx[:, None], idx, idx,
                                         block_tables=block_tables[:, :num_blocks],
                                         ctx_lens=as_tensor([ctx_lens[r] for r in rows])))
        return groups
