"""Multi-LoRA decode on a GPU: our engine vs transformers + PEFT, and the memory-bandwidth bound.

Random weights shaped like Llama-3.1-8B (nothing downloaded); --batch sequences, each with its own
of --num-adapters random LoRA adapters (rank --rank, all 7 projections), greedy, exactly
--new-tokens each; one warm-up run per system first.
  * ours: worker.server.assemble_engine around the model, stepped synchronously; adapters go
    into the host tier and device slots up front (no files). Prefill = until every sequence has
    its first token; decode tok/s = tokens after that / time of the remaining steps (best of
    --repeats). Then the same runs again side by side: with eager steps instead of CUDA graphs
    (CUDA), and, on eager steps, with the LoRA deltas, then the decode attention, on torch's
    paths instead of the kernels (Triton on CUDA, C++ on CPU).
  * transformers + PEFT: LlamaForCausalLM on views of our weights, PEFT holding the same
    adapters, one generate() over the batch with adapter_names= (one adapter per row); its
    prefill ends when its streamer sees the first token; one measured run.
  * bound: bytes per decode step = base weights (of the embedding only the batch's rows) + every
    adapter's LoRA weights (each read once a step) + the KV cache at the mean
    decode context; bound tok/s = batch / (bytes / peak bandwidth).
Targets: ours / transformers+peft >= 20x decode tok/s; ours >= 50% of the bound.

    .venv/bin/python bench/gpu_decode.py     # GPU machine (CUDA torch: make setup TORCH_SPEC=...)
    .venv/bin/python bench/gpu_decode.py --shape tiny --device cpu --dtype float32 --batch 4 \
        --num-adapters 4 --rank 4 --prompt-tokens 8 --new-tokens 4 --peak-gbps 50   # smoke
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from tqdm import tqdm

from common.adapter_format import LORA_MODULES, AdapterSpec
from worker.adapter_memory import AdapterMemory, HostWeights
from worker.config import WorkerConfig
from worker.engine import Engine
from worker.lora import module_shapes
from worker.model import LlamaModel, ModelConfig, rope_inv_freq
from worker.sequence import SamplingOptions, Sequence
from worker.server import assemble_engine

SHAPES = {
    "llama-8b": ModelConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                            num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                            rope_theta=500000.0, max_position_embeddings=8192),
    "tiny": ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
                        num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=512),
}
# HBM bandwidth in GB/s by torch.cuda.get_device_name(); first substring that matches wins
PEAK_GBPS = (("H100 PCIe", 2000.0), ("H100 NVL", 3900.0), ("H100", 3350.0), ("H200", 4800.0),
             ("A100-SXM4-40GB", 1555.0), ("A100-PCIE-40GB", 1555.0), ("A100 80GB PCIe", 1935.0),
             ("A100", 2039.0))
TARGET_RATIO, TARGET_FRACTION = 20.0, 0.5


@dataclass
class Result:
    name: str
    prefill_s: float
    decode_tokens: int
    decode_s: float
    decode_steps: int
    outputs: list[list[int]] = field(repr=False)

    @property
    def tps(self) -> float:
        return self.decode_tokens / self.decode_s


@dataclass
class Report:
    ours: Result
    baseline: Result | None
    bytes_per_step: dict[str, int]
    bound_tps: float | None
    engine: Engine = field(repr=False)
    prompts: list[list[int]] = field(repr=False)
    adapter_ids: list[str] = field(repr=False)


class NullDetokenizer:
    """worker.sequence.Detokenizer without a tokenizer: no text, never stops."""

    stopped = False

    def add_token(self, token_id: int) -> str:
        return ""

    def flush(self) -> str:
        return ""


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_bytes(cfg: ModelConfig, dtype: torch.dtype, batch: int, num_adapters: int, rank: int,
                 mean_context: float) -> dict[str, int]:
    """Bytes one decode step must read at least: base weights, LoRA pool, KV cache."""
    h, q, kv = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    layer = h * (q + 2 * kv) + q * h + 3 * h * cfg.intermediate_size + 2 * h  # + 2 norms
    lm_head = 0 if cfg.tie_word_embeddings else cfg.vocab_size * h
    embed = cfg.vocab_size * h if cfg.tie_word_embeddings else batch * h  # rows gathered
    base = cfg.num_layers * layer + h + lm_head + embed
    lora = num_adapters * rank * cfg.num_layers * sum(
        fan_in + fan_out for fan_in, fan_out in module_shapes(cfg).values())
    kv_cache = round(batch * mean_context) * 2 * cfg.num_layers * kv
    return {"base": base * dtype.itemsize, "lora": lora * dtype.itemsize,
            "kv": kv_cache * dtype.itemsize}


def peak_gbps(device: torch.device, given: float | None) -> float | None:
    if given is not None or device.type != "cuda":
        return given
    name = torch.cuda.get_device_name(device)
    return next((gbps for key, gbps in PEAK_GBPS if key in name), None)


def build_model(cfg: ModelConfig, device: torch.device, dtype: torch.dtype,
                std: float) -> LlamaModel:
    """Random weights allocated on the device in the dtype: no fp32 or host copy of 8B params."""
    with torch.device("meta"):
        model = LlamaModel(cfg)
    model = model.to(dtype).to_empty(device=device)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:  # RMSNorm weights (the shapes here have no biases)
                p.fill_(1.0)
            else:
                p.normal_(0.0, std)
    model.inv_freq = rope_inv_freq(cfg).to(device)  # to_empty left it uninitialised
    return model.eval().requires_grad_(False)


def random_adapter(cfg: ModelConfig, rank: int, scaling: float, std: float,
                   device: torch.device) -> HostWeights:
    """read_adapter_weights' format: {(layer, module): (A [r, in], B [out, r] * scaling)} in
    float32 on the host; drawn on the device (fast), then copied down."""
    weights = {}
    for layer in range(cfg.num_layers):
        for module, (fan_in, fan_out) in module_shapes(cfg).items():
            a = torch.randn(rank, fan_in, device=device) * std
            b = torch.randn(fan_out, rank, device=device) * (std * scaling)
            weights[layer, module] = (a.cpu(), b.cpu())
    return weights


def preload(memory: AdapterMemory, spec: AdapterSpec, weights: HostWeights) -> None:
    """Servable and device-resident without a file: into the host tier, then acquire + release
    copy it into a slot through the real host -> device path and leave it resident and idle."""
    memory.register_loaded(spec, weights)
    memory.release(memory.acquire(spec.adapter_id))


def run_ours(engine: Engine, prompts: list[list[int]], adapter_ids: list[str], new_tokens: int,
             device: torch.device) -> Result:
    options = SamplingOptions(max_tokens=new_tokens, ignore_eos=True)
    seqs = [Sequence(i, p, options, a, detok=engine.make_detokenizer(()))
            for i, (p, a) in enumerate(zip(prompts, adapter_ids, strict=True))]
    for seq in seqs:
        engine.scheduler.add(seq)
    sync(device)
    start = time.perf_counter()
    while any(s.num_output_tokens == 0 for s in seqs):
        engine.step()
    sync(device)
    prefill_end = time.perf_counter()
    # rows admitted early already decode while later prompts prefill: count only what is left
    done_early = sum(s.num_output_tokens for s in seqs)
    steps = 0
    while engine.scheduler.has_work():
        engine.step()
        steps += 1
    sync(device)
    end = time.perf_counter()
    outputs = [s.output_ids for s in seqs]
    assert all(len(o) == new_tokens for o in outputs), "a sequence stopped early"
    return Result("ours", prefill_end - start, len(seqs) * new_tokens - done_early,
                  end - prefill_end, steps, outputs)


def build_ours(args: argparse.Namespace, cfg: ModelConfig, device: torch.device,
               dtype: torch.dtype) -> tuple[Engine, dict[str, HostWeights]]:
    model = build_model(cfg, device, dtype, args.init_std)
    block = 16
    blocks_per_seq = math.ceil((args.prompt_tokens + args.new_tokens) / block) + 1
    kv_bytes = args.batch * blocks_per_seq * block * 2 * cfg.num_layers * cfg.num_kv_heads \
        * cfg.head_dim * dtype.itemsize
    config = WorkerConfig(
        device=str(device), dtype=str(dtype).removeprefix("torch."), num_threads=args.threads,
        max_batch_size=args.batch, max_num_batched_tokens=max(args.batch, args.prefill_tokens),
        max_model_len=args.prompt_tokens + args.new_tokens, kv_block_size=block,
        kv_cache_mb=math.ceil(kv_bytes / 2**20) + 1, max_lora_rank=args.rank,
        device_adapter_slots=args.num_adapters, host_adapter_cache=args.num_adapters)

    def emit(event) -> None:
        assert event.finish_reason != "error", event.error

    engine, max_len = assemble_engine(config, model, lambda stop: NullDetokenizer(), (), emit,
                                      args.threads)
    assert max_len >= args.prompt_tokens + args.new_tokens, f"KV cache too small ({max_len})"
    memory = engine.scheduler.adapters
    alpha = 2.0 * args.rank
    adapters = {}
    for i in tqdm(range(args.num_adapters), desc="adapters", disable=None):
        spec = AdapterSpec(f"adapter-{i:02d}", "(random, in memory)", args.rank, alpha, False,
                           LORA_MODULES)
        adapters[spec.adapter_id] = random_adapter(cfg, args.rank, spec.scaling, args.lora_std,
                                                   device)
        preload(memory, spec, adapters[spec.adapter_id])
    return engine, adapters


def hf_state(model: LlamaModel) -> dict[str, torch.Tensor]:
    """Our weights under transformers' names; fused q/k/v and gate/up split into row views
    (contiguous, sharing our storage: no second copy of the model)."""
    cfg = model.config
    q, kv, inter = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, \
        cfg.intermediate_size
    splits = {"self_attn.qkv_proj": (("q_proj", "k_proj", "v_proj"), [q, kv, kv]),
              "mlp.gate_up_proj": (("gate_proj", "up_proj"), [inter, inter])}
    state = {}
    for name, tensor in model.state_dict().items():
        hf_name = name if name.startswith("lm_head.") else f"model.{name}"
        fused = next((f for f in splits if f".{f}." in name), None)
        if fused is None:
            state[hf_name] = tensor
            continue
        parts, sizes = splits[fused]
        for part, view in zip(parts, tensor.split(sizes), strict=True):
            state[hf_name.replace(fused, f"{fused.split('.')[0]}.{part}")] = view
    return state


def build_baseline(model: LlamaModel, adapters: dict[str, HostWeights], rank: int):
    """transformers LlamaForCausalLM on our weights + PEFT holding the same adapters."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    cfg, device = model.config, model.embed_tokens.weight.device
    hf_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        intermediate_size=cfg.intermediate_size, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=None, pad_token_id=None)  # no EOS: exactly N tokens
    with torch.device("meta"):
        hf = LlamaForCausalLM(hf_cfg)
    hf.load_state_dict(hf_state(model), strict=True, assign=True)
    hf.model.rotary_emb = type(hf.model.rotary_emb)(hf_cfg).to(device)  # meta left it empty
    hf.eval().requires_grad_(False)

    def lora_config() -> LoraConfig:
        return LoraConfig(r=rank, lora_alpha=2.0 * rank, target_modules=list(LORA_MODULES),
                          lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")

    names = list(adapters)
    # new LoRA layers born on the GPU, not the host; autocast off, else PEFT would hold bf16
    # adapters in fp32: a slower baseline than it can be
    with torch.device(device):
        peft_model = get_peft_model(hf, lora_config(), adapter_name=names[0],
                                    autocast_adapter_dtype=False)
        for name in names[1:]:
            peft_model.add_adapter(name, lora_config(), autocast_adapter_dtype=False)
    scaling = 2.0  # lora_alpha / r: a power of two, so B / scaling is PEFT's B exactly
    with torch.no_grad():
        for name, weights in adapters.items():
            for (i, module), (a, b) in weights.items():
                kind = "self_attn" if module in LORA_MODULES[:4] else "mlp"
                layer = hf.get_submodule(f"model.layers.{i}.{kind}.{module}")
                layer.lora_A[name].weight.copy_(a)
                layer.lora_B[name].weight.copy_(b / scaling)
    return peft_model.eval()


class _Clock:
    """generate() streamer: notes when the first new token arrives (put #1 is the prompt; each
    put follows a copy to the host, so the device is synchronised); moves a progress bar."""

    def __init__(self, total: int) -> None:
        self.puts, self.first_token_at = 0, 0.0
        self.bar = tqdm(total=total, desc="transformers+peft tokens", disable=None)

    def put(self, value: torch.Tensor) -> None:
        self.puts += 1
        if self.puts == 2:
            self.first_token_at = time.perf_counter()
        self.bar.update(int(self.puts > 1))

    def end(self) -> None:
        self.bar.close()


def run_baseline(peft_model, prompts: list[list[int]], adapter_ids: list[str], new_tokens: int,
                 device: torch.device) -> Result:
    ids = torch.tensor(prompts, device=device)
    clock = _Clock(new_tokens)
    sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = peft_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                  adapter_names=adapter_ids, do_sample=False, pad_token_id=0,
                                  max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                  streamer=clock)
    sync(device)
    end = time.perf_counter()
    outputs = out[:, ids.shape[1]:].tolist()
    assert all(len(o) == new_tokens for o in outputs), "transformers stopped early"
    return Result("transformers+peft", clock.first_token_at - start,
                  len(prompts) * (new_tokens - 1), end - clock.first_token_at, new_tokens - 1,
                  outputs)


