"""Tests for worker.scheduler: continuous batching, chunked prefill, finish, abort, preemption,
fair admission across tenants."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from common.errors import Aborted, NotFound, ResourceExhausted
from worker.kv_cache import BlockManager
from worker.scheduler import Batch, Scheduler, StepResult
from worker.sequence import (
    SamplingOptions,
    Sequence,
    SequenceStatus,
    TenantLimits,
    TokenEvent,
    TokenLogprobs,
)
from worker.tenant_queues import overflow_limit

EOS = 2


class FakeDetok:
    """Text is "<id>" per token; reports stopped once it has seen `stop_on`."""

    def __init__(self, stop_on: int | None = None) -> None:
        self.stopped = False
        self.stop_on = stop_on
        self.seen: list[int] = []
        self.flushed = 0

    def add_token(self, token_id: int) -> str:
        self.seen.append(token_id)
        if token_id == self.stop_on:
            self.stopped = True
        return f"<{token_id}>"

    def flush(self) -> str:
        self.flushed += 1
        return ""


def make_seq(request_id: int, prompt_len: int, max_tokens: int = 4, ignore_eos: bool = False,
             stop_on: int | None = None) -> Sequence:
    prompt = [10 + (request_id * 7 + i) % 50 for i in range(prompt_len)]
    options = SamplingOptions(max_tokens=max_tokens, ignore_eos=ignore_eos)
    return Sequence(request_id, prompt, options, detok=FakeDetok(stop_on))


def make_scheduler(num_blocks: int = 64, block_size: int = 4, max_batch_size: int = 8,
                   max_num_batched_tokens: int = 32, max_queue: int = 64) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, block_size), max_batch_size, max_num_batched_tokens,
                     max_queue, eos_token_ids=(EOS,))


def token_for(seq: Sequence) -> int:
    """A deterministic, never-EOS token: the n-th output of request r is always the same."""
    return 1000 + seq.request_id * 100 + seq.num_output_tokens


def tokens_for(batch: Batch) -> StepResult:
    """The runner's result for `batch`: token_for each row."""
    return StepResult([token_for(item.seq) for item in batch.items])


def expected_outputs(request_id: int, n: int) -> list[int]:
    return [1000 + request_id * 100 + i for i in range(n)]


def rows(batch: Batch | None) -> list[tuple[int, int]]:
    """(request_id, num_new_tokens) per scheduled row."""
    assert batch is not None, "expected a batch, got None"
    return [(item.seq.request_id, item.num_new_tokens) for item in batch.items]


def step(sched: Scheduler, tokens: list[int] | None = None) -> tuple[Batch, list[TokenEvent]]:
    """schedule() then postprocess() with the given tokens (default: token_for each row)."""
    batch = sched.schedule()
    assert batch is not None, (
        f"no batch although waiting={ids(sched.waiting)} running={ids(sched.running)}")
    if tokens is None:
        tokens = [token_for(item.seq) for item in batch.items]
    events = sched.postprocess(batch, StepResult(tokens))
    return batch, events


def ids(seqs) -> list[int]:
    return [s.request_id for s in seqs]


def assert_blocks_consistent(sched: Scheduler) -> None:
    """Running tables + free list partition the blocks; waiting sequences hold none."""
    bm = sched.blocks
    tables = {s.request_id: list(s.block_table) for s in sched.running}
    held = [b for t in tables.values() for b in t]
    free = list(bm._free)  # the free list itself: the point is that nothing is lost or duplicated
    assert sorted(held + free) == list(range(bm.num_blocks)), (
        f"blocks lost or duplicated: running tables={tables} free={free}")
    for s in sched.waiting:
        assert s.block_table == [] and s.num_computed_tokens == 0, (
            f"waiting seq {s.request_id} holds blocks {s.block_table} "
            f"or computed {s.num_computed_tokens}")
        assert s.status is SequenceStatus.WAITING, (s.request_id, s.status)
    for s in sched.running:
        assert s.status is SequenceStatus.RUNNING, (s.request_id, s.status)
        assert len(s.block_table) * bm.block_size >= s.num_computed_tokens, (
            f"seq {s.request_id}: {len(s.block_table)} blocks for {s.num_computed_tokens} tokens")


def assert_all_free(sched: Scheduler) -> None:
    bm = sched.blocks
    assert bm.num_free_blocks == bm.num_blocks, (
        f"{bm.num_blocks - bm.num_free_blocks} blocks still held; running={ids(sched.running)}")


def assert_finished(seq: Sequence, reason: str) -> None:
    assert seq.status is SequenceStatus.FINISHED and seq.finish_reason == reason, (
        f"seq {seq.request_id}: status={seq.status} finish_reason={seq.finish_reason!r}, "
        f"wanted {reason!r}")
    assert seq.block_table == [], f"finished seq {seq.request_id} holds {seq.block_table}"


# --- admission and chunked prefill ---------------------------------------------------------------


def test_new_sequence_is_admitted_and_prefilled_in_one_step() -> None:
    sched = make_scheduler()
    seq = make_seq(1, prompt_len=10)
    sched.add(seq)
    assert sched.has_work()
    batch, events = step(sched, [123])
    assert rows(batch) == [(1, 10)]
    assert len(seq.block_table) == 3, seq.block_table  # ceil(10 / 4)
    assert ids(sched.running) == [1] and not sched.waiting
    assert len(events) == 1, events
    ev = events[0]
    assert (ev.request_id, ev.token_ids, ev.text, ev.finish_reason) == (1, [123], "<123>", "")
    assert (ev.num_prompt_tokens, ev.num_output_tokens) == (10, 1), ev
    assert seq.output_ids == [123] and seq.num_computed_tokens == 10


