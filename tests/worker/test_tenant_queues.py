"""Tests for worker.tenant_queues: per-tenant FIFOs in round-robin order, queue caps, the gate."""

from __future__ import annotations

import pytest

from worker.sequence import SamplingOptions, Sequence, TenantLimits
from worker.tenant_queues import TenantGate, TenantQueues, has_newcomer, overflow_limit


def seq(request_id: int, tenant: str = "", max_running: int = 0, max_queued: int = 0) -> Sequence:
    return Sequence(request_id, [1, 2, 3], SamplingOptions(max_tokens=1), tenant=tenant,
                    limits=TenantLimits(max_running=max_running, max_queued=max_queued))


def ids(seqs) -> list[int]:
    return [s.request_id for s in seqs]


def queues_of(*seqs: Sequence) -> TenantQueues:
    queues = TenantQueues()
    for s in seqs:
        queues.append(s)
    return queues


# --- queue operations ----------------------------------------------------------------------------


def test_empty_queues() -> None:
    queues = TenantQueues()
    assert len(queues) == 0 and not queues
    assert list(queues) == [] and queues.tenants() == []
    assert queues.count("a") == 0 and queues.num_tenants == 0


def test_one_tenant_is_plain_fifo() -> None:
    s1, s2, s3, s0 = seq(1), seq(2), seq(3), seq(0)
    queues = queues_of(s1, s2, s3)
    assert ids(queues) == [1, 2, 3]
    queues.take(s1)
    queues.appendleft(s0)  # a preempted sequence: the front
    assert ids(queues) == [0, 2, 3]
    queues.remove(s2)
    assert ids(queues) == [0, 3] and len(queues) == 2 and queues.count("") == 2


def test_iteration_interleaves_tenants_in_rotation_order() -> None:
    a1, a2, a3, b1, c1, c2 = (seq(1, "a"), seq(2, "a"), seq(3, "a"), seq(11, "b"),
                              seq(21, "c"), seq(22, "c"))
    queues = queues_of(a1, a2, b1, c1, a3, c2)
    assert ids(queues) == [1, 11, 21, 2, 22, 3], "heads first, then second sequences, ..."
    assert queues.tenants() == ["a", "b", "c"]
    assert (queues.count("a"), queues.count("b"), queues.count("c")) == (3, 1, 2)
    assert len(queues) == 6 and queues.num_tenants == 3


def test_take_moves_the_tenant_behind_the_others() -> None:
    a1, a2, b1, c1 = seq(1, "a"), seq(2, "a"), seq(11, "b"), seq(21, "c")
    queues = queues_of(a1, a2, b1, c1)
    queues.take(a1)
    assert queues.tenants() == ["b", "c", "a"], "the rotation resumes after the tenant admitted"
    assert ids(queues) == [11, 21, 2]
    queues.take(c1)  # b was passed over (say its adapter was loading): it keeps the front
    assert queues.tenants() == ["b", "a"]
    assert ids(queues) == [11, 2]


def test_remove_keeps_the_rotation_and_drops_empty_tenants() -> None:
    a1, a2, b1, c1 = seq(1, "a"), seq(2, "a"), seq(11, "b"), seq(21, "c")
    queues = queues_of(a1, a2, b1, c1)
    queues.remove(a2)
    queues.remove(b1)
    assert queues.tenants() == ["a", "c"] and ids(queues) == [1, 21]
    assert queues.count("b") == 0 and queues.num_tenants == 2
    with pytest.raises(ValueError):
        queues.remove(b1)
    with pytest.raises(ValueError):
        queues.remove(seq(99, "a"))


def test_a_returning_tenant_joins_at_the_back() -> None:
    a1, b1, a2 = seq(1, "a"), seq(11, "b"), seq(2, "a")
    queues = queues_of(a1, b1)
    queues.take(a1)
    queues.append(a2)
    assert queues.tenants() == ["b", "a"] and ids(queues) == [11, 2]


def test_appendleft_puts_a_preempted_sequence_first_in_its_tenant() -> None:
    a1, b1, b2, c1 = seq(1, "a"), seq(11, "b"), seq(12, "b"), seq(21, "c")
    queues = queues_of(a1, b1)
    queues.appendleft(b2)  # b waits already: keeps its place in the rotation
    assert ids(queues) == [1, 12, 11]
    queues.appendleft(c1)  # c had nothing waiting: it goes first, as it waited its turn once
    assert queues.tenants() == ["c", "a", "b"] and ids(queues) == [21, 1, 12, 11]
    assert len(queues) == 4


def test_iteration_survives_take_and_remove_while_walking() -> None:
    a1, a2, b1, b2 = seq(1, "a"), seq(2, "a"), seq(11, "b"), seq(12, "b")
    queues = queues_of(a1, a2, b1, b2)
    walked = []
    for s in queues:
        walked.append(s.request_id)
        if s is a1:
            queues.take(s)
        elif s is b1:
            queues.remove(s)
    assert walked == [1, 11, 2, 12], "the walk is over a snapshot"
    assert ids(queues) == [12, 2] and len(queues) == 2


def test_clear() -> None:
    queues = queues_of(seq(1, "a"), seq(11, "b"))
    queues.clear()
    assert len(queues) == 0 and list(queues) == [] and queues.num_tenants == 0


