"""Decode throughput of our engine vs transformers `generate`, same model, same prompts, one run.

Measures, on one checkpoint (default: the embedded SmolLM2-135M-Instruct, float32):
  * transformers AutoModelForCausalLM.generate at batch 1 (greedy, exactly N new tokens);
  * our Engine (built by worker.server.build_engine, driven synchronously with engine.step())
    at batch 1 and at --batch, greedy, SamplingOptions(max_tokens=N, ignore_eos=True).
Prefill = time until every sequence has its first token; decode tokens/s = the remaining
generated tokens / the time of the remaining steps (both systems count N - 1 decode tokens per
sequence). One warm-up run per system, then --repeats interleaved rounds; best run of each kept.
Prints a table with ratios vs transformers batch 1 and PASS/MISS against the targets
(ours batch 1 >= 1.0x, ours batch --batch aggregate >= 6x). --bf16 adds ours in bfloat16 (and
its paged decode kernel vs torch's attention); --int8 adds bf16 with --int8-small-steps at batch
1, 4 and 8 (at 8 with the threshold raised to 8 tokens), side by side with bf16 alone.

    .venv/bin/python bench/engine_throughput.py [--model default|DIR] [--threads 2]
        [--new-tokens 64] [--batch 16] [--prompt-tokens 32] [--repeats 3] [--bf16] [--int8]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from bench.engine_drive import Result, make_prompts, run_ours
from worker import server
from worker.config import WorkerConfig
from worker.engine import Engine
from worker.kernels.int8_weights import SMALL_STEP_TOKENS
from worker.tokenizer import Tokenizer

TARGET_B1, TARGET_BN = 1.0, 6.0


class _FirstTokenClock:
    """A generate() streamer that notes when the first new token arrives (put #2; #1 = prompt)."""

    def __init__(self) -> None:
        self.calls, self.first_token_at = 0, 0.0

    def put(self, value: torch.Tensor) -> None:
        self.calls += 1
        if self.calls == 2:
            self.first_token_at = time.perf_counter()

    def end(self) -> None:
        pass


def run_hf(hf_model: torch.nn.Module, prompt: list[int], new_tokens: int, pad_id: int) -> Result:
    ids = torch.tensor([prompt])
    clock = _FirstTokenClock()
    start = time.perf_counter()
    with torch.inference_mode():
        out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                pad_token_id=pad_id, streamer=clock)
    end = time.perf_counter()
    gen = out[0, len(prompt):].tolist()
    assert len(gen) == new_tokens, f"transformers generated {len(gen)} tokens, not {new_tokens}"
    return Result("transformers", 1, clock.first_token_at - start, new_tokens - 1,
                  end - clock.first_token_at, [gen])