def test_prompt_is_chunked_by_token_budget_and_mid_chunk_samples_are_dropped() -> None:
    sched = make_scheduler(block_size=4, max_num_batched_tokens=4)
    seq = make_seq(1, prompt_len=10, max_tokens=3)
    sched.add(seq)

    batch, events = step(sched, [501])
    assert rows(batch) == [(1, 4)] and events == [], (rows(batch), events)
    assert seq.num_computed_tokens == 4 and seq.output_ids == [], seq
    assert len(seq.block_table) == 1, seq.block_table

    batch, events = step(sched, [502])
    assert rows(batch) == [(1, 4)] and events == [], (rows(batch), events)
    assert seq.num_computed_tokens == 8 and seq.output_ids == [], seq
    assert len(seq.block_table) == 2, seq.block_table

    batch, events = step(sched, [503])
    assert rows(batch) == [(1, 2)]
    assert [e.token_ids for e in events] == [[503]], events
    assert seq.output_ids == [503] and seq.num_computed_tokens == 10
    assert seq.detok.seen == [503], "mid-prompt samples must never reach the detokenizer"

    batch, events = step(sched, [504])  # decode: one token
    assert rows(batch) == [(1, 1)]
    assert [e.token_ids for e in events] == [[504]]


def test_decode_rows_share_a_step_with_a_newcomer_prompt_chunk() -> None:
    sched = make_scheduler(max_num_batched_tokens=8)
    a = make_seq(1, prompt_len=3, max_tokens=10)
    sched.add(a)
    assert rows(step(sched)[0]) == [(1, 3)]

    b = make_seq(2, prompt_len=20, max_tokens=10)
    sched.add(b)
    batch, events = step(sched)
    assert rows(batch) == [(1, 1), (2, 7)]
    assert ids_of_events(events) == [1], events  # b is mid-prompt: no event
    batch, events = step(sched)
    assert rows(batch) == [(1, 1), (2, 7)]
    assert ids_of_events(events) == [1], events
    batch, events = step(sched)
    assert rows(batch) == [(1, 1), (2, 6)]
    assert ids_of_events(events) == [1, 2], events
    assert b.output_ids == expected_outputs(2, 1)
    batch, _ = step(sched)
    assert rows(batch) == [(1, 1), (2, 1)]


def ids_of_events(events: list[TokenEvent]) -> list[int]:
    return [e.request_id for e in events]


def test_new_sequences_join_while_others_run() -> None:
    sched = make_scheduler()
    a = make_seq(1, prompt_len=5, max_tokens=6)
    sched.add(a)
    step(sched)
    step(sched)
    b = make_seq(2, prompt_len=4, max_tokens=6)
    sched.add(b)
    batch, events = step(sched)
    assert rows(batch) == [(1, 1), (2, 4)]
    assert ids_of_events(events) == [1, 2]
    c = make_seq(3, prompt_len=2, max_tokens=6)
    sched.add(c)
    batch, _ = step(sched)
    assert rows(batch) == [(1, 1), (2, 1), (3, 2)]
    assert ids(sched.running) == [1, 2, 3]
    assert a.output_ids == expected_outputs(1, 4)
    assert b.output_ids == expected_outputs(2, 2)
    assert c.output_ids == expected_outputs(3, 1)


def test_max_batch_size_is_respected() -> None:
    sched = make_scheduler(max_batch_size=2)
    seqs = [make_seq(i, prompt_len=3, max_tokens=2 + i) for i in range(5)]
    for s in seqs:
        sched.add(s)
    batch, _ = step(sched)
    assert rows(batch) == [(0, 3), (1, 3)]
    assert ids(sched.waiting) == [2, 3, 4]
    batch, events = step(sched)  # seq 0 finishes (max_tokens 2); nobody else fits this step
    assert rows(batch) == [(0, 1), (1, 1)]
    assert [e.finish_reason for e in events] == ["length", ""]
    batch, _ = step(sched)  # its slot goes to the head of the queue
    assert rows(batch) == [(1, 1), (2, 3)]
    for _ in range(100):
        if not sched.has_work():
            break
        batch, _ = step(sched)
        assert len(batch.items) <= 2, rows(batch)
        assert len(sched.running) <= 2, ids(sched.running)
    for s in seqs:
        assert_finished(s, "length")
        assert s.output_ids == expected_outputs(s.request_id, 2 + s.request_id)


def test_budget_zero_leftover_defers_later_running_rows() -> None:
    sched = make_scheduler(max_num_batched_tokens=4)
    a = make_seq(1, prompt_len=4, max_tokens=5)
    b = make_seq(2, prompt_len=4, max_tokens=5)
    sched.add(a)
    sched.add(b)
    assert rows(step(sched)[0]) == [(1, 4)]  # b waits: the budget is spent
    assert ids(sched.waiting) == [2]
    assert rows(step(sched)[0]) == [(1, 1), (2, 3)]


# --- finishing ---------------------------------------------------------------------------------


def test_max_tokens_finishes_with_length_and_frees_blocks_at_once() -> None:
    sched = make_scheduler(num_blocks=8, block_size=4)
    seq = make_seq(1, prompt_len=6, max_tokens=3)
    sched.add(seq)
    _, e1 = step(sched)
    _, e2 = step(sched)
    assert sched.blocks.num_free_blocks < 8
    _, e3 = step(sched)
    events = e1 + e2 + e3
    assert [e.finish_reason for e in events] == ["", "", "length"], events
    assert [e.num_output_tokens for e in events] == [1, 2, 3], events
    assert seq.output_ids == expected_outputs(1, 3)
    assert_finished(seq, "length")
    assert_all_free(sched)
    assert not sched.running and not sched.has_work()
    assert sched.schedule() is None
    assert seq.detok.flushed == 1


def test_max_tokens_one_finishes_on_the_prefill_step() -> None:
    sched = make_scheduler()
    seq = make_seq(1, prompt_len=5, max_tokens=1)
    sched.add(seq)
    _, events = step(sched)
    assert [(e.token_ids, e.finish_reason) for e in events] == [([1100], "length")], events
    assert_finished(seq, "length")
    assert_all_free(sched)


def test_eos_finishes_with_stop() -> None:
    sched = make_scheduler()
    seq = make_seq(1, prompt_len=3, max_tokens=10)
    sched.add(seq)
    step(sched, [400])
    _, events = step(sched, [EOS])
    assert len(events) == 1
    ev = events[0]
    assert (ev.token_ids, ev.text, ev.finish_reason) == ([EOS], f"<{EOS}>", "stop"), ev
    assert ev.num_output_tokens == 2
    assert_finished(seq, "stop")
    assert_all_free(sched)


