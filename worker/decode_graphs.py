"""Decode steps replayed from CUDA graphs: one launch replays a whole step's kernels.

A decode step launches a few hundred small kernels (about 25 per layer). On a GPU each launch from
Python costs several microseconds of host time, which at small batches can exceed the kernel's own
run time. A CUDA graph records the launches once and replays them with one call, but it fixes every
shape, pointer and launch argument. So a step of decode rows is padded to the next batch-size
bucket and reads everything that changes from step to step out of static device buffers, filled by
one host-to-device copy: tokens, positions, the KV slot each row writes, context lengths, block
tables and the LoRA segment table. Padded rows write their K and V to a scratch KV block that no
sequence owns, attend to it alone, and carry no adapter; their logits are dropped.

Prompt chunks, scoring rows, and batches past the largest bucket take the runner's eager path.
Without CUDA (the tests) the same static step runs eagerly: capture is the only CUDA-only part.
"""

from __future__ import annotations

import logging

import torch

from worker.kernels.paged_attention import DecodeAttention
from worker.kernels.self_check import agrees
from worker.kv_cache import KVCache
from worker.lora import KernelDelta, LoraSlots, kernel_segments, segment_runs
from worker.model import AttentionGroup, ForwardBatch, LlamaModel
from worker.scheduler import ScheduledSeq
from worker.sequence import SamplingOptions, Sequence

log = logging.getLogger(__name__)
# Padding a step to the next bucket wastes at most a third of its rows past 8.
BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)
# Per row of the static buffers: token, position, KV slot written, context length, and the
# LoRA segment (start, end, storage index, rank); then the block table.
FIELDS = ("input_ids", "positions", "slot_mapping", "ctx_lens")
SEGMENT_COLUMNS = 4
# A replay runs the kernels an eager step runs, on the same inputs: anything past rounding noise
# (cuBLAS may pick other algorithms under capture) means a value was fixed at capture that should
# not have been, which puts whole rows off by the logits' scale. Relative to that scale:
REPLAY_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 3e-2, torch.float16: 1e-2}


def buckets_up_to(max_batch: int) -> list[int]:
    return [b for b in BUCKETS if b < max_batch] + [max_batch]


