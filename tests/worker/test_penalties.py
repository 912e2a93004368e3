"""worker.penalties: the formulas against a per-row reference, the row table alone, and the
device counts against counts taken from each sequence's tokens."""

from __future__ import annotations

import pytest
import torch

from worker.penalties import PenaltyRows, PenaltyState, apply_penalties
from worker.sequence import SamplingOptions, Sequence

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])]
VOCAB = 50


def seq(request_id: int, prompt: list[int], outputs: list[int] = (), **penalties) -> Sequence:
    s = Sequence(request_id, list(prompt), SamplingOptions(max_tokens=100, **penalties))
    s.token_ids += list(outputs)
    return s


def reference(logits: torch.Tensor, s: Sequence) -> torch.Tensor:
    """One row, token by token: HF's repetition penalty, then OpenAI's formula."""
    out = logits.clone()
    o = s.options
    for token in set(s.token_ids):
        value = out[token]
        out[token] = value / o.repetition_penalty if value > 0 else value * o.repetition_penalty
    for token in set(s.output_ids):
        count = s.output_ids.count(token)
        out[token] -= count * o.frequency_penalty + o.presence_penalty
    return out


def assert_counts_match(counts: PenaltyState, seqs: list[Sequence]) -> None:
    for s in seqs:
        row = counts.table.row_of(s)
        expected = torch.bincount(torch.tensor(s.output_ids, dtype=torch.long), minlength=VOCAB)
        got = counts.output_counts[row].cpu().long()
        assert torch.equal(got, expected), f"request {s.request_id}: {got} != {expected}"
        history = counts.tokens[row, :counts.num_tokens[row]].tolist()
        assert history == s.token_ids, f"request {s.request_id}"


@pytest.mark.parametrize("device", DEVICES)
def test_penalties_match_the_per_row_reference(device: str) -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, VOCAB, generator=g) * 3
    seqs = [seq(0, [1, 2, 3], [4, 4, 5, 1], repetition_penalty=1.3),
            seq(1, [7, 8], [9, 9, 9], frequency_penalty=0.5),
            seq(2, [7, 8], [9, 9, 9, 10], presence_penalty=-1.5),
            seq(3, [1, 2, 3, 4, 5], [6, 6, 2], repetition_penalty=0.7, frequency_penalty=-2.0,
                presence_penalty=2.0)]
    batch_rows = [0, 2, 3, 4]  # row 1 uses no penalty
    counts = PenaltyState(VOCAB, torch.device(device))
    p = counts.gather(batch_rows, seqs)
    out = apply_penalties(logits.clone().to(device), p).cpu()
    assert torch.equal(out[1], logits[1])
    for row, s in zip(batch_rows, seqs, strict=True):
        assert torch.allclose(out[row], reference(logits[row], s), atol=1e-6), s.options


@pytest.mark.parametrize("device", DEVICES)
def test_a_rows_result_does_not_depend_on_its_neighbours(device: str) -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, VOCAB, generator=g).to(device)
    me = seq(0, [1, 2], [3, 3, 4], repetition_penalty=1.5, presence_penalty=0.5)
    neighbours = [seq(i, [5, 6], [i, 7], frequency_penalty=0.1 * i) for i in range(1, 4)]
    alone = apply_penalties(logits[:1].clone(), PenaltyState(VOCAB, logits.device).gather(
        [0], [me]))
    crowd = apply_penalties(logits.clone(), PenaltyState(VOCAB, logits.device).gather(
        [0, 1, 2, 3], [me, *neighbours]))
    assert torch.equal(alone[0], crowd[0])


def test_row_table_keeps_rows_and_reuses_finished_ones() -> None:
    table = PenaltyRows()
    a, b, c = seq(1, [1]), seq(2, [1]), seq(3, [1])
    rows, fresh = table.assign([a, b])
    assert rows == [0, 1] and fresh == [0, 1]
    assert table.assign([a, b]) == ([0, 1], [])
    a.finish_reason = "stop"
    rows, fresh = table.assign([b, c])  # c takes finished a's row, not a new one
    assert rows == [1, 0] and fresh == [0] and table.num_rows == 2
    assert table.row_of(a) is None


def test_row_table_takes_absent_rows_only_when_short() -> None:
    table = PenaltyRows()
    a, b, c = seq(1, [1]), seq(2, [1]), seq(3, [1])
    table.assign([a, b])
    rows, fresh = table.assign([c])  # a and b still run (not in this step): c takes one
    assert fresh == rows and table.num_rows == 2
    evicted = [s for s in (a, b) if table.row_of(s) is None]
    assert len(evicted) == 1
    rows, fresh = table.assign([a, b, c])  # the evicted one comes back to a fresh row
    assert sorted(rows) == [0, 1, 2] and len(fresh) == 1 and table.num_rows == 3


def test_row_table_sees_a_reused_request_id_as_a_new_sequence() -> None:
    table = PenaltyRows()
    first = seq(7, [1])
    table.assign([first])
    again = seq(7, [2])
    rows, fresh = table.assign([again])
    assert fresh == rows and table.row_of(again) == rows[0] and table.row_of(first) is None


@pytest.mark.parametrize("device", DEVICES)
def test_counts_follow_the_tokens_step_by_step(device: str) -> None:
    counts = PenaltyState(VOCAB, torch.device(device))
    g = torch.Generator().manual_seed(2)
    seqs = [seq(i, torch.randint(VOCAB, (5 + i,), generator=g).tolist(), presence_penalty=1.0)
            for i in range(3)]
    for step in range(6):
        running = seqs if step % 2 == 0 else seqs[:2]  # the third skips odd steps
        counts.gather(list(range(len(running))), running)
        assert_counts_match(counts, running)
        for s in running:
            s.token_ids += torch.randint(VOCAB, (1 + step % 3,), generator=g).tolist()
    seqs[0].finish_reason = "stop"
    newcomer = seq(9, [1, 2], [3, 3])
    counts.gather([0, 1, 2], [newcomer, *seqs[1:]])  # the finished row is refilled from history
    assert_counts_match(counts, [newcomer, *seqs[1:]])