def test_eos_is_ignored_with_ignore_eos() -> None:
    sched = make_scheduler()
    seq = make_seq(1, prompt_len=3, max_tokens=3, ignore_eos=True)
    sched.add(seq)
    reasons = [e.finish_reason for _ in range(3) for e in step(sched, [EOS])[1]]
    assert reasons == ["", "", "length"], reasons
    assert seq.output_ids == [EOS, EOS, EOS]
    assert_finished(seq, "length")
    assert_all_free(sched)


def test_detokenizer_stop_finishes_with_stop() -> None:
    sched = make_scheduler()
    seq = make_seq(1, prompt_len=3, max_tokens=10, stop_on=777)
    sched.add(seq)
    step(sched, [400])
    _, events = step(sched, [777])
    assert [e.finish_reason for e in events] == ["stop"], events
    assert_finished(seq, "stop")
    assert seq.detok.flushed == 1
    assert_all_free(sched)


def test_one_row_finishing_leaves_the_others_running() -> None:
    sched = make_scheduler()
    a = make_seq(1, prompt_len=3, max_tokens=10)
    b = make_seq(2, prompt_len=3, max_tokens=10)
    sched.add(a)
    sched.add(b)
    step(sched, [400, 401])
    _, events = step(sched, [EOS, 402])
    assert [(e.request_id, e.finish_reason) for e in events] == [(1, "stop"), (2, "")], events
    assert ids(sched.running) == [2]
    assert rows(step(sched)[0]) == [(2, 1)]


# --- abort and queue limits --------------------------------------------------------------------


def test_each_row_gets_the_logprobs_at_its_index_in_the_result() -> None:
    sched = make_scheduler()
    sched.add(make_seq(1, prompt_len=3))
    sched.add(make_seq(2, prompt_len=5))
    batch = sched.schedule()
    assert batch is not None and rows(batch) == [(1, 3), (2, 5)]
    result = tokens_for(batch)
    result.logprobs[1] = TokenLogprobs(result.tokens[1], -0.5, [(result.tokens[1], -0.5)])
    events = {e.request_id: e for e in sched.postprocess(batch, result)}
    assert events[2].logprobs == [result.logprobs[1]] and events[1].logprobs == []


def test_abort_waiting_sequence() -> None:
    sched = make_scheduler(max_batch_size=1)
    a = make_seq(1, prompt_len=3, max_tokens=10)
    b = make_seq(2, prompt_len=3, max_tokens=10)
    sched.add(a)
    sched.add(b)
    step(sched)
    assert ids(sched.waiting) == [2]
    assert sched.abort(2) is True
    assert ids(sched.waiting) == [] and ids(sched.running) == [1]
    assert_finished(b, "cancelled")
    assert_blocks_consistent(sched)


def test_abort_running_sequence_frees_its_blocks() -> None:
    sched = make_scheduler(num_blocks=10)
    a = make_seq(1, prompt_len=9, max_tokens=10)
    sched.add(a)
    step(sched)
    assert sched.blocks.num_free_blocks == 7
    assert sched.abort(1) is True
    assert_finished(a, "cancelled")
    assert_all_free(sched)
    assert not sched.has_work() and sched.schedule() is None


def test_abort_unknown_request_returns_false() -> None:
    sched = make_scheduler()
    sched.add(make_seq(1, prompt_len=3))
    assert sched.abort(99) is False
    assert ids(sched.waiting) == [1]


def test_abort_between_schedule_and_postprocess_emits_nothing() -> None:
    sched = make_scheduler()
    a = make_seq(1, prompt_len=3, max_tokens=10)
    b = make_seq(2, prompt_len=3, max_tokens=10)
    sched.add(a)
    sched.add(b)
    batch = sched.schedule()
    assert sched.abort(1)
    events = sched.postprocess(batch, StepResult([400, 401]))
    assert ids_of_events(events) == [2], events
    assert a.output_ids == [] and a.detok.seen == []
    assert_finished(a, "cancelled")
    assert_blocks_consistent(sched)


def test_full_queue_raises_resource_exhausted() -> None:
    sched = make_scheduler(max_queue=2)
    sched.add(make_seq(1, prompt_len=3))
    sched.add(make_seq(2, prompt_len=3))
    with pytest.raises(ResourceExhausted, match="queue is full"):
        sched.add(make_seq(3, prompt_len=3))
    assert ids(sched.waiting) == [1, 2]
    step(sched)  # admitted sequences leave the queue, making room again
    sched.add(make_seq(3, prompt_len=3))
    assert ids(sched.waiting) == [3]


# --- KV pressure -------------------------------------------------------------------------------


def test_kv_exhaustion_preempts_the_newest_running_sequence() -> None:
    # 4 blocks of 2 tokens; max_batch_size 2 keeps seq 3 in the queue behind the victim.
    sched = make_scheduler(num_blocks=4, block_size=2, max_batch_size=2,
                           max_num_batched_tokens=16)
    a = make_seq(1, prompt_len=3, max_tokens=4)
    b = make_seq(2, prompt_len=3, max_tokens=4)
    c = make_seq(3, prompt_len=1, max_tokens=1)
    for s in (a, b, c):
        sched.add(s)
    assert rows(step(sched)[0]) == [(1, 3), (2, 3)]  # 2 blocks each: cache full
    assert sched.blocks.num_free_blocks == 0
    assert rows(step(sched)[0]) == [(1, 1), (2, 1)]  # 4 tokens still fit 2 blocks
    assert_blocks_consistent(sched)

    batch, events = step(sched)  # a needs a 3rd block: b goes
    assert rows(batch) == [(1, 1)]
    assert ids_of_events(events) == [1]
    assert ids(sched.running) == [1]
    assert ids(sched.waiting) == [2, 3], "the victim must go to the FRONT of the queue"
    assert b.num_computed_tokens == 0 and b.block_table == [], b
    assert b.status is SequenceStatus.WAITING
    assert b.output_ids == expected_outputs(2, 2), "preemption must keep generated tokens"
    assert_blocks_consistent(sched)

    _, events = step(sched)  # a: 4th output -> done, frees its blocks
    assert [(e.request_id, e.finish_reason) for e in events] == [(1, "length")]
    assert_finished(a, "length")

    batch, events = step(sched)  # b recomputes prompt + 2 outputs in one chunk
    assert rows(batch)[0] == (2, 5), rows(batch)
    assert [e.token_ids for e in events if e.request_id == 2] == [[1202]], events
    assert [e.num_output_tokens for e in events if e.request_id == 2] == [3]
    for _ in range(100):
        if not sched.has_work():
            break
        step(sched)
        assert_blocks_consistent(sched)
    assert_finished(b, "length")
    assert b.output_ids == expected_outputs(2, 4), b.output_ids
    assert_finished(c, "length")
    assert_all_free(sched)


