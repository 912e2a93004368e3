"""Continuous batching: which sequences run in the next step, and what their sampled tokens mean.

New sequences join at any step; prompt chunks and decodes share a step under one token budget;
finished, aborted and preempted sequences free their KV blocks at once. Admission is fair across
tenants (worker.tenant_queues): round robin over per-tenant queues, per-tenant caps, and a tenant
with nothing running gets its first chunk in a step of its own instead of behind another's flood.
With one tenant all of it is plain FIFO. Torch-free.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from common.errors import EdgeLoraError, NotFound, ResourceExhausted
from worker.adapter_memory import AdapterMemory
from worker.kv_cache import BlockManager
from worker.sequence import Sequence, SequenceStatus, TokenEvent, TokenLogprobs
from worker.tenant_queues import TenantGate, TenantQueues, has_newcomer

# A named tenant already running something admits more only while 1/16 of the KV blocks stay
# free, so another tenant's first request finds room without waiting for a flood to finish.
KV_HEADROOM_FRACTION = 16


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int  # tokens fed this step, starting at seq.num_computed_tokens


@dataclass
class Batch:
    items: list[ScheduledSeq]
    # requests that ended while scheduling (their adapter failed to load or went away): as is
    events: list[TokenEvent] = field(default_factory=list)


@dataclass
class StepResult:
    """What one forward step gives the batch (ModelRunner.run). Row i is batch.items[i] in the
    order run() left them in (it sorts them in place); dicts hold only the rows they apply to."""

    tokens: list[int]  # one per row; meaningless for mid-prompt chunks and scoring rows
    # the sampled token's, for the rows whose request asked
    logprobs: dict[int, TokenLogprobs] = field(default_factory=dict)
    # scoring rows: the sum of log p over the reference tokens this chunk predicts
    log_likelihoods: dict[int, float] = field(default_factory=dict)


class Scheduler:
    def __init__(self, blocks: BlockManager, max_batch_size: int, max_num_batched_tokens: int,
                 max_queue: int, eos_token_ids: tuple[int, ...],
                 adapters: AdapterMemory | None = None) -> None:
        self.blocks = blocks
        self.adapters = adapters
        self.max_batch_size = max_batch_size
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_queue = max_queue
        self.eos_token_ids = frozenset(eos_token_ids)
        self.waiting = TenantQueues()
        self.running: list[Sequence] = []
        # False after a newcomer-only step (the next one must advance the running sequences) and
        # after a preemption (memory is short: a newcomer would only be the next victim).
        self._newcomer_step_ok = True

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        """Queues seq at the back of its tenant's queue; ResourceExhausted over the tenant's
        max_queued or, once max_queue are waiting, past the tenant's fair share of the queue."""
        refusal = self.waiting.refusal(seq, self.max_queue)
        if refusal:
            raise ResourceExhausted(refusal)
        if seq.adapter_id:
            if self.adapters is None:
                raise NotFound(f"adapter {seq.adapter_id!r}: this worker serves no adapters")
            error = self.adapters.error(seq.adapter_id)
            if error:
                raise error
            self.adapters.prefetch(seq.adapter_id)  # disk -> host while it queues
        self.waiting.append(seq)

    def abort(self, request_id: int) -> bool:
        for queue in (self.waiting, self.running):
            for seq in queue:
                if seq.request_id == request_id:
                    queue.remove(seq)
                    self._finish(seq, "cancelled")
                    return True
        return False

    def schedule(self) -> Batch | None:
        """The next step's rows (None: nothing to run).

        When a tenant with nothing running can be admitted while others run, the step holds only
        newcomers' prompt chunks: their first token then costs one small prefill step rather than
        a full step of someone's flood. Never two such steps in a row, so running sequences
        advance at least every other step however often new tenants arrive. A newcomer that
        finds no KV free takes it from the tenant running the most (its newest sequence).
        """
        events: list[TokenEvent] = []
        if self.running and self._newcomer_step_ok and has_newcomer(self.waiting, self.running,
                                                                       self.max_batch_size):
            # Before reserving anything for the running sequences: they skip this step.
            items, events = self._admit(self.max_num_batched_tokens, newcomers_only=True)
            if items:
                self._newcomer_step_ok = False
                return Batch(items, events)
        num_waiting = len(self.waiting)
        items, budget = self._schedule_running()
        self._newcomer_step_ok = True
        # After a preemption, memory is short: admitting now would only be preempted again.
        if len(self.waiting) == num_waiting:
            admitted, admit_events = self._admit(budget)
            items += admitted
            events += admit_events
        return Batch(items, events) if items or events else None

    def _schedule_running(self) -> tuple[list[ScheduledSeq], int]:
        """Rows for the running sequences in admission order, reserving their KV (preempting
        the newest if short); -> (rows, token budget left)."""
        budget = self.max_num_batched_tokens
        items: list[ScheduledSeq] = []
        scheduled: set[int] = set()
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:  # preempted earlier in this loop
                continue
            num_new = min(seq.num_uncomputed_tokens, budget)
            if not self._reserve(seq, num_new, scheduled):
                continue
            items.append(ScheduledSeq(seq, num_new))
            scheduled.add(seq.request_id)
            budget -= num_new
        return items, budget

    def _admit(self, budget: int, newcomers_only: bool = False,
               ) -> tuple[list[ScheduledSeq], list[TokenEvent]]:
        """Moves waiting sequences to running in round-robin tenant order (FIFO within a tenant)
        while the token budget, KV blocks and slots allow; -> (their rows, error events).

        Passed over, still waiting: tenants the TenantGate refuses (running cap, full batch,
        newcomers_only); sequences whose adapter is still loading, and once one waits for a
        device slot, later ones needing a new slot wait behind it, so nobody starves. The first
        candidate whose KV blocks cannot be had ends admission: KV is global, and letting later
        arrivals overtake it could starve it. A newcomer-only step also leaves the blocks the
        running sequences' next step needs, or the newcomer would be that step's victim.
        """
        items: list[ScheduledSeq] = []
        events: list[TokenEvent] = []
        gate = TenantGate(self.running, self.max_batch_size, newcomers_only,
                          waiting_tenants=self.waiting.tenants())
        keep = self._running_needs() if newcomers_only else 0
        headroom = max(1, self.blocks.num_blocks // KV_HEADROOM_FRACTION)
        waiting_for_slot = False
        for seq in self.waiting:
            if budget == 0 or gate.is_full:
                break
            if not gate.allows(seq):
                continue
            if seq.adapter_id and not self.adapters.is_resident(seq.adapter_id):
                error = self.adapters.error(seq.adapter_id)
                if error:
                    events.append(self._fail_waiting(seq, error))
                    continue
                if waiting_for_slot or not self.adapters.can_acquire(seq.adapter_id):
                    waiting_for_slot = waiting_for_slot or self.adapters.has_no_idle_slot()
                    continue
            num_new = min(seq.num_uncomputed_tokens, budget)
            needed = self.blocks.blocks_needed(seq.block_table, seq.num_computed_tokens + num_new)
            # A named tenant already running leaves some KV free for the others' first request.
            extra = headroom if seq.tenant and gate.per_tenant[seq.tenant] else 0
            if not self.blocks.can_allocate(needed + keep + extra):
                if extra and self.blocks.can_allocate(needed + keep):
                    continue
                if not newcomers_only or not self._make_room(seq, needed):
                    break
                keep = self._running_needs()
            failure = self._start(seq, num_new)
            if failure:
                events.append(failure)
                continue
            gate.admitted(seq)
            items.append(ScheduledSeq(seq, num_new))
            budget -= num_new
        return items, events

    def _make_room(self, newcomer: Sequence, needed: int) -> bool:
        """Preempts the newest sequences of the tenant running the most (while it runs two or
        more, and it is not the newcomer's) until `needed` blocks and the running sequences'
        next step fit; -> whether they do."""
        while not self.blocks.can_allocate(needed + self._running_needs()):
            counts = Counter(s.tenant for s in self.running)
            tenant, num_running = max(counts.items(), key=lambda item: item[1],
                                      default=("", 0))
            if num_running < 2 or tenant == newcomer.tenant:
                return False
            self._preempt([s for s in self.running if s.tenant == tenant][-1])
        return True

    def _running_needs(self) -> int:
        """KV blocks the next normal step reserves for the running sequences (their rows in
        order under the token budget, as _schedule_running takes them)."""
        budget, needed = self.max_num_batched_tokens, 0
        for seq in self.running:
            num_new = min(seq.num_uncomputed_tokens, budget)
            needed += self.blocks.blocks_needed(seq.block_table, seq.num_computed_tokens + num_new)
            budget -= num_new
            if budget == 0:
                break
        return needed

    def _start(self, seq: Sequence, num_new: int) -> TokenEvent | None:
        """Waiting -> running with KV for num_new tokens; an error event if its adapter fails."""
        try:
            if seq.adapter_id:
                seq.slot = self.adapters.acquire(seq.adapter_id, pinned=seq.adapter_spec)
                seq.adapter_spec = self.adapters.slot_spec[seq.slot]
        except EdgeLoraError as error:
            # e.g. NotFound: unregistered by another thread since can_acquire(). Nothing is
            # allocated yet; only this request ends, the step goes on.
            return self._fail_waiting(seq, error)
        self.waiting.take(seq)
        self.blocks.allocate(seq.block_table, seq.num_computed_tokens + num_new)
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)
        return None

    def _fail_waiting(self, seq: Sequence, error: EdgeLoraError) -> TokenEvent:
        self.waiting.remove(seq)
        self._finish(seq, "error")
        return self._error_event(seq, str(error), error.code.name)

    def _reserve(self, seq: Sequence, num_new: int, scheduled: set[int]) -> bool:
        """Blocks for seq's next tokens, preempting the newest unscheduled sequences if needed."""
        target = seq.num_computed_tokens + num_new
        while not self.blocks.can_allocate(self.blocks.blocks_needed(seq.block_table, target)):
            victims = [s for s in self.running if s.request_id not in scheduled]
            # the newest of the tenant running the most: a flood pays for its own memory
            counts = Counter(s.tenant for s in self.running)
            victim = max(reversed(victims), key=lambda s: counts[s.tenant])
            self._preempt(victim)
            if victim is seq:
                return False
        self.blocks.allocate(seq.block_table, target)
        return True

    def _preempt(self, seq: Sequence) -> None:
        # Recompute later from scratch (prompt + outputs so far): frees every block now. The
        # front of its tenant's queue: it already waited its turn once.
        self.running.remove(seq)
        self._release(seq)
        seq.num_computed_tokens = 0
        seq.log_likelihood = 0.0  # its chunks are recomputed, and scored, again
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def postprocess(self, batch: Batch, result: StepResult) -> list[TokenEvent]:
        """Applies one step's results (row i: batch.items[i]); returns the events to stream."""
        events = []
        for i, (item, token) in enumerate(zip(batch.items, result.tokens, strict=True)):
            seq = item.seq
            if seq.status is not SequenceStatus.RUNNING:
                continue
            seq.num_computed_tokens += item.num_new_tokens
            if seq.is_scoring:
                seq.log_likelihood += result.log_likelihoods[i]
                if seq.num_uncomputed_tokens == 0:  # scored in full: no token is sampled
                    self.running.remove(seq)
                    self._finish(seq, "scored")
                    events.append(TokenEvent(seq.request_id, [], "", seq.num_prompt_tokens, 0,
                                             finish_reason="scored",
                                             log_likelihood=seq.log_likelihood))
                continue
            if seq.num_uncomputed_tokens > 0:
                continue  # mid-prompt chunk: its sample means nothing
            seq.token_ids.append(token)
            if seq.constraint is not None and not seq.constraint.accept(token):
                self.running.remove(seq)  # the mask allowed it: a bug, not the client's fault
                self._finish(seq, "error")
                events.append(self._error_event(seq, f"token {token} broke the response_format "
                                                "grammar", "INTERNAL"))
                continue
            text = seq.detok.add_token(token) if seq.detok else ""
            reason = self._finish_reason(seq, token)
            if reason:
                self.running.remove(seq)
                self._finish(seq, reason)
                text += seq.detok.flush() if seq.detok else ""
            logprobs = result.logprobs.get(i)
            events.append(TokenEvent(seq.request_id, [token], text, seq.num_prompt_tokens,
                                     seq.num_output_tokens, finish_reason=reason,
                                     logprobs=[logprobs] if logprobs else []))
        return events

    def _finish_reason(self, seq: Sequence, token: int) -> str:
        if token in self.eos_token_ids and not seq.options.ignore_eos:
            return "stop"
        if seq.constraint is not None and seq.constraint.is_done:  # even with ignore_eos
            return "stop"
        if seq.detok is not None and seq.detok.stopped:
            return "stop"
        if seq.num_output_tokens >= seq.options.max_tokens:
            return "length"
        return ""

    def _release(self, seq: Sequence) -> None:
        self.blocks.free(seq.block_table)
        if seq.slot:
            self.adapters.release(seq.slot)
            seq.slot = 0

    def _finish(self, seq: Sequence, reason: str) -> None:
        self._release(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def fail_all(self, message: str) -> list[TokenEvent]:
        """After an engine error: end every sequence with an error event, freeing all KV."""
        events = []
        for seq in [*self.running, *self.waiting]:
            self._finish(seq, "error")
            events.append(self._error_event(seq, message, "INTERNAL"))
        self.running.clear()
        self.waiting.clear()
        return events

    @staticmethod
    def _error_event(seq: Sequence, message: str, code: str) -> TokenEvent:
        return TokenEvent(seq.request_id, [], "", seq.num_prompt_tokens, seq.num_output_tokens,
                          finish_reason="error", error=message, error_code=code)
