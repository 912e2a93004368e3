"""ContentHolds: when the router's store may remove an adapter content. A fake store records
removals; installs are plain functions (the one thread hop is add's own)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from router.content_holds import ContentHolds


class FakeStore:
    def __init__(self, digests: set[str]) -> None:
        self.held = set(digests)
        self.removed: list[str] = []

    def digests(self) -> set[str]:
        return set(self.held)

    def remove(self, digest: str) -> None:
        self.held.discard(digest)
        self.removed.append(digest)


def holds(store: FakeStore, registered: set[str]) -> ContentHolds:
    return ContentHolds(store, registered.__contains__)  # type: ignore[arg-type]


def test_a_content_goes_only_when_nothing_uses_it() -> None:
    store = FakeStore({"a", "b", "c"})
    contents = holds(store, registered={"a"})
    contents.hold("b")
    for digest in ("a", "b", "c", ""):
        contents.drop_if_unused(digest)
    assert store.removed == ["c"]  # a registered, b held, "" no content
    contents.unhold("b")
    assert not contents.is_held("b") and store.removed == ["c"]  # unhold alone removes nothing
    contents.drop_if_unused("b")
    assert store.removed == ["c", "b"]


def test_holds_count_and_release_removes_unless_registered() -> None:
    store = FakeStore({"a", "b"})
    registered: set[str] = set()
    contents = holds(store, registered)
    contents.hold("a")
    contents.hold("a")
    contents.release("a")
    assert store.removed == []  # one hold left
    registered.add("a")  # its registration finished
    contents.release("a")
    assert store.removed == [] and not contents.is_held("a")
    contents.hold("b")
    contents.release("b")  # refused: nothing registered it
    assert store.removed == ["b"]


def test_add_holds_its_content_and_removals_wait_for_installs() -> None:
    store = FakeStore({"old", "same"})
    contents = holds(store, registered=set())
    started, finish = threading.Event(), threading.Event()

    def install() -> str:  # finds "same" in the store already, as add_folder may
        started.set()
        finish.wait(timeout=10)
        return "same"

    async def main() -> str:
        adding = asyncio.create_task(contents.add(install))
        await asyncio.to_thread(started.wait, 10)
        contents.drop_if_unused("same")  # under way: may be the install's own content
        contents.drop_if_unused("old")
        assert store.removed == []
        finish.set()
        return await adding

    assert asyncio.run(main()) == "same"
    assert store.removed == ["old"] and contents.is_held("same")  # "same" held by add
    contents.release("same")
    assert store.removed == ["old", "same"]


def test_a_failed_install_still_runs_the_deferred_removals() -> None:
    store = FakeStore({"old"})
    contents = holds(store, registered=set())
    started, finish = threading.Event(), threading.Event()

    def install() -> str:
        started.set()
        finish.wait(timeout=10)
        raise OSError("disk full")

    async def main() -> None:
        adding = asyncio.create_task(contents.add(install))
        await asyncio.to_thread(started.wait, 10)
        contents.drop_if_unused("old")
        assert store.removed == []
        finish.set()
        with pytest.raises(OSError):
            await adding

    asyncio.run(main())
    assert store.removed == ["old"]


def test_collect_unused_and_no_store() -> None:
    store = FakeStore({"a", "b", "c"})
    assert holds(store, set()).collect_unused({"b"}) == 2
    assert sorted(store.removed) == ["a", "c"]
    nothing = ContentHolds(None, lambda digest: False)
    nothing.drop_if_unused("a")
    assert nothing.collect_unused(set()) == 0
