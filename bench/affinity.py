"""Adapter affinity vs round-robin: cache hit rates of 2 workers under the DESIGN.md workload.

Two `edgelora worker` processes (fresh for every run, so caches start cold and counters at 0)
behind one in-process router, 64 random LoRA adapters, the workload of bench/workload.py replayed
at its arrival times and streamed. Each run ends by reading every worker's Info adapter_stats:
  device hit rate = device hits / (hits + misses)      (adapter already in a device slot)
  host hit rate   = host hits / (hits + misses)        (on a device miss: already in host memory)
  device+host     = (device hits + host hits) / acquisitions: requests served without a disk read
The same requests run once with --routing affinity and once with round-robin; the target is
affinity's device+host hit rate >= 1.5x round-robin's. Cache sizes are small on purpose (default
4 device slots, 16 host entries per worker: 20 of 64 adapters) so the adapter set does not fit one
worker. The tiny random Llama (bench/random_weights.py) is the default model: hit rates depend on
the routing and the request sequence, not on the weights; --model default uses SmolLM2-135M.
Skew decides the ratio: under Zipf alpha=1 the few head adapters take most requests and stay hot
on both workers with either policy, so affinity only wins the tail; with the EdgeLoRA client's
rule (uniform at alpha=1) each worker caching half the set shows in full.

    .venv/bin/python bench/affinity.py [--rules zipf,edgelora] [--num-requests 300] [--rate 6]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import grpc  # noqa: E402

from bench.workload import Request, generate_workload, make_prompt, replay, summarize  # noqa: E402
from edgelora.client import build_request  # noqa: E402
from edgelora.v1 import router_pb2_grpc, types_pb2, worker_pb2, worker_pb2_grpc  # noqa: E402
from router.config import RouterConfig  # noqa: E402
from router.server import start_router  # noqa: E402
from worker.config import WorkerConfig  # noqa: E402
from worker.gguf_import import resolve_model_path  # noqa: E402

TARGET_RATIO = 1.5
NUM_WORKERS = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_workers(args: argparse.Namespace, model: Path, log_dir: Path
                  ) -> list[tuple[subprocess.Popen, str]]:
    workers = []
    for i in range(NUM_WORKERS):
        port = free_port()
        command = [sys.executable, "-m", "edgelora.cli", "worker", "--model", str(model),
                   "--port", str(port), "--num-threads", "1", "--max-lora-rank", "8",
                   "--device-adapter-slots", str(args.device_slots),
                   "--host-adapter-cache", str(args.host_cache), "--max-batch-size", "16",
                   "--max-model-len", "512", "--kv-cache-mb", "64", "--log-level", "WARNING"]
        with open(log_dir / f"worker{i}.log", "ab") as log:
            proc = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        workers.append((proc, f"127.0.0.1:{port}"))
    for proc, address in workers:
        stub = worker_pb2_grpc.WorkerStub(grpc.insecure_channel(address))
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker {address} did not start: see {log_dir}")
            try:
                stub.Info(worker_pb2.InfoRequest(), timeout=2)
                break
            except grpc.RpcError:
                time.sleep(0.3)
    return workers


async def run_once(args: argparse.Namespace, routing: str, model: Path,
                   adapter_dirs: list[Path], requests: list[Request], prompts: list[str],
                   log_dir: Path) -> tuple[list[worker_pb2.InfoResponse], dict[str, float]]:
    workers = start_workers(args, model, log_dir)
    router = await start_router(RouterConfig(
        port=0, workers=",".join(a for _, a in workers), routing=routing, log_level="WARNING"))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{router.port}") as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            for i, path in enumerate(adapter_dirs):
                await stub.RegisterAdapter(types_pb2.RegisterAdapterRequest(
                    adapter_id=f"adapter-{i:02d}", path=str(path)))

            async def stream(r: Request) -> AsyncIterator[int]:
                async for chunk in stub.GenerateStream(build_request(
                        prompts[r.index], adapter_id=f"adapter-{r.adapter:02d}",
                        max_tokens=r.output_len, ignore_eos=True), timeout=600):
                    yield len(chunk.token_ids)

            summary = summarize(await replay(requests, stream))
        infos = []
        for _, address in workers:
            with grpc.insecure_channel(address) as ch:
                infos.append(worker_pb2_grpc.WorkerStub(ch).Info(worker_pb2.InfoRequest(),
                                                                 timeout=10))
        return infos, summary
    finally:
        await router.stop(0)
        for proc, _ in workers:
            proc.terminate()
            proc.wait(timeout=30)


def rate(hits: int, misses: int) -> float:
    return hits / (hits + misses) if hits + misses else float("nan")


def report(routing: str, infos: list[worker_pb2.InfoResponse], summary: dict[str, float]
           ) -> float:
    """Prints one line per worker and the total; -> the device+host hit rate over both."""
    totals = [0, 0, 0, 0]
    for i, info in enumerate(infos):
        d, h = info.adapter_stats.device, info.adapter_stats.host
        totals = [totals[0] + d.hits, totals[1] + d.misses, totals[2] + h.hits,
                  totals[3] + h.misses]
        print(f"  {routing:<12} worker{i}  acquisitions {d.hits + d.misses:>4}  device "
              f"{rate(d.hits, d.misses):>5.1%}  host {rate(h.hits, h.misses):>5.1%}  "
              f"device+host {rate(d.hits + h.hits, d.misses - h.hits):>5.1%}  "
              f"disk loads {h.loads:>3}")
    dh, dm, hh, hm = totals
    combined = rate(dh + hh, dm - hh)
    print(f"  {routing:<12} both     acquisitions {dh + dm:>4}  device {rate(dh, dm):>5.1%}  "
          f"host {rate(hh, hm):>5.1%}  device+host {combined:>5.1%}  "
          f"(failed requests {summary['num_failed']})", flush=True)
    return combined


def prepare(args: argparse.Namespace, tmp: Path) -> tuple[Path, list[Path]]:
    from bench.random_weights import write_random_adapter, write_tiny_llama

    default = resolve_model_path("default", WorkerConfig().cache_path)
    model = default if args.model == "default" else write_tiny_llama(tmp / "tiny", default)
    dirs = [write_random_adapter(tmp / f"adapter-{i:02d}", model, rank=8, seed=i, std=0.05)
            for i in range(args.num_adapters)]
    return model, dirs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", choices=("tiny", "default"), default="tiny",
                   help="tiny random Llama (fast) or the embedded SmolLM2-135M")
    p.add_argument("--rules", default="zipf,edgelora",
                   help="popularity rules to run (bench/workload.py): zipf, edgelora")
    p.add_argument("--num-adapters", type=int, default=64)
    p.add_argument("--num-requests", type=int, default=300)
    p.add_argument("--rate", type=float, default=6.0, help="mean arrival rate, req/s")
    p.add_argument("--cv", type=float, default=1.5, help="inter-arrival coeff. of variation")
    p.add_argument("--alpha", type=float, default=1.0, help="popularity skew")
    p.add_argument("--input-max", type=int, default=128, help="prompt tokens U[8, this]")
    p.add_argument("--output-max", type=int, default=64,
                   help="output tokens U[8, this] (DESIGN.md: 256; shorter keeps runs short)")
    p.add_argument("--device-slots", type=int, default=4, help="device adapter slots per worker")
    p.add_argument("--host-cache", type=int, default=16, help="host cache entries per worker")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    from worker.tokenizer import Tokenizer

    with tempfile.TemporaryDirectory(prefix="edgelora-affinity-") as name:
        tmp = Path(name)
        model, dirs = prepare(args, tmp)
        tokenizer = Tokenizer(model)
        print(f"model {args.model} ({model.name}) | {NUM_WORKERS} worker processes, 1 torch "
              f"thread each | {args.num_adapters} random r=8 adapters | per worker "
              f"{args.device_slots} device slots + {args.host_cache} host entries "
              f"({args.device_slots + args.host_cache} of {args.num_adapters} adapters fit one "
              f"worker) | load average {os.getloadavg()[0]:.1f}", flush=True)
        for rule in args.rules.split(","):
            requests = generate_workload(args.num_requests, args.num_adapters, args.alpha, rule,
                                         args.rate, args.cv, (8, args.input_max),
                                         (8, args.output_max), args.seed)
            prompts = [make_prompt(tokenizer, r.input_len, seed=args.seed * 100003 + r.index)
                       for r in requests]
            print(f"\nworkload: {len(requests)} requests, rule {rule} alpha {args.alpha} "
                  f"({len({r.adapter for r in requests})} adapters used), Gamma rate "
                  f"{args.rate}/s cv {args.cv}, input U[8,{args.input_max}], output "
                  f"U[8,{args.output_max}]", flush=True)
            combined = {}
            for routing in ("affinity", "round-robin"):
                started = time.perf_counter()
                infos, summary = asyncio.run(run_once(args, routing, model, dirs, requests,
                                                      prompts, tmp))
                combined[routing] = report(routing, infos, summary)
                print(f"  {routing:<12} run took {time.perf_counter() - started:.0f} s",
                      flush=True)
            ratio = combined["affinity"] / combined["round-robin"]
            print(f"{'PASS' if ratio >= TARGET_RATIO else 'MISS'}  [{rule}] device+host hit rate "
                  f"affinity / round-robin = {combined['affinity']:.1%} / "
                  f"{combined['round-robin']:.1%} = {ratio:.2f}x (target >= {TARGET_RATIO}x)",
                  flush=True)


if __name__ == "__main__":
    main()
