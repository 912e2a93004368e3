"""Router overhead of adapter_id "auto": embed the prompt + score every adapter + decide, as the
router runs it (AdapterSelector.select: batcher thread hop, MiniLM forward, zero-shot and head
confidences, residency-aware decision). Target: p50 <= 15 ms on this CPU.

  (a) one request at a time (the latency a lone request pays): the demo held-out prompts
      (adapters/demo/heldout.jsonl, style requests of 5-20 words) and DESIGN.md-workload prompts
      (U[8, 128] SmolLM2 tokens of English words, cut to the embedder's 128 word pieces);
  (b) --concurrency requests at once (the cross-request batcher: requests arriving during a
      forward share the next): latency per request and selections/s.
Adapters: the 4 demo cards, times --copies (each copy a distinct adapter id with the same card),
plus a trained head over all of them with --with-head (random weights: cost, not quality).

    .venv/bin/python bench/selector.py [--threads 1] [--dtype auto] [--copies 1] [--with-head]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from router.embedder import EmbeddingBatcher  # noqa: E402
from router.selector import AdapterSelector  # noqa: E402
from router.selector_head import TrainedHead  # noqa: E402

DEMO = ROOT / "adapters" / "demo"


@dataclass
class Card:
    description: str
    example_prompts: list[str] = field(default_factory=list)


def demo_cards(copies: int) -> dict[str, Card]:
    cards = {}
    for path in sorted(DEMO.glob("*/card.json")):
        data = json.loads(path.read_text())
        for copy in range(copies):
            suffix = f"-{copy}" if copy else ""
            cards[data["adapter_id"] + suffix] = Card(data["description"],
                                                      data["example_prompts"])
    return cards


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
    cards = demo_cards(args.copies)
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
    heldout = [json.loads(line)["prompt"] for line in
               (DEMO / "heldout.jsonl").read_text().splitlines()]
    workload = workload_prompts(args.num_workload, seed=0)
    await sequential(selector, cards, heldout[:10], resident)  # warm caches and allocator
    for _ in range(args.repeats):
        print("(a) one at a time")
        print(f"    held-out prompts : {percentiles(await sequential(selector, cards, heldout, resident))}")  # noqa: E501
        print(f"    workload prompts : {percentiles(await sequential(selector, cards, workload, resident))}")  # noqa: E501
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
    parser.add_argument("--copies", type=int, default=1, help="copies of each demo card")
    parser.add_argument("--with-head", action="store_true", help="also a trained head")
    parser.add_argument("--num-workload", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(1)
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
