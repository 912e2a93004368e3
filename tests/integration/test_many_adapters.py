"""10,000 registered adapters, 8 device slots, 64 host slots: 200 power-law requests all served with
the right adapter, and registration costs little memory (tiny model)."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import grpc
import torch

from edgelora.client import build_request
from edgelora.v1 import router_pb2_grpc, types_pb2
from tests.conftest import ServeThread, write_random_adapter
from worker.config import WorkerConfig

NUM_IDS, NUM_FILES, NUM_REQUESTS = 10_000, 64, 200


def rss_mb() -> float:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_ten_thousand_adapters_power_law(tmp_path: Path, tiny_model_dir: Path,
                                         record_property) -> None:
    # Distinct weights per file; ids share files round-robin so the test writes 64 files, not 10k.
    files = [write_random_adapter(tmp_path / f"w{i}", tiny_model_dir, rank=8, seed=i,
                                  modules=("q_proj", "v_proj"), dtype=torch.float16, std=0.4)
             for i in range(NUM_FILES)]
    server = ServeThread(WorkerConfig(model=str(tiny_model_dir), port=0, num_threads=1,
                                      max_model_len=256, kv_cache_mb=32, max_batch_size=16,
                                      max_lora_rank=8, device_adapter_slots=8,
                                      host_adapter_cache=64, max_queue=NUM_REQUESTS))
    try:
        stub = router_pb2_grpc.RouterStub(grpc.insecure_channel(server.address))
        before, started = rss_mb(), time.perf_counter()
        for i in range(NUM_IDS):
            stub.RegisterAdapter(types_pb2.RegisterAdapterRequest(
                adapter_id=f"tenant-{i}", path=str(files[i % NUM_FILES])), timeout=30)
        register_s, grown_mb = time.perf_counter() - started, rss_mb() - before
        record_property("register_10k_s", round(register_s, 1))
        record_property("rss_growth_mb", round(grown_mb, 1))
        assert grown_mb < 150, f"10k registrations grew router+worker RSS by {grown_mb:.0f} MB"

        def request(adapter_id: str) -> types_pb2.GenerateRequest:
            return build_request("Say something", adapter_id=adapter_id, max_tokens=6,
                                 ignore_eos=True)

        reference = [list(stub.Generate(request(f"tenant-{f}"), timeout=60).token_ids)
                     for f in range(NUM_FILES)]
        assert len({tuple(r) for r in reference}) > NUM_FILES // 2, "adapters must differ"
        rng = random.Random(0)
        weights = [1 / (i + 1) for i in range(NUM_IDS)]  # Zipf, alpha = 1
        chosen = rng.choices(range(NUM_IDS), weights=weights, k=NUM_REQUESTS)
        calls = [stub.Generate.future(request(f"tenant-{i}"), timeout=300) for i in chosen]
        for i, call in zip(chosen, calls, strict=True):
            response = call.result()
            assert response.adapter_id == f"tenant-{i}"
            assert list(response.token_ids) == reference[i % NUM_FILES], f"tenant-{i}"
        record_property("rss_after_requests_mb", round(rss_mb() - before, 1))
        assert len(set(chosen)) > 2 * 8, "the mix must overflow the 8 device slots"
    finally:
        server.stop()