def test_preempted_sequence_recompute_is_chunked_without_events() -> None:
    # a grows to 4 of the 5 blocks; b, preempted after generating, recomputes in chunks of <= 3.
    sched = make_scheduler(num_blocks=5, block_size=2, max_batch_size=2,
                           max_num_batched_tokens=3)
    a = make_seq(1, prompt_len=2, max_tokens=7)
    b = make_seq(2, prompt_len=2, max_tokens=4)
    sched.add(a)
    sched.add(b)
    streamed: dict[int, list[int]] = {1: [], 2: []}
    preempted_outputs: list[int] = []  # b's outputs at each preemption
    silent_recompute_steps = 0
    for _ in range(100):
        if not sched.has_work():
            break
        computed_before = b.num_computed_tokens
        batch = sched.schedule()
        assert batch is not None
        if b.num_computed_tokens < computed_before:  # reset by preemption (maybe re-admitted)
            preempted_outputs.append(b.num_output_tokens)
        assert sum(n for _, n in rows(batch)) <= 3, rows(batch)
        events = sched.postprocess(batch, tokens_for(batch))
        b_fed = any(item.seq is b for item in batch.items)
        if b_fed and b.num_output_tokens > 0 and 2 not in ids_of_events(events):
            silent_recompute_steps += 1
        for e in events:
            streamed[e.request_id] += e.token_ids
        assert_blocks_consistent(sched)
    assert any(n > 0 for n in preempted_outputs), f"b preempted at outputs {preempted_outputs}"
    assert silent_recompute_steps > 0, "recompute of prompt + outputs should span steps"
    assert a.output_ids == expected_outputs(1, 7)
    assert b.output_ids == expected_outputs(2, 4)
    assert streamed == {1: a.output_ids, 2: b.output_ids}, "every token streams exactly once"
    assert_all_free(sched)


def test_fifo_head_that_does_not_fit_blocks_later_arrivals() -> None:
    sched = make_scheduler(num_blocks=4, block_size=2, max_num_batched_tokens=32)
    a = make_seq(1, prompt_len=5, max_tokens=2)  # 3 blocks
    b = make_seq(2, prompt_len=6, max_tokens=1)  # 3 blocks: does not fit next to a
    c = make_seq(3, prompt_len=1, max_tokens=1)  # 1 block: would fit, must not overtake b
    for s in (a, b, c):
        sched.add(s)
    batch, _ = step(sched)
    assert rows(batch) == [(1, 5)]
    assert ids(sched.waiting) == [2, 3], ids(sched.waiting)
    assert sched.blocks.num_free_blocks == 1
    batch, _ = step(sched)  # a finishes
    assert rows(batch) == [(1, 1)]
    assert ids(sched.waiting) == [2, 3]
    batch, _ = step(sched)
    assert rows(batch) == [(2, 6), (3, 1)]
    assert_finished(b, "length")
    assert_finished(c, "length")
    assert_all_free(sched)


def test_fail_all_ends_everything_with_error_events() -> None:
    sched = make_scheduler(max_batch_size=2)
    seqs = [make_seq(i, prompt_len=3, max_tokens=10) for i in range(4)]
    for s in seqs:
        sched.add(s)
    step(sched)
    events = sched.fail_all("boom")
    assert [e.request_id for e in events] == [0, 1, 2, 3], events
    for e in events:
        assert (e.finish_reason, e.error, e.token_ids) == ("error", "boom", []), e
        assert e.num_prompt_tokens == 3
    assert [e.num_output_tokens for e in events] == [1, 1, 0, 0]
    for s in seqs:
        assert_finished(s, "error")
    assert not sched.has_work() and sched.schedule() is None
    assert_all_free(sched)


def test_fail_all_on_an_idle_scheduler_is_empty() -> None:
    assert make_scheduler().fail_all("boom") == []


# --- whole runs --------------------------------------------------------------------------------


def _simulate(seed: int, num_seqs: int = 20, abort_rate: float = 0.0,
              eos_rate: float = 0.0) -> tuple[Scheduler, list[Sequence], dict, int]:
    """Random arrivals under tight KV; returns (sched, seqs, events per request, preemptions)."""
    rng = random.Random(seed)
    block_size, num_blocks, budget, max_batch = 4, 14, 16, 6
    sched = make_scheduler(num_blocks=num_blocks, block_size=block_size, max_batch_size=max_batch,
                           max_num_batched_tokens=budget, max_queue=num_seqs)
    capacity = num_blocks * block_size
    seqs = []
    for i in range(num_seqs):
        prompt_len = rng.randint(1, 30)
        max_tokens = rng.randint(1, min(24, capacity - prompt_len))
        seqs.append(make_seq(i, prompt_len, max_tokens))
    pending = list(seqs)
    events: dict[int, list[TokenEvent]] = {s.request_id: [] for s in seqs}
    preemptions = 0
    for step_no in range(5000):
        while pending and rng.random() < 0.4:
            sched.add(pending.pop(0))
        if not pending and not sched.has_work():
            break
        if abort_rate and sched.running and rng.random() < abort_rate:
            victim = rng.choice([*sched.running, *sched.waiting])
            assert sched.abort(victim.request_id)
        running_before = set(ids(sched.running))
        batch = sched.schedule()
        if batch is None:
            assert not sched.running, f"step {step_no}: running but nothing scheduled"
            continue
        preemptions += len(running_before & set(ids(sched.waiting)))
        assert_batch_ok(sched, batch, step_no)
        tokens = [EOS if eos_rate and rng.random() < eos_rate else token_for(item.seq)
                  for item in batch.items]
        for ev in sched.postprocess(batch, StepResult(tokens)):
            events[ev.request_id].append(ev)
        assert_blocks_consistent(sched)
    else:
        pytest.fail(f"did not finish: waiting={ids(sched.waiting)} running={ids(sched.running)}")
    return sched, seqs, events, preemptions


