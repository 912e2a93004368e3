"""One user at a time (and a few): our engine vs llama.cpp on the same GGUF, same threads, one run.

For each --quant (a GGUF type of the model and the --weights we hold it in: Q4_0 -> int4,
Q8_0 -> int8, F16 -> bf16):
  * llama-bench -p P -n N -t T: prompt processing (ppP) and text generation (tgN) tokens/s;
  * ours, in a child process of its own (its peak RSS is the engine's alone), the worker's own
    assembly (worker.server.build_engine) with --model FILE.gguf --weights W: ppP = one P-token
    prompt prefilled in one step; tgN = N greedy tokens at batch 1 after an 8-token prompt
    (decode steps only), as llama-bench's tg runs from an almost empty context;
  * --batches B...: B concurrent streams of one prompt (32 tokens) generating N tokens each, ours
    in one engine vs llama-server --parallel B with B concurrent /completion streams;
    aggregate generated tokens/s over the whole run, prefill included, for both.
Each side's KV cache is sized for the same context. Peak RSS of each process is printed beside.
Each side's figure is its best of --repeats. pp and tg run in --rounds rounds, llama-bench then
ours back to back: a round's ratio compares both under one memory bandwidth (a VM's drifts by
half over minutes), and the median round's ratio is the verdict; streams run in the first.
Targets (issue 16): ours/llama.cpp >= 1.0x at tg and at pp, peak RSS <= 1.25x (PASS/MISS).

Models: --model FILE.gguf, or --shape NAME for bench/make_model.py's random weights in that
model's shape (written once under ~/.cache/edgelora/bench/models/NAME, ~2 min for 1B).
llama.cpp: bench/llamacpp/build.sh (once, ~11 min).

    .venv/bin/python bench/single_stream.py --shape llama-3.2-1b [--quant Q4_0,Q8_0]
        [--threads 2] [--prompt-tokens 512] [--new-tokens 128] [--batches 2,4,8] [--repeats 2]
        [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.make_model import WEIGHTS  # noqa: E402

CONTEXT_PROMPT = 8     # tokens before a tg run (llama-bench's tg starts from an empty context)
STREAM_PROMPT = 32     # tokens of each concurrent stream's prompt
TARGET = 1.0
RSS_BOUND = 1.25


def peak_rss_mib(pid: int) -> float:
    """A live process's peak resident memory so far, MiB (VmHWM)."""
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    return next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmHWM:"))


def wait_peak_rss_mib(process: subprocess.Popen) -> float:
    """Waits for `process` to exit -> its peak resident memory in MiB (VmHWM, polled: a child's
    getrusage maxrss would include this process's, inherited at fork)."""
    peak = 0.0
    while process.poll() is None:
        try:
            peak = max(peak, peak_rss_mib(process.pid))
        except (FileNotFoundError, ProcessLookupError, StopIteration):
            break  # exited (a zombie's status has no VmHWM)
        time.sleep(0.05)
    process.wait()
    return peak


# -- ours, in a child process ----------------------------------------------------------------
def ours(args: argparse.Namespace) -> dict:
    import torch

    from bench.engine_drive import make_prompts, run_ours
    from worker import server
    from worker.config import WorkerConfig
    from worker.gguf_import import resolve_model_path
    from worker.kv_cache import KVCache
    from worker.loader import read_model_config

    batches = [1, *args.batches]
    path = resolve_model_path(args.model, WorkerConfig().cache_path)
    # the KV cache for the longest run (bf16), as llama.cpp sizes its context
    tokens = max(args.prompt_tokens + 2, max(batches) * (STREAM_PROMPT + args.new_tokens))
    per_token = KVCache.bytes_per_token(read_model_config(path), torch.bfloat16)
    kv_mib = math.ceil((tokens + 16 * (max(batches) + 2)) * per_token / 2**20)
    config = WorkerConfig(model=args.model, device="cpu", weights=args.weights,
                          num_threads=args.threads, max_batch_size=max(batches),
                          max_num_batched_tokens=max(512, args.prompt_tokens), kv_cache_mb=kv_mib)
    engine, tokenizer, _ = server.build_engine(config, emit=lambda event: None)
    engine.bind_threads()
    long_prompt = make_prompts(tokenizer, 1, args.prompt_tokens)
    short_prompt = make_prompts(tokenizer, 1, CONTEXT_PROMPT)
    out: dict = {"pp": [], "tg": [], "batches": {}}
    run_ours(engine, tokenizer, short_prompt, 4)  # warm-up
    for _ in range(args.repeats):
        out["pp"].append(args.prompt_tokens / run_ours(engine, tokenizer, long_prompt,
                                                       2).prefill_s)
        out["tg"].append(run_ours(engine, tokenizer, short_prompt, args.new_tokens + 1).tps)
    for b in args.batches:
        prompts = make_prompts(tokenizer, b, STREAM_PROMPT)
        best = 0.0
        for _ in range(args.repeats):
            start = time.perf_counter()
            result = run_ours(engine, tokenizer, prompts, args.new_tokens)
            best = max(best, b * args.new_tokens / (time.perf_counter() - start))
            assert result.batch == b
        out["batches"][b] = best
    out["model"] = str(path)
    return out


