"""Which adapter contents in the router's store must stay. A content (a blob, by digest) goes
once no registration uses it, but not while one is under way: an upload's blob is committed
before its registration starts, and a registration runs for seconds on the workers. Holds cover
that gap; an install under way (on a thread) may be a content being removed, found in the store
already, so removals wait for it.

Bookkeeping only: counters and a set, no lock (the router's event loop is the only caller); the
store's own calls are the only I/O.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Collection

from common.adapter_blobs import BlobStore


class ContentHolds:
    def __init__(self, store: BlobStore | None, registered: Callable[[str], bool]) -> None:
        """registered(digest): whether a registration uses that content."""
        self.store = store
        self._registered = registered
        self._held: Counter[str] = Counter()  # by digest: registrations under way
        self._installing = 0  # blobs being installed: removals wait (one may be theirs)
        self._deferred: set[str] = set()  # to remove once no install is under way

    def hold(self, digest: str) -> None:
        self._held[digest] += 1

    def unhold(self, digest: str) -> None:
        """Ends one hold; the content stays until drop_if_unused or release."""
        self._held[digest] -= 1
        if self._held[digest] <= 0:
            del self._held[digest]

    def is_held(self, digest: str) -> bool:
        return digest in self._held

    async def add(self, install: Callable[[], str]) -> str:
        """Runs `install` (a BlobWriter.commit or BlobStore.add_folder: -> digest) off the event
        loop and holds the content until release(digest): nothing removes it meanwhile."""
        self._installing += 1
        try:
            digest = await asyncio.to_thread(install)
            self.hold(digest)
            return digest
        finally:
            self._installing -= 1
            if not self._installing:
                deferred, self._deferred = self._deferred, set()
                for waiting in deferred:
                    self.drop_if_unused(waiting)

    def release(self, digest: str) -> None:
        """Ends add's hold; the content goes unless a registration uses it."""
        self.unhold(digest)
        self.drop_if_unused(digest)

    def drop_if_unused(self, digest: str) -> None:
        """Removes a content from the store once nothing (registered, held) uses it; while a
        blob is being installed the removal waits until that install is held."""
        if not digest or self.store is None or self.is_held(digest) or self._registered(digest):
            return
        if self._installing:
            self._deferred.add(digest)
        else:
            self.store.remove(digest)

    def collect_unused(self, used: Collection[str]) -> int:
        """Removes every stored content not in `used` (a crash between a blob's commit and its
        registration's leaves one). Call at start, before any request; -> count."""
        if self.store is None:
            return 0
        unused = sorted(self.store.digests() - set(used))
        for digest in unused:
            self.store.remove(digest)
        return len(unused)
