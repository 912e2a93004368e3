"""Fair admission bookkeeping: one FIFO queue per tenant, round robin across tenants.

Torch-free and thread-free, like the scheduler that owns it. With one tenant ("" everywhere:
tests, benchmarks, a single-user worker) every rule here reduces to a plain FIFO queue.
"""

from __future__ import annotations

from collections import Counter, OrderedDict, deque
from collections.abc import Iterable, Iterator
from itertools import zip_longest

from worker.sequence import Sequence


class TenantQueues:
    """The scheduler's waiting sequences, offered to admission in round-robin tenant order.

    Invariants: every tenant in `_queues` has at least one waiting sequence (emptied queues are
    dropped, so memory follows the tenants actually waiting); the dict's order is the rotation, its
    front tenant offered first. take() moves the admitted sequence's tenant to the back, so the
    rotation resumes after the tenant admitted last and a tenant passed over keeps its place.
    """

    def __init__(self) -> None:
        self._queues: OrderedDict[str, deque[Sequence]] = OrderedDict()
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[Sequence]:
        """Every waiting sequence in admission order: the tenants' heads in rotation order, then
        their second sequences, and so on (FIFO within a tenant).

        Iterates over a snapshot taken at the first next(), so the caller may take() or remove()
        sequences while walking it.
        """
        snapshot = [list(queue) for queue in self._queues.values()]
        for row in zip_longest(*snapshot):
            yield from (seq for seq in row if seq is not None)

    @property
    def num_tenants(self) -> int:
        return len(self._queues)

    def tenants(self) -> list[str]:
        """Tenants with waiting sequences, in rotation order."""
        return list(self._queues)

    def count(self, tenant: str) -> int:
        queue = self._queues.get(tenant)
        return len(queue) if queue else 0

    def append(self, seq: Sequence) -> None:
        """A new request: the back of its tenant's queue (a new tenant joins at the back)."""
        self._queues.setdefault(seq.tenant, deque()).append(seq)
        self._len += 1

    def appendleft(self, seq: Sequence) -> None:
        """A preempted sequence: the front of its tenant's queue, and a tenant that had nothing
        waiting goes to the front of the rotation, as the victim went to the front of the single
        FIFO before tenants existed: it already waited its turn once."""
        queue = self._queues.get(seq.tenant)
        if queue is None:
            queue = self._queues[seq.tenant] = deque()
            self._queues.move_to_end(seq.tenant, last=False)
        queue.appendleft(seq)
        self._len += 1

    def remove(self, seq: Sequence) -> None:
        """Takes seq out without touching the rotation (aborts, failures); ValueError if absent."""
        queue = self._queues.get(seq.tenant)
        if queue is None:
            raise ValueError(f"request {seq.request_id} is not waiting")
        queue.remove(seq)
        self._len -= 1
        if not queue:
            del self._queues[seq.tenant]

    def take(self, seq: Sequence) -> None:
        """Takes seq out for admission: its tenant goes to the back of the rotation."""
        self.remove(seq)
        if seq.tenant in self._queues:
            self._queues.move_to_end(seq.tenant)

    def clear(self) -> None:
        self._queues.clear()
        self._len = 0

    def refusal(self, seq: Sequence, max_queue: int) -> str:
        """Why seq may not join the queue now, "" when it may.

        Per tenant: at most seq.limits.max_queued (> 0) waiting. Worker-wide: once max_queue are
        waiting, only a tenant holding less than its fair share (max_queue over the tenants
        waiting, counting seq's, at least 1) may add more. So one tenant filling the queue never
        makes another's request fail. Past 2 * max_queue nobody may add more: the queue's memory
        stays bounded whatever the number of tenants.
        """
        held = self.count(seq.tenant)
        cap = seq.limits.max_queued
        if cap and held >= cap:
            return (f"tenant {seq.tenant!r} has {held} requests waiting on this worker "
                    f"(its max_queued is {cap}); retry later")
        if self._len < max_queue:
            return ""
        if self._len >= 2 * max_queue:
            return (f"the worker queue is full ({self._len} waiting requests, twice max_queue "
                    f"{max_queue}); retry later")
        fair_share = max(1, max_queue // (self.num_tenants + (held == 0)))
        if held < fair_share:
            return ""
        return (f"the worker queue is full ({self._len} waiting requests, max_queue {max_queue}) "
                f"and tenant {seq.tenant!r} holds {held} of them; retry later")


def overflow_limit(max_batch_size: int) -> int:
    """Most sequences running at once: newcomers may go this far past max_batch_size."""
    return max_batch_size + max(1, max_batch_size // 8)


def fair_share(max_batch_size: int, num_active_tenants: int) -> int:
    """Rows of the batch each active tenant (running or waiting) is owed."""
    return max(1, max_batch_size // max(1, num_active_tenants))


class TenantGate:
    """One step's per-tenant admission rules, counting as admissions happen.

    A tenant already running max_running (> 0, from the candidate's own limits: the newest the
    router sent) is passed over. A tenant running less than its fair share of the batch while
    others run (an under-served tenant, e.g. a newcomer) may be admitted up to
    overflow_limit(max_batch_size) running in all, so a flood holding the whole batch never makes
    it wait for the flood's completions; any other tenant only below max_batch_size.
    newcomers_only: only under-served tenants at all (a newcomer-only step). With one tenant
    only the old rule holds: a tenant with nothing running is the newcomer.
    """

    def __init__(self, running: Iterable[Sequence], max_batch_size: int,
                 newcomers_only: bool = False, waiting_tenants: Iterable[str] = ()) -> None:
        self.per_tenant: Counter[str] = Counter(seq.tenant for seq in running)
        self.num_running = self.per_tenant.total()
        self.max_batch_size = max_batch_size
        self.newcomers_only = newcomers_only
        active = set(self.per_tenant) | set(waiting_tenants)
        self.share = fair_share(max_batch_size, len(active)) if len(active) > 1 else 1

    @property
    def is_full(self) -> bool:
        return self.num_running >= overflow_limit(self.max_batch_size)

    def is_under_served(self, tenant: str) -> bool:
        running = self.per_tenant[tenant]
        others = self.num_running - running
        return running < self.share and (running == 0 or others > 0)

    def allows(self, seq: Sequence) -> bool:
        running = self.per_tenant[seq.tenant]
        if not self.is_under_served(seq.tenant) and (
                self.newcomers_only or self.num_running >= self.max_batch_size):
            return False
        cap = seq.limits.max_running
        return not (cap and running >= cap)

    def admitted(self, seq: Sequence) -> None:
        self.per_tenant[seq.tenant] += 1
        self.num_running += 1


def has_newcomer(queues: TenantQueues, running: Iterable[Sequence],
                 max_batch_size: int) -> bool:
    """Whether a prompt-only step is worth it: some tenant waits while under-served, others
    run, and they run at least half a batch (a smaller step costs little more than the
    newcomer's prompt alone). False for one tenant alone: its steps stay as they were."""
    gate = TenantGate(running, max_batch_size, waiting_tenants=queues.tenants())
    if gate.num_running < max(1, max_batch_size // 2):
        return False
    return any(gate.is_under_served(tenant) and gate.num_running > gate.per_tenant[tenant]
               for tenant in queues.tenants())
