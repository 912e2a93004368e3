"""Continuous batching: which sequences run in the next step, and what their sampled tokens mean.

New sequences join at any step; prompt chunks and decodes share a step under one token budget;
finished, aborted and preempted sequences free their KV blocks at once. Torch-free.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from common.errors import NotFound, ResourceExhausted
from worker.adapter_memory import AdapterMemory
from worker.kv_cache import BlockManager
from worker.sequence import Sequence, SequenceStatus, TokenEvent


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int  # tokens fed this step, starting at seq.num_computed_tokens
    # scoring rows: the runner's sum of log p over the reference tokens this chunk predicts
    log_likelihood: float = 0.0


@dataclass
class Batch:
    items: list[ScheduledSeq]
    # requests that ended while scheduling (their adapter failed to load): emitted as is
    events: list[TokenEvent] = field(default_factory=list)


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
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        if len(self.waiting) >= self.max_queue:
            raise ResourceExhausted(
                f"the worker queue is full ({self.max_queue} waiting requests); retry later")
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
        budget = self.max_num_batched_tokens
        items: list[ScheduledSeq] = []
        scheduled: set[int] = set()
        num_waiting = len(self.waiting)
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
        # After a preemption, memory is short: admitting now would only be preempted again.
        events = self._admit(items, budget) if len(self.waiting) == num_waiting else []
        return Batch(items, events) if items or events else None

    def _admit(self, items: list[ScheduledSeq], budget: int) -> list[TokenEvent]:
        """Moves waiting sequences to running in FIFO order while KV blocks and slots allow.

        A sequence whose adapter is still loading is passed over; once one waits for a device
        slot, later ones needing a new slot wait behind it, so nobody starves.
        """
        events: list[TokenEvent] = []
        waiting_for_slot = False
        index = 0
        while index < len(self.waiting) and budget > 0 and len(self.running) < self.max_batch_size:
            seq = self.waiting[index]
            if seq.adapter_id and not self.adapters.is_resident(seq.adapter_id):
                error = self.adapters.error(seq.adapter_id)
                if error:
                    del self.waiting[index]
                    self._finish(seq, "error")
                    events.append(self._error_event(seq, str(error), error.code.name))
                    continue
                if waiting_for_slot or not self.adapters.can_acquire(seq.adapter_id):
                    waiting_for_slot = waiting_for_slot or self.adapters.has_no_idle_slot()
                    index += 1
                    continue
            num_new = min(seq.num_uncomputed_tokens, budget)
            needed = self.blocks.blocks_needed(seq.block_table, seq.num_computed_tokens + num_new)
            if not self.blocks.can_allocate(needed):
                break  # FIFO on KV: later arrivals never overtake, so nobody starves
            del self.waiting[index]
            if seq.adapter_id:
                seq.slot = self.adapters.acquire(seq.adapter_id)
            self.blocks.allocate(seq.block_table, seq.num_computed_tokens + num_new)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            items.append(ScheduledSeq(seq, num_new))
            budget -= num_new
        return events

    def _reserve(self, seq: Sequence, num_new: int, scheduled: set[int]) -> bool:
        """Blocks for seq's next tokens, preempting the newest unscheduled sequences if needed."""
        target = seq.num_computed_tokens + num_new
        while not self.blocks.can_allocate(self.blocks.blocks_needed(seq.block_table, target)):
            victims = [s for s in self.running if s.request_id not in scheduled]
            victim = victims[-1]
            self._preempt(victim)
            if victim is seq:
                return False
        self.blocks.allocate(seq.block_table, target)
        return True

    def _preempt(self, seq: Sequence) -> None:
        # Recompute later from scratch (prompt + outputs so far): frees every block now.
        self.running.remove(seq)
        self._release(seq)
        seq.num_computed_tokens = 0
        seq.log_likelihood = 0.0  # its chunks are recomputed, and scored, again
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def postprocess(self, batch: Batch, next_tokens: list[int]) -> list[TokenEvent]:
        """Applies one step's sampled tokens; returns the events to stream."""
        events = []
        for item, token in zip(batch.items, next_tokens, strict=True):
            seq = item.seq
            if seq.status is not SequenceStatus.RUNNING:
                continue
            seq.num_computed_tokens += item.num_new_tokens
            if seq.is_scoring:
                seq.log_likelihood += item.log_likelihood
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
            text = seq.detok.add_token(token) if seq.detok else ""
            reason = self._finish_reason(seq, token)
            if reason:
                self.running.remove(seq)
                self._finish(seq, reason)
                text += seq.detok.flush() if seq.detok else ""
            events.append(TokenEvent(seq.request_id, [token], text, seq.num_prompt_tokens,
                                     seq.num_output_tokens, finish_reason=reason))
        return events

    def _finish_reason(self, seq: Sequence, token: int) -> str:
        if token in self.eos_token_ids and not seq.options.ignore_eos:
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
