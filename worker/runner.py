"""Turns a scheduled Batch into tensors, runs the model and the sampler, returns the step's results
(a StepResult: one token per row, and the logprobs and log-likelihoods of the rows that have them).

With worker.decode_graphs (the steps it replays), the only place that moves batch data between
host and device; one host sync per step (two in steps that also score references).
"""

from __future__ import annotations

from itertools import accumulate

import torch

from worker.batch_invariant import BatchInvariance, gathered_attention
from worker.decode_graphs import DecodeGraphs
from worker.json_constraint import TokenMasks
from worker.kernels.int8_weights import SMALL_STEP_TOKENS, Int8Weights
from worker.kernels.paged_attention import DecodeAttention, table_slots
from worker.kv_cache import KVCache
from worker.logprobs import StepLogprobs
from worker.lora import LoraBatch, LoraSlots
from worker.model import AttentionGroup, ForwardBatch, LlamaModel
from worker.penalties import PenaltyState
from worker.sampler import make_sampling_tensors, sample
from worker.scheduler import Batch, ScheduledSeq, StepResult
from worker.scoring import row_log_likelihoods, scored_positions

# Token reported for scoring rows: they sample nothing, and postprocess never reads it.
NO_TOKEN = -1
# Fixed cost of one more attention group (its gathers, SDPA and scatter in every layer), in
# padded context tokens of one row: split decode rows only where that saves more padding.
GROUP_COST_TOKENS = 256


def _attention_group(items: list[ScheduledSeq], offsets: list[int], block_size: int,
                     device: torch.device, paged_decode: bool = False) -> AttentionGroup:
    """Pads the rows of `items` to one query length and one context length.

    paged_decode: decode rows for the paged kernel, which reads block tables and lengths."""
    q_len = max(it.num_new_tokens for it in items)
    max_blocks = max(len(it.seq.block_table) for it in items)
    token_idx, query_pos, tables, src, dst = [], [], [], [], []
    for row, (it, offset) in enumerate(zip(items, offsets, strict=True)):
        start, n = it.seq.num_computed_tokens, it.num_new_tokens
        # Padding queries repeat the row's first token at position 0: finite, then dropped.
        token_idx.append([offset + q for q in range(n)] + [offset] * (q_len - n))
        query_pos.append(list(range(start, start + n)) + [0] * (q_len - n))
        tables.append(it.seq.block_table + [0] * (max_blocks - len(it.seq.block_table)))
        src.extend(row * q_len + q for q in range(n))
        dst.extend(offset + q for q in range(n))
    ctx_len = max(it.seq.num_computed_tokens + it.num_new_tokens for it in items)

    def as_tensor(values: list) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=device)

    block_tables = as_tensor(tables)                                  # [rows, max_blocks]
    if paged_decode:
        ctx_lens = as_tensor([it.seq.num_computed_tokens + 1 for it in items])
        return AttentionGroup(as_tensor(token_idx), as_tensor(src), as_tensor(dst),
                              block_tables=block_tables, ctx_lens=ctx_lens)
    kv_slots = table_slots(block_tables, block_size, ctx_len)         # [rows, Lk]
    positions = torch.arange(ctx_len, device=device)                  # [Lk]
    qpos = as_tensor(query_pos)                                       # [rows, Lq]
    mask = (positions[None, None, :] <= qpos[:, :, None])[:, None]    # [rows, 1, Lq, Lk]
    return AttentionGroup(as_tensor(token_idx), as_tensor(src), as_tensor(dst), kv_slots, mask)


def split_by_context(rows: list[int], items: list[ScheduledSeq]) -> list[list[int]]:
    """Decode rows cut into groups of similar context length, fewest padded tokens first.

    A group pads every row's KV gather and attention to its longest context; each group also
    costs a fixed GROUP_COST_TOKENS. Optimal over the rows sorted by length (n <= max batch).
    """
    rows = sorted(rows, key=lambda i: items[i].seq.num_computed_tokens)
    lengths = [items[i].seq.num_computed_tokens + 1 for i in rows]
    best, cut = [0] + [0] * len(rows), [0] * (len(rows) + 1)
    for end in range(1, len(rows) + 1):
        # rows[start:end] as the last group costs (end - start) * lengths[end - 1]
        best[end], cut[end] = min((best[start] + (end - start) * lengths[end - 1]
                                   + GROUP_COST_TOKENS, start) for start in range(end))
    groups, end = [], len(rows)
    while end:
        groups.append(rows[cut[end]:end])
        end = cut[end]
    return groups[::-1]


