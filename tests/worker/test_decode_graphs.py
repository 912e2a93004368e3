"""worker.decode_graphs: padded static decode steps against the runner's eager steps, and the
start-up check that decides whether a GPU worker replays them. On CPU the static steps run
eagerly (the same code, without capture); with a GPU they are captured as CUDA graphs."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests.conftest import built_cpu_kernels
from worker import decode_graphs
from worker.decode_graphs import DecodeGraphs, buckets_up_to, captured_decode
from worker.kernels import lora_triton, paged_attention_triton
from worker.kv_cache import BlockManager, KVCache
from worker.loader import load_model
from worker.lora import LoraSlots, module_shapes
from worker.runner import ModelRunner
from worker.scheduler import Batch, ScheduledSeq
from worker.sequence import SamplingOptions, Sequence

NUM_BLOCKS, BLOCK_SIZE, MAX_BLOCKS, MAX_BATCH = 40, 4, 12, 8
RANKS = {1: 8, 2: 4, 3: 2}  # adapter slot -> rank
# (device, kernels): C++ kernels or Triton's (its interpreter on CPU); captured on CUDA
SETUPS = [("cpu", "cpp"), ("cpu", "triton"), pytest.param("cuda", "triton", marks=[
    pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(),
                                         reason="needs a CUDA device")])]


def kernels(name: str):
    if name == "cpp":
        module = built_cpu_kernels()
        return module.paged_decode_attention, module.lora_delta_
    return paged_attention_triton.paged_decode_attention, lora_triton.lora_delta_


class Twin:
    """One model, two KV caches and runners: eager, and with static decode steps."""

    def __init__(self, path: Path, device: str, kernel_set: str) -> None:
        self.device = torch.device(device)
        self.model = load_model(path, self.device, torch.float32)
        cfg = self.model.config
        attention, lora_kernel = kernels(kernel_set)
        self.slots = LoraSlots(cfg, len(RANKS), max(RANKS.values()), self.device, torch.float32,
                               lora_kernel)
        gen = torch.Generator().manual_seed(0)
        for slot, rank in RANKS.items():
            weights = {(layer, module): (torch.randn(rank, fan_in, generator=gen) * 0.3,
                                         torch.randn(fan_out, rank, generator=gen) * 0.3)
                       for layer in range(cfg.num_layers)
                       for module, (fan_in, fan_out) in module_shapes(cfg).items()}
            self.slots.write(slot, weights, rank)
        self.runners, self.blocks = [], []
        for _ in range(2):
            kv = KVCache(cfg, NUM_BLOCKS + 1, BLOCK_SIZE, self.device, torch.float32)
            self.runners.append(ModelRunner(self.model, kv, BLOCK_SIZE, self.device, self.slots,
                                            attention))
            self.blocks.append(BlockManager(NUM_BLOCKS, BLOCK_SIZE))
        self.eager, static = self.runners
        self.graphs = DecodeGraphs(self.model, static.kv_cache, BLOCK_SIZE, MAX_BLOCKS,
                                   NUM_BLOCKS, MAX_BATCH, attention, self.slots,
                                   capture=self.device.type == "cuda")
        static.graphs = self.graphs

    def sequences(self, prompts: list[list[int]], slots: list[int]) -> list[list[Sequence]]:
        """The same sequences for each runner, prefilled by it, with their first token."""
        both, firsts = [], []
        for runner, blocks in zip(self.runners, self.blocks, strict=True):
            seqs = [Sequence(i, p, SamplingOptions(max_tokens=64), slot=s)
                    for i, (p, s) in enumerate(zip(prompts, slots, strict=True))]
            for seq in seqs:
                blocks.allocate(seq.block_table, len(seq.token_ids))
            batch = Batch([ScheduledSeq(seq, len(seq.token_ids)) for seq in seqs])
            tokens = runner.run(batch).tokens
            for it, token in zip(batch.items, tokens, strict=True):
                it.seq.num_computed_tokens = len(it.seq.token_ids)
                it.seq.token_ids.append(token)
            firsts.append([seq.token_ids[-1] for seq in seqs])
            both.append(seqs)
        assert firsts[0] == firsts[1]  # a prefill step is not replayed: the same eager step
        return both

    @torch.inference_mode()
    def decode_logits(self, rows: list[int], seqs: list[list[Sequence]]) -> list[torch.Tensor]:
        """One decode step of `rows` on each runner -> each runner's logits, in row order."""
        out = []
        for runner, blocks, mine in zip(self.runners, self.blocks, seqs, strict=True):
            items = [ScheduledSeq(mine[i], 1) for i in rows]
            for it in items:
                blocks.allocate(it.seq.block_table, it.seq.num_computed_tokens + 1)
            items.sort(key=lambda it: it.seq.slot)  # as ModelRunner.run
            if runner.graphs is not None:
                assert runner.graphs.covers(items)
                logits = runner.graphs.run(items)
            else:
                input_ids, fb, last_idx = runner.prepare(Batch(items))
                hidden = self.model(input_ids, fb, runner.kv_cache.layers)
                logits = self.model.compute_logits(hidden.index_select(0, last_idx))
            order = {id(it.seq): k for k, it in enumerate(items)}
            out.append(logits[[order[id(mine[i])] for i in rows]].cpu())
            for i in rows:
                mine[i].num_computed_tokens += 1
        return out