# --- queue caps ----------------------------------------------------------------------------------


def test_refusal_over_the_tenants_max_queued() -> None:
    queues = queues_of(seq(1, "acme", max_queued=2), seq(2, "acme", max_queued=2))
    message = queues.refusal(seq(3, "acme", max_queued=2), max_queue=100)
    assert "tenant 'acme' has 2 requests waiting" in message and "max_queued is 2" in message
    assert queues.refusal(seq(4, "acme", max_queued=3), max_queue=100) == "", (
        "the newest limits the router sent apply")
    assert queues.refusal(seq(5, "acme"), max_queue=100) == "", "0 = no limit"
    assert queues.refusal(seq(11, "other", max_queued=1), max_queue=100) == ""


def test_full_queue_refuses_only_tenants_holding_their_fair_share() -> None:
    queues = queues_of(*[seq(i, "a") for i in range(4)])
    message = queues.refusal(seq(9, "a"), max_queue=4)
    assert "queue is full" in message and "tenant 'a' holds 4 of them" in message, message
    assert queues.refusal(seq(11, "b"), max_queue=4) == "", "b holds nothing: let in"
    queues.append(seq(11, "b"))
    assert queues.refusal(seq(12, "b"), max_queue=4) == "", "b holds 1 of a fair share of 2"
    queues.append(seq(12, "b"))
    assert "tenant 'b' holds 2" in queues.refusal(seq(13, "b"), max_queue=4)
    assert queues.refusal(seq(21, "c"), max_queue=4) == "", "a third tenant: share 1"


def test_one_tenant_at_max_queue_is_refused() -> None:
    queues = queues_of(seq(1), seq(2))
    assert "queue is full (2 waiting requests" in queues.refusal(seq(3), max_queue=2)
    assert queues.refusal(seq(3), max_queue=3) == ""


def test_fair_share_is_at_least_one() -> None:
    queues = queues_of(seq(1, "a"))
    assert queues.refusal(seq(11, "b"), max_queue=1) == "", "1 // 2 tenants rounds up to 1"
    queues.append(seq(11, "b"))
    assert "twice max_queue" in queues.refusal(seq(12, "b"), max_queue=1)


def test_nobody_adds_past_twice_max_queue() -> None:
    queues = queues_of(*(seq(i, f"t{i}") for i in range(8)))
    assert "twice max_queue" in queues.refusal(seq(101, "newer"), max_queue=4)
    assert "holds 1" in queues.refusal(seq(102, "t0"), max_queue=6)


# --- the admission gate --------------------------------------------------------------------------


def test_overflow_limit() -> None:
    assert [overflow_limit(n) for n in (1, 8, 15, 16, 64)] == [2, 9, 16, 18, 72]


def test_gate_lets_newcomers_past_a_full_batch_up_to_the_overflow_limit() -> None:
    running = [seq(i, "flood") for i in range(8)]
    gate = TenantGate(running, max_batch_size=8)
    assert not gate.allows(seq(100, "flood")), "a tenant already running: only below the batch"
    newcomer = seq(200, "new")
    assert gate.allows(newcomer) and not gate.is_full
    gate.admitted(newcomer)
    assert gate.is_full, "8 + max(1, 8 // 8) = 9 running"
    assert not gate.allows(seq(201, "new")), "no longer a newcomer"


def test_gate_below_the_batch_admits_anyone_within_their_running_cap() -> None:
    running = [seq(1, "a", max_running=2), seq(2, "a", max_running=2)]
    gate = TenantGate(running, max_batch_size=8)
    assert not gate.allows(seq(3, "a", max_running=2)), "a runs its max_running"
    assert gate.allows(seq(4, "a", max_running=3)), "the candidate's own (newest) limits"
    assert gate.allows(seq(5, "a")), "0 = no limit"
    capped = seq(11, "b", max_running=1)
    assert gate.allows(capped)
    gate.admitted(capped)
    assert not gate.allows(seq(12, "b", max_running=1)), "counts this step's admissions"
    assert gate.num_running == 3


def test_newcomers_only_gate() -> None:
    gate = TenantGate([seq(1, "a")], max_batch_size=8, newcomers_only=True)
    assert not gate.allows(seq(2, "a"))
    newcomer = seq(11, "b")
    assert gate.allows(newcomer)
    gate.admitted(newcomer)
    assert not gate.allows(seq(12, "b")), "one sequence per new tenant"
    assert gate.allows(seq(21, "c"))


def test_has_newcomer() -> None:
    queues = queues_of(seq(1, "a"), seq(2, "a"))
    assert not has_newcomer(queues, [seq(0, "a")], 8)
    assert has_newcomer(queues, [seq(10 + i, "b") for i in range(4)], 8)
    assert not has_newcomer(queues, [seq(10, "b")], 8), "a small step: a joins it as is"
    assert not has_newcomer(queues, [], 8), "nothing runs: no step to jump ahead of"
    flood = [seq(20 + i, "b") for i in range(7)]
    assert has_newcomer(queues, [seq(0, "a"), *flood], 8), "a runs 1 of its share of 4"
    assert not has_newcomer(queues, [*(seq(i, "a") for i in range(4)), *flood], 8)
    assert not has_newcomer(TenantQueues(), [seq(0, "a")], 8)
