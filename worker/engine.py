"""The decode loop: one thread owns the device and runs schedule -> run -> postprocess -> emit.

Talks to the service only through plain messages (AddRequest/Abort in, TokenEvent out);
never touches protobuf, asyncio or gRPC.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from common.errors import EdgeLoraError
from worker.adapter_memory import AdapterMemory
from worker.runner import ModelRunner
from worker.scheduler import Scheduler, StepResult
from worker.sequence import Abort, AddRequest, Detokenizer, Sequence, SequenceStatus, TokenEvent

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineLoad:
    """What the engine holds now, for Info and health (read off the engine thread: a snapshot
    that may be a step old)."""

    num_running: int
    num_waiting: int
    num_free_kv_blocks: int
    num_kv_blocks: int


class Engine:
    def __init__(self, scheduler: Scheduler, runner: ModelRunner,
                 make_detokenizer: Callable[[tuple[str, ...]], Detokenizer],
                 emit: Callable[[TokenEvent], None], num_threads: int = 0) -> None:
        self.scheduler = scheduler
        # torch threads of the engine thread, set on that thread (see _loop); 0 = torch's count now
        self.num_threads = num_threads or torch.get_num_threads()
        self.runner = runner
        self.make_detokenizer = make_detokenizer
        self.emit = emit
        self._inbox: queue.SimpleQueue[AddRequest | Abort | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    @property
    def adapters(self) -> AdapterMemory | None:
        """The adapters it serves: registrations, tiers and stats (None: no LoRA slots)."""
        return self.scheduler.adapters

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self.scheduler.eos_token_ids

    def load(self) -> EngineLoad:
        scheduler = self.scheduler
        return EngineLoad(len(scheduler.running), len(scheduler.waiting),
                          scheduler.blocks.num_free_blocks, scheduler.blocks.num_blocks)

    def submit(self, message: AddRequest | Abort) -> None:
        """Thread-safe: the engine thread picks it up before its next step."""
        self._inbox.put(message)

    def bind_threads(self) -> None:
        """Gives the calling thread the engine's torch thread count: call it on whichever thread
        will step() (the engine thread does in its loop; synchronous drivers call it first).

        Then runs one multi-threaded matmul at once: a thread whose first parallel work comes
        after another thread's (the adapter loader's, say) ran small GEMMs 1.6x slower here.
        With --batch-invariant, measures its matmul tiling here too, at this thread count (a
        BLAS may split work by it), before the first request instead of inside its step.
        """
        torch.set_num_threads(self.num_threads)
        warm = torch.ones(512, 512)
        warm @ warm
        if self.runner.invariance is not None:
            self.runner.invariance.warm_up()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._inbox.put(None)
            self._thread.join()
            self._thread = None

    def step(self) -> bool:
        """One scheduling round and forward pass; False when nothing could run."""
        batch = self.scheduler.schedule()
        if batch is None:
            return False
        result = self.runner.run(batch) if batch.items else StepResult([])
        for event in [*batch.events, *self.scheduler.postprocess(batch, result)]:
            self.emit(event)
        return True

    def _loop(self) -> None:
        # OpenMP keeps thread counts per calling thread: set ours here, on the thread that runs
        # the forwards (worker.server.build_engine leaves the loading thread at 1).
        self.bind_threads()
        # Idle: block on the inbox. Work that cannot run yet (an adapter loading): poll briefly.
        timeout_s: float | None = None
        while self._drain_inbox(timeout_s):
            try:
                progressed = self.step()
            except Exception as exc:  # a failed step must end its streams, never hang them
                log.exception("engine step failed")
                for event in self.scheduler.fail_all(f"the worker failed a step: {exc}"):
                    self.emit(event)
                progressed = True
            timeout_s = None if not self.scheduler.has_work() else (0 if progressed else 0.002)

    def _drain_inbox(self, timeout_s: float | None) -> bool:
        """Applies queued messages (waiting up to timeout_s, None = forever); False once stopped."""
        try:
            message = self._inbox.get(timeout=timeout_s)
        except queue.Empty:
            return True
        while True:
            if message is None:
                return False
            self._apply(message)
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                return True

    def _apply(self, message: AddRequest | Abort) -> None:
        if isinstance(message, Abort):
            self.scheduler.abort(message.request_id)
            return
        scoring = message.num_reference_tokens > 0  # emits no text: no detokenizer
        seq = Sequence(message.request_id, message.prompt_ids, message.options,
                       message.adapter_id,
                       detok=None if scoring else self.make_detokenizer(message.options.stop),
                       num_reference_tokens=message.num_reference_tokens,
                       tenant=message.tenant, limits=message.limits,
                       constraint=message.constraint)
        try:
            self.scheduler.add(seq)
        except EdgeLoraError as exc:
            seq.status = SequenceStatus.FINISHED
            self.emit(TokenEvent(seq.request_id, [], "", seq.num_prompt_tokens, 0,
                                 finish_reason="error", error=str(exc), error_code=exc.code.name))
