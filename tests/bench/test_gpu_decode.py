"""bench/gpu_decode.py on tiny shapes: the CPU smoke runs the code path of the GPU benchmark
(engine, in-memory adapters, the LoRA kernel and torch's pool path, transformers + PEFT
baseline, bytes model)."""

from __future__ import annotations

import contextlib
import io
import math
import re

import pytest
import torch

from bench import gpu_decode
from worker import lora

BATCH, ADAPTERS, RANK, PROMPT, NEW = 4, 4, 4, 8, 4
SMOKE = ["--shape", "tiny", "--batch", str(BATCH), "--num-adapters",
         str(ADAPTERS), "--rank", str(RANK), "--prompt-tokens", str(PROMPT), "--new-tokens",
         str(NEW), "--repeats", "1", "--threads", "1",
         "--lora-std", "0.3"]  # adapters strong enough to change greedy tokens


def run_smoke(argv: list[str]) -> tuple[gpu_decode.Report, str, int]:
    """-> (report, printed text, pool_delta calls during the run)."""
    calls = 0
    real = lora.pool_delta

    def counting(*args, **kwargs):
        nonlocal calls
        calls += 1
        return real(*args, **kwargs)

    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
        mp.setattr(lora, "pool_delta", counting)
        report = gpu_decode.run(gpu_decode.parse_args(argv))
    return report, out.getvalue(), calls


@pytest.fixture(scope="module")
def smoke() -> tuple[gpu_decode.Report, str, int]:
    return run_smoke([*SMOKE, "--device", "cpu", "--dtype", "float32", "--peak-gbps", "50"])


def test_every_sequence_gets_exactly_new_tokens(smoke) -> None:
    report = smoke[0]
    assert [len(o) for o in report.ours.outputs] == [NEW] * BATCH
    assert [len(o) for o in report.baseline.outputs] == [NEW] * BATCH
    # every prompt fits one prefill step: then NEW - 1 full-batch decode steps follow
    assert report.ours.decode_steps == NEW - 1
    assert report.ours.decode_tokens == report.baseline.decode_tokens == BATCH * (NEW - 1)
    assert report.adapter_ids == [f"adapter-{i:02d}" for i in range(BATCH)]


def test_greedy_tokens_equal_peft_row_by_row(smoke) -> None:
    report = smoke[0]
    assert report.ours.outputs == report.baseline.outputs
    # ...and the adapters matter: the same prompts with the adapters shifted by one row differ
    shifted = report.adapter_ids[1:] + report.adapter_ids[:1]
    other = gpu_decode.run_ours(report.engine, report.prompts, shifted, NEW, torch.device("cpu"))
    assert any(a != b for a, b in zip(other.outputs, report.baseline.outputs, strict=True))


def test_ours_runs_on_the_lora_kernel_then_on_torchs_pool_path(smoke) -> None:
    # warm-up + 1 measured run on the C++ kernels (no pool_delta), 1 run on torch's LoRA paths
    # (NEW - 1 decode steps, 4 fused projections per layer; prefill takes segments), then 1 run
    # with torch's attention and the LoRA kernel
    layers = gpu_decode.SHAPES["tiny"].num_layers
    assert smoke[0].engine.runner.lora_slots.kernel is not None
    assert smoke[2] == (NEW - 1) * layers * 4
    for label in ("torch LoRA", "torch attention"):
        assert re.search(rf"^ours, {label} .*\n  kernel / {label}: [\d.]+x", smoke[1],
                         re.MULTILINE), smoke[1]


def test_bytes_model_matches_a_hand_count(smoke) -> None:
    cfg = gpu_decode.SHAPES["tiny"]  # hidden 64, inter 128, 2 layers, 4 q / 2 kv heads of 16
    nbytes = gpu_decode.decode_bytes(cfg, torch.float32, BATCH, ADAPTERS, RANK, 10.0)
    per_layer = 64 * (64 + 32 + 32) + 64 * 64 + 64 * 2 * 128 + 128 * 64 + 2 * 64
    base = 2 * per_layer + 64 + 512 * 64 + BATCH * 64  # + final norm, lm_head, embedding rows
    assert nbytes["base"] == 4 * base == 428288
    # sum over q, k, v, o, gate, up, down of (in + out)
    lora_per_rank = 128 + 96 + 96 + 128 + 192 + 192 + 192
    assert nbytes["lora"] == 4 * ADAPTERS * RANK * 2 * lora_per_rank == 131072
    assert nbytes["kv"] == 4 * BATCH * 10 * 2 * 2 * 2 * 16 == 20480
    # the same counts from the live objects: model parameters and the engine's LoRA slot pool
    model = smoke[0].engine.runner.model
    params = sum(p.numel() for p in model.parameters()) - model.embed_tokens.weight.numel()
    assert nbytes["base"] == 4 * (params + BATCH * 64)
    assert nbytes["lora"] == smoke[0].engine.runner.lora_slots.nbytes
    assert smoke[0].bytes_per_step == gpu_decode.decode_bytes(
        cfg, torch.float32, BATCH, ADAPTERS, RANK, PROMPT + NEW / 2)


def test_printed_ratio_and_fraction_are_finite(smoke) -> None:
    report, text = smoke[0], smoke[1]
    ratio = float(re.search(r"ours / transformers\+peft = ([0-9.]+)x", text)[1])
    fraction = float(re.search(r"ours = ([0-9.]+)% of the bandwidth bound", text)[1])
    assert math.isfinite(ratio) and ratio > 0
    assert math.isfinite(fraction) and fraction > 0
    assert ratio == pytest.approx(report.ours.tps / report.baseline.tps, abs=0.01)
    bound = BATCH / (sum(report.bytes_per_step.values()) / 50e9)
    assert report.bound_tps == pytest.approx(bound)
    assert fraction == pytest.approx(100 * report.ours.tps / bound, abs=0.1)


def test_peak_bandwidth_by_device_name(monkeypatch) -> None:
    cuda = torch.device("cuda")
    for name, gbps in [("NVIDIA H100 80GB HBM3", 3350.0), ("NVIDIA H100 PCIe", 2000.0),
                       ("NVIDIA H200", 4800.0), ("NVIDIA A100-SXM4-80GB", 2039.0),
                       ("NVIDIA L4", None)]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device, n=name: n)
        assert gpu_decode.peak_gbps(cuda, None) == gbps, name
    assert gpu_decode.peak_gbps(cuda, 123.0) == 123.0
    assert gpu_decode.peak_gbps(torch.device("cpu"), None) is None


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_small_cuda_run(dtype: str) -> None:
    report, text, calls = run_smoke([*SMOKE, "--device", "cuda", "--dtype", dtype,
                                     "--peak-gbps", "1000"])
    assert [len(o) for o in report.ours.outputs] == [NEW] * BATCH
    assert [len(o) for o in report.baseline.outputs] == [NEW] * BATCH
    assert calls > 0 and math.isfinite(report.ours.tps / report.bound_tps)
    assert "ours / transformers+peft = " in text
    assert re.search(r"^ours, eager steps .*\n  CUDA graphs / eager steps: [\d.]+x", text,
                     re.MULTILINE), text
    if dtype == "float32":  # exact mode: the same greedy tokens as PEFT
        assert report.ours.outputs == report.baseline.outputs
