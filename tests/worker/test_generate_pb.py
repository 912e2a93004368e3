"""worker.generate_pb: the generation controls reach SamplingOptions, and logprobs reach the
GenerateResponse (token text and exact bytes), merged chunks included."""

from __future__ import annotations

import pytest

from edgelora.v1 import types_pb2
from worker.generate_pb import event_to_pb, merge_events, sampling_from_pb
from worker.sequence import TokenEvent, TokenLogprobs


class Bytes:
    """A vocabulary whose token 3 is half of 'é'."""

    def token_bytes(self, token_id: int) -> bytes:
        return b"\xc3" if token_id == 3 else f"t{token_id}".encode()


def test_controls_reach_the_options() -> None:
    params = types_pb2.SamplingParams(presence_penalty=0.5, frequency_penalty=-1.0,
                                      repetition_penalty=1.2, logprobs=True, top_logprobs=4)
    options = sampling_from_pb(params, default_max_tokens=16)
    assert (options.presence_penalty, options.frequency_penalty, options.logprobs,
            options.top_logprobs) == (0.5, -1.0, True, 4)
    assert options.repetition_penalty == pytest.approx(1.2)  # a float32 on the wire
    assert options.has_penalties
    plain = sampling_from_pb(types_pb2.SamplingParams(), default_max_tokens=16)
    assert plain.repetition_penalty == 1.0 and not plain.has_penalties and not plain.logprobs


def test_logprobs_reach_the_response_in_merged_chunks() -> None:
    events = [TokenEvent(1, [3], "", 5, 1, logprobs=[TokenLogprobs(3, -0.5, [(3, -0.5),
                                                                            (9, -1.5)])]),
              TokenEvent(1, [9], "x", 5, 2, finish_reason="stop",
                         logprobs=[TokenLogprobs(9, -0.25)])]
    response = event_to_pb(merge_events(events), "pirate", Bytes())
    assert list(response.token_ids) == [3, 9] and response.finish_reason == "stop"
    first, second = response.logprobs
    assert (first.token_id, first.token_bytes, first.token) == (3, b"\xc3", "\ufffd")
    assert first.logprob == -0.5
    assert [(t.token_id, t.token, t.logprob) for t in first.top_logprobs] == [
        (3, "\ufffd", -0.5), (9, "t9", -1.5)]
    assert (second.token_id, second.token, second.logprob, len(second.top_logprobs)) == (
        9, "t9", -0.25, 0)
    assert not event_to_pb(TokenEvent(1, [4], "y", 5, 1), "").logprobs
