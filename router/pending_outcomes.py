"""Requests whose outcome a client may still report (Router.ReportOutcome): request id -> who
asked, which adapter served, and what the prompt was, bounded in count and age. Torch-free
bookkeeping; the prompt is kept as its embedding ("auto" computed it) or as clipped text (an
explicit adapter: embedded only if a report comes).

A request id is unguessable (uuid4) and is found only by the tenant that made the request: for
anyone else it does not exist, as for an expired or unknown id.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from common.errors import FailedPrecondition, NotFound

MAX_TEXT_CHARS = 2048  # the embedder reads 128 word pieces of head and tail: 1 KiB of each is more


@dataclass
class Pending:
    tenant: str
    adapter_key: str      # the worker key that served ("" = base model)
    embedding: Any = None  # the prompt's whole embedding (a tensor) when "auto" made one
    text: str = ""        # else the prompt text, clipped to its head and tail


def clip(text: str, limit: int = MAX_TEXT_CHARS) -> str:
    """Head and tail of a long prompt, as the embedder would read it anyway."""
    if len(text) <= limit:
        return text
    return text[:limit // 2] + " " + text[-(limit // 2):]


class PendingOutcomes:
    """request id -> [Pending] (one per prompt of the request), oldest dropped first."""

    def __init__(self, capacity: int = 16384, window_s: float = 3600.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity, self.window_s, self.clock = capacity, window_s, clock
        self._entries: OrderedDict[str, tuple[float, list[Pending]]] = OrderedDict()
        self._reported: OrderedDict[str, str] = OrderedDict()  # id -> tenant, to say "twice"

    def __len__(self) -> int:
        return len(self._entries)

    def expect(self, request_id: str, pending: Pending) -> None:
        self._expire()
        if request_id in self._entries:  # another prompt of the same request
            self._entries[request_id][1].append(pending)
            return
        self._entries[request_id] = (self.clock(), [pending])
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def take(self, tenant: str, request_id: str) -> list[Pending]:
        """The request's pendings, once: NotFound for an unknown, expired or other tenant's
        id, FailedPrecondition for one already reported."""
        self._expire()
        entry = self._entries.get(request_id)
        if entry is None or entry[1][0].tenant != tenant:
            if self._reported.get(request_id) == tenant:
                raise FailedPrecondition(f"request {request_id!r}: its outcome was already "
                                         "reported (one report per request)")
            raise NotFound(f"request {request_id!r} is unknown or older than "
                           f"{self.window_s:.0f} s (or the {self.capacity} most recent "
                           "requests): its outcome can no longer be reported")
        del self._entries[request_id]
        self._reported[request_id] = tenant
        while len(self._reported) > self.capacity:
            self._reported.popitem(last=False)
        return entry[1]

    def _expire(self) -> None:
        oldest = self.clock() - self.window_s
        while self._entries:
            request_id, (created, _) = next(iter(self._entries.items()))
            if created >= oldest:
                break
            del self._entries[request_id]
