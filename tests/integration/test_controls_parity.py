"""Penalties and logprobs through the engine (tiny model, float32) against transformers: greedy
with each penalty equals `generate` with the matching logits processor, every row of one mixed
batch alike; logprobs equal log_softmax of transformers' logits to 1e-4."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from worker.config import WorkerConfig
from worker.sequence import SamplingOptions, Sequence, TokenEvent
from worker.server import build_engine

ATOL = 1e-4
NEW_TOKENS = 12
# one-step prefill; prompts cut in chunks (penalty rows made mid-prompt); CUDA where present
ENGINES = {
    "cpu": {},
    "cpu-chunked": {"max_num_batched_tokens": 8, "max_batch_size": 8},
    "cuda": {"device": "cuda"},
}
PENALTIES = [
    {},
    {"repetition_penalty": 1.3},
    {"repetition_penalty": 0.8},
    {"frequency_penalty": 0.7},
    {"frequency_penalty": -0.4},
    {"presence_penalty": 1.5},
    {"presence_penalty": -1.0},
    {"repetition_penalty": 1.2, "frequency_penalty": 0.5, "presence_penalty": 0.5},
]


@pytest.fixture(scope="module", params=list(ENGINES))
def engine(request: pytest.FixtureRequest, tiny_model_dir: Path):
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    engine, tokenizer, _ = build_engine(WorkerConfig(
        model=str(tiny_model_dir), dtype="float32", num_threads=1, max_model_len=512,
        kv_cache_mb=16, **ENGINES[request.param]), emit=lambda e: None)
    return engine, tokenizer


@pytest.fixture(scope="module")
def hf_model(tiny_model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def run_events(engine, requests: list[tuple[list[int], SamplingOptions]]
               ) -> list[list[TokenEvent]]:
    """Every request added at once, the engine stepped until all finish; -> events per request."""
    events: dict[int, list[TokenEvent]] = {i: [] for i in range(len(requests))}
    done: set[int] = set()

    def collect(event: TokenEvent) -> None:
        assert event.finish_reason != "error", event.error
        events[event.request_id].append(event)
        if event.finish_reason:
            done.add(event.request_id)

    engine.emit = collect
    for i, (ids, options) in enumerate(requests):
        engine.scheduler.add(Sequence(i, list(ids), options,
                                      detok=engine.make_detokenizer(options.stop)))
    while len(done) < len(requests):
        engine.step()
    return [events[i] for i in range(len(requests))]


def openai_penalties(prompt_len: int, presence: float, frequency: float):
    """OpenAI's formula as a transformers logits processor (transformers has none built in):
    logit -= count * frequency + (count > 0) * presence, over the generated tokens only."""
    from transformers import LogitsProcessor

    class OpenAIPenalties(LogitsProcessor):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            out = input_ids[:, prompt_len:]
            counts = torch.zeros_like(scores).scatter_add_(
                1, out, torch.ones_like(out, dtype=scores.dtype))
            return scores - counts * frequency - (counts > 0).to(scores.dtype) * presence

    return OpenAIPenalties()


def hf_greedy(model, ids: list[int], penalties: dict) -> list[int]:
    from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor

    processors = LogitsProcessorList()
    if "repetition_penalty" in penalties:  # vLLM's order: repetition, then OpenAI's
        processors.append(RepetitionPenaltyLogitsProcessor(penalties["repetition_penalty"]))
    if "presence_penalty" in penalties or "frequency_penalty" in penalties:
        processors.append(openai_penalties(len(ids), penalties.get("presence_penalty", 0.0),
                                           penalties.get("frequency_penalty", 0.0)))
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS,
                             min_new_tokens=NEW_TOKENS, do_sample=False, suppress_tokens=None,
                             logits_processor=processors)
    return out[0, len(ids):].tolist()


def test_greedy_with_each_penalty_matches_transformers(engine, hf_model) -> None:
    eng, tokenizer = engine
    ids = tokenizer.encode_prompt("the sea, the sea, the sea and the ships on the sea")
    requests = [(ids, SamplingOptions(max_tokens=NEW_TOKENS, ignore_eos=True, **p))
                for p in PENALTIES]
    got = [[t for e in events for t in e.token_ids] for events in run_events(eng, requests)]
    for penalties, ours in zip(PENALTIES, got, strict=True):
        assert ours == hf_greedy(hf_model, ids, penalties), f"penalties {penalties}"
    assert len({tuple(g) for g in got}) >= 4, "penalties should change the greedy outputs"


def test_logprobs_match_log_softmax_of_transformers_logits(engine, hf_model) -> None:
    eng, tokenizer = engine
    prompts = ["Tell me about the sea", "1, 2, 3,", "Why is the sky blue?"]
    options = [SamplingOptions(max_tokens=8, logprobs=True, top_logprobs=5, ignore_eos=True),
               # raw logprobs: the penalty changes the tokens, not the reported distribution
               SamplingOptions(max_tokens=8, logprobs=True, top_logprobs=20, ignore_eos=True,
                               repetition_penalty=1.5, presence_penalty=1.0),
               SamplingOptions(max_tokens=8, logprobs=True, ignore_eos=True, temperature=1.0,
                               seed=3)]
    requests = [(tokenizer.encode_prompt(p), o) for p, o in zip(prompts, options, strict=True)]
    requests.append((requests[0][0], SamplingOptions(max_tokens=8, ignore_eos=True)))
    results = run_events(eng, requests)
    assert all(not e.logprobs for e in results[3]), "a request that did not ask gets none"
    for (ids, opts), events in zip(requests[:3], results[:3], strict=True):
        tokens = [t for e in events for t in e.token_ids]
        logprobs = [lp for e in events for lp in e.logprobs]
        assert [lp.token_id for lp in logprobs] == tokens
        with torch.no_grad():
            logits = hf_model(torch.tensor([ids + tokens])).logits[0, len(ids) - 1:-1]
        ref = logits.float().log_softmax(-1)  # [tokens, vocab]
        for pos, (token, lp) in enumerate(zip(tokens, logprobs, strict=True)):
            assert abs(lp.logprob - ref[pos, token].item()) <= ATOL, (opts, pos)
            assert len(lp.top) == opts.top_logprobs
            top = ref[pos].topk(opts.top_logprobs)
            for (top_id, value), ref_id, ref_value in zip(
                    lp.top, top.indices.tolist(), top.values.tolist(), strict=True):
                assert abs(value - ref_value) <= ATOL, (opts, pos)
                # near-ties may swap places: the id must carry the value the reference gives it
                assert top_id == ref_id or abs(ref[pos, top_id].item() - value) <= ATOL