class DecodeGraphs:
    """Static buffers for `max_batch` decode rows and one step per bucket over them.

    capture=True (CUDA) records each bucket's step as a CUDA graph; otherwise steps run eagerly
    on the same buffers."""

    def __init__(self, model: LlamaModel, kv_cache: KVCache, block_size: int, max_blocks: int,
                 scratch_block: int, max_batch: int, decode_attention: DecodeAttention,
                 lora_slots: LoraSlots | None, capture: bool) -> None:
        if lora_slots is not None and lora_slots.kernel is None:
            raise ValueError("captured steps need the LoRA kernel (torch's paths sync the host)")
        device = model.embed_tokens.weight.device
        self.model, self.kv_cache, self.lora_slots = model, kv_cache, lora_slots
        self.block_size, self.max_blocks, self.max_batch = block_size, max_blocks, max_batch
        self.decode_attention = decode_attention
        self.scratch_block = scratch_block
        self.buckets = buckets_up_to(max_batch)
        # One flat int64 buffer, each field a contiguous region of it: one copy per step.
        widths = {**dict.fromkeys(FIELDS, 1), "segments": SEGMENT_COLUMNS,
                  "block_tables": max_blocks}
        size = max_batch * sum(widths.values())
        self.staging = torch.zeros(size, dtype=torch.long, pin_memory=device.type == "cuda")
        self.buffer = torch.zeros(size, dtype=torch.long, device=device)
        self.host = self._regions(self.staging, widths)
        self.static = self._regions(self.buffer, widths)
        self.rows = torch.arange(max_batch, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        if capture:
            self._capture()

    def _regions(self, flat: torch.Tensor, widths: dict[str, int]) -> dict[str, torch.Tensor]:
        parts = flat.split([self.max_batch * w for w in widths.values()])
        return {name: part.view(self.max_batch, -1) if w > 1 else part
                for (name, w), part in zip(widths.items(), parts, strict=True)}

    def bucket(self, num_rows: int) -> int:
        return next(b for b in self.buckets if b >= num_rows)

    def covers(self, items: list[ScheduledSeq]) -> bool:
        """Whether this step can replay: decode rows only, no scoring, few enough rows."""
        return (0 < len(items) <= self.max_batch
                and all(it.num_new_tokens == 1 and not it.seq.is_scoring
                        and len(it.seq.block_table) <= self.max_blocks for it in items))

    def run(self, items: list[ScheduledSeq]) -> torch.Tensor:
        """Logits [rows, vocab] (float32) of a step of decode rows (`covers(items)`), whose KV
        blocks are allocated; rows of one adapter must be adjacent (the runner sorts them)."""
        n = len(items)
        bucket = self.bucket(n)
        self._fill(items, bucket)
        self.buffer.copy_(self.staging, non_blocking=True)
        graph = self.graphs.get(bucket)
        if graph is None:
            return self.forward(bucket)[:n]
        graph.replay()
        return self.logits[bucket][:n]

    def _fill(self, items: list[ScheduledSeq], bucket: int) -> None:
        """Writes the step's rows, then padding up to `bucket`, into the staging buffer."""
        n, bs, host = len(items), self.block_size, self.host
        positions = [it.seq.num_computed_tokens for it in items]
        tables = [it.seq.block_table for it in items]
        width = max(len(t) for t in tables)
        host["input_ids"][:n] = torch.tensor([it.seq.token_ids[p]
                                              for it, p in zip(items, positions, strict=True)])
        host["positions"][:n] = torch.tensor(positions)
        host["slot_mapping"][:n] = torch.tensor([t[p // bs] * bs + p % bs
                                                 for t, p in zip(tables, positions, strict=True)])
        host["ctx_lens"][:n] = host["positions"][:n] + 1
        # Columns past a row's length are never read: no need to clear them.
        host["block_tables"][:n, :width] = torch.tensor([t + [0] * (width - len(t))
                                                         for t in tables])
        self._pad(n, bucket)
        segments = host["segments"]
        if self.lora_slots is not None:
            table = kernel_segments(segment_runs([it.seq.slot for it in items], [1] * n, n),
                                    self.lora_slots.ranks)
            if table:
                segments[:len(table)] = torch.tensor(table)
            segments[len(table):bucket] = torch.tensor([n, n, 0, 0])  # empty: nothing to add

    @torch.inference_mode()
    def forward(self, bucket: int) -> torch.Tensor:
        """The step of `bucket` rows on the static buffers -> logits [bucket, vocab]."""
        s, rows = self.static, self.rows[:bucket]
        group = AttentionGroup(rows[:, None], rows, rows, block_tables=s["block_tables"][:bucket],
                               ctx_lens=s["ctx_lens"][:bucket])
        lora = (None if self.lora_slots is None
                else KernelDelta(self.lora_slots, s["segments"][:bucket]))
        fb = ForwardBatch(positions=s["positions"][:bucket],
                          slot_mapping=s["slot_mapping"][:bucket], groups=[group], lora=lora,
                          decode_attention=self.decode_attention, block_size=self.block_size)
        hidden = self.model(s["input_ids"][:bucket], fb, self.kv_cache.layers)
        return self.model.compute_logits(hidden)

    def _pad(self, start: int, end: int) -> None:
        """Rows [start, end) of the staging buffer become padding rows."""
        for name, value in (("input_ids", 0), ("positions", 0), ("ctx_lens", 1),
                            ("slot_mapping", self.scratch_block * self.block_size)):
            self.host[name][start:end] = value
        self.host["block_tables"][start:end, 0] = self.scratch_block

    def load_padding(self, bucket: int) -> None:
        """Makes every row of a `bucket` step padding, on the device: what capture runs on."""
        self._pad(0, bucket)
        self.host["segments"][:bucket] = 0  # empty segments
        self.buffer.copy_(self.staging)

    def _capture(self) -> None:
        """Records every bucket, largest first, in one memory pool (vLLM's order: the smaller
        graphs reuse the largest one's blocks)."""
        pool = None
        for bucket in reversed(self.buckets):
            self.load_padding(bucket)
            self.forward(bucket)  # compiles the Triton kernels, sets cuBLAS up: not capturable
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            # thread_local: another thread's CUDA call (an adapter copy) cannot void the capture
            with (torch.inference_mode(),
                  torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local")):
                self.logits[bucket] = self.forward(bucket)
            pool = graph.pool()
            self.graphs[bucket] = graph

    def replay_error(self, vocab_size: int, seed: int = 0) -> float:
        """Largest gap, relative to the logits' scale, between each bucket's step as run and as
        eagerly computed, on random decode rows in free KV blocks 0..max_batch-1 (call it
        before serving: it overwrites them). Two rounds, so a value fixed at capture shows; the
        second runs one row short of each bucket, so padding rows run too."""
        gen = torch.Generator().manual_seed(seed)
        worst = 0.0
        for padding in (0, 1):
            for bucket in self.buckets:
                num_rows = max(1, bucket - padding)
                lengths = torch.randint(1, self.block_size + 1, (num_rows,), generator=gen)
                items = []
                for row, length in enumerate(lengths.tolist()):
                    ids = torch.randint(vocab_size, (length,), generator=gen).tolist()
                    seq = Sequence(row, ids, SamplingOptions(max_tokens=1),
                                   num_computed_tokens=length - 1, block_table=[row])
                    items.append(ScheduledSeq(seq, 1))
                ran = self.run(items).clone()
                # the step's inputs are still in the buffers
                eager = self.forward(self.bucket(num_rows))[:num_rows]
                worst = max(worst, float((ran - eager).abs().max() / eager.abs().max()))
        return worst


def captured_decode(model: LlamaModel, kv_cache: KVCache, block_size: int, max_blocks: int,
                    scratch_block: int, max_batch: int, decode_attention: DecodeAttention,
                    lora_slots: LoraSlots | None) -> DecodeGraphs | None:
    """CUDA-graph decode steps once their replays match eager steps, else None (logged): the
    runner then runs every step eagerly. max_batch must not exceed the free KV blocks."""
    graphs = None

    def error() -> float:
        nonlocal graphs
        graphs = DecodeGraphs(model, kv_cache, block_size, max_blocks, scratch_block, max_batch,
                              decode_attention, lora_slots, capture=True)
        return graphs.replay_error(model.config.vocab_size)

    tolerance = REPLAY_TOLERANCE[model.embed_tokens.weight.dtype]
    if not agrees(log, "CUDA graphs", "decode steps run eagerly", error, tolerance):
        return None
    log.info("decode steps: CUDA graphs for batch sizes %s", graphs.buckets)
    return graphs
