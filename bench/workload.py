"""The DESIGN.md workload (from the EdgeLoRA artifact), shared by every serving benchmark.

n adapters with skewed popularity (Zipf p(i) ∝ (i+1)^-alpha, or EdgeLoRA's client rule
adapter = floor(n·U^(1/alpha))), Gamma inter-arrival times with mean 1/R and coefficient of
variation cv, uniform integer input and output lengths; English-ish prompts of a given token length;
the replay of requests at their arrival times against a streaming server; and the summary
metrics (req/s, output tokens/s, mean/p50/p99 latency, mean TTFT, SLO attainment).

Torch-free and server-free, so any client (ours over gRPC, transformers+PEFT, llama.cpp's HTTP
server) can replay the same requests:

    from bench.workload import generate_workload, make_prompt, replay, summarize
    requests = generate_workload(40, 32, rate=2.0, seed=0)
    records = asyncio.run(replay(requests, stream))  # stream(request) yields tokens per chunk
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import math
import random
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

SLO_TTFT_S = 6.0

_WORD_LIST = (
    "the of and to in is was for on that with as by at from his her they this which be are have "
    "had not but one all were when there can an time more would about been other into some them "
    "these could first people than water only new long make over day way good great little man "
    "through before after world life city river house school light market garden story mountain "
    "small old young early late open close simple careful quiet strong bright warm cold history "
    "music science village morning evening summer winter friend teacher doctor farmer engineer "
    "write read build learn explain describe travel cook paint answer question reason number "
    "system problem idea family country road window table letter picture journey weather "
    "because while although however often always never sometimes together across between under"
)
WORDS = tuple(_WORD_LIST.split())


@dataclass(frozen=True)
class Request:
    index: int
    arrival_s: float  # seconds after the start of the run
    adapter: int      # 0 .. num_adapters - 1
    input_len: int    # prompt tokens
    output_len: int   # generated tokens (sent as max_tokens with ignore_eos)


@dataclass
class Record:
    """One served request; times in seconds on one clock (e.g. time.perf_counter())."""

    index: int
    arrival: float
    first_token_at: float
    done_at: float
    output_tokens: int
    error: str = ""


def _pick_adapter(rng: random.Random, num_adapters: int, alpha: float, rule: str,
                  cumulative: list[float]) -> int:
    if rule == "edgelora":  # the EdgeLoRA client: uniform when alpha == 1
        return min(num_adapters - 1, math.floor(num_adapters * rng.random() ** (1.0 / alpha)))
    return min(num_adapters - 1, bisect.bisect_right(cumulative, rng.random() * cumulative[-1]))


def generate_workload(num_requests: int, num_adapters: int, alpha: float = 1.0,
                      rule: str = "zipf", rate: float = 1.0, cv: float = 1.5,
                      input_range: tuple[int, int] = (8, 128),
                      output_range: tuple[int, int] = (8, 256), seed: int = 0,
                      duration_s: float | None = None) -> list[Request]:
    """Requests in arrival order; the first arrives at 0 s, then Gamma(k = 1/cv², θ = 1/(R·k))
    gaps (mean 1/R, coefficient of variation cv); lengths uniform in the closed ranges.
    duration_s: stop at the first arrival at or after it (num_requests stays a cap); the result
    is a prefix of the same call without it."""
    if rule not in ("zipf", "edgelora"):
        raise ValueError(f"rule must be 'zipf' or 'edgelora', got {rule!r}")
    if num_requests < 0 or num_adapters < 1 or rate <= 0 or cv <= 0 or alpha <= 0:
        raise ValueError("need num_requests >= 0, num_adapters >= 1, rate > 0, cv > 0, alpha > 0")
    rng = random.Random(seed)
    shape = 1.0 / (cv * cv)
    scale = 1.0 / (rate * shape)
    weights = [(i + 1) ** -alpha for i in range(num_adapters)]
    cumulative = list(itertools.accumulate(weights))
    requests, now = [], 0.0
    for index in range(num_requests):
        if index:
            now += rng.gammavariate(shape, scale)
        if duration_s is not None and now >= duration_s:
            break
        requests.append(Request(index, now, _pick_adapter(rng, num_adapters, alpha, rule,
                                                          cumulative),
                                rng.randint(*input_range), rng.randint(*output_range)))
    return requests


def _encoder(tokenizer: Any) -> Callable[[str], list[int]]:
    """Our worker.tokenizer.Tokenizer, an HF tokenizer, or any callable str -> ids."""
    if hasattr(tokenizer, "encode_prompt"):
        return tokenizer.encode_prompt
    if hasattr(tokenizer, "encode"):
        return lambda text: list(tokenizer.encode(text))
    return tokenizer


def make_prompt(tokenizer: Any, n_tokens: int, seed: int) -> str:
    """Random words from a fixed English list, cut to the longest word prefix whose encoding has
    at most n_tokens tokens (usually exactly n_tokens: the words are mostly single tokens)."""
    encode = _encoder(tokenizer)
    rng = random.Random(seed)
    words = [rng.choice(WORDS) for _ in range(2 * n_tokens + 8)]
    words[0] = words[0].capitalize()
    lo, hi = 1, len(words)  # largest k with len(encode(words[:k])) <= n_tokens
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(encode(" ".join(words[:mid]))) <= n_tokens:
            lo = mid
        else:
            hi = mid - 1
    return " ".join(words[:lo])


async def replay(requests: Iterable[Request],
                 stream: Callable[[Request], AsyncIterator[int]],
                 on_done: Callable[[Record], None] | None = None) -> list[Record]:
    """Starts each request at its arrival time (concurrently, on this event loop) and records it.

    stream(request) yields the number of generated tokens in each chunk it receives (a server's
    streaming call); TTFT is the first chunk with tokens. An exception marks the request failed.
    on_done(record) is called as each request finishes (e.g. to advance a progress bar).
    """
    t0 = time.perf_counter()

    async def one(request: Request) -> Record:
        arrival = t0 + request.arrival_s
        await asyncio.sleep(max(0.0, arrival - time.perf_counter()))
        first, tokens = 0.0, 0
        try:
            async for count in stream(request):
                if count and not first:
                    first = time.perf_counter()
                tokens += count
            # no token means no TTFT: a failure, not a record that would skew the figures
            record = Record(request.index, arrival, first, time.perf_counter(), tokens,
                            "" if first else "no tokens streamed")
        except Exception as exc:  # any failure of one request is its record
            record = Record(request.index, arrival, 0.0, 0.0, 0, f"{type(exc).__name__}: {exc}")
        if on_done is not None:
            on_done(record)
        return record

    return list(await asyncio.gather(*(one(r) for r in requests)))


def _percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _field(record: Record | Mapping[str, Any], name: str, default: Any = None) -> Any:
    if isinstance(record, Mapping):
        return record.get(name, default)
    return getattr(record, name, default)


def summarize(records: Iterable[Record | Mapping[str, Any]],
              slo_ttft_s: float = SLO_TTFT_S) -> dict[str, float]:
    """Metrics over records (Record or dicts with arrival, first_token_at, done_at,
    output_tokens[, error]). Throughput spans first arrival -> last completion; a failed request
    counts against SLO attainment and is left out of the latency figures."""
    records = list(records)
    ok = [r for r in records if not _field(r, "error", "")]
    if not records:
        return {"num_requests": 0}
    start = min(_field(r, "arrival") for r in records)
    end = max((_field(r, "done_at") for r in ok), default=start)
    span = max(end - start, 1e-9)
    latencies = [_field(r, "done_at") - _field(r, "arrival") for r in ok]
    ttfts = [_field(r, "first_token_at") - _field(r, "arrival") for r in ok]
    tokens = sum(_field(r, "output_tokens") for r in ok)
    return {
        "num_requests": len(records),
        "num_failed": len(records) - len(ok),
        "duration_s": span,
        "output_tokens": tokens,
        "req_per_s": len(ok) / span,
        "tokens_per_s": tokens / span,
        "latency_mean_s": _mean(latencies),
        "latency_p50_s": _percentile(latencies, 50),
        "latency_p99_s": _percentile(latencies, 99),
        "ttft_mean_s": _mean(ttfts),
        "ttft_p99_s": _percentile(ttfts, 99),
        "slo_attainment": sum(t <= slo_ttft_s for t in ttfts) / len(records),
    }