def run_ours_child(args: argparse.Namespace, gguf: Path, weights: str,
                   batches: list[int]) -> tuple[dict, float]:
    cmd = [sys.executable, __file__, "--ours", "--model", str(gguf), "--weights", weights,
           "--threads", str(args.threads), "--prompt-tokens", str(args.prompt_tokens),
           "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats),
           "--batches", ",".join(map(str, batches))]
    with tempfile.TemporaryFile("w+") as out:
        child = subprocess.Popen(cmd, stdout=out, text=True)
        rss = wait_peak_rss_mib(child)
        if child.returncode != 0:
            raise SystemExit(f"ours ({weights}) failed with status {child.returncode}")
        out.seek(0)
        return json.loads(out.read().strip().splitlines()[-1]), rss


# -- llama.cpp --------------------------------------------------------------------------------
def llama_bench(args: argparse.Namespace, gguf: Path) -> tuple[dict, float]:
    from bench.llamacpp import binary

    cmd = [str(binary("llama-bench")), "-m", str(gguf), "-t", str(args.threads),
           "-p", str(args.prompt_tokens), "-n", str(args.new_tokens),
           "-r", str(args.repeats), "-o", "json"]
    with tempfile.TemporaryFile("w+") as out:
        child = subprocess.Popen(cmd, stdout=out, stderr=subprocess.DEVNULL, text=True)
        rss = wait_peak_rss_mib(child)
        if child.returncode != 0:
            raise SystemExit(f"llama-bench failed ({child.returncode}): {' '.join(cmd)}")
        out.seek(0)
        tests = json.loads(out.read())
    result = {}
    for test in tests:  # the best repeat, as ours
        kind = "pp" if test["n_gen"] == 0 else "tg"
        result[kind] = max(test.get("samples_ts") or [test["avg_ts"]])
    return result, rss


def llama_server_streams(args: argparse.Namespace, gguf: Path, b: int) -> tuple[float, float]:
    """b concurrent greedy streams of args.new_tokens tokens -> (aggregate tokens/s, peak RSS)."""
    from bench.llamacpp.http_client import completion_token_counts
    from bench.llamacpp.server import LlamaServer, LlamaServerConfig

    prompt = " ".join(["the river rose slowly through the night"] * 5)  # ~STREAM_PROMPT tokens
    config = LlamaServerConfig(model=gguf, parallel=b, threads=args.threads,
                               ctx_per_slot=STREAM_PROMPT + args.new_tokens + 64)
    server = LlamaServer(config).start()

    async def stream() -> int:
        total = 0
        async for count in completion_token_counts(server.url, prompt, args.new_tokens, None):
            total += count
        return total

    async def all_streams() -> list[int]:
        return await asyncio.gather(*[stream() for _ in range(b)])

    best, rss = 0.0, 0.0
    try:
        asyncio.run(all_streams())  # warm-up
        for _ in range(args.repeats):
            start = time.perf_counter()
            counts = asyncio.run(all_streams())
            best = max(best, sum(counts) / (time.perf_counter() - start))
        assert server.process is not None
        rss = peak_rss_mib(server.process.pid)
    finally:
        server.stop()
    return best, rss