def assert_batch_ok(sched: Scheduler, batch: Batch, step_no: int) -> None:
    got = rows(batch)
    assert len(got) <= sched.max_batch_size, f"step {step_no}: batch too large {got}"
    assert len({r for r, _ in got}) == len(got), f"step {step_no}: a row twice {got}"
    assert sum(n for _, n in got) <= sched.max_num_batched_tokens, f"step {step_no}: {got}"
    assert all(n >= 1 for _, n in got), f"step {step_no}: empty row {got}"
    assert len(sched.running) <= sched.max_batch_size, f"step {step_no}: {ids(sched.running)}"
    for item in batch.items:
        s = item.seq
        end = s.num_computed_tokens + item.num_new_tokens
        assert end <= s.num_tokens, f"step {step_no}: seq {s.request_id} fed past its tokens"
        assert len(s.block_table) * sched.blocks.block_size >= end, (
            f"step {step_no}: seq {s.request_id} has {len(s.block_table)} blocks for {end} tokens")


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_whole_run_under_tight_kv_completes_every_sequence(seed: int) -> None:
    sched, seqs, events, preemptions = _simulate(seed)
    for s in seqs:
        n = s.options.max_tokens
        assert_finished(s, "length")
        assert s.output_ids == expected_outputs(s.request_id, n), (
            f"seq {s.request_id}: outputs {s.output_ids}, wanted {n} tokens")
        evs = events[s.request_id]
        assert [t for e in evs for t in e.token_ids] == s.output_ids, (s.request_id, evs)
        assert [e.num_output_tokens for e in evs] == list(range(1, n + 1)), (s.request_id, evs)
        assert [e.finish_reason for e in evs] == [""] * (n - 1) + ["length"], (s.request_id, evs)
        assert "".join(e.text for e in evs) == "".join(f"<{t}>" for t in s.output_ids)
    assert preemptions > 0, "the KV budget was meant to force preemptions"
    assert_all_free(sched)
    assert not sched.has_work()


@pytest.mark.parametrize("seed", [10, 11])
def test_whole_run_with_aborts_and_eos_frees_everything(seed: int) -> None:
    sched, seqs, events, _ = _simulate(seed, abort_rate=0.05, eos_rate=0.05)
    for s in seqs:
        assert s.status is SequenceStatus.FINISHED, (s.request_id, s.status)
        assert s.finish_reason in ("length", "stop", "cancelled"), (s.request_id, s.finish_reason)
        assert s.block_table == [], (s.request_id, s.block_table)
        evs = events[s.request_id]
        assert [t for e in evs for t in e.token_ids] == s.output_ids, (s.request_id, evs)
        assert s.num_output_tokens <= s.options.max_tokens, (s.request_id, s.output_ids)
        if s.finish_reason == "stop":
            assert s.output_ids[-1] == EOS and evs[-1].finish_reason == "stop"
        if s.finish_reason == "length":
            assert s.num_output_tokens == s.options.max_tokens
    assert_all_free(sched)


# --- scoring sequences (prefill only) -------------------------------------------------------------


def make_scoring_seq(request_id: int, prompt_len: int, num_reference: int) -> Sequence:
    """prompt_len tokens in all, the last num_reference of them scored; no detokenizer."""
    prompt = [10 + (request_id * 7 + i) % 50 for i in range(prompt_len)]
    return Sequence(request_id, prompt, SamplingOptions(max_tokens=1),
                    num_reference_tokens=num_reference)


def score_step(sched: Scheduler, chunk_scores: dict[int, float]) -> tuple[Batch, list[TokenEvent]]:
    """Like step(), with the runner's part for scoring rows: a log-likelihood per chunk and an
    unusable token (-1), as ModelRunner gives them."""
    batch = sched.schedule()
    assert batch is not None
    result = StepResult([])
    for i, item in enumerate(batch.items):
        if item.seq.is_scoring:
            result.log_likelihoods[i] = chunk_scores.get(item.seq.request_id, 0.0)
            result.tokens.append(-1)
        else:
            result.tokens.append(token_for(item.seq))
    return batch, sched.postprocess(batch, result)


def test_scoring_sequence_finishes_after_its_last_chunk_with_the_summed_score() -> None:
    sched = make_scheduler(block_size=4, max_num_batched_tokens=4)
    seq = make_scoring_seq(1, prompt_len=10, num_reference=6)
    sched.add(seq)
    for expected_rows in ([(1, 4)], [(1, 4)]):
        batch, events = score_step(sched, {1: -1.5})
        assert rows(batch) == expected_rows and events == []
    batch, events = score_step(sched, {1: -0.25})
    assert rows(batch) == [(1, 2)]
    assert len(events) == 1, events
    ev = events[0]
    assert (ev.request_id, ev.token_ids, ev.text, ev.finish_reason) == (1, [], "", "scored")
    assert ev.log_likelihood == -3.25
    assert (ev.num_prompt_tokens, ev.num_output_tokens) == (10, 0)
    assert seq.token_ids == seq.prompt_ids, "a scoring sequence appends no token"
    assert_finished(seq, "scored")
    assert not sched.has_work()
    assert_all_free(sched)


def test_scoring_and_generating_rows_share_a_step() -> None:
    sched = make_scheduler(max_num_batched_tokens=32)
    gen, scoring = make_seq(1, prompt_len=5, max_tokens=3), make_scoring_seq(2, 8, 3)
    sched.add(gen)
    sched.add(scoring)
    batch, events = score_step(sched, {2: -2.0})
    assert rows(batch) == [(1, 5), (2, 8)]
    assert [(e.request_id, e.finish_reason) for e in events] == [(1, ""), (2, "scored")]
    assert gen.output_ids == expected_outputs(1, 1)
    assert ids(sched.running) == [1]