class ModelRunner:
    def __init__(self, model: LlamaModel, kv_cache: KVCache, block_size: int,
                 device: torch.device, lora_slots: LoraSlots | None = None,
                 decode_attention: DecodeAttention | None = None,
                 invariance: BatchInvariance | None = None) -> None:
        self.model = model
        # --batch-invariant: every row of a step computed as if alone (worker.batch_invariant)
        self.invariance = invariance
        self.decode_attention = decode_attention
        self.kv_cache = kv_cache
        self.lora_slots = lora_slots
        self.block_size = block_size
        self.device = device
        # Captured decode steps (worker.decode_graphs), for the steps they cover, and int8
        # weight copies for the smallest steps (worker.kernels.int8_weights); set once built.
        self.graphs: DecodeGraphs | None = None
        self.int8: Int8Weights | None = None
        # Device state of the generation controls, made when a request first uses them.
        self.penalty_state: PenaltyState | None = None
        self.masks: TokenMasks | None = None

    def prepare(self, batch: Batch) -> tuple[torch.Tensor, ForwardBatch, torch.Tensor]:
        """-> input_ids [T], the ForwardBatch, and each row's last-token index [rows]."""
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        offsets: list[int] = []
        bs = self.block_size
        for it in batch.items:
            seq, start, n = it.seq, it.seq.num_computed_tokens, it.num_new_tokens
            offsets.append(len(input_ids))
            input_ids.extend(seq.token_ids[start:start + n])
            positions.extend(range(start, start + n))
            table = seq.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, start + n))
        last_idx = [off + it.num_new_tokens - 1
                    for off, it in zip(offsets, batch.items, strict=True)]
        if self.invariance is not None:  # every token attends as a decode row of its own
            groups = self.invariance.attention_groups(batch.items, offsets, bs, self.device,
                                                      paged=self.decode_attention is not None)
        else:
            groups = self._attention_groups(batch.items, offsets)
        tiling = None if self.invariance is None else self.invariance.tiling
        decode_attention = self.decode_attention or (gathered_attention if tiling is not None
                                                     else None)

        def as_tensor(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long, device=self.device)

        lora = None if self.lora_slots is None else LoraBatch.build(
            self.lora_slots, [it.seq.slot for it in batch.items],
            [it.num_new_tokens for it in batch.items], self.device, tiling)
        fb = ForwardBatch(positions=as_tensor(positions), slot_mapping=as_tensor(slots),
                          groups=groups, lora=lora, decode_attention=decode_attention,
                          block_size=bs, tiling=tiling)
        return as_tensor(input_ids), fb, as_tensor(last_idx)

    def _attention_groups(self, items: list[ScheduledSeq],
                          offsets: list[int]) -> list[AttentionGroup]:
        """The default steps' groups. Decode rows (one query) and prompt chunks attend apart so
        that a long chunk never pads every decode row to its length. The paged kernel reads each
        decode row's own length; torch's path splits decode rows further by length."""
        decode = [i for i, it in enumerate(items) if it.num_new_tokens == 1]
        prompt = [i for i, it in enumerate(items) if it.num_new_tokens > 1]

        def group(rows: list[int], paged_decode: bool = False) -> AttentionGroup:
            return _attention_group([items[i] for i in rows], [offsets[i] for i in rows],
                                    self.block_size, self.device, paged_decode)

        if self.decode_attention is not None:
            groups = [group(decode, paged_decode=True)] if decode else []
        else:
            groups = [group(rows) for rows in split_by_context(decode, items)]
        if prompt:
            groups.append(group(prompt))
        return groups

    @torch.inference_mode()
    def run(self, batch: Batch) -> StepResult:
        """One forward step of `batch` -> its results; row i of them is batch.items[i] after
        the sort below, which reorders batch.items in place."""
        # Decode rows first, then prompt chunks (LoraBatch gives each part its own path); within
        # each, rows of one adapter side by side form one segment for the LoRA matmuls.
        batch.items.sort(key=lambda it: (it.num_new_tokens > 1, it.seq.slot))
        if self.graphs is not None and self.graphs.covers(batch.items):
            return self._sample(batch.items, self.graphs.run(batch.items))
        input_ids, fb, last_idx = self.prepare(batch)
        scoring = any(it.seq.is_scoring for it in batch.items)
        int8 = self.int8 if not scoring and input_ids.numel() <= SMALL_STEP_TOKENS else None
        fb.weights = int8
        hidden = self.model(input_ids, fb, self.kv_cache.layers)       # [T, hidden]
        if scoring:
            return self._score_and_sample(batch.items, hidden, last_idx)
        last = hidden.index_select(0, last_idx)
        return self._sample(batch.items, self._logits(last) if int8 is None
                            else int8.logits(last))

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[rows, hidden] -> [rows, vocab] fp32, batch-invariant under --batch-invariant."""
        if self.invariance is not None:
            return self.invariance.logits(hidden)
        return self.model.compute_logits(hidden)

    def _sample(self, items: list[ScheduledSeq], logits: torch.Tensor) -> StepResult:
        """logits [rows, vocab] of `items` -> one sampled token per row (and, for the rows that
        asked, its logprobs). JSON masks, then logprobs, then penalties and sampling, as vLLM
        orders them; each extra costs nothing in a step where no row uses it."""
        seqs = [it.seq for it in items]
        opts = [seq.options for seq in seqs]
        tensors = make_sampling_tensors(
            temperature=[o.temperature for o in opts], top_p=[o.top_p for o in opts],
            top_k=[o.top_k for o in opts], seed=[o.seed for o in opts],
            step=[seq.num_output_tokens for seq in seqs], device=self.device)
        constrained = [i for i, seq in enumerate(seqs) if seq.constraint is not None]
        if constrained:
            self.masks = self.masks or TokenMasks(logits.shape[-1], self.device)
            self.masks.apply(logits, constrained, [seqs[i].constraint for i in constrained])
        wanted = [i for i, o in enumerate(opts) if o.logprobs]
        logprobs = (StepLogprobs(logits, wanted, [opts[i].top_logprobs for i in wanted])
                    if wanted else None)
        penalized = [i for i, o in enumerate(opts) if o.has_penalties]
        if penalized:
            state = self.penalty_state or PenaltyState(logits.shape[-1], self.device)
            self.penalty_state = state
            tensors.penalties = state.gather(penalized, [seqs[i] for i in penalized])
        tokens = sample(logits, tensors)
        if logprobs is None:
            return StepResult(tokens.tolist())  # the step's one host sync
        host_tokens, rows = logprobs.fetch(tokens)  # the same one sync, logprobs included
        return StepResult(host_tokens, dict(zip(wanted, rows, strict=True)))

    def _score_and_sample(self, items: list[ScheduledSeq], hidden: torch.Tensor,
                          last_idx: torch.Tensor) -> StepResult:
        """Scoring rows get their chunk's log-likelihood and NO_TOKEN; the other rows are
        sampled as usual, from the same forward."""
        offsets = list(accumulate((it.num_new_tokens for it in items[:-1]), initial=0))
        hidden_idx, targets, rows = scored_positions(items, offsets)
        sums = row_log_likelihoods(self.model, hidden, hidden_idx, targets, rows, len(items))
        result = StepResult([NO_TOKEN] * len(items), log_likelihoods={
            i: total for i, (it, total) in enumerate(zip(items, sums, strict=True))
            if it.seq.is_scoring})
        generating = [i for i, it in enumerate(items) if not it.seq.is_scoring]
        if generating:
            last = last_idx.index_select(0, torch.tensor(generating, device=self.device))
            sampled = self._sample([items[i] for i in generating],
                                   self._logits(hidden.index_select(0, last)))
            # the sampled rows' indices are into `generating`: back to the step's rows
            for i, token in zip(generating, sampled.tokens, strict=True):
                result.tokens[i] = token
            result.logprobs = {generating[j]: row for j, row in sampled.logprobs.items()}
        return result
