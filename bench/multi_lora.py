"""Multi-LoRA on one box: mixed-adapter batches, adapter load times, the DESIGN.md workload.

One run, one checkpoint (the embedded SmolLM2-135M-Instruct, float32 on CPU), random PEFT adapters
written to a temporary directory (deleted at exit), --threads torch threads for every system:
  (a) decode tokens/s of --batch requests over --batch different adapters vs all on one adapter
      (and the base model), same prompts, greedy, --new-tokens each (ignore_eos); our Engine
      driven synchronously, adapters made device-resident by a warm-up request each first.
      Target: mixed / same >= 0.85. On CPU, the mixed batch again on torch's LoRA paths instead
      of the C++ kernel (worker.kernels.cpu), side by side.
  (b) adapter load times per adapter: disk -> host (read_adapter_weights + host_layout, page
      cache warm) and host -> device slot (LoraSlots.write) from the host layout, and from the
      tensors as read side by side; r=8 and r=64, all 7 projection modules.
  (c) the DESIGN.md workload (Zipf alpha, Gamma cv, inputs/outputs uniform, --num-adapters r=8
      adapters) through our router + worker over gRPC (in-process, ephemeral ports; each request
      sent at its arrival time, streamed) vs transformers + PEFT serving one request at a time in
      arrival order (all adapters loaded, set_adapter per request). Target: req/s ratio >= 5x.

    .venv/bin/python bench/multi_lora.py [--threads 2] [--num-requests 40] [--rate 2]
        [--sections abc]   # smoke: --sections abc --num-requests 4 --output-max 16 --new-tokens 8
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from bench.workload import Record, Request, generate_workload, make_prompt, replay, summarize
from common.adapter_format import read_adapter_spec, read_adapter_weights
from worker.config import WorkerConfig
from worker.engine import Engine
from worker.gguf_import import resolve_model_path
from worker.lora import LoraSlots, module_shapes
from worker.sequence import SamplingOptions, Sequence
from worker.server import build_engine

TARGET_MIXED, TARGET_SERVE = 0.85, 5.0


def adapter_name(i: int) -> str:
    return f"adapter-{i:02d}"


def write_adapters(base: Path, root: Path, count: int, rank: int, seed: int) -> list[Path]:
    from bench.random_weights import write_random_adapter

    return [write_random_adapter(root / f"r{rank}-{i:02d}", base, rank=rank, alpha=2.0 * rank,
                                 seed=seed + i, std=0.05) for i in range(count)]


# -- (a) batched decode: mixed adapters vs one adapter vs base --
_ids = iter(range(1 << 62))


def run_batch(engine: Engine, prompts: list[list[int]], adapters: list[str],
              new_tokens: int) -> tuple[float, float]:
    """-> (decode tokens/s over the steps after every sequence has its first token, prefill s)."""
    options = SamplingOptions(max_tokens=new_tokens, ignore_eos=True)
    seqs = [Sequence(next(_ids), p, options, a, detok=engine.make_detokenizer(()))
            for p, a in zip(prompts, adapters, strict=True)]
    for seq in seqs:
        engine.scheduler.add(seq)
    start = time.perf_counter()
    while any(s.num_output_tokens == 0 for s in seqs):
        engine.step()
    prefill_end = time.perf_counter()
    while engine.scheduler.has_work():
        engine.step()
    end = time.perf_counter()
    assert all(s.num_output_tokens == new_tokens for s in seqs), "a sequence stopped early"
    return len(seqs) * (new_tokens - 1) / (end - prefill_end), prefill_end - start


def section_a(args: argparse.Namespace, path: Path, adapter_dirs: list[Path]) -> Engine:
    config = WorkerConfig(model=str(path), dtype=args.dtype, device_adapter_slots=args.batch,
                          max_lora_rank=8, max_batch_size=args.batch, num_threads=args.threads,
                          max_num_batched_tokens=max(1024, args.batch * args.prompt_tokens))
    engine, tokenizer, info = build_engine(config, emit=lambda event: None)
    engine.bind_threads()  # this thread steps the engine
    memory = engine.scheduler.adapters
    ids = [adapter_name(i) for i in range(args.batch)]
    for i, name in enumerate(ids):
        memory.register(read_adapter_spec(name, adapter_dirs[i]))
    prompts = [tokenizer.encode_prompt(make_prompt(tokenizer, args.prompt_tokens, seed=i))
               for i in range(args.batch)]
    run_batch(engine, prompts, ids, 2)  # one warm-up request per adapter: all device-resident
    assert all(memory.is_resident(name) for name in ids), "adapters not device-resident"
    slots = engine.runner.lora_slots
    kernel = slots.kernel
    # name -> (adapter per request, the LoRA kernel or None for torch's paths)
    cases = {"base (no adapter)": ([""] * args.batch, kernel),
             "same adapter": ([ids[0]] * args.batch, kernel),
             f"{args.batch} adapters": (ids, kernel)}
    if kernel is not None:  # the CPU kernel side by side with torch's paths
        cases[f"{args.batch} ad., torch LoRA"] = (ids, None)

    def run(case: tuple[list[str], object]) -> tuple[float, float]:
        with mock.patch.object(slots, "kernel", case[1]):
            return run_batch(engine, prompts, case[0], args.new_tokens)

    for case in cases.values():  # warm-up
        run(case)
    runs = [[run(case) for case in cases.values()]
            for _ in range(args.repeats)]  # interleaved: load from elsewhere hits all alike
    best = [max(column) for column in zip(*runs, strict=True)]
    print(f"\n(a) decode, {info.dtype}, batch {args.batch}, prompt {args.prompt_tokens} tok, "
          f"{args.new_tokens} new tok, greedy, best of {args.repeats}")
    print(f"{'case':<20}{'tok/s':>9}{'ms/step':>9}{'prefill ms':>12}")
    for name, (tps, prefill) in zip(cases, best, strict=True):
        print(f"{name:<20}{tps:>9.1f}{args.batch / tps * 1e3:>9.1f}{prefill * 1e3:>12.1f}")
    ratio = best[2][0] / best[1][0]
    print(f"{'PASS' if ratio >= TARGET_MIXED else 'MISS'}  mixed / same adapter = {ratio:.3f} "
          f"(target >= {TARGET_MIXED}); base / same = {best[0][0] / best[1][0]:.3f}; "
          f"device loads {memory.stats.device.loads}, evictions {memory.stats.device.evictions}")
    if kernel is not None:
        print(f"LoRA kernel / torch's paths, {args.batch} adapters: {best[2][0] / best[3][0]:.2f}x")
    return engine


# -- (b) adapter load times --
def section_b(args: argparse.Namespace, engine: Engine, base: Path, root: Path,
              r8_dirs: list[Path]) -> None:
    cfg = engine.runner.model.config
    shapes = module_shapes(cfg)
    dtype = engine.runner.lora_slots.dtype
    print(f"\n(b) adapter load, ms per adapter (median of {args.load_adapters}; 7 modules x "
          f"{cfg.num_layers} layers, {str(dtype).removeprefix('torch.')} slots; disk -> host "
          "(read + LoraSlots.host_layout, the loader thread) with the page cache warm: each file "
          "read once first; host -> device (LoraSlots.write, the engine thread) from the host "
          "layout, and from the tensors as read, side by side)")
    print(f"{'rank':<6}{'file MB':>9}{'disk->host':>12}{'host->device':>14}{'as read':>9}"
          f"{'ratio':>7}")
    for rank in (8, 64):
        dirs = (r8_dirs[:args.load_adapters] if rank == 8 else
                write_adapters(base, root, args.load_adapters, rank, seed=1000))
        slots = LoraSlots(cfg, 1, rank, torch.device("cpu"), dtype)
        read_ms, write_ms, raw_ms = [], [], []
        for i, d in enumerate(dirs):
            spec = read_adapter_spec(f"load-{rank}-{i}", d)
            read_adapter_weights(spec, shapes, cfg.num_layers)  # warms the page cache
            t0 = time.perf_counter()
            raw = read_adapter_weights(spec, shapes, cfg.num_layers)
            weights = slots.host_layout(raw, pin=False)
            t1 = time.perf_counter()
            slots.write(1, weights, rank)
            t2 = time.perf_counter()
            slots.write(1, raw, rank)
            t3 = time.perf_counter()
            read_ms.append((t1 - t0) * 1e3)
            write_ms.append((t2 - t1) * 1e3)
            raw_ms.append((t3 - t2) * 1e3)
        size = (dirs[0] / "adapter_model.safetensors").stat().st_size / 2**20
        # the median: a process's first large loads run several times slower (page faults)
        mid = [statistics.median(ms) for ms in (read_ms, write_ms, raw_ms)]
        print(f"r={rank:<4}{size:>9.1f}{mid[0]:>12.1f}{mid[1]:>14.1f}{mid[2]:>9.1f}"
              f"{mid[2] / mid[1]:>6.2f}x")


# -- (c) the workload: ours over gRPC vs transformers + PEFT one at a time --
async def serve_ours(args: argparse.Namespace, path: Path, adapter_dirs: list[Path],
                     requests: list[Request], prompts: list[str]) -> list[Record]:
    """`edgelora serve` in its own process, as deployed: sharing this process would also share
    OpenMP's per-thread state with transformers, which slows whichever runs second."""
    import grpc

    from bench.llamacpp.adapters import BenchAdapter
    from bench.serve_targets import EdgeloraServer, edgelora_stream

    adapters = [BenchAdapter(adapter_name(i), d, 8) for i, d in enumerate(adapter_dirs)]
    server = EdgeloraServer(threads=args.threads, max_batch=args.batch, max_rank=8,
                            device_slots=args.device_slots,
                            extra_args=["--model", str(path), "--dtype", args.dtype]
                            ).start(adapters)
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stream = edgelora_stream(channel, prompts, [a.name for a in adapters], 600.0)
            warm_up = [Request(0, 0.0, 0, 8, 4)]  # the first forward pays one-off costs
            await replay(warm_up, stream)
            return await replay(requests, stream)
    finally:
        server.stop()


