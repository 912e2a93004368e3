"""worker.kernels.int8_weights: the int8 copies, their matmuls, and the runner steps that take
them."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from worker.kernels.int8_weights import SMALL_STEP_TOKENS, Int8Weights, quantize
from worker.kv_cache import BlockManager, KVCache
from worker.loader import load_model
from worker.model import LlamaModel, ModelConfig
from worker.runner import ModelRunner
from worker.scheduler import Batch, ScheduledSeq
from worker.sequence import SamplingOptions, Sequence


def dequantized(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return q.float() * scales.float()[:, None]


def test_quantize_maps_each_rows_largest_weight_to_127() -> None:
    w = torch.randn(40, 64, generator=torch.Generator().manual_seed(0))
    w[3] = 0.0  # an all-zero row stays zero, no division by zero
    q, scales = quantize(w)
    assert q.dtype == torch.int8 and scales.shape == (40,)
    assert torch.equal(q.abs().amax(dim=1)[[0, 1, 39]], torch.full((3,), 127, dtype=torch.int8))
    assert not q[3].any()
    assert (dequantized(q, scales) - w).abs().max() <= scales.max() / 2 + 1e-7


def test_int8_linear_is_the_dequantized_matmul(tiny_model_dir: Path) -> None:
    dtype, tol = torch.bfloat16, 1e-2  # the output's own rounding
    model = load_model(tiny_model_dir, torch.device("cpu"), dtype)
    int8 = Int8Weights(model)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1)).to(dtype)
    for name in ("qkv_proj", "gate_up_proj"):
        q, scales = int8.layers[1][name]
        ref = x.float() @ dequantized(q, scales).T
        got = int8.linear(1, name, x, None).float()
        assert (got - ref).abs().max() <= tol * ref.abs().max(), name
        bias = torch.randn(q.shape[0]).to(dtype)  # Qwen2's q/k/v biases
        assert torch.equal(int8.linear(1, name, x, bias), int8.linear(1, name, x, None) + bias)
    hidden = torch.randn(2, 64, generator=torch.Generator().manual_seed(2)).to(dtype)
    ref = hidden.float() @ dequantized(*int8.head).T
    assert (int8.logits(hidden) - ref).abs().max() <= tol * ref.abs().max()
    # and the copies stand for the model's weights to within int8's rounding
    weight = model.layers[1].mlp.gate_up_proj.weight.float()
    assert (dequantized(*int8.layers[1]["gate_up_proj"]) - weight).abs().max() \
        <= weight.abs().max() / 127


def test_widths_and_dtypes_the_kernel_is_slow_or_unsafe_for_are_refused() -> None:
    cfg = ModelConfig(vocab_size=64, hidden_size=72, intermediate_size=96, num_layers=1,
                      num_heads=2, num_kv_heads=1, head_dim=36, tie_word_embeddings=True)
    with pytest.raises(ValueError, match="divisible by 16"):
        Int8Weights(LlamaModel(cfg).to(torch.bfloat16))
    for dtype in (torch.float32, torch.float16):
        with pytest.raises(ValueError, match="bfloat16"):
            Int8Weights(LlamaModel(replace(cfg, hidden_size=64, head_dim=32)).to(dtype))


class Runners:
    """One model; a runner with int8 copies and one without, each on its own KV cache."""

    def __init__(self, path: Path) -> None:
        self.model = load_model(path, torch.device("cpu"), torch.bfloat16)
        self.runners, self.blocks = [], []
        for int8 in (Int8Weights(self.model), None):
            kv = KVCache(self.model.config, 32, 4, torch.device("cpu"), torch.bfloat16)
            runner = ModelRunner(self.model, kv, 4, torch.device("cpu"))
            runner.int8 = int8
            self.runners.append(runner)
            self.blocks.append(BlockManager(32, 4))

    def logits(self, lengths: list[int]) -> tuple[list[torch.Tensor], int]:
        """A prefill step of one sequence per length on each runner -> each runner's sampled
        logits, and how many projections took the int8 copies."""
        out = []
        int8 = self.runners[0].int8
        with mock.patch.object(int8, "linear", wraps=int8.linear) as spy:
            for runner, blocks in zip(self.runners, self.blocks, strict=True):
                seqs = [Sequence(i, list(range(200, 200 + n)), SamplingOptions(max_tokens=4))
                        for i, n in enumerate(lengths)]
                for seq in seqs:
                    blocks.allocate(seq.block_table, len(seq.token_ids))
                with mock.patch.object(runner, "_sample", lambda items, logits: logits):
                    out.append(runner.run(Batch([ScheduledSeq(s, len(s.token_ids))
                                                 for s in seqs])))
                for seq in seqs:
                    blocks.free(seq.block_table)
        return out, spy.call_count


def test_steps_of_a_few_tokens_take_the_int8_copies(tiny_model_dir: Path) -> None:
    runners = Runners(tiny_model_dir)
    layers = runners.model.config.num_layers
    (int8, plain), calls = runners.logits([SMALL_STEP_TOKENS - 1, 1])  # 4 tokens: int8
    assert calls == 4 * layers
    assert not torch.equal(int8, plain)
    assert (int8 - plain).abs().max() <= 0.05 * plain.abs().max()
    assert F.cosine_similarity(int8, plain).min() > 0.999
    assert torch.equal(int8.argmax(-1), plain.argmax(-1))
    (int8, plain), calls = runners.logits([SMALL_STEP_TOKENS + 1])  # 5 tokens: the model's own
    assert calls == 0 and torch.equal(int8, plain)