def build_engine(args: argparse.Namespace, dtype: str,
                 int8: bool = False) -> tuple[Engine, Tokenizer, Path]:
    """The worker's own assembly (worker.server.build_engine) on CPU, minus gRPC and thread.

    Room for the whole batch, and for all its prompts in one prefill step.
    """
    defaults = WorkerConfig()
    config = WorkerConfig(
        model=args.model, device="cpu", dtype=dtype, num_threads=args.threads,
        max_batch_size=max(defaults.max_batch_size, args.batch),
        max_num_batched_tokens=max(defaults.max_num_batched_tokens,
                                   args.batch * args.prompt_tokens), int8_small_steps=int8)
    engine, tokenizer, info = server.build_engine(config, emit=lambda event: None)
    return engine, tokenizer, Path(info.model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="default", help="'default' or a checkpoint directory")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for both systems")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="measured runs each (best kept)")
    parser.add_argument("--bf16", action="store_true",
                        help="also run ours with bfloat16 weights (AMX on recent x86 CPUs)")
    parser.add_argument("--int8", action="store_true",
                        help="also run ours bf16 with --int8-small-steps at batch 1, 4 and 8, side "
                        "by side with bf16 alone (implies --bf16)")
    args = parser.parse_args()
    args.bf16 = args.bf16 or args.int8
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2 (one prefill token + decode tokens)")

    engine, tokenizer, path = build_engine(args, "float32")
    # build_engine loads on one thread; bind_threads (after the last build) restores --threads
    engine16 = build_engine(args, "bfloat16")[0] if args.bf16 else None
    engine8 = build_engine(args, "bfloat16", int8=True)[0] if args.int8 else None
    engine.bind_threads()  # this thread steps both engines
    prompts = make_prompts(tokenizer, args.batch, args.prompt_tokens)
    print(f"model {path.name} | torch {torch.__version__} | threads {torch.get_num_threads()} | "
          f"prompt {args.prompt_tokens} tok | new {args.new_tokens} tok | batch {args.batch}")

    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    pad_id = tokenizer.hf.pad_token_id if tokenizer.hf.pad_token_id is not None else 0
    systems = [lambda: run_hf(hf_model, prompts[0], args.new_tokens, pad_id)]
    systems += [lambda b=b: run_ours(engine, tokenizer, prompts[:b], args.new_tokens)
                for b in dict.fromkeys([1, args.batch])]
    if engine16 is not None:
        systems += [lambda b=b: run_ours(engine16, tokenizer, prompts[:b], args.new_tokens,
                                         "ours bf16") for b in dict.fromkeys([1, args.batch])]
        if engine16.runner.decode_attention is not None:  # the same, attention on torch's path
            def torch_attention() -> Result:
                with mock.patch.object(engine16.runner, "decode_attention", None):
                    return run_ours(engine16, tokenizer, prompts, args.new_tokens,
                                    "bf16 torch-att")

            systems.append(torch_attention)
    # decode steps of 1 and of SMALL_STEP_TOKENS tokens, int8's; and of twice that, where the
    # int8 rows raise the threshold to show why it stops where it does
    small = [1, SMALL_STEP_TOKENS, 2 * SMALL_STEP_TOKENS]

    def run_small(engine: Engine, name: str, b: int) -> Result:
        with mock.patch("worker.runner.SMALL_STEP_TOKENS", b):
            return run_ours(engine, tokenizer, prompts[:b], args.new_tokens, name)

    if engine8 is not None:
        systems += [lambda b=b, e=e, name=name: run_small(e, name, b)
                    for e, name in ((engine16, "bf16 small"), (engine8, "bf16 int8"))
                    for b in small]
    for system in systems:  # warm-up
        system()
    # Interleaved, so that load from other processes hits every system alike.
    runs = [[system() for system in systems] for _ in range(args.repeats)]
    results = [max(column, key=lambda r: r.tps) for column in zip(*runs, strict=True)]
    hf = results[0]
    load = os.getloadavg()[0]
    if load > args.threads + 0.5:
        print(f"WARNING: load average {load:.1f} > {args.threads} threads: other processes "
              "share the cores, numbers are noisy")

    print(f"\n{'system':<14}{'batch':>6}{'prefill ms':>12}{'decode tok':>12}{'decode s':>10}"
          f"{'tok/s':>10}{'ms/step':>9}{'vs HF b1':>10}")
    for r in results:
        steps = r.decode_tokens / r.batch
        print(f"{r.name:<14}{r.batch:>6}{r.prefill_s * 1e3:>12.1f}{r.decode_tokens:>12}"
              f"{r.decode_s:>10.2f}{r.tps:>10.1f}{r.decode_s / steps * 1e3:>9.1f}"
              f"{r.tps / hf.tps:>9.2f}x")

    by_name = {(r.name, r.batch): r for r in results}
    if ("bf16 torch-att", args.batch) in by_name:
        ratio = (by_name["ours bf16", args.batch].tps
                 / by_name["bf16 torch-att", args.batch].tps)
        print(f"\npaged decode kernel vs torch gather + SDPA, bf16 batch {args.batch}: "
              f"{ratio:.2f}x decode tok/s")
    if engine8 is not None:
        print("int8 small steps vs bf16: " + ", ".join(
            f"batch {b} {by_name['bf16 int8', b].tps / by_name['bf16 small', b].tps:.2f}x"
            for b in small) + " decode tok/s")
        pairs = [(a, b) for b in small for a, b in zip(by_name["bf16 int8", b].outputs,
                                                       by_name["bf16 small", b].outputs,
                                                       strict=True)]
        same = sum(x == y for a, b in pairs for x, y in zip(a, b, strict=True))
        print(f"greedy tokens, int8 small steps vs bf16: {same}/{len(pairs) * args.new_tokens} "
              "identical (int8 rounding moves near-ties; a sequence that flips one goes its "
              "own way after it)")
    ours_b1 = results[1]
    same = sum(a == b for a, b in zip(ours_b1.outputs[0], hf.outputs[0], strict=True))
    print(f"\ngreedy tokens, ours batch 1 vs transformers: {same}/{args.new_tokens} identical"
          + ("" if same == args.new_tokens else " (fp32 reductions differ; near-ties may flip)"))
    ours_bn = results[len(dict.fromkeys([1, args.batch]))]
    checks = [(f"ours batch 1 >= {TARGET_B1:.1f}x transformers batch 1", ours_b1, TARGET_B1),
              (f"ours batch {args.batch} >= {TARGET_BN:.1f}x transformers batch 1", ours_bn,
               TARGET_BN)]
    for label, r, target in checks:
        ratio = r.tps / hf.tps
        print(f"{'PASS' if ratio >= target else 'MISS'}  {label}: {ratio:.2f}x")


if __name__ == "__main__":
    main()
