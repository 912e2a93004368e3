"""One request's state inside the worker (tokens, KV blocks, progress) and the engine messages.

Torch-free and protobuf-free: the service converts to and from these.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from common.adapter_format import AdapterSpec


@dataclass(frozen=True)
class SamplingOptions:
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    # OpenAI semantics over the generated tokens (0 = off); HF semantics over prompt + generated
    # tokens (1 = off). Applied by worker.penalties.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: bool = False  # return each sampled token's log-probability
    top_logprobs: int = 0  # ... and this many most likely tokens at its position (<= 20)

    @property
    def has_penalties(self) -> bool:
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.repetition_penalty != 1.0)


@dataclass(frozen=True)
class TenantLimits:
    """A tenant's share of one worker, sent by the router with each request; 0 = no limit."""

    max_running: int = 0  # sequences admitted to the batch at once
    max_queued: int = 0   # sequences waiting for admission


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


@dataclass
class AddRequest:
    """Service -> engine: start generating for this request."""

    request_id: int
    prompt_ids: list[int]
    options: SamplingOptions
    adapter_id: str = ""
    # > 0: a scoring request (see Sequence.num_reference_tokens)
    num_reference_tokens: int = 0
    tenant: str = ""  # who asked: admission is fair across tenants
    limits: TenantLimits = TenantLimits()
    constraint: Constraint | None = None  # response_format: what the output must parse as


@dataclass
class Abort:
    """Service -> engine: the client went away; free the sequence and its KV now."""

    request_id: int


@dataclass
class TokenLogprobs:
    """The log-probability of one sampled token and the most likely tokens at its position."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token id, logprob), best first


@dataclass
class TokenEvent:
    """Engine -> service: new tokens/text of one request; finish_reason set on the last one."""

    request_id: int
    token_ids: list[int]
    text: str
    num_prompt_tokens: int
    num_output_tokens: int
    finish_reason: str = ""  # "", "stop", "length", "scored" or "error"
    error: str = ""
    error_code: str = "INTERNAL"  # grpc.StatusCode name the client sees on finish_reason "error"
    # finish_reason "scored": sum of log p(reference token | prefix), natural log
    log_likelihood: float = 0.0
    logprobs: list[TokenLogprobs] = field(default_factory=list)  # one per token, if asked


class Detokenizer(Protocol):
    """Turns sampled token ids into text that is safe to stream (see worker.detokenizer)."""

    stopped: bool

    def add_token(self, token_id: int) -> str: ...

    def flush(self) -> str: ...


class Constraint(Protocol):
    """A sequence's output grammar (see worker.json_constraint): masks each step's logits and
    follows the sampled tokens."""

    @property
    def is_done(self) -> bool: ...  # the output is complete: the sequence stops

    def fill_mask(self, bitmask: object, row: int) -> None: ...

    def accept(self, token_id: int) -> bool: ...


@dataclass
class Sequence:
    request_id: int
    prompt_ids: list[int]
    options: SamplingOptions
    adapter_id: str = ""
    detok: Detokenizer | None = None
    token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose k/v are in the cache
    block_table: list[int] = field(default_factory=list)
    slot: int = 0  # device adapter slot while admitted (0 = base model)
    adapter_spec: AdapterSpec | None = None  # the version it first ran on: kept to its end
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str = ""
    # Scoring: the last num_reference_tokens prompt tokens are scored, nothing is sampled, and
    # the sequence finishes after its last prompt chunk. 0 = a normal generating sequence.
    num_reference_tokens: int = 0
    log_likelihood: float = 0.0  # summed over the chunks computed so far
    tenant: str = ""
    limits: TenantLimits = field(default_factory=TenantLimits)
    constraint: Constraint | None = None

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_ids)

    @property
    def is_scoring(self) -> bool:
        return self.num_reference_tokens > 0

    @property
    def first_scored_position(self) -> int:
        """Position whose hidden state predicts the first reference token."""
        return len(self.prompt_ids) - self.num_reference_tokens - 1

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_ids):]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens
