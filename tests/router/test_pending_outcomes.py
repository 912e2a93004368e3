"""router.pending_outcomes: request ids are found once, by their own tenant, within the window
and the capacity; no threads, a fake clock."""

from __future__ import annotations

import pytest

from common.errors import FailedPrecondition, NotFound
from router.pending_outcomes import MAX_TEXT_CHARS, Pending, PendingOutcomes, clip


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_taken_once_by_its_own_tenant() -> None:
    pending = PendingOutcomes()
    pending.expect("r1", Pending("acme", "acme:a", text="hi"))
    with pytest.raises(NotFound):
        pending.take("globex", "r1")  # another tenant's id does not exist for it
    [got] = pending.take("acme", "r1")
    assert got.adapter_key == "acme:a"
    with pytest.raises(FailedPrecondition, match="already reported"):
        pending.take("acme", "r1")
    with pytest.raises(NotFound):
        pending.take("globex", "r1")  # and saying "already" would tell it the id exists
    with pytest.raises(NotFound):
        pending.take("acme", "never-issued")


def test_prompts_of_one_request_share_its_id() -> None:
    pending = PendingOutcomes()
    pending.expect("r", Pending("t", "a"))
    pending.expect("r", Pending("t", "b"))
    assert [p.adapter_key for p in pending.take("t", "r")] == ["a", "b"]


def test_expire_after_the_window_and_beyond_the_capacity() -> None:
    clock = Clock()
    pending = PendingOutcomes(capacity=3, window_s=10.0, clock=clock)
    pending.expect("old", Pending("t", ""))
    clock.now = 5.0
    for name in ("a", "b", "c"):
        pending.expect(name, Pending("t", ""))
    assert len(pending) == 3  # "old" went first: capacity
    with pytest.raises(NotFound, match="older than 10 s"):
        pending.take("t", "old")
    clock.now = 16.0
    with pytest.raises(NotFound):
        pending.take("t", "a")
    assert len(pending) == 0


def test_clip_keeps_head_and_tail() -> None:
    assert clip("short") == "short"
    long = "A" * 5000 + "B" * 5000
    clipped = clip(long)
    assert len(clipped) <= MAX_TEXT_CHARS + 1 and clipped.startswith("A") and clipped.endswith("B")