def test_preempted_scoring_sequence_restarts_its_sum() -> None:
    sched = make_scheduler(num_blocks=4, block_size=4, max_num_batched_tokens=4)
    seq = make_scoring_seq(1, prompt_len=12, num_reference=4)
    sched.add(seq)
    score_step(sched, {1: -1.0})
    assert seq.log_likelihood == -1.0
    sched._preempt(seq)  # what _reserve does when memory runs short
    assert seq.log_likelihood == 0.0 and seq.num_computed_tokens == 0
    events = []
    while not events:
        _, events = score_step(sched, {1: -1.0})
    assert events[0].log_likelihood == -3.0  # three chunks after the restart, none before
    assert_all_free(sched)


def test_aborted_scoring_sequence_frees_its_blocks() -> None:
    sched = make_scheduler(block_size=4, max_num_batched_tokens=4)
    seq = make_scoring_seq(1, prompt_len=12, num_reference=4)
    sched.add(seq)
    score_step(sched, {})
    assert sched.abort(1)
    assert_finished(seq, "cancelled")
    assert_all_free(sched)


# --- tenants -------------------------------------------------------------------------------------


def tenant_seq(request_id: int, tenant: str, prompt_len: int = 4, max_tokens: int = 4,
               limits: TenantLimits | None = None) -> Sequence:
    seq = make_seq(request_id, prompt_len, max_tokens)
    seq.tenant = tenant
    seq.limits = limits or TenantLimits()
    return seq


def test_a_flood_does_not_delay_another_tenants_first_token() -> None:
    sched = make_scheduler(num_blocks=512, max_batch_size=8, max_num_batched_tokens=64)
    flood = [tenant_seq(i, "a", prompt_len=8, max_tokens=100) for i in range(50)]
    for s in flood:
        sched.add(s)
    assert rows(step(sched)[0]) == [(i, 8) for i in range(8)]
    assert rows(step(sched)[0]) == [(i, 1) for i in range(8)], "the batch is full of a's"
    b = tenant_seq(100, "b", prompt_len=6)
    sched.add(b)

    batch, events = step(sched)
    assert rows(batch) == [(100, 6)], "a newcomer-only step: b's prompt and nothing else"
    assert ids_of_events(events) == [100] and b.output_ids == expected_outputs(100, 1)
    assert len(sched.running) == 9 == overflow_limit(8), "b runs past max_batch_size"
    batch, _ = step(sched)
    assert rows(batch) == [*[(i, 1) for i in range(8)], (100, 1)], "then everyone decodes"
    batch, _ = step(sched)
    assert rows(batch) == [*[(i, 1) for i in range(8)], (100, 1)], "and a's wait their turn"
    assert ids(sched.waiting) == list(range(8, 50))
    assert_blocks_consistent(sched)


def test_newcomer_only_steps_never_come_twice_in_a_row() -> None:
    # max batch 4: a's two running sequences are half a batch, worth a prompt-only step
    sched = make_scheduler(num_blocks=64, max_batch_size=4, max_num_batched_tokens=32)
    sched.add(tenant_seq(1, "a", max_tokens=20))
    sched.add(tenant_seq(2, "a", max_tokens=20))
    assert rows(step(sched)[0]) == [(1, 4), (2, 4)]
    sched.add(tenant_seq(11, "b", max_tokens=20))
    assert rows(step(sched)[0]) == [(11, 4)]
    sched.add(tenant_seq(21, "c", max_tokens=20))
    assert rows(step(sched)[0]) == [(1, 1), (2, 1), (11, 1), (21, 4)], "c joins a normal step"
    assert rows(step(sched)[0]) == [(1, 1), (2, 1), (11, 1), (21, 1)]
    sched.add(tenant_seq(31, "d", max_tokens=20))
    assert rows(step(sched)[0]) == [(31, 4)], "newcomer-only again after a normal step"
    assert len(sched.running) == 5, "d took an overflow row past the full batch"


def test_a_newcomer_only_step_keeps_the_blocks_running_sequences_need_next() -> None:
    # 3 blocks of 4: a holds 1 and needs a 2nd for its next token; b's 8-token prompt needs 2.
    sched = make_scheduler(num_blocks=3, block_size=4, max_batch_size=8)
    a = tenant_seq(1, "a", prompt_len=4, max_tokens=10)
    sched.add(a)
    step(sched)
    sched.add(tenant_seq(11, "b", prompt_len=8))
    assert rows(step(sched)[0]) == [(1, 1)], "b would only have been a's preemption victim"
    assert ids(sched.waiting) == [11] and ids(sched.running) == [1]
    assert_blocks_consistent(sched)


def test_a_newcomer_gets_its_first_step_even_when_memory_is_short() -> None:
    # 4 blocks of 2: a's two sequences fill them, and a's growth preempts its second.
    sched = make_scheduler(num_blocks=4, block_size=2, max_batch_size=2, max_num_batched_tokens=16)
    for request_id in (1, 2):
        sched.add(tenant_seq(request_id, "a", prompt_len=3, max_tokens=10))
    step(sched)
    step(sched)
    assert rows(step(sched)[0]) == [(1, 1)] and ids(sched.waiting) == [2], "2 was preempted"
    sched.add(tenant_seq(11, "b", prompt_len=1))  # fits the last free block
    assert rows(step(sched)[0]) == [(11, 1)], "b's first token does not wait for a's flood"
    assert rows(step(sched)[0]) == [(1, 1), (11, 1)]
    assert_blocks_consistent(sched)


def test_a_newcomer_short_of_kv_takes_it_from_the_tenant_running_the_most() -> None:
    sched = make_scheduler(num_blocks=6, block_size=2, max_batch_size=4, max_num_batched_tokens=16)
    for request_id in (1, 2, 3):
        sched.add(tenant_seq(request_id, "a", prompt_len=3, max_tokens=10))
    step(sched)  # a's three prompts take all six blocks
    sched.add(tenant_seq(11, "b", prompt_len=3))
    batch, _ = step(sched)
    assert rows(batch) == [(11, 3)], "b's prompt runs at once"
    assert ids(sched.waiting) == [3], "a's newest made room"
    assert_blocks_consistent(sched)


