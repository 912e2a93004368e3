"""Generate's pb <-> engine conversions for worker.service: SamplingParams -> SamplingOptions,
TokenEvents (logprobs included) -> GenerateResponse. Never touches tensors."""

from __future__ import annotations

import random
from typing import Protocol

from common.errors import InvalidArgument
from edgelora.v1 import types_pb2
from worker.sequence import SamplingOptions, TokenEvent, TokenLogprobs


class Vocabulary(Protocol):
    def token_bytes(self, token_id: int) -> bytes: ...


def sampling_from_pb(params: types_pb2.SamplingParams, default_max_tokens: int) -> SamplingOptions:
    """Validates ranges (common.limits.check_generate checked the new controls' bounds);
    max_tokens against the context is checked once the prompt is tokenized."""
    temperature = params.temperature if params.HasField("temperature") else 0.0
    top_p = params.top_p if params.HasField("top_p") else 1.0
    if params.HasField("max_tokens") and params.max_tokens == 0:
        raise InvalidArgument("params.max_tokens must be at least 1 (unset = the default)")
    if not temperature >= 0.0:  # also rejects NaN
        raise InvalidArgument(f"params.temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise InvalidArgument(f"params.top_p must be in (0, 1], got {top_p}")
    seed = params.seed if params.HasField("seed") else random.getrandbits(31)
    return SamplingOptions(
        max_tokens=params.max_tokens if params.HasField("max_tokens") else default_max_tokens,
        temperature=temperature, top_p=top_p, top_k=params.top_k,
        # the sampler's hash takes 31-bit seeds: fold larger ones in rather than reject them
        seed=seed % (2**31 - 1), stop=tuple(params.stop), ignore_eos=params.ignore_eos,
        presence_penalty=params.presence_penalty, frequency_penalty=params.frequency_penalty,
        repetition_penalty=(params.repetition_penalty
                            if params.HasField("repetition_penalty") else 1.0),
        logprobs=params.logprobs, top_logprobs=params.top_logprobs)


def event_to_pb(event: TokenEvent, adapter_id: str,
                vocab: Vocabulary | None = None) -> types_pb2.GenerateResponse:
    """vocab gives the logprobs' token bytes (needed only when the event has logprobs)."""
    return types_pb2.GenerateResponse(
        text=event.text, token_ids=event.token_ids, adapter_id=adapter_id,
        finish_reason=event.finish_reason,
        usage=types_pb2.Usage(prompt_tokens=event.num_prompt_tokens,
                              completion_tokens=event.num_output_tokens),
        logprobs=[logprobs_to_pb(lp, vocab) for lp in event.logprobs])


def logprobs_to_pb(lp: TokenLogprobs, vocab: Vocabulary) -> types_pb2.TokenLogprob:
    def token(token_id: int) -> dict:
        raw = vocab.token_bytes(token_id)
        # a token may hold part of a UTF-8 character: its text shows U+FFFD, its bytes are exact
        return {"token_id": token_id, "token": raw.decode("utf-8", "replace"), "token_bytes": raw}

    return types_pb2.TokenLogprob(
        **token(lp.token_id), logprob=lp.logprob,
        top_logprobs=[types_pb2.TopLogprob(**token(t), logprob=v) for t, v in lp.top])


def merge_events(events: list[TokenEvent]) -> TokenEvent:
    """Events that queued up while the client was slow go out as one chunk."""
    last = events[-1]
    return TokenEvent(last.request_id, [t for e in events for t in e.token_ids],
                      "".join(e.text for e in events), last.num_prompt_tokens,
                      last.num_output_tokens, last.finish_reason, last.error, last.error_code,
                      logprobs=[lp for e in events for lp in e.logprobs])
