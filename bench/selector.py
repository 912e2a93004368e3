"""Adapter_id "auto": where it sends held-out prompts, and what it costs.

Accuracy (bench/selector_accuracy.py): the demo behaviour cards and the domain cards of
adapters/domains/ registered together, from cards alone; behaviour, domain and generic held-out
prompts, each against its target (PASS/MISS); the demo set alone too, as before domain cards.

Overhead: embed the prompt + score every adapter + decide, as the
router runs it (AdapterSelector.select: batcher thread hop, MiniLM forward, zero-shot and head
confidences, residency-aware decision). Target: p50 <= 15 ms on this CPU with 64 adapters.

  (a) one request at a time (the latency a lone request pays): the demo held-out prompts
      (adapters/demo/heldout.jsonl, style requests of 5-20 words) and DESIGN.md-workload prompts
      (U[8, 128] SmolLM2 tokens of English words, cut to the embedder's 128 word pieces);
  (b) --concurrency requests at once (the cross-request batcher: requests arriving during a
      forward share the next): latency per request and selections/s.
Adapters: --num-adapters (64) ids cycling over the 11 cards of both sets (a copy: a distinct
adapter id with the same card), plus a trained head over all of them with --with-head (random
weights: cost, not quality). --quick: accuracy and (a) on held-out prompts only.

    .venv/bin/python bench/selector.py [--quick] [--threads 1] [--dtype auto]
        [--num-adapters 64] [--with-head] [--show-misses]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.selector_accuracy import (  # noqa: E402
    DEMO,
    DOMAINS,
    Card,
    Case,
    mixed_cases,
    read_cards,
    read_rows,
    report,
    tally,
)
from router.embedder import EmbeddingBatcher  # noqa: E402
from router.selector import AdapterSelector  # noqa: E402
from router.selector_head import TrainedHead  # noqa: E402

LATENCY_TARGET_MS = 15.0


def cycled_cards(count: int) -> dict[str, Card]:
    """`count` adapter ids over the cards of both sets, in turn (copy n of `sql`: `sql-n`)."""
    cards = list(read_cards(DEMO, DOMAINS).items())
    return {(name if i < len(cards) else f"{name}-{i // len(cards)}"): card
            for i, (name, card) in ((i, cards[i % len(cards)]) for i in range(count))}


async def accuracy(args: argparse.Namespace) -> None:
    """Both sets' cards registered together, nothing resident, no head."""
    selector = AdapterSelector(EmbeddingBatcher(num_threads=args.threads, dtype=args.dtype))
    demo, both = read_cards(DEMO), read_cards(DEMO, DOMAINS)
    await selector.warm_up(both)
    kinds = {k: sorted(a for a, v in selector.kinds.items() if v == k)
             for k in set(selector.kinds.values())}
    print(f"accuracy from cards alone: {len(both)} adapters registered, cards read as "
          + "; ".join(f"{k} {', '.join(ids)}" for k, ids in sorted(kinds.items())))
    mixed = await tally(selector, both, mixed_cases())
    for line in report(mixed):
        print(line)
    alone = await tally(selector, demo, [Case(r["prompt"], "demo", {r["adapter_id"]})
                                         for r in read_rows(DEMO / "heldout.jsonl")])
    print(f"    demo set alone (4 behaviour cards, as before domain cards): "
          f"{alone['demo'].right}/{alone['demo'].total} = {100 * alone['demo'].accuracy:.1f}%")
    if args.show_misses:
        for category, counts in {**mixed, **alone}.items():
            for prompt, picked in counts.misses:
                print(f"      miss {category}: {prompt!r} -> {picked or 'base model'!r}")
    selector.close()


def workload_prompts(count: int, seed: int) -> list[str]:
    from transformers import AutoTokenizer

    from bench.workload import make_prompt
    from worker.config import WorkerConfig
    from worker.gguf_import import ensure_default_checkpoint

    tokenizer = AutoTokenizer.from_pretrained(ensure_default_checkpoint(WorkerConfig().cache_path))
    rng = random.Random(seed)
    return [make_prompt(tokenizer, rng.randint(8, 128), seed + i) for i in range(count)]