@pytest.mark.parametrize(("device", "kernel_set"), SETUPS)
def test_static_steps_match_eager_steps(tiny_model_dir: Path, device: str,
                                        kernel_set: str) -> None:
    twin = Twin(tiny_model_dir, device, kernel_set)
    gen = torch.Generator().manual_seed(1)
    lengths = [3, 9, 4, 17, 6, 1, 12]
    prompts = [torch.randint(0, 49152, (n,), generator=gen).tolist() for n in lengths]
    seqs = twin.sequences(prompts, slots=[0, 2, 1, 2, 3, 0, 1])
    # row counts that fill a bucket (1, 2, 4) and that are padded (3 -> 4, 7 and 5 -> 8)
    for rows in ([0, 1, 2, 3, 4, 5, 6], [6, 3, 1], [2], [0, 4, 5, 1, 6], [3, 1],
                 [0, 1, 2, 3], [5, 6, 0]):
        static, eager = reversed(twin.decode_logits(rows, seqs))
        err = (static - eager).abs().max().item()
        assert err <= 1e-4, f"rows {rows}: max abs diff {err:.3g}"
        for i, token in zip(rows, eager.argmax(-1).tolist(), strict=True):
            for mine in seqs:
                mine[i].token_ids.append(token)
    # every real slot holds the same K and V; padding rows wrote only the scratch block
    eager_kv, static_kv = (r.kv_cache.storage for r in twin.runners)
    real = NUM_BLOCKS * BLOCK_SIZE
    assert torch.allclose(static_kv[:, :, :real], eager_kv[:, :, :real], atol=1e-5)
    assert static_kv[:, :, real:].abs().sum() > 0 and eager_kv[:, :, real:].abs().sum() == 0


def test_runner_replays_only_the_steps_graphs_cover(tiny_model_dir: Path) -> None:
    twin = Twin(tiny_model_dir, "cpu", "cpp")
    runner, blocks = twin.runners[1], twin.blocks[1]
    seqs = [Sequence(i, list(range(100, 100 + n)), SamplingOptions(max_tokens=8), slot=i % 3)
            for i, n in enumerate([5, 3, 7])]
    scoring = Sequence(9, list(range(50, 58)), SamplingOptions(max_tokens=1),
                       num_reference_tokens=3)

    def step(items: list[ScheduledSeq]) -> None:
        for it in items:
            blocks.allocate(it.seq.block_table, it.seq.num_computed_tokens + it.num_new_tokens)
        batch = Batch(items)
        for it, token in zip(batch.items, runner.run(batch).tokens, strict=True):
            it.seq.num_computed_tokens += it.num_new_tokens
            if it.seq.num_computed_tokens == len(it.seq.token_ids):
                it.seq.token_ids.append(token)

    with mock.patch.object(twin.graphs, "run", wraps=twin.graphs.run) as replay:
        step([ScheduledSeq(seqs[0], 5), ScheduledSeq(seqs[1], 3)])       # prompt chunks
        assert replay.call_count == 0
        step([ScheduledSeq(seqs[0], 1), ScheduledSeq(seqs[1], 1)])       # decode rows
        assert replay.call_count == 1
        step([ScheduledSeq(seqs[0], 1), ScheduledSeq(seqs[2], 7)])       # decode + chunk
        step([ScheduledSeq(seqs[1], 1), ScheduledSeq(scoring, 8)])       # decode + scoring
        assert replay.call_count == 1
    decode = [ScheduledSeq(seqs[0], 1)]
    assert twin.graphs.covers(decode)
    assert not twin.graphs.covers(decode * (MAX_BATCH + 1))
    assert not twin.graphs.covers([])


