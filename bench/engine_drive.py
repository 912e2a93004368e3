"""One way for the benchmarks to drive our engine and time it: prompts of exact lengths, every
sequence added at once, engine.step() on this thread until all finish; prefill = until every
sequence has its first token, decode = the rest (bench/engine_throughput.py,
bench/single_stream.py, bench/weights_accuracy.py)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from worker.engine import Engine
from worker.sequence import SamplingOptions, Sequence
from worker.tokenizer import Tokenizer

PROMPTS = [
    "The quick brown fox jumps over the lazy dog while the farmer watches from the porch.",
    "Explain in simple words why the sky looks blue during the day and red at sunset.",
    "Write a short story about a robot who learns to paint landscapes in the mountains.",
    "List three good reasons to drink water every day, and explain each one briefly.",
    "What is the capital of France, and what is it famous for among tourists?",
    "Describe how a bicycle works, starting with the pedals and ending with the wheels.",
    "Give me a recipe for a simple tomato soup that a beginner can cook at home.",
    "Summarize the plot of a detective novel set in a small seaside town in winter.",
]


@dataclass
class Result:
    name: str
    batch: int
    prefill_s: float
    decode_tokens: int
    decode_s: float
    outputs: list[list[int]]

    @property
    def tps(self) -> float:
        return self.decode_tokens / self.decode_s


def make_prompts(tokenizer: Tokenizer, count: int, length: int) -> list[list[int]]:
    """`count` prompts of exactly `length` tokens, cycling PROMPTS and repeating short ones."""
    prompts = []
    for i in range(count):
        ids = tokenizer.encode_prompt(PROMPTS[i % len(PROMPTS)])
        prompts.append((ids * (length // len(ids) + 1))[:length])
    return prompts


def run_ours(engine: Engine, tokenizer: Tokenizer, prompts: list[list[int]],
             new_tokens: int, name: str = "ours") -> Result:
    options = SamplingOptions(max_tokens=new_tokens, ignore_eos=True)
    seqs = [Sequence(i, p, options, detok=tokenizer.detokenizer(())) for i, p in enumerate(prompts)]
    for seq in seqs:
        engine.scheduler.add(seq)
    start = time.perf_counter()
    while any(s.num_output_tokens == 0 for s in seqs):  # prefill: every sequence's first token
        engine.step()
    prefill_end = time.perf_counter()
    while engine.scheduler.has_work():
        engine.step()
    end = time.perf_counter()
    outputs = [s.output_ids for s in seqs]
    assert all(len(o) == new_tokens for o in outputs), "a sequence stopped early"
    return Result(name, len(prompts), prefill_end - start, sum(len(o) - 1 for o in outputs),
                  end - prefill_end, outputs)