def serve_hf(path: Path, adapter_dirs: list[Path], requests: list[Request],
             prompts: list[str]) -> list[Record]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from bench.engine_throughput import _FirstTokenClock

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    tokenizer = AutoTokenizer.from_pretrained(path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(base, str(adapter_dirs[0]), adapter_name=adapter_name(0))
    for i, d in enumerate(adapter_dirs[1:], start=1):
        model.load_adapter(str(d), adapter_name=adapter_name(i))
    model.eval()

    def generate(ids: list[int], n: int, clock: _FirstTokenClock | None = None) -> int:
        x = torch.tensor([ids])
        with torch.inference_mode():
            out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False,
                                 max_new_tokens=n, min_new_tokens=n, pad_token_id=pad_id,
                                 streamer=clock)
        return out.shape[1] - len(ids)

    encoded = [list(tokenizer(p).input_ids) for p in prompts]
    generate(encoded[0], 4)  # warm-up
    records, t0 = [], time.perf_counter()
    for r in requests:  # one at a time, in arrival order
        arrival = t0 + r.arrival_s
        time.sleep(max(0.0, arrival - time.perf_counter()))
        model.set_adapter(adapter_name(r.adapter))
        clock = _FirstTokenClock()
        n = generate(encoded[r.index], r.output_len, clock)
        records.append(Record(r.index, arrival, clock.first_token_at, time.perf_counter(), n))
    return records