def print_row(r: Result, bound_tps: float | None) -> None:
    fraction = f"{r.tps / bound_tps:>9.1%}" if bound_tps else f"{'n/a':>9}"
    print(f"{r.name:<24}{r.prefill_s * 1e3:>12.1f}{r.tps:>13.1f}"
          f"{r.decode_s / r.decode_steps * 1e3:>10.2f}{fraction}", flush=True)


def run(args: argparse.Namespace) -> Report:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    cfg = SHAPES[args.shape]
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    engine, adapters = build_ours(args, cfg, device, dtype)
    engine.bind_threads()  # this thread steps the engine
    print(f"built model + {args.num_adapters} adapters in {time.perf_counter() - started:.1f} s",
          flush=True)
    gen = torch.Generator().manual_seed(args.seed)
    prompts = torch.randint(0, cfg.vocab_size, (args.batch, args.prompt_tokens),
                            generator=gen).tolist()
    adapter_ids = [list(adapters)[i % args.num_adapters] for i in range(args.batch)]
    mean_context = args.prompt_tokens + args.new_tokens / 2  # decode steps see P+1 .. P+N-1
    nbytes = decode_bytes(cfg, dtype, args.batch, args.num_adapters, args.rank, mean_context)
    peak = peak_gbps(device, args.peak_gbps)
    bound_tps = args.batch / (sum(nbytes.values()) / (peak * 1e9)) if peak else None
    name = (torch.cuda.get_device_name(device) if device.type == "cuda" else
            f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)")
    print(f"device {name} | {args.shape} {args.dtype} | batch {args.batch}, "
          f"{args.num_adapters} adapters r={args.rank} (7 modules), prompt {args.prompt_tokens}"
          f", {args.new_tokens} new tokens, greedy")
    size = {k: f"{v / 1e9:.3f} GB" if v >= 1e8 else f"{v / 1e6:.3f} MB"
            for k, v in {**nbytes, "total": sum(nbytes.values())}.items()}
    print(f"bytes/decode step: base {size['base']} + LoRA {size['lora']} + KV {size['kv']} "
          f"(mean context {mean_context:g}) = {size['total']}")
    source = "--peak-gbps" if args.peak_gbps else "by device name"
    print(f"bound: {bound_tps:.1f} tok/s at {peak:g} GB/s ({source})" if bound_tps else
          "bound: n/a (unknown device: pass --peak-gbps)", flush=True)
    run_ours(engine, prompts, adapter_ids, args.new_tokens, device)  # warm-up
    runs = [run_ours(engine, prompts, adapter_ids, args.new_tokens, device)
            for _ in tqdm(range(args.repeats), desc="ours", disable=None)]
    ours = max(runs, key=lambda r: r.tps)
    stats = engine.scheduler.adapters.stats.device
    assert stats.evictions == 0 and stats.loads == args.num_adapters, "adapters left the device"
    print(f"\n{'system':<24}{'prefill ms':>12}{'decode tok/s':>13}{'ms/step':>10}{'of bound':>9}")
    print_row(ours, bound_tps)
    # side by side, same engine: eager steps instead of CUDA graphs; then, on eager steps (the
    # graphs hold the kernels), each kernel against torch's path for its part
    runner, eager = engine.runner, ours
    for label, owner, attr in (("eager steps", runner, "graphs"),
                               ("torch LoRA", runner.lora_slots, "kernel"),
                               ("torch attention", runner, "decode_attention")):
        if getattr(owner, attr) is None:
            continue
        with mock.patch.object(runner, "graphs", None), mock.patch.object(owner, attr, None):
            other = max((run_ours(engine, prompts, adapter_ids, args.new_tokens, device)
                         for _ in range(args.repeats)), key=lambda r: r.tps)
        other.name = f"ours, {label}"
        print_row(other, bound_tps)
        if attr == "graphs":
            eager = other
            print(f"  CUDA graphs / eager steps: {ours.tps / other.tps:.2f}x decode tok/s")
        else:
            print(f"  kernel / {label}: {eager.tps / other.tps:.2f}x decode tok/s, both eager")
    baseline = None
    if args.baseline:
        n = args.baseline_new_tokens or args.new_tokens
        with warnings.catch_warnings():  # transformers' deprecation notes, raised by PEFT
            warnings.simplefilter("ignore", FutureWarning)
            peft_model = build_baseline(engine.runner.model, adapters, args.rank)
            run_baseline(peft_model, prompts, adapter_ids, 2, device)  # warm-up
            baseline = run_baseline(peft_model, prompts, adapter_ids, n, device)
        print_row(baseline, bound_tps)
        ratio = ours.tps / baseline.tps
        print(f"{'PASS' if ratio >= TARGET_RATIO else 'MISS'}  ours / transformers+peft = "
              f"{ratio:.2f}x decode tok/s (target >= {TARGET_RATIO:g}x; transformers' prefill "
              "= until its streamer sees the first token, one run)")
    if bound_tps:
        fraction = ours.tps / bound_tps
        print(f"{'PASS' if fraction >= TARGET_FRACTION else 'MISS'}  ours = {fraction:.1%} of "
              f"the bandwidth bound (target >= {TARGET_FRACTION:.0%}; peak {peak:g} GB/s)")
    return Report(ours, baseline, nbytes, bound_tps, engine, prompts, adapter_ids)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--shape", choices=list(SHAPES), default="llama-8b", help="model shape")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16",
                   help="weights, KV cache and LoRA slots (float32: exact, as the parity test)")
    for flag, default, text in (("batch", 64, "concurrent sequences"),
                                ("num-adapters", 64, "sequence i uses adapter i %% N"),
                                ("rank", 16, "LoRA rank"), ("prompt-tokens", 128, "per sequence"),
                                ("new-tokens", 128, "per sequence")):
        p.add_argument(f"--{flag}", type=int, default=default, help=text)
    p.add_argument("--repeats", type=int, default=3, help="our measured runs, best kept")
    p.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                   help="also run transformers + PEFT (one measured run)")
    p.add_argument("--baseline-new-tokens", type=int, default=0,
                   help="transformers' new tokens (0 = --new-tokens); it is the slow one")
    p.add_argument("--peak-gbps", type=float, default=None,
                   help="memory bandwidth for the bound, GB/s (None: by GPU name; none on CPU)")
    p.add_argument("--prefill-tokens", type=int, default=2048,
                   help="our max_num_batched_tokens: prompt tokens per step")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    p.add_argument("--seed", type=int, default=0, help="weights, adapters and prompts")
    p.add_argument("--init-std", type=float, default=0.02, help="base weights' std")
    p.add_argument("--lora-std", type=float, default=0.02, help="LoRA A and B std")
    args = p.parse_args(argv)
    if args.new_tokens < 2 or args.baseline_new_tokens == 1:
        p.error("new tokens must be at least 2 (decode is measured after the first)")
    return args


if __name__ == "__main__":
    run(parse_args())
