"""worker.runner: how decode rows are grouped for attention, and the results a step returns."""

from __future__ import annotations

import itertools
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from worker.kv_cache import BlockManager, KVCache
from worker.loader import load_model
from worker.runner import GROUP_COST_TOKENS, NO_TOKEN, ModelRunner, split_by_context
from worker.scheduler import Batch, ScheduledSeq, StepResult
from worker.sequence import SamplingOptions, Sequence

NUM_BLOCKS, BLOCK_SIZE = 16, 4


def items_of(lengths: list[int]) -> list[SimpleNamespace]:
    """Decode rows whose context (with the new token) is `length`."""
    return [SimpleNamespace(seq=SimpleNamespace(num_computed_tokens=n - 1)) for n in lengths]


def cost(groups: list[list[int]], lengths: list[int]) -> int:
    return sum(len(g) * max(lengths[i] for i in g) + GROUP_COST_TOKENS for g in groups)


def test_similar_lengths_stay_one_group() -> None:
    lengths = [100, 120, 90, 130, 101]
    assert split_by_context(list(range(5)), items_of(lengths)) == [[2, 0, 4, 1, 3]]


def test_far_apart_lengths_split_shortest_first() -> None:
    lengths = [20, 2000, 30, 2100, 25, 1900]
    groups = split_by_context(list(range(6)), items_of(lengths))
    assert groups == [[0, 4, 2], [5, 1, 3]]


def test_only_the_given_rows_are_grouped() -> None:
    lengths = [5, 3000, 7, 9]
    assert split_by_context([0, 2], items_of(lengths)) == [[0, 2]]
    assert split_by_context([], items_of(lengths)) == []


@pytest.mark.parametrize("seed", range(20))
def test_groups_partition_the_rows_at_least_cost(seed: int) -> None:
    rng = random.Random(seed)
    lengths = [rng.randint(1, 1200) for _ in range(rng.randint(1, 8))]
    rows = list(range(len(lengths)))
    groups = split_by_context(rows, items_of(lengths))
    assert sorted(i for g in groups for i in g) == rows
    order, n = sorted(rows, key=lambda i: lengths[i]), len(rows)
    best = min(cost([order[a:b] for a, b in itertools.pairwise((0, *cuts, n))], lengths)
               for k in range(n) for cuts in itertools.combinations(range(1, n), k))
    assert cost(groups, lengths) == best, (lengths, groups)


class Steps:
    """A CPU runner on the tiny model, and the KV blocks its sequences take."""

    def __init__(self, path: Path) -> None:
        device = torch.device("cpu")
        model = load_model(path, device, torch.float32)
        kv = KVCache(model.config, NUM_BLOCKS, BLOCK_SIZE, device, torch.float32)
        self.runner = ModelRunner(model, kv, BLOCK_SIZE, device)
        self.blocks = BlockManager(NUM_BLOCKS, BLOCK_SIZE)

    def run(self, items: list[ScheduledSeq]) -> tuple[Batch, StepResult]:
        """One step of `items`; then each row's tokens count as computed, and a generating row
        that finished its prompt gets its token."""
        for it in items:
            self.blocks.allocate(it.seq.block_table,
                                 it.seq.num_computed_tokens + it.num_new_tokens)
        batch = Batch(items)
        result = self.runner.run(batch)
        for it, token in zip(batch.items, result.tokens, strict=True):
            it.seq.num_computed_tokens += it.num_new_tokens
            if not it.seq.is_scoring:
                it.seq.token_ids.append(token)
        return batch, result


def scoring_seq(request_id: int) -> Sequence:
    return Sequence(request_id, list(range(300, 308)), SamplingOptions(max_tokens=1),
                    num_reference_tokens=3)


def test_run_returns_each_rows_results_in_the_order_of_batch_items(tiny_model_dir: Path) -> None:
    steps = Steps(tiny_model_dir)
    asking = Sequence(1, list(range(100, 105)),
                      SamplingOptions(max_tokens=4, logprobs=True, top_logprobs=3))
    plain = Sequence(2, list(range(200, 204)), SamplingOptions(max_tokens=4))
    steps.run([ScheduledSeq(plain, 4)])

    # run() moves the decode row ahead of the chunks: the results follow the new order, and
    # the asking row's logprobs are at its index in the step, not among the sampled rows
    batch, result = steps.run([ScheduledSeq(scoring_seq(3), 8), ScheduledSeq(asking, 5),
                               ScheduledSeq(plain, 1)])
    assert [it.seq.request_id for it in batch.items] == [2, 3, 1]
    assert len(result.tokens) == 3 and result.tokens[1] == NO_TOKEN
    assert min(result.tokens[0], result.tokens[2]) >= 0
    assert list(result.logprobs) == [2], "only the row that asked, at its index"
    lp = result.logprobs[2]
    assert lp.token_id == result.tokens[2] and lp.logprob <= 0 and len(lp.top) == 3
    assert lp.top[0][0] == result.tokens[2], "greedy: the sampled token is the likeliest"
    assert list(result.log_likelihoods) == [1], "only the scoring row, at its index"
    _, alone = steps.run([ScheduledSeq(scoring_seq(4), 8)])
    assert result.log_likelihoods[1] == pytest.approx(alone.log_likelihoods[0], abs=1e-4)
    assert result.log_likelihoods[1] < 0

    _, decode = steps.run([ScheduledSeq(plain, 1), ScheduledSeq(asking, 1)])  # sampling only
    assert list(decode.logprobs) == [1] and decode.logprobs[1].token_id == decode.tokens[1]
    assert decode.log_likelihoods == {}
