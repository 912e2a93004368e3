"""SlotTable: which device slot holds which adapter, and which idle slot is reused next. Plain
bookkeeping, no torch, no threads (AdapterMemory's own tests cover the weights and the lock)."""

from __future__ import annotations

import pytest

from worker.slot_table import SlotTable


def load(table: SlotTable[str], adapter_id: str) -> tuple[int, str | None]:
    """What AdapterMemory.acquire does for an adapter that is not resident."""
    slot, evicted = table.take_idle()
    table.place(slot, adapter_id, f"{adapter_id}-v1")
    table.pin(slot)
    return slot, evicted


def test_slots_start_idle_and_empty_and_slot_zero_is_never_handed_out() -> None:
    table: SlotTable[str] = SlotTable(3)
    assert table.idle() == [1, 2, 3] and table.has_idle() and table.num_in_use() == 0
    assert [load(table, a)[0] for a in "abc"] == [1, 2, 3]
    assert not table.has_idle() and table.num_in_use() == 3
    assert table.slot_of("b") == 2 and table.spec[2] == "b-v1" and table.slot_of("z") is None


def test_the_least_recently_released_slot_is_reused_and_its_adapter_evicted() -> None:
    table: SlotTable[str] = SlotTable(2)
    a, _ = load(table, "a")
    b, _ = load(table, "b")
    table.unpin(b)
    table.unpin(a)  # a used last: b goes first
    assert table.idle() == [b, a]
    slot, evicted = load(table, "c")
    assert (slot, evicted) == (b, "b") and table.slot_of("b") is None
    assert table.slot_of("a") == a  # idle but still resident: a hit needs no copy
    table.pin(a)
    assert table.idle() == [] and table.refcount[a] == 1


def test_a_slot_is_idle_only_when_no_sequence_uses_it() -> None:
    table: SlotTable[str] = SlotTable(1)
    slot, _ = load(table, "a")
    table.pin(slot)
    table.unpin(slot)
    assert table.refcount[slot] == 1 and table.idle() == []
    table.unpin(slot)
    assert table.refcount[slot] == 0 and table.idle() == [slot]
    with pytest.raises(AssertionError, match="released more often"):
        table.unpin(slot)


def test_a_forgotten_adapter_frees_its_slot_first_but_keeps_it_for_running_sequences() -> None:
    table: SlotTable[str] = SlotTable(3)
    a, _ = load(table, "a")
    b, _ = load(table, "b")
    c, _ = load(table, "c")
    for slot in (a, b, c):
        table.unpin(slot)
    table.forget("c")  # idle: the first to reuse, nothing to evict
    assert table.idle() == [c, a, b] and table.slot_of("c") is None
    assert table.take_idle() == (c, None)
    table.place(c, "d", "d-v1")
    table.pin(c)
    table.pin(b)
    table.forget("b")  # in use: its sequence keeps the weights it started with
    assert table.slot_of("b") is None and table.spec[b] == "b-v1" and table.refcount[b] == 1
    table.unpin(b)  # then first in line, before a (which still holds an adapter)
    assert table.idle() == [b, a]
    table.forget("nobody")  # not resident: nothing changes
    assert table.idle() == [b, a]