def test_a_named_tenant_leaves_kv_headroom_for_the_others() -> None:
    sched = make_scheduler(num_blocks=16, block_size=2, max_batch_size=16,
                           max_num_batched_tokens=64)
    for request_id in range(1, 9):
        sched.add(tenant_seq(request_id, "a", prompt_len=4, max_tokens=10))
    step(sched)
    assert sched.blocks.num_free_blocks >= 1, "a stops short of the last block"
    single = make_scheduler(num_blocks=16, block_size=2, max_batch_size=16,
                            max_num_batched_tokens=64)
    for request_id in range(1, 9):
        single.add(tenant_seq(request_id, "", prompt_len=4, max_tokens=10))
    step(single)
    assert single.blocks.num_free_blocks == 0, "one anonymous tenant keeps today's behaviour"


def test_a_tenants_max_running_caps_it_and_others_pass() -> None:
    sched = make_scheduler(max_batch_size=8)
    cap = TenantLimits(max_running=2)
    a = [tenant_seq(i, "a", max_tokens=2 if i == 1 else 10, limits=cap) for i in (1, 2, 3, 4)]
    for s in [*a, tenant_seq(11, "b", max_tokens=10)]:
        sched.add(s)
    assert rows(step(sched)[0]) == [(1, 4), (11, 4), (2, 4)], "round robin, a capped at 2"
    assert ids(sched.waiting) == [3, 4]
    batch, events = step(sched)  # a's first finishes
    assert rows(batch) == [(1, 1), (11, 1), (2, 1)]
    assert [e.finish_reason for e in events if e.request_id == 1] == ["length"]
    assert rows(step(sched)[0]) == [(11, 1), (2, 1), (3, 4)], "its slot goes to a's next"
    assert ids(sched.waiting) == [4]


def test_a_tenants_max_queued_refuses_it_alone() -> None:
    sched = make_scheduler(max_queue=64)
    limits = TenantLimits(max_queued=2)
    sched.add(tenant_seq(1, "a", limits=limits))
    sched.add(tenant_seq(2, "a", limits=limits))
    with pytest.raises(ResourceExhausted, match=r"tenant 'a' has 2 requests waiting.*max_queued"):
        sched.add(tenant_seq(3, "a", limits=limits))
    sched.add(tenant_seq(11, "b"))
    assert ids(sched.waiting) == [1, 11, 2]


def test_a_tenant_filling_the_queue_never_fails_another() -> None:
    sched = make_scheduler(max_queue=4)
    for i in range(4):
        sched.add(tenant_seq(i, "a"))
    with pytest.raises(ResourceExhausted, match=r"queue is full.*tenant 'a' holds 4"):
        sched.add(tenant_seq(9, "a"))
    sched.add(tenant_seq(11, "b"))
    sched.add(tenant_seq(12, "b"))  # 1 of b's fair share of 2
    with pytest.raises(ResourceExhausted, match="tenant 'b' holds 2"):
        sched.add(tenant_seq(13, "b"))
    assert len(sched.waiting) == 6 and sched.waiting.count("b") == 2


def test_three_tenants_are_admitted_round_robin() -> None:
    sched = make_scheduler(max_num_batched_tokens=8)  # two 4-token prompts a step
    for tenant, base in (("a", 0), ("b", 10), ("c", 20)):
        for i in (1, 2, 3):
            sched.add(tenant_seq(base + i, tenant, max_tokens=1))  # done on its prefill step
    admitted = [ids_of_rows(step(sched)[0]) for _ in range(5)]
    # a and b first; c then leads, as the rotation resumes after the tenant admitted last.
    assert admitted == [[1, 11], [21, 2], [12, 22], [3, 13], [23]], admitted
    assert not sched.has_work()
    assert_all_free(sched)


def ids_of_rows(batch: Batch) -> list[int]:
    return [request_id for request_id, _ in rows(batch)]


class FakeAdapters:
    """AdapterMemory's calls from the scheduler: any adapter loads at once, but those in `gone`
    were unregistered by another thread between can_acquire() and acquire(). An adapter's
    version is `versions[id]` ("v1" unless set): a request pinned to another is refused."""

    def __init__(self, gone: tuple[str, ...] = ()) -> None:
        self.gone = set(gone)
        self.slot_of: dict[str, int] = {}
        self.refcount: Counter[int] = Counter()
        self.versions: dict[str, str] = {}
        self.slot_spec: dict[int, str] = {}

    def prefetch(self, adapter_id: str) -> None:
        pass

    def error(self, adapter_id: str) -> None:
        return None

    def is_resident(self, adapter_id: str) -> bool:
        return False

    def can_acquire(self, adapter_id: str) -> bool:
        return True

    def has_no_idle_slot(self) -> bool:
        return False

    def acquire(self, adapter_id: str, pinned: str | None = None) -> int:
        if adapter_id in self.gone:
            raise NotFound(f"adapter {adapter_id!r} is not registered on this worker")
        version = self.versions.get(adapter_id, "v1")
        if pinned is not None and pinned != version:
            raise Aborted(f"adapter {adapter_id!r} was replaced while this request ran")
        slot = self.slot_of.setdefault(adapter_id, len(self.slot_of) + 1)
        self.slot_spec[slot] = version
        self.refcount[slot] += 1
        return slot

    def release(self, slot: int) -> None:
        self.refcount[slot] -= 1


