"""What --weights int8 / int4 cost in accuracy, and what they save in bytes and time, side by side.

One checkpoint (default: the embedded SmolLM2-135M-Instruct, real weights; any HF directory or
.gguf file with --model), loaded once per format (fp32, bf16, int8, int4) through the worker's own
assembly (worker.server.build_engine), each scoring the same fixed English text (TEXT below,
teacher-forced in one prefill):
  * perplexity of the text;
  * top-1 agreement: positions whose most likely next token is the bf16 model's;
  * mean KL(bf16 || format) of the next-token distributions, in nats;
  * greedy = bf16: of 4 chat prompts' 32 greedy tokens (decode steps, through the C++ kernels),
    those before the first that differs from bf16's;
  * weight MiB as held;
  * with --speed: batch-1 decode steps/s (the per-token time of a single user) and a 256-token
    prefill, each the best of --repeats, on --threads threads.
The accuracy check (docs/weights.md): int8 agrees with bf16 on >= 95% of positions with
perplexity within 2%, int4 on >= 90% within 5% (PASS/MISS printed).

    .venv/bin/python bench/weights_accuracy.py [--model default] [--formats fp32,bf16,int8,int4]
        [--speed] [--threads 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F

from bench.engine_drive import run_ours
from worker import server
from worker.config import WorkerConfig
from worker.engine import Engine
from worker.kernels.quantized_weights import weight_bytes
from worker.sequence import SamplingOptions, Sequence
from worker.tokenizer import Tokenizer

TEXT = (
    "The river rose slowly through the night, and by morning the lower fields were under water. "
    "Farmers moved their animals to the hill behind the church, where the ground stayed dry. "
    "In the town, the baker opened his shop as usual, because people still needed bread, and "
    "the school closed for the day so that the older children could help carry sandbags to the "
    "bridge. By noon the rain had stopped. The mayor walked along the bank with two engineers, "
    "who measured the water against the old marks on the stone wall and said that it would fall "
    "again within a day or two. That evening the families who had left their houses came back "
    "to look at the damage: mud on the floors, wet furniture, a few broken windows. Nobody had "
    "been hurt. The next week the town council met to discuss how to build a better wall, and "
    "after a long debate they agreed to ask the regional government for help with the cost."
)
GREEDY_TEXTS = ("What is the capital of France?", "Write a haiku about the sea.",
                "Explain how a bicycle works.", "Give me three tips for better sleep.")
GREEDY_TOKENS = 32
# (min top-1 agreement with bf16, max perplexity ratio to bf16) per quantized format
TARGETS = {"int8": (0.95, 1.02), "int4": (0.90, 1.05)}


def build(model: str, weights: str, threads: int, prefill: int) -> tuple[Engine, Tokenizer]:
    config = WorkerConfig(model=model, device="cpu", weights=weights, num_threads=threads,
                          max_num_batched_tokens=max(512, prefill), max_batch_size=8)
    engine, tokenizer, _ = server.build_engine(config, emit=lambda event: None)
    torch.set_num_threads(threads)
    return engine, tokenizer


@torch.inference_mode()
def next_token_logits(engine: Engine, ids: list[int]) -> torch.Tensor:
    """Logits after every position of `ids`, from one prefill: [len(ids) - 1, vocab] float32."""
    seq = Sequence(0, ids, SamplingOptions(max_tokens=1, ignore_eos=True))
    engine.scheduler.add(seq)
    batch = engine.scheduler.schedule()
    assert batch is not None and batch.items[0].num_new_tokens == len(ids), "one prefill"
    runner = engine.runner
    input_ids, fb, _ = runner.prepare(batch)
    hidden = runner.model(input_ids, fb, runner.kv_cache.layers)
    logits = runner.model.compute_logits(hidden[:-1])
    engine.scheduler.abort(0)
    return logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--formats", default="fp32,bf16,int8,int4")
    parser.add_argument("--speed", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    formats = args.formats.split(",")
    if "bf16" not in formats:
        formats.insert(0, "bf16")  # the reference of the agreement columns
    prefill = 256
    results, reference, reference_outputs = {}, None, []
    for fmt in sorted(formats, key=lambda f: f != "bf16"):
        engine, tokenizer = build(args.model, fmt, args.threads, prefill)
        ids = tokenizer.encode_prompt(TEXT)[:prefill]
        logits = next_token_logits(engine, ids)
        log_probs = F.log_softmax(logits, dim=-1)
        targets = torch.tensor(ids[1:])
        ppl = math.exp(-float(log_probs.gather(1, targets[:, None]).mean()))
        top1 = logits.argmax(dim=-1)
        if reference is None:
            reference = (log_probs, top1)
        agree = float((top1 == reference[1]).float().mean())
        kl = float(F.kl_div(log_probs, reference[0], log_target=True, reduction="batchmean"))
        row = {"ppl": ppl, "agree": agree, "kl": kl,
               "mib": weight_bytes(engine.runner.model) / 2**20}
        if args.speed:
            prompt = (ids * (prefill // len(ids) + 1))[:prefill]
            timings = [run_ours(engine, tokenizer, [prompt], args.new_tokens)
                       for _ in range(args.repeats)]
            row["prefill_tps"] = prefill / min(t.prefill_s for t in timings)
            row["decode_tps"] = max(t.tps for t in timings)
        # decode steps (one token each: the C++ kernels, int8 activations): greedy tokens
        # before the first that differs from bf16's, over GREEDY_PROMPTS
        prompts = [tokenizer.encode_chat([("user", text)]) for text in GREEDY_TEXTS]
        outputs = run_ours(engine, tokenizer, prompts, GREEDY_TOKENS).outputs
        if fmt == "bf16":
            reference_outputs = outputs
        row["greedy"] = sum(next((i for i, (a, b) in enumerate(zip(o, r, strict=True)) if a != b),
                                 len(o)) for o, r in zip(outputs, reference_outputs, strict=True))
        results[fmt] = row
        del engine
    print(f"{args.model}: {len(ids)} tokens of fixed text, teacher-forced; threads "
          f"{args.threads}; load average {os.getloadavg()[0]:.2f}")
    head = (f"{'weights':8} {'MiB':>7} {'ppl':>8} {'top-1 = bf16':>12} {'KL nats':>9} "
            f"{'greedy = bf16':>14}")
    if args.speed:
        head += f" {'decode tok/s':>13} {'x bf16':>7} {'pp256 tok/s':>12} {'x bf16':>7}"
    print(head)
    base = results["bf16"]
    for fmt in formats:
        r = results[fmt]
        line = (f"{fmt:8} {r['mib']:7.0f} {r['ppl']:8.3f} {100 * r['agree']:11.1f}% "
                f"{r['kl']:9.4f} {r['greedy']:6}/{GREEDY_TOKENS * len(GREEDY_TEXTS)}")
        if args.speed:
            line += (f" {r['decode_tps']:13.1f} {r['decode_tps'] / base['decode_tps']:6.2f}x"
                     f" {r['prefill_tps']:12.1f} {r['prefill_tps'] / base['prefill_tps']:6.2f}x")
        print(line)
    for fmt, (min_agree, max_ppl) in TARGETS.items():
        if fmt in results:
            r = results[fmt]
            ok = r["agree"] >= min_agree and r["ppl"] <= max_ppl * base["ppl"]
            print(f"{'PASS' if ok else 'MISS'}  {fmt}: top-1 agreement {100 * r['agree']:.1f}% "
                  f"(>= {100 * min_agree:.0f}%), perplexity {r['ppl'] / base['ppl']:.3f}x bf16 "
                  f"(<= {max_ppl:.2f}x), weights {r['mib'] / base['mib']:.2f}x bf16's bytes")


if __name__ == "__main__":
    main()