# -- the run ----------------------------------------------------------------------------------
def model_file(args: argparse.Namespace, quant: str) -> Path:
    from bench.make_model import model_files

    return Path(args.model) if args.model else model_files(args.shape, quant)[0]


def verdict(ratio: float) -> str:
    return "PASS" if ratio >= TARGET else "MISS"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="llama-3.2-1b", help="bench/make_model.py shape")
    p.add_argument("--model", default="", help="a GGUF file instead of --shape")
    p.add_argument("--quant", default="Q4_0", help=f"comma-separated, of {sorted(WEIGHTS)}")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batches", default="2,4,8", help="concurrent streams ('' = none)")
    p.add_argument("--repeats", type=int, default=2, help="runs of each test a round (best)")
    p.add_argument("--rounds", type=int, default=3,
                   help="llama-bench then ours, this many times (ratio: the median round's)")
    p.add_argument("--ours", action="store_true", help=argparse.SUPPRESS)  # the child
    p.add_argument("--weights", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.batches = [int(b) for b in args.batches.split(",") if b]
    if args.ours:
        print(json.dumps(ours(args)))
        return
    load = os.getloadavg()[0]
    lines = []
    for quant in args.quant.split(","):
        gguf = model_file(args, quant)
        subprocess.run([sys.executable, "-c", "import sys; from worker.gguf_import import "
                        "resolve_model_path as r; from worker.config import WorkerConfig as W; "
                        "r(sys.argv[1], W().cache_path)", str(gguf)], check=True, cwd=ROOT)
        weights = WEIGHTS[quant]
        # this VM's memory bandwidth drifts (32-55 GB/s over minutes): see the docstring
        rounds = []
        for r in range(args.rounds):
            theirs, their_rss = llama_bench(args, gguf)
            mine, my_rss = run_ours_child(args, gguf, weights, args.batches if r == 0 else [])
            rounds.append((theirs, mine, their_rss, my_rss))
        lines.append(f"{gguf.name} ({quant}; ours --weights {weights}), {args.threads} threads, "
                     f"{args.rounds} rounds (ratio: the median round's)")
        lines.append(f"  {'':18}{'ours':>10}{'llama.cpp':>11}{'ratio':>8}")
        for kind, name in (("pp", f"pp{args.prompt_tokens} tok/s"),
                           ("tg", f"tg{args.new_tokens} tok/s")):
            us = [max(mine[kind]) for _, mine, _, _ in rounds]
            them = [theirs[kind] for theirs, _, _, _ in rounds]
            ratios = [a / b for a, b in zip(us, them, strict=True)]
            lines.append(f"  {name:18}{statistics.median(us):10.1f}"
                         f"{statistics.median(them):11.1f}{statistics.median(ratios):7.2f}x  "
                         f"{verdict(statistics.median(ratios))}  (rounds: "
                         f"{' '.join(f'{x:.2f}' for x in ratios)})")
        mine, my_rss = rounds[0][1], max(r[3] for r in rounds)
        their_rss = max(r[2] for r in rounds)
        lines.append(f"  {'peak RSS MiB':18}{my_rss:10.0f}{their_rss:11.0f}"
                     f"{my_rss / their_rss:7.2f}x  "
                     f"{'PASS' if my_rss <= RSS_BOUND * their_rss else 'MISS'}  (llama-bench; "
                     f"target <= {RSS_BOUND}x)")
        for b in args.batches:
            their_b, server_rss = llama_server_streams(args, gguf, b)
            us = mine["batches"][str(b)]
            lines.append(f"  {f'{b} streams tok/s':18}{us:10.1f}{their_b:11.1f}"
                         f"{us / their_b:7.2f}x  {verdict(us / their_b)}  (llama-server "
                         f"--parallel {b}, peak RSS {server_rss:.0f} MiB)")
    print(f"load average {load:.2f} before, {os.getloadavg()[0]:.2f} after")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