class OpLog(TorchDispatchMode):
    """The torch ops run inside it (not the kernels' own launches: those are no torch ops)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: set = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func)
        return func(*args, **(kwargs or {}))


# Reading a device value on the host (.item(), int(), bool(), nonzero) syncs, and a tensor made
# from host data (torch.tensor) is a copy fixed at capture: a captured step can hold neither.
# (.tolist() makes no torch op: this cannot see it.)
aten = torch.ops.aten
HOST_OPS = {aten._local_scalar_dense.default, aten.item.default, aten.is_nonzero.default,
            aten.lift_fresh.default, aten.nonzero.default}


@pytest.mark.parametrize("kernel_set", ["cpp", "triton"])
def test_a_static_step_neither_syncs_nor_reads_host_data(tiny_model_dir: Path,
                                                         kernel_set: str) -> None:
    twin = Twin(tiny_model_dir, "cpu", kernel_set)
    twin.graphs.load_padding(MAX_BATCH)
    with OpLog() as log:
        twin.graphs.forward(MAX_BATCH)
    assert aten.embedding.default in log.ops and not log.ops & HOST_OPS
    with OpLog() as log, torch.inference_mode():  # the log does see them, as forward runs
        ones = torch.tensor([1.0, 1.0])
        bool(ones.sum() > 0), int(ones[0]), ones.nonzero()
    assert log.ops & HOST_OPS == {aten.lift_fresh.default, aten.is_nonzero.default,
                                  aten.item.default, aten.nonzero.default}


def test_buckets() -> None:
    assert buckets_up_to(64) == [1, 2, 4, 8, 12, 16, 24, 32, 48, 64]
    assert buckets_up_to(10) == [1, 2, 4, 8, 10]
    assert buckets_up_to(1) == [1]


def test_replay_check_sees_a_step_fixed_at_capture(tiny_model_dir: Path) -> None:
    twin = Twin(tiny_model_dir, "cpu", "cpp")
    graphs, vocab = twin.graphs, twin.model.config.vocab_size
    assert graphs.replay_error(vocab) <= decode_graphs.REPLAY_TOLERANCE[torch.float32]
    # a "graph" that replays what it computed once, whatever the buffers now hold
    for bucket in graphs.buckets:
        graphs.graphs[bucket] = SimpleNamespace(replay=lambda: None)
        graphs.load_padding(bucket)
        graphs.logits[bucket] = graphs.forward(bucket)
    assert graphs.replay_error(vocab) > 0.1


def test_captured_decode_falls_back_to_eager_steps(tiny_model_dir: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    twin = Twin(tiny_model_dir, "cpu", "cpp")
    args = (twin.model, twin.runners[1].kv_cache, BLOCK_SIZE, MAX_BLOCKS, NUM_BLOCKS, MAX_BATCH,
            twin.runners[1].decode_attention, twin.slots)
    with caplog.at_level(logging.WARNING, logger="worker.decode_graphs"):
        if not torch.cuda.is_available():  # capture itself needs CUDA
            assert captured_decode(*args) is None
            assert "CUDA graphs unusable" in caplog.text
        monkeypatch.setattr(DecodeGraphs, "_capture", lambda self: None)
        assert isinstance(captured_decode(*args), DecodeGraphs)  # eager replays match
        monkeypatch.setattr(DecodeGraphs, "replay_error", lambda self, vocab: 0.5)
        assert captured_decode(*args) is None
    assert "off by 0.5" in caplog.text
    with pytest.raises(ValueError, match="LoRA kernel"):
        DecodeGraphs(*args[:-1], LoraSlots(twin.model.config, 1, 4, torch.device("cpu"),
                                           torch.float32), capture=False)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_captured_decode_captures_every_bucket_on_cuda(tiny_model_dir: Path) -> None:
    twin = Twin(tiny_model_dir, "cuda", "triton")
    graphs = captured_decode(twin.model, twin.runners[1].kv_cache, BLOCK_SIZE, MAX_BLOCKS,
                             NUM_BLOCKS, MAX_BATCH, twin.runners[1].decode_attention, twin.slots)
    assert graphs is not None and sorted(graphs.graphs) == buckets_up_to(MAX_BATCH)
