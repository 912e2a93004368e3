"""The selector's training loop on the real model and the real demo adapters, end to end:
profile -> labels -> train -> score on adapters/demo/heldout.jsonl (never used for training).

Dataset: topics = training questions of the demo adapters that no held-out prompt mentions; for
each topic one row per adapter (a request phrasing from TRAIN_PHRASINGS, none of them in the cards
or the held-out set, + the question; reference = the base model's answer rewritten the way that
adapter was trained: upper-cased, JSON-wrapped, first sentence, pirate prefix) and one plain row
(reference = the base answer itself). `router profile` labels them by log-likelihood on a worker,
`router train` fits the head; we print label agreement with the intended adapter, the head's
held-out score, and "auto" accuracy on the held-out prompts with the head alone (--selector-head)
and zero-shot alone.

    .venv/bin/python bench/selector_profile_demo.py [--topics 24] [--threads 2]
        [--with-card-examples]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path

import grpc
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgelora.v1 import router_pb2_grpc, types_pb2  # noqa: E402
from router.adapter_record import AdapterRecord  # noqa: E402
from router.config import RouterConfig  # noqa: E402
from router.embedder import EmbeddingBatcher  # noqa: E402
from router.profiling import run_profile, train  # noqa: E402
from router.selector import AdapterSelector  # noqa: E402
from router.server import start_router  # noqa: E402
from scripts.train_demo_adapters import QUESTIONS, TRANSFORMS  # noqa: E402
from worker.config import WorkerConfig  # noqa: E402
from worker.gguf_import import ensure_default_checkpoint  # noqa: E402
from worker.server import start_worker  # noqa: E402

DEMO = ROOT / "adapters" / "demo"
TRAIN_PHRASINGS = {
    "shout": ["Reply using capital letters only:", "Everything in caps, please.",
              "Uppercase answer:", "Write it all in CAPITALS:",
              "Type your reply with caps lock on:"],
    "json": ["Answer in JSON:", "Give me a JSON object in reply:", "Respond as a JSON payload:",
             "Your answer must be valid JSON:", "JSON only, please:"],
    "brief": ["Answer in one sentence:", "Keep it very short:", "Quick reply, one line:",
              "Be brief:", "Short version only:"],
    "pirate": ["Answer like a pirate:", "Say it the pirate way:", "Pirate talk, please:",
               "As a pirate captain, answer:", "Reply in pirate speech:"],
}


def topics(count: int) -> list[str]:
    heldout = (DEMO / "heldout.jsonl").read_text().lower()
    return [q for q in QUESTIONS if q.lower().rstrip("?.") not in heldout][:count]


async def base_answers(stub, questions: list[str]) -> list[str]:
    async def one(q: str) -> str:
        reply = await stub.Generate(types_pb2.GenerateRequest(
            messages=[types_pb2.ChatMessage(role="user", content=q)],
            params=types_pb2.SamplingParams(max_tokens=40)), timeout=600)
        return reply.text.strip()
    return list(await asyncio.gather(*(one(q) for q in questions)))


def dataset_rows(questions: list[str], answers: list[str]) -> list[tuple[dict, str]]:
    rows = []
    for i, (question, answer) in enumerate(zip(questions, answers, strict=True)):
        for name, phrasings in TRAIN_PHRASINGS.items():
            prompt = f"{phrasings[i % len(phrasings)]} {question}"
            rows.append(({"messages": [{"role": "user", "content": prompt}],
                          "reference": TRANSFORMS[name](answer)}, name))
        rows.append(({"messages": [{"role": "user", "content": question}],
                      "reference": answer}, ""))
    return rows


async def heldout_accuracy(head_path: str, cards: dict) -> float:
    selector = AdapterSelector(EmbeddingBatcher(), head_path=head_path)
    rows = [json.loads(line) for line in (DEMO / "heldout.jsonl").read_text().splitlines()]
    right = 0
    for row in rows:
        right += (await selector.select(row["prompt"], cards, set())).adapter_id == row[
            "adapter_id"]
    selector.close()
    return right / len(rows)


async def run(args: argparse.Namespace, tmp: Path) -> None:
    model = ensure_default_checkpoint(WorkerConfig().cache_path)
    worker = await start_worker(WorkerConfig(model=str(model), port=0, num_threads=args.threads,
                                             max_model_len=512, kv_cache_mb=128))
    address = f"127.0.0.1:{worker.port}"
    router = await start_router(RouterConfig(port=0, workers=address, adapters_dir=str(DEMO)))
    try:
        stub = router_pb2_grpc.RouterStub(grpc.aio.insecure_channel(f"127.0.0.1:{router.port}"))
        questions = topics(args.topics)
        answers = await base_answers(stub, questions)
        rows = dataset_rows(questions, answers)
        if args.with_card_examples:  # the cards' own examples as more profiled rows
            cards = demo_cards()
            examples = [(e, n) for n, c in cards.items() for e in c.example_prompts]
            example_answers = await base_answers(stub, [e.split(":")[-1].strip()
                                                        for e, _ in examples])
            rows += [({"messages": [{"role": "user", "content": e}],
                       "reference": TRANSFORMS[n](a)}, n)
                     for (e, n), a in zip(examples, example_answers, strict=True)]
        (tmp / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r, _ in rows))
        labeled = await run_profile([address], str(tmp / "data.jsonl"), str(tmp / "labels.jsonl"))
        agree = sum(r["positives"] == ([want] if want else [])
                    for r, (_, want) in zip(labeled, rows, strict=True))
        print(f"profiled {len(labeled)} prompts ({len(questions)} topics x 5"
              f"{' + card examples' if args.with_card_examples else ''}): labels equal to "
              f"the intended adapter for {agree}/{len(labeled)}")
        for name in [*TRAIN_PHRASINGS, ""]:
            got = [r["positives"] for r, (_, want) in zip(labeled, rows, strict=True)
                   if want == name]
            print(f"  rows for {name or 'base'}: {sum(g == ([name] if name else []) for g in got)}"
                  f"/{len(got)} labeled so")
        metrics = await asyncio.to_thread(train, str(tmp / "labels.jsonl"), str(tmp / "head.pt"))
        print(f"train: held-out split {metrics['heldout_rows']} prompts, decision accuracy "
              f"{metrics['heldout_accuracy']:.3f}, label F1 {metrics['heldout_f1']:.3f}")
        cards = demo_cards()
        print(f"'auto' on adapters/demo/heldout.jsonl: trained head "
              f"{await heldout_accuracy(str(tmp / 'head.pt'), cards):.3f}, zero-shot "
              f"{await heldout_accuracy('', cards):.3f}")
    finally:
        await router.stop(0)
        await worker.stop(0)


def demo_cards() -> dict[str, AdapterRecord]:
    """What the router's registry holds for the demo adapters (from their card.json)."""
    cards = {}
    for path in sorted(DEMO.glob("*/card.json")):
        data = json.loads(path.read_text())
        cards[data["adapter_id"]] = AdapterRecord(data["adapter_id"], str(path.parent), 4,
                                                  data["description"], data["example_prompts"])
    return cards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--topics", type=int, default=24)
    parser.add_argument("--threads", type=int, default=2, help="worker torch threads")
    parser.add_argument("--with-card-examples", action="store_true",
                        help="also profile the cards' example prompts")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(run(args, Path(tmp)))


if __name__ == "__main__":
    main()