def test_an_adapter_gone_at_acquire_ends_only_its_sequence() -> None:
    adapters = FakeAdapters(gone=("gone",))
    sched = Scheduler(BlockManager(64, 4), 8, 32, 64, eos_token_ids=(EOS,), adapters=adapters)
    ok, gone, base = make_seq(1, 4), make_seq(2, 4), make_seq(3, 4)
    ok.adapter_id, gone.adapter_id = "ok", "gone"
    for s in (ok, gone, base):
        sched.add(s)
    batch = sched.schedule()
    assert rows(batch) == [(1, 4), (3, 4)]
    assert [(e.request_id, e.finish_reason, e.error_code) for e in batch.events] == [
        (2, "error", "NOT_FOUND")], batch.events
    assert "not registered" in batch.events[0].error
    assert_finished(gone, "error")
    assert gone.slot == 0 and not sched.waiting
    assert_blocks_consistent(sched)
    sched.postprocess(batch, tokens_for(batch))
    while sched.has_work():
        step(sched)
    assert adapters.refcount == Counter({1: 0}), "the adapter that loaded is released"
    assert_all_free(sched)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_whole_run_with_tenants_under_tight_kv(seed: int) -> None:
    rng = random.Random(seed)
    max_batch = 6
    sched = make_scheduler(num_blocks=14, block_size=4, max_batch_size=max_batch,
                           max_num_batched_tokens=16, max_queue=30)
    limits = {"a": TenantLimits(max_running=2), "b": TenantLimits(), "c": TenantLimits()}
    pending = []
    for i in range(30):
        prompt_len = rng.randint(1, 30)
        tenant = rng.choice("aabbc")
        pending.append(tenant_seq(i, tenant, prompt_len, rng.randint(1, min(24, 56 - prompt_len)),
                                  limits[tenant]))
    seqs = list(pending)
    streamed: dict[int, list[int]] = {s.request_id: [] for s in seqs}
    last_newcomer_only = False
    for _ in range(5000):
        while pending and rng.random() < 0.4:
            sched.add(pending.pop(0))
        if not pending and not sched.has_work():
            break
        running_before = set(ids(sched.running))
        batch = sched.schedule()
        if batch is None:
            continue
        newcomer_only = bool(running_before) and not running_before & set(ids_of_rows(batch))
        assert not (newcomer_only and last_newcomer_only), "two newcomer-only steps in a row"
        last_newcomer_only = newcomer_only
        assert len(sched.running) <= overflow_limit(max_batch), ids(sched.running)
        assert sum(1 for s in sched.running if s.tenant == "a") <= 2, ids(sched.running)
        for ev in sched.postprocess(batch, tokens_for(batch)):
            streamed[ev.request_id] += ev.token_ids
        assert_blocks_consistent(sched)
    else:
        pytest.fail(f"did not finish: waiting={ids(sched.waiting)} running={ids(sched.running)}")
    for s in seqs:
        assert_finished(s, "length")
        assert s.output_ids == expected_outputs(s.request_id, s.options.max_tokens)
        assert streamed[s.request_id] == s.output_ids, "every token streams exactly once"
    assert_all_free(sched)


def test_a_tenant_below_its_share_is_not_stuck_behind_a_flood() -> None:
    # b already runs one request; its next one must not wait for a's flood to finish either
    sched = make_scheduler(num_blocks=256, max_batch_size=16, max_num_batched_tokens=128)
    for request_id in range(1, 31):
        sched.add(tenant_seq(request_id, "a", max_tokens=50))
    step(sched)
    sched.add(tenant_seq(101, "b", max_tokens=50))
    assert rows(step(sched)[0]) == [(101, 4)]
    step(sched)
    sched.add(tenant_seq(102, "b", max_tokens=50))
    assert rows(step(sched)[0]) == [(102, 4)], "b runs 1 of its share of 8: served at once"
    assert len(sched.running) == 18, "two overflow rows past the batch of 16"


def test_a_preempted_sequence_never_resumes_on_a_replaced_adapter() -> None:
    adapters = FakeAdapters()
    sched = Scheduler(BlockManager(64, 4), 8, 32, 64, eos_token_ids=(EOS,), adapters=adapters)
    old, same = make_seq(1, prompt_len=4, max_tokens=8), make_seq(2, prompt_len=4, max_tokens=8)
    old.adapter_id = same.adapter_id = "a"
    sched.add(old)
    step(sched)
    assert old.adapter_spec == "v1" and old.num_output_tokens == 1
    sched._preempt(old)  # what _reserve does when memory runs short
    adapters.versions["a"] = "v2"  # replaced meanwhile
    sched.add(same)
    batch, _ = step(sched)
    assert [(e.request_id, e.error_code) for e in batch.events] == [(1, "ABORTED")]
    assert old.status is SequenceStatus.FINISHED and old.finish_reason == "error"
    assert same.adapter_spec == "v2", "a request admitted after the replacement: new version"
    assert adapters.refcount == Counter({1: 1}), "only the new request holds the slot"


class FakeConstraint:
    """Accepts tokens below 5000; done once it accepted `done_on`."""

    def __init__(self, done_on: int) -> None:
        self.done_on = done_on
        self.is_done = False
        self.accepted: list[int] = []

    def fill_mask(self, bitmask: object, row: int) -> None:
        raise AssertionError("the scheduler never builds masks")

    def accept(self, token_id: int) -> bool:
        self.accepted.append(token_id)
        self.is_done = token_id == self.done_on
        return token_id < 5000


def test_a_complete_grammar_stops_even_with_ignore_eos() -> None:
    sched = make_scheduler()
    seq = make_seq(1, prompt_len=3, max_tokens=10, ignore_eos=True)
    seq.constraint = FakeConstraint(done_on=EOS)
    sched.add(seq)
    step(sched, [1234])  # the prompt, then its first token
    _, events = step(sched, [EOS])
    assert seq.constraint.accepted == [1234, EOS]
    assert events[-1].finish_reason == "stop" and not sched.running


def test_a_token_the_grammar_refuses_ends_the_request_with_an_error() -> None:
    sched = make_scheduler()
    seq = make_seq(1, prompt_len=3, max_tokens=10)
    seq.constraint = FakeConstraint(done_on=EOS)
    sched.add(seq)
    _, events = step(sched, [9999])
    assert events[-1].finish_reason == "error" and events[-1].error_code == "INTERNAL"
    assert "response_format" in events[-1].error
    assert not sched.running and sched.blocks.num_free_blocks == sched.blocks.num_blocks