def section_c(args: argparse.Namespace, path: Path, adapter_dirs: list[Path]) -> None:
    from worker.tokenizer import Tokenizer

    requests = generate_workload(args.num_requests, args.num_adapters, args.alpha, args.rule,
                                 args.rate, args.cv, (args.input_min, args.input_max),
                                 (args.output_min, args.output_max), args.seed)
    tokenizer = Tokenizer(path)
    prompts = [make_prompt(tokenizer, r.input_len, seed=args.seed * 100003 + r.index)
               for r in requests]
    used = len({r.adapter for r in requests})
    print(f"\n(c) workload: {len(requests)} requests, {args.num_adapters} adapters r=8 ({used} "
          f"used, {args.rule} alpha={args.alpha}), Gamma rate {args.rate}/s cv {args.cv}, "
          f"input U[{args.input_min},{args.input_max}], output U[{args.output_min},"
          f"{args.output_max}] ({sum(r.output_len for r in requests)} output tokens), "
          f"last arrival {requests[-1].arrival_s:.2f} s", flush=True)
    results, started = {}, time.perf_counter()
    results["ours (gRPC)"] = summarize(asyncio.run(serve_ours(args, path, adapter_dirs,
                                                              requests, prompts)))
    print(f"    ours done in {time.perf_counter() - started:.0f} s", flush=True)
    started = time.perf_counter()  # includes loading the model and every adapter into PEFT
    results["transformers+peft"] = summarize(serve_hf(path, adapter_dirs, requests, prompts))
    print(f"    transformers+peft done in {time.perf_counter() - started:.0f} s")
    print(f"{'system':<20}{'req/s':>7}{'tok/s':>8}{'lat mean':>10}{'lat p99':>9}{'TTFT mean':>11}"
          f"{'SLO<=6s':>9}{'failed':>8}")
    for name, s in results.items():
        print(f"{name:<20}{s['req_per_s']:>7.3f}{s['tokens_per_s']:>8.1f}"
              f"{s['latency_mean_s']:>9.1f}s{s['latency_p99_s']:>8.1f}s{s['ttft_mean_s']:>10.2f}s"
              f"{s['slo_attainment']:>8.0%} {s['num_failed']:>7}")
    ours, hf = results.values()
    ratio = ours["req_per_s"] / hf["req_per_s"]
    print(f"{'PASS' if ratio >= TARGET_SERVE else 'MISS'}  throughput ours / transformers+peft = "
          f"{ratio:.2f}x req/s, {ours['tokens_per_s'] / hf['tokens_per_s']:.2f}x tok/s "
          f"(target >= {TARGET_SERVE:.0f}x)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--threads", type=int, default=2, help="torch threads for every system")
    p.add_argument("--dtype", default="auto", help="(a)/(b)/(c) our worker's --dtype (auto: bf16 "
                   "with AMX, else fp32); transformers+PEFT runs fp32, its faster CPU dtype")
    p.add_argument("--sections", default="abc", help="which of (a), (b), (c) to run")
    p.add_argument("--seed", type=int, default=0, help="workload, prompts and adapters")
    p.add_argument("--batch", type=int, default=16, help="(a) batch; (a)/(c) max batch size")
    p.add_argument("--new-tokens", type=int, default=64, help="(a) tokens per sequence")
    p.add_argument("--prompt-tokens", type=int, default=32, help="(a) prompt length")
    p.add_argument("--repeats", type=int, default=2, help="(a) measured runs, best kept")
    p.add_argument("--load-adapters", type=int, default=5, help="(b) adapters per rank")
    p.add_argument("--num-requests", type=int, default=40, help="(c) requests")
    p.add_argument("--rate", type=float, default=2.0, help="(c) mean arrival rate, req/s")
    p.add_argument("--cv", type=float, default=1.5, help="(c) inter-arrival coeff. of variation")
    p.add_argument("--num-adapters", type=int, default=32, help="(c) adapters (r=8)")
    p.add_argument("--alpha", type=float, default=1.0, help="(c) popularity skew")
    p.add_argument("--rule", choices=("zipf", "edgelora"), default="zipf", help="(c) popularity")
    p.add_argument("--device-slots", type=int, default=16, help="(c) our device adapter slots")
    for name, lo, hi in (("input", 8, 128), ("output", 8, 256)):
        p.add_argument(f"--{name}-min", type=int, default=lo, help=f"(c) shortest {name}, tokens")
        p.add_argument(f"--{name}-max", type=int, default=hi, help=f"(c) longest {name}, tokens")
    args = p.parse_args()
    if args.new_tokens < 2:
        p.error("--new-tokens must be at least 2")
    if len(args.sections) > 1:
        # One process per section: OpenMP favours the first thread that runs parallel work, so
        # (a) stepping on this thread would slow (c)'s engine thread (measured 1.6x).
        argv, skip = [], False
        for arg in sys.argv[1:]:
            if not skip and not arg.startswith("--sections"):
                argv.append(arg)
            skip = arg == "--sections"
        for section in args.sections:
            subprocess.run([sys.executable, __file__, *argv, f"--sections={section}"], check=True)
        return

    path = resolve_model_path("default", WorkerConfig().cache_path)
    with tempfile.TemporaryDirectory(prefix="edgelora-bench-") as tmp:
        count = max(args.batch if "a" in args.sections else 0, args.load_adapters,
                    args.num_adapters if "c" in args.sections else 0)
        dirs = write_adapters(path, Path(tmp), count, rank=8, seed=args.seed * 1000)
        torch.set_num_threads(args.threads)
        print(f"model {path.name} | torch {torch.__version__} | threads "
              f"{torch.get_num_threads()} | {count} random r=8 adapters in {tmp} | load average "
              f"{os.getloadavg()[0]:.1f}", flush=True)
        engine = None
        if "a" in args.sections:
            engine = section_a(args, path, dirs)
        if "b" in args.sections:
            if engine is None:
                engine, _, _ = build_engine(WorkerConfig(model=str(path), kv_cache_mb=16,
                                                         num_threads=args.threads), lambda e: None)
            section_b(args, engine, path, Path(tmp), dirs)
        del engine
        if "c" in args.sections:
            section_c(args, path, dirs)
    load = os.getloadavg()[0]
    if load > args.threads + 0.5:
        print(f"WARNING: load average {load:.1f} > {args.threads} threads: other processes "
              "shared the cores, numbers are noisy")


if __name__ == "__main__":
    main()
