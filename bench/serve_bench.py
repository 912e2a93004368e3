"""Serving benchmark over the network: the DESIGN.md workload against our router (gRPC, and its
OpenAI-compatible HTTP front with --protocols grpc,http) and llama.cpp's llama-server (HTTP),
same prompts, same adapters, same machine, one run.

Scenarios: "mixed" (--num-adapters adapters, Zipf/EdgeLoRA popularity) and "single" (the same
requests, all on adapter 0, where llama.cpp batches too). Each target is launched in turn (ours:
one `edgelora serve`, driven over each of --protocols; llama.cpp: bench/llamacpp/server.py), or
reached at --edgelora-address / --edgelora-http-url / --llamacpp-url when given. With --rounds R
ours is driven R times per protocol, the order reversed every round (gRPC, HTTP, HTTP, gRPC, ...)
so that a drift of the machine's speed hits both alike; the tables show each protocol's median
round and the HTTP cost is the median of the rounds' own ratios. Prints req/s, tok/s,
mean/p50/p99 latency, mean TTFT, SLO attainment, the ratios ours / llama.cpp (and what HTTP costs
against gRPC), and writes results.json + serve_bench.png to --out.

    .venv/bin/python bench/serve_bench.py                        # both targets, both scenarios
    .venv/bin/python bench/serve_bench.py --num-requests 4 --output-max 16   # smoke
    .venv/bin/python bench/serve_bench.py --targets llamacpp --llamacpp-url http://127.0.0.1:8080
    .venv/bin/python bench/serve_bench.py --targets edgelora --protocols grpc,http \
        --scenarios mixed --rounds 2
    .venv/bin/python bench/serve_bench.py --targets edgelora,edgelora-invariant --scenarios mixed
        # what --batch-invariant costs: edgelora-invariant / edgelora tok/s (target >= 0.8x)
    .venv/bin/python bench/serve_bench.py --shape llama-3.2-1b --quant Q4_0 --num-requests 48
        # a 1B-class model (bench/make_model.py's random weights): llama-server on the Q4_0 file,
        # ours on the same file with --weights int4, adapters in that shape

Without --shape both serve the embedded default (ours: its checkpoint; llama.cpp: its Q4_1 GGUF).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.llamacpp.server import LlamaServer
from bench.serve_report import Results, format_table, http_cost_lines, plot, ratio_lines
from bench.serve_targets import EdgeloraServer, StreamFn
from bench.workload import (
    SLO_TTFT_S,
    Record,
    Request,
    generate_workload,
    make_prompt,
    replay,
    summarize,
)
from worker.config import WorkerConfig

TARGETS = ("edgelora", "llamacpp", "edgelora-invariant")
SCENARIOS = ("mixed", "single")
PROTOCOLS = ("grpc", "http")  # ours; llama.cpp is HTTP only
HTTP_LABEL = "edgelora-http"  # ours over HTTP in the tables ("edgelora" is ours over gRPC)
INVARIANT_LABEL = "edgelora-invariant"  # ours with --batch-invariant, over gRPC
SHAPE_SINGLE_TARGET = 2.0  # issue 16: at a real model's shape, one adapter >= 2x llama-server


def scenario_requests(requests: list[Request], scenario: str) -> list[Request]:
    if scenario == "single":
        return [dataclasses.replace(r, adapter=0) for r in requests]
    return requests


async def run_replay(requests: list[Request], stream: StreamFn, label: str) -> list[Record]:
    from tqdm import tqdm

    failed = 0
    with tqdm(total=len(requests), desc=label, unit="req", file=sys.stderr,
              dynamic_ncols=True) as bar:
        def done(record: Record) -> None:
            nonlocal failed
            failed += bool(record.error)
            bar.update(1)
            if failed:
                bar.set_postfix(failed=failed)

        return await replay(requests, stream, on_done=done)


def result_of(requests: list[Request], records: list[Record], slo_ttft_s: float) -> dict:
    wanted = {r.index: r.output_len for r in requests}
    errors = sorted({r.error for r in records if r.error})
    return {"summary": summarize(records, slo_ttft_s),
            "records": [dataclasses.asdict(r) for r in records],
            "mismatched": sum(not r.error and r.output_tokens != wanted[r.index]
                              for r in records),
            "errors": errors[:5]}


def labels(targets: Sequence[str], protocols: Sequence[str]) -> list[str]:
    """What is driven, in order: ours once per protocol, then llama.cpp."""
    out = []
    for target in targets:
        if target == "edgelora":
            out += ["edgelora" if p == "grpc" else HTTP_LABEL for p in protocols]
        else:
            out.append(target)
    return out


async def _drive(target: str, endpoint: str, prompts: Sequence[str], adapter_ids: Sequence[str],
                 per_scenario: dict[str, list[Request]], timeout_s: float,
                 slo_ttft_s: float) -> dict[str, dict]:
    from bench.serve_targets import edgelora_http_stream, edgelora_stream, llamacpp_stream

    channel = None
    if target in ("edgelora", INVARIANT_LABEL):
        import grpc

        channel = grpc.aio.insecure_channel(endpoint)
        stream = edgelora_stream(channel, prompts, adapter_ids, timeout_s)
    elif target == HTTP_LABEL:
        stream = edgelora_http_stream(endpoint, prompts, adapter_ids, timeout_s)
    else:
        stream = llamacpp_stream(endpoint, prompts, timeout_s)
    try:
        first = next(iter(per_scenario.values()))[0]
        warm = dataclasses.replace(first, arrival_s=0.0, adapter=0, output_len=4)
        warm_record = (await replay([warm], stream))[0]
        if warm_record.error:
            raise RuntimeError(f"{target}: warm-up request failed: {warm_record.error}")
        out = {}
        for scenario, requests in per_scenario.items():
            records = await run_replay(requests, stream, f"{scenario}/{target}")
            out[scenario] = result_of(requests, records, slo_ttft_s)
        return out
    finally:
        if channel is not None:
            await channel.close()


def run_target(target: str, args: argparse.Namespace, prompts: Sequence[str],
               per_scenario: dict[str, list[Request]], base_dir: Path
               ) -> dict[str, dict[str, dict]]:
    """Launches the target (unless an address was given), runs every scenario (ours: over each
    protocol, --rounds times), stops it. -> {label: {scenario: result}}."""
    server = None
    try:
        started = time.perf_counter()
        server, endpoints, ids = _launch(target, args, base_dir)
        if len(ids) < args.num_adapters:
            raise SystemExit(f"{target} at {endpoints} has {len(ids)} adapters, the workload "
                             f"needs {args.num_adapters}")
        print(f"{target}: ready at {', '.join(endpoints.values())} in "
              f"{time.perf_counter() - started:.0f} s, load average {os.getloadavg()[0]:.1f}",
              flush=True)
        rounds = args.rounds if target != "llamacpp" else 1
        runs: dict[str, list[dict[str, dict]]] = {label: [] for label in endpoints}
        for round_ in range(rounds):
            order = list(endpoints) if round_ % 2 == 0 else list(reversed(endpoints))
            for label in order:
                runs[label].append(asyncio.run(_drive(
                    label, endpoints[label], prompts, ids, per_scenario,
                    args.request_timeout_s, args.slo_ttft_s)))
        return {label: {scenario: median_round([run[scenario] for run in label_runs])
                        for scenario in per_scenario}
                for label, label_runs in runs.items()}
    finally:
        if server is not None:
            server.stop()


def median_round(results: list[dict]) -> dict:
    """The round with the median tok/s (the lower one of an even count); every round's summary
    is kept under "rounds" (the HTTP cost pairs them up)."""
    ordered = sorted(results, key=lambda r: r["summary"].get("tokens_per_s", 0.0))
    chosen = dict(ordered[(len(ordered) - 1) // 2])
    chosen["rounds"] = [r["summary"] for r in results]
    return chosen


def _launch(target: str, args: argparse.Namespace, base_dir: Path
            ) -> tuple[EdgeloraServer | LlamaServer | None, dict[str, str], list[str]]:
    """-> (the launched server or None, {label: endpoint}, the ids of workload adapters 0..n-1).
    Ours is one server; each of --protocols is a label ("edgelora" gRPC, HTTP_LABEL)."""
    from bench.llamacpp.adapters import adapter_set

    if target == INVARIANT_LABEL:  # a second server of ours: the same, with --batch-invariant
        adapters = adapter_set(base_dir, args.num_adapters, args.demo_adapters, seed=args.seed)
        server = EdgeloraServer(args.threads, args.max_batch, max(a.rank for a in adapters),
                                args.device_slots, [*args.ours_arg, "--batch-invariant", "true"],
                                args.out / "edgelora-invariant.log").start(adapters)
        return server, {INVARIANT_LABEL: server.address}, [a.name for a in adapters]
    if target == "edgelora":
        from bench.serve_targets import edgelora_adapter_ids

        given = {"edgelora": args.edgelora_address, HTTP_LABEL: args.edgelora_http_url}
        wanted = labels(["edgelora"], args.protocols)
        if all(given[label] for label in wanted):
            ids = args.adapter_ids.split(",") if args.adapter_ids else edgelora_adapter_ids(
                args.edgelora_address or "127.0.0.1:50051")
            return None, {label: given[label] for label in wanted}, ids
        adapters = adapter_set(base_dir, args.num_adapters, args.demo_adapters, seed=args.seed)
        server = EdgeloraServer(args.threads, args.max_batch, max(a.rank for a in adapters),
                                args.device_slots, args.ours_arg,
                                args.out / "edgelora.log").start(adapters)
        launched = {"edgelora": server.address, HTTP_LABEL: server.http_url}
        return server, {label: launched[label] for label in wanted}, [a.name for a in adapters]

    from bench.llamacpp.convert import convert_adapters
    from bench.llamacpp.server import LlamaServerConfig, default_gguf
    from bench.serve_targets import llamacpp_adapter_count

    if args.llamacpp_url:
        return None, {target: args.llamacpp_url}, [
            str(i) for i in range(llamacpp_adapter_count(args.llamacpp_url))]
    adapters = adapter_set(base_dir, args.num_adapters, args.demo_adapters, seed=args.seed)
    loras = convert_adapters([a.path for a in adapters], base_dir, args.lora_outtype)
    server = LlamaServer(LlamaServerConfig(
        args.gguf or default_gguf(), tuple(loras), parallel=args.max_batch, threads=args.threads,
        ctx_per_slot=args.ctx_per_slot, extra_args=tuple(args.llamacpp_arg)),
        args.out / "llamacpp.log").start()
    return server, {target: server.url}, [str(i) for i in range(len(loras))]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--targets", default="edgelora,llamacpp", help="comma list of " + str(TARGETS)
                   + f" ({INVARIANT_LABEL}: a second server of ours with --batch-invariant)")
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma list of "
                   + str(SCENARIOS))
    p.add_argument("--protocols", default="grpc", help="ours over these, each against a "
                   f"freshly launched server: comma list of {PROTOCOLS}")
    p.add_argument("--rounds", type=int, default=1, help="ours: drive each protocol this many "
                   "times on the one server, the order reversed every round")
    p.add_argument("--edgelora-address", default="", help="a running router (else launched)")
    p.add_argument("--edgelora-http-url", default="", help="a running router's HTTP front, "
                   "e.g. http://127.0.0.1:8000 (else launched)")
    p.add_argument("--adapter-ids", default="", help="external router: ids for adapters 0..n-1 "
                   "(default: its registered ids, sorted, from --edgelora-address)")
    p.add_argument("--llamacpp-url", default="", help="a running llama-server (else launched); "
                   "adapter i = its lora id i")
    w = p.add_argument_group("workload (DESIGN.md)")
    w.add_argument("--num-adapters", type=int, default=32)
    w.add_argument("--alpha", type=float, default=1.0, help="popularity skew")
    w.add_argument("--rule", choices=("zipf", "edgelora"), default="zipf")
    w.add_argument("--rate", type=float, default=4.0, help="mean arrival rate, req/s (4 keeps "
                   "both servers saturated on 2 cores)")
    w.add_argument("--cv", type=float, default=1.5, help="inter-arrival coeff. of variation")
    for name, lo, hi in (("input", 8, 128), ("output", 8, 256)):
        w.add_argument(f"--{name}-min", type=int, default=lo, help=f"shortest {name}, tokens")
        w.add_argument(f"--{name}-max", type=int, default=hi, help=f"longest {name}, tokens")
    w.add_argument("--num-requests", type=int, default=100, help="requests (a cap with "
                   "--duration-s)")
    w.add_argument("--duration-s", type=float, default=None, help="arrivals within this window")
    w.add_argument("--seed", type=int, default=0, help="workload, prompts and random adapters")
    m = p.add_argument_group("model (default: the embedded SmolLM2-135M)")
    m.add_argument("--shape", default="", help="bench/make_model.py's random weights in this "
                   "shape (e.g. llama-3.2-1b), written first if missing")
    m.add_argument("--quant", default="Q4_0", help="--shape's GGUF type for llama-server; ours "
                   "serves the same file with the matching --weights (Q4_0: int4, Q8_0: int8, "
                   "F16: bf16)")
    s = p.add_argument_group("servers")
    s.add_argument("--threads", type=int, default=2, help="ours --num-threads, llama.cpp -t")
    s.add_argument("--max-batch", type=int, default=WorkerConfig().max_batch_size,
                   help="ours --max-batch-size, llama.cpp --parallel")
    s.add_argument("--device-slots", type=int, default=32, help="ours --device-adapter-slots: "
                   "every workload adapter on the device, as llama.cpp holds them all")
    s.add_argument("--demo-adapters", action="store_true", help="demo adapters first, then "
                   "random r=8 ones")
    s.add_argument("--lora-outtype", default="f32", choices=("f32", "f16", "bf16", "q8_0"))
    s.add_argument("--ctx-per-slot", type=int, default=512, help="llama.cpp context per slot")
    s.add_argument("--ours-arg", action="append", default=[], help="extra `edgelora serve` "
                   "flag (repeat; e.g. --ours-arg=--dtype=float32)")
    s.add_argument("--llamacpp-arg", action="append", default=[], help="extra llama-server flag")
    p.add_argument("--request-timeout-s", type=float, default=3600.0)
    p.add_argument("--slo-ttft-s", type=float, default=SLO_TTFT_S)
    p.add_argument("--target-ratio", type=float, default=4.0, help="mixed: ours / llama.cpp")
    p.add_argument("--single-target-ratio", type=float, default=None,
                   help="single: ours / llama.cpp throughput to print PASS/MISS for (default: "
                   f"{SHAPE_SINGLE_TARGET:g} with --shape, else not gated)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out"
                   / "serve_bench", help="results.json, serve_bench.png, server logs")
    args = p.parse_args(argv)
    args.targets = [t for t in args.targets.split(",") if t]
    args.scenarios = [s for s in args.scenarios.split(",") if s]
    args.protocols = [s for s in args.protocols.split(",") if s]
    if not set(args.targets) <= set(TARGETS) or not set(args.scenarios) <= set(SCENARIOS) \
            or not args.protocols or not set(args.protocols) <= set(PROTOCOLS):
        p.error(f"--targets from {TARGETS}, --scenarios from {SCENARIOS}, --protocols from "
                f"{PROTOCOLS}")
    if args.num_requests < 1 or args.num_adapters < 1 or args.rounds < 1:
        p.error("--num-requests, --num-adapters and --rounds must be >= 1")
    return args


def main(argv: list[str] | None = None) -> Results:
    args = parse_args(argv)
    from worker.gguf_import import resolve_model_path
    from worker.tokenizer import Tokenizer

    args.gguf = None  # llama-server's model: the default's GGUF unless --shape
    base_dir = resolve_model_path("default", WorkerConfig().cache_path)
    if args.shape:
        from bench.make_model import WEIGHTS, model_files

        if args.quant not in WEIGHTS:
            raise SystemExit(f"--quant {args.quant}: one of {sorted(WEIGHTS)}")
        if args.demo_adapters:  # trained on the default model: other shapes cannot load them
            raise SystemExit("--demo-adapters fit only the default model, not --shape")
        args.gguf, base_dir = model_files(args.shape, args.quant)  # adapters in its shapes
        args.ours_arg = ["--model", str(args.gguf), "--weights", WEIGHTS[args.quant],
                         *args.ours_arg]
    requests = generate_workload(args.num_requests, args.num_adapters, args.alpha, args.rule,
                                 args.rate, args.cv, (args.input_min, args.input_max),
                                 (args.output_min, args.output_max), args.seed,
                                 duration_s=args.duration_s)
    tokenizer = Tokenizer(base_dir)  # prompt lengths are SmolLM2 tokens; both get the same text
    prompts = [make_prompt(tokenizer, r.input_len, seed=args.seed * 100003 + r.index)
               for r in requests]
    per_scenario = {s: scenario_requests(requests, s) for s in args.scenarios}
    idle_load = os.getloadavg()[0]  # before our servers start: other processes' share
    print(f"model: {args.gguf or 'the embedded default'}", flush=True)
    print(f"workload: {len(requests)} requests over {args.num_adapters} adapters "
          f"({len({r.adapter for r in requests})} used, {args.rule} alpha={args.alpha}), Gamma "
          f"rate {args.rate}/s cv {args.cv}, last arrival {requests[-1].arrival_s:.1f} s, input "
          f"U[{args.input_min},{args.input_max}], output U[{args.output_min},{args.output_max}] "
          f"({sum(r.output_len for r in requests)} output tokens); scenarios {args.scenarios}; "
          f"load average {idle_load:.1f}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    results: Results = {s: {} for s in args.scenarios}
    for target in args.targets:
        for label, per_label in run_target(target, args, prompts, per_scenario,
                                           base_dir).items():
            for scenario, result in per_label.items():
                results[scenario][label] = result
    (args.out / "results.json").write_text(json.dumps(
        {"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=1))
    print(format_table(results, args.slo_ttft_s))
    single_ratio = (args.single_target_ratio if args.single_target_ratio is not None
                    else SHAPE_SINGLE_TARGET if args.shape else None)
    for line in ratio_lines(results, target_ratio=args.target_ratio, single_ratio=single_ratio):
        print(line)
    for line in http_cost_lines(results, http=HTTP_LABEL, grpc="edgelora"):
        print(line)
    for line in ratio_lines(results, INVARIANT_LABEL, "edgelora", target_ratio=0.8):
        print(line.replace("SLO >= theirs", "SLO >= the default's"))
    for scenario, targets in results.items():
        for target, result in targets.items():
            for error in result["errors"]:
                print(f"error ({scenario}/{target}): {error}")
    try:
        print(f"plot: {plot(results, args.out / 'serve_bench.png', args.slo_ttft_s)}")
    except ImportError:  # matplotlib is the optional 'bench' extra
        print("plot: skipped (pip install 'edgelora[bench]' for matplotlib)")
    # The load average after the run counts our own servers' threads, so only the one before
    # any server started tells of other processes.
    if idle_load > args.threads / 2:
        print(f"WARNING: load average {idle_load:.1f} before the run (over half of "
              f"{args.threads} threads): other processes shared the cores, numbers are noisy")
    return results


if __name__ == "__main__":
    main()
