"""worker.runner: how decode rows are grouped for attention."""

from __future__ import annotations

import itertools
import random
from types import SimpleNamespace

import pytest

from worker.runner import GROUP_COST_TOKENS, split_by_context


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