def percentiles(ms: list[float]) -> str:
    q = statistics.quantiles(ms, n=100)
    return (f"p50 {statistics.median(ms):6.2f} ms  p90 {q[89]:6.2f}  p99 {q[98]:6.2f}  "
            f"mean {statistics.fmean(ms):6.2f}  (n={len(ms)})")


async def sequential(selector: AdapterSelector, cards: dict, prompts: list[str],
                     resident: set[str]) -> list[float]:
    times = []
    for prompt in prompts:
        start = time.perf_counter()
        await selector.select(prompt, cards, resident)
        times.append((time.perf_counter() - start) * 1000)
    return times


async def concurrent(selector: AdapterSelector, cards: dict, prompts: list[str],
                     resident: set[str], concurrency: int) -> tuple[list[float], float]:
    times: list[float] = []
    queue = list(prompts)

    async def client() -> None:
        while queue:
            prompt = queue.pop()
            start = time.perf_counter()
            await selector.select(prompt, cards, resident)
            times.append((time.perf_counter() - start) * 1000)

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return times, len(prompts) / (time.perf_counter() - start)


async def run(args: argparse.Namespace) -> None:
    await accuracy(args)
    cards = cycled_cards(args.num_adapters)
    head_path = ""
    if args.with_head:
        head_path = f"/tmp/bench-selector-head-{os.getpid()}.pt"
        TrainedHead(list(cards), torch.randn(len(cards), 384) * 0.1,
                    torch.zeros(len(cards))).save(head_path)
    selector = AdapterSelector(EmbeddingBatcher(num_threads=args.threads, dtype=args.dtype),
                               head_path=head_path)
    start = time.perf_counter()
    await selector.warm_up(cards)
    print(f"embedder loaded + {len(cards)} adapters' prototypes embedded in "
          f"{time.perf_counter() - start:.1f} s; torch threads {args.threads}, dtype "
          f"{args.dtype}, head: {'yes' if args.with_head else 'no'}; "
          f"load average {os.getloadavg()[0]:.2f}")
    resident = set(list(cards)[: len(cards) // 2])
    heldout = [case.prompt for case in mixed_cases()]
    workload = [] if args.quick else workload_prompts(args.num_workload, seed=0)
    await sequential(selector, cards, heldout[:10], resident)  # warm caches and allocator
    for _ in range(args.repeats):
        print(f"(a) one at a time, {len(cards)} adapters")
        times = await sequential(selector, cards, heldout, resident)
        verdict = "PASS" if statistics.median(times) <= LATENCY_TARGET_MS else "MISS"
        print(f"    held-out prompts : {percentiles(times)}  (target p50 <= "
              f"{LATENCY_TARGET_MS:.0f} ms) {verdict}")
        if workload:
            print(f"    workload prompts : {percentiles(await sequential(selector, cards, workload, resident))}")  # noqa: E501
    if args.quick:
        selector.close()
        return
    batches_before = selector.batcher.num_batches
    times, rate = await concurrent(selector, cards, heldout * 2, resident, args.concurrency)
    batches = selector.batcher.num_batches - batches_before
    print(f"(b) {args.concurrency} concurrent, held-out prompts: {percentiles(times)}; "
          f"{rate:.0f} selections/s, {len(times) / batches:.1f} prompts per forward")
    selector.close()
    if head_path:
        os.unlink(head_path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="embedder torch threads")
    parser.add_argument("--dtype", default="auto", help="auto, float32 or bfloat16")
    parser.add_argument("--num-adapters", type=int, default=64,
                        help="adapters registered for the overhead runs (cards in turn)")
    parser.add_argument("--quick", action="store_true",
                        help="accuracy and one-at-a-time held-out prompts only")
    parser.add_argument("--show-misses", action="store_true")
    parser.add_argument("--with-head", action="store_true", help="also a trained head")
    parser.add_argument("--num-workload", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(1)
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
