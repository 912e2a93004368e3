"""Which adapter each device LoRA slot holds, how many running sequences use it, and which idle
slot is reused next. Bookkeeping only, no torch and no lock: AdapterMemory copies the weights
into a slot and calls this under its own lock.

Slot 0 is the base model's (no adapter) and is never handed out. An idle slot (no sequence uses
it) keeps its adapter resident until it is reused, least recently used first; a slot whose
adapter was unregistered is reused before any that still holds one.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, TypeVar

Spec = TypeVar("Spec")  # what a slot's weights were made from (AdapterSpec: id + version)


class SlotTable(Generic[Spec]):
    def __init__(self, num_slots: int) -> None:
        self.adapter: list[str | None] = [None] * (num_slots + 1)  # by slot
        self.spec: list[Spec | None] = [None] * (num_slots + 1)  # by slot: the version it holds
        self.refcount = [0] * (num_slots + 1)  # by slot: sequences using it
        self._slot_of: dict[str, int] = {}
        self._idle: OrderedDict[int, None] = OrderedDict(
            (slot, None) for slot in range(1, num_slots + 1))  # refcount 0, the next to reuse first

    def slot_of(self, adapter_id: str) -> int | None:
        """The slot holding `adapter_id`, in use or idle; None if not resident."""
        return self._slot_of.get(adapter_id)

    def has_idle(self) -> bool:
        return bool(self._idle)

    def idle(self) -> list[int]:
        """The idle slots, the next to be reused first."""
        return list(self._idle)

    def num_in_use(self) -> int:
        return sum(1 for count in self.refcount if count)

    def take_idle(self) -> tuple[int, str | None]:
        """Empties the idle slot to reuse next -> (that slot, the adapter it held or None).
        The slot is not idle afterwards: place() then pin() it."""
        slot, _ = self._idle.popitem(last=False)
        old = self.adapter[slot]
        if old is not None:
            del self._slot_of[old]
            self.adapter[slot] = None
        return slot, old

    def place(self, slot: int, adapter_id: str, spec: Spec) -> None:
        self.adapter[slot], self.spec[slot] = adapter_id, spec
        self._slot_of[adapter_id] = slot

    def pin(self, slot: int) -> None:
        """One more sequence uses `slot`: it is not idle."""
        if self.refcount[slot] == 0:
            self._idle.pop(slot, None)
        self.refcount[slot] += 1

    def unpin(self, slot: int) -> None:
        """One sequence fewer; at none the slot is idle, reused last (its adapter was just
        used), or first when it holds no adapter."""
        self.refcount[slot] -= 1
        assert self.refcount[slot] >= 0, f"slot {slot} released more often than acquired"
        if self.refcount[slot] == 0:
            self._idle[slot] = None
            if self.adapter[slot] is None:
                self._idle.move_to_end(slot, last=False)

    def forget(self, adapter_id: str) -> None:
        """`adapter_id` no longer counts as resident (unregistered or replaced). A slot still
        in use keeps serving its sequences with `spec[slot]`'s weights; idle, it is reused
        first."""
        slot = self._slot_of.pop(adapter_id, None)
        if slot is None:
            return
        self.adapter[slot] = None
        if slot in self._idle:
            self._idle.move_to_end(slot, last=False)
