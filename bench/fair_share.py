"""Fair share across tenants, measured side by side in one run against one `edgelora serve`:
tenant A streams a flood of long requests at once, tenant B sends one short request a second.

Prints B's time to first token (p50, p99) alone and under A's flood, and A's throughput alone and
with B beside it, with the ratios and PASS/MISS against the targets (B's p50 TTFT under the flood
<= 2x alone; A's throughput with B >= 0.9x alone).

    .venv/bin/python bench/fair_share.py                    # 200 x 256 tokens, as the issue asks
    .venv/bin/python bench/fair_share.py --flood 64 --flood-tokens 128   # a quicker look
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.serve_targets import EdgeloraServer
from bench.workload import _percentile
from edgelora.client import build_request

KEYS = {"keys": [{"key": "bench-key-tenant-a", "tenant": "a"},
                 {"key": "bench-key-tenant-b", "tenant": "b"}]}
A_PROMPT = "Write a long story about a lighthouse keeper and the sea, with many details."
B_PROMPT = "What is the capital of France?"


def _metadata(tenant: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer bench-key-tenant-{tenant}"),)


async def _stream(stub, tenant: str, prompt: str, max_tokens: int) -> tuple[float, int]:
    """-> (seconds to the first token, tokens received) of one greedy request."""
    started = time.perf_counter()
    first, tokens = 0.0, 0
    call = stub.GenerateStream(build_request(prompt, chat=True, max_tokens=max_tokens,
                                             temperature=0.0, ignore_eos=True),
                               metadata=_metadata(tenant), timeout=3600)
    async for chunk in call:
        if chunk.token_ids and not first:
            first = time.perf_counter() - started
        tokens += len(chunk.token_ids)
    return first, tokens


async def _flood(stub, count: int, max_tokens: int) -> tuple[float, int]:
    """A's requests all at once -> (wall seconds until the last finishes, tokens)."""
    started = time.perf_counter()
    results = await asyncio.gather(*(_stream(stub, "a", A_PROMPT, max_tokens)
                                     for _ in range(count)))
    return time.perf_counter() - started, sum(tokens for _, tokens in results)


async def _trickle(stub, count: int, max_tokens: int, interval_s: float,
                   stop: asyncio.Event | None = None) -> list[float]:
    """B's requests, one every interval_s (until `stop` is set) -> TTFT of each."""
    tasks = []
    for _ in range(count):
        if stop is not None and stop.is_set():
            break
        tasks.append(asyncio.create_task(_stream(stub, "b", B_PROMPT, max_tokens)))
        await asyncio.sleep(interval_s)
    return [first for first, _ in await asyncio.gather(*tasks)]


async def measure(address: str, args: argparse.Namespace) -> dict[str, float]:
    import grpc

    from edgelora.v1 import router_pb2_grpc

    async with grpc.aio.insecure_channel(address) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        await _stream(stub, "b", B_PROMPT, 4)  # warm-up: first-request costs are not fairness
        b_alone = await _trickle(stub, args.b_requests, args.b_tokens, args.interval_s)
        a_seconds, a_tokens = await _flood(stub, args.flood, args.flood_tokens)
        stop = asyncio.Event()
        flood = asyncio.create_task(_flood(stub, args.flood, args.flood_tokens))
        await asyncio.sleep(args.interval_s)  # let A fill the batch first
        trickle = asyncio.create_task(_trickle(stub, 10**6, args.b_tokens, args.interval_s,
                                               stop))
        both_seconds, both_tokens = await flood
        stop.set()
        b_flood = await trickle
    return {"b_alone_p50": _percentile(b_alone, 50), "b_alone_p99": _percentile(b_alone, 99),
            "b_flood_p50": _percentile(b_flood, 50), "b_flood_p99": _percentile(b_flood, 99),
            "b_flood_n": len(b_flood), "a_alone_tps": a_tokens / a_seconds,
            "a_with_b_tps": both_tokens / both_seconds}


def report(m: dict[str, float]) -> list[str]:
    ttft = m["b_flood_p50"] / m["b_alone_p50"]
    share = m["a_with_b_tps"] / m["a_alone_tps"]
    return [
        "tenant B's time to first token (s)   alone    under A's flood",
        f"  p50                                 {m['b_alone_p50']:6.3f}   {m['b_flood_p50']:6.3f}",
        f"  p99                                 {m['b_alone_p99']:6.3f}   {m['b_flood_p99']:6.3f}",
        f"  (requests under the flood: {m['b_flood_n']:.0f})",
        "tenant A's throughput (tokens/s)       alone    with B",
        f"                                      {m['a_alone_tps']:6.1f}   {m['a_with_b_tps']:6.1f}",
        f"B p50 TTFT flood / alone: {ttft:.2f}x (target <= 2.0x) "
        f"{'PASS' if ttft <= 2.0 else 'MISS'}",
        f"A throughput with B / alone: {share:.2f}x (target >= 0.9x) "
        f"{'PASS' if share >= 0.9 else 'MISS'}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flood", type=int, default=200, help="tenant A's requests at once")
    parser.add_argument("--flood-tokens", type=int, default=256, help="tokens per A request")
    parser.add_argument("--b-requests", type=int, default=10, help="B's requests alone")
    parser.add_argument("--b-tokens", type=int, default=16, help="tokens per B request")
    parser.add_argument("--interval-s", type=float, default=1.0, help="B's request interval")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--json", default="", help="also write the figures to this file")
    args = parser.parse_args()
    print(f"load average before start: {os.getloadavg()}")
    with tempfile.TemporaryDirectory() as tmp:
        keys = Path(tmp) / "keys.json"
        keys.write_text(json.dumps(KEYS))
        server = EdgeloraServer(threads=args.threads, max_batch=args.max_batch, extra_args=[
            "--api-keys", str(keys), "--max-queue", str(max(256, 2 * args.flood))],
            log_path=Path(tmp) / "serve.log")
        server.start([])
        try:
            figures = asyncio.run(measure(server.address, args))
        finally:
            server.stop()
    print(f"edgelora serve, {args.threads} threads, max batch {args.max_batch}; A: {args.flood} "
          f"x {args.flood_tokens} tokens at once; B: one request of {args.b_tokens} tokens every "
          f"{args.interval_s:g} s")
    print("\n".join(report(figures)))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
