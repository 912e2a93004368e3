"""Random weights in the exact shapes of the models edge boxes run, for benchmarks when no real
checkpoint is at hand offline: an HF checkpoint (float16 safetensors, for us), the same weights as
GGUF files (F16 / Q8_0 / Q4_0, for llama.cpp, written as its converter writes them:
bench/gguf_writer.py), and random r=8 / r=16 PEFT adapters for that shape (converted to GGUF
LoRAs for llama-server with --llamacpp-loras, when the vendored converter is there:
bench/llamacpp/build.sh). Both servers read the same weights.

The tokenizer is SmolLM2's (the only one offline); the vocabulary keeps the shape's size, the ids
past the tokenizer's padding (the GGUF token list is padded with [PAD<i>] tokens, as llama.cpp's
converter pads). RoPE scaling (Llama 3.2's "llama3" type) is left out of both, so both compute the
same model: a difference in speed, not in shape.

    .venv/bin/python bench/make_model.py --shape llama-3.2-1b          # ~5 GB under --out
    .venv/bin/python bench/make_model.py --shape qwen2.5-0.5b --types F16,Q4_0 --llamacpp-loras
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# (model_type, hidden, intermediate, layers, heads, kv heads, vocab, rope theta, max positions)
SHAPES: dict[str, tuple[str, int, int, int, int, int, int, float, int]] = {
    "llama-3.2-1b": ("llama", 2048, 8192, 16, 32, 8, 128256, 500000.0, 131072),
    "llama-3.2-3b": ("llama", 3072, 8192, 28, 24, 8, 128256, 500000.0, 131072),
    "qwen2.5-0.5b": ("qwen2", 896, 4864, 24, 14, 2, 151936, 1000000.0, 32768),
    "qwen2.5-1.5b": ("qwen2", 1536, 8960, 28, 12, 2, 151936, 1000000.0, 32768),
    "tiny": ("llama", 64, 128, 2, 4, 2, 49280, 10000.0, 2048),  # the tests' size
}
TYPES = ("F16", "Q8_0", "Q4_0")
# how we hold each GGUF type's weights when a benchmark compares us with llama.cpp on it
WEIGHTS = {"Q4_0": "int4", "Q8_0": "int8", "F16": "bf16"}
STD = 0.02  # of every matrix: a trained model's scale


def hf_config(shape: str) -> dict:
    model_type, hidden, inter, layers, heads, kv, vocab, theta, positions = SHAPES[shape]
    return {"architectures": ["LlamaForCausalLM" if model_type == "llama" else
                              "Qwen2ForCausalLM"],
            "model_type": model_type, "hidden_size": hidden, "intermediate_size": inter,
            "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv, "head_dim": hidden // heads, "vocab_size": vocab,
            "rope_theta": theta, "max_position_embeddings": positions, "rms_norm_eps": 1e-5,
            "tie_word_embeddings": True, "hidden_act": "silu", "bos_token_id": 1,
            "eos_token_id": 2, "torch_dtype": "float16"}


def write_checkpoint(shape: str, target: Path, tokenizer_dir: Path, seed: int) -> Path:
    """Random float16 weights of `shape` with SmolLM2's tokenizer files, as an HF directory."""
    import torch
    from safetensors.torch import save_file

    from bench.random_weights import TOKENIZER_FILES

    config = hf_config(shape)
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    head_dim, kv = config["head_dim"], config["num_key_value_heads"]
    gen = torch.Generator().manual_seed(seed)

    def matrix(rows: int, cols: int) -> torch.Tensor:
        return (torch.randn(rows, cols, generator=gen) * STD).half()

    def ones(n: int) -> torch.Tensor:
        return (1.0 + 0.1 * torch.randn(n, generator=gen)).half()

    tensors = {"model.embed_tokens.weight": matrix(config["vocab_size"], hidden),
               "model.norm.weight": ones(hidden)}
    shapes = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (kv * head_dim, hidden),
              "self_attn.v_proj": (kv * head_dim, hidden), "self_attn.o_proj": (hidden, hidden),
              "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden),
              "mlp.down_proj": (hidden, inter)}
    for layer in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{layer}"
        for module, (rows, cols) in shapes.items():
            tensors[f"{prefix}.{module}.weight"] = matrix(rows, cols)
            if config["model_type"] == "qwen2" and module[-6:] in ("q_proj", "k_proj", "v_proj"):
                tensors[f"{prefix}.{module}.bias"] = (torch.randn(rows, generator=gen)
                                                      * STD).half()
        tensors[f"{prefix}.input_layernorm.weight"] = ones(hidden)
        tensors[f"{prefix}.post_attention_layernorm.weight"] = ones(hidden)
    target.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
    (target / "config.json").write_text(json.dumps(config, indent=2))
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, target / name)
    return target


def model_files(shape: str, quant: str) -> tuple[Path, Path]:
    """(the `quant` GGUF file, the HF checkpoint) of `shape` under the default --out, written
    first where missing (the benchmarks' models: bench/single_stream.py, bench/serve_bench.py)."""
    from worker.config import WorkerConfig

    out = WorkerConfig().cache_path / "bench" / "models" / shape
    gguf = out / f"{shape}-{quant}.gguf"
    if not gguf.exists() or not (out / "hf" / "config.json").exists():
        main(["--shape", shape, "--types", quant, "--ranks", ""])
    return gguf, out / "hf"


def main(argv: list[str] | None = None) -> dict[str, Path]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--shape", required=True, choices=sorted(SHAPES))
    p.add_argument("--out", type=Path, default=None, help="default: "
                   "~/.cache/edgelora/bench/models/<shape>")
    p.add_argument("--types", default=",".join(TYPES), help=f"GGUF files to write, of {TYPES}")
    p.add_argument("--ranks", default="8,16", help="one random adapter per rank")
    p.add_argument("--llamacpp-loras", action="store_true", help="also convert the adapters "
                   "to GGUF LoRAs for llama-server (needs bench/llamacpp/build.sh's sources)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    types = [t for t in args.types.split(",") if t]
    if not set(types) <= set(TYPES):
        p.error(f"--types from {TYPES}")

    from bench.gguf_writer import write_gguf
    from bench.random_weights import write_random_adapter
    from worker.config import WorkerConfig
    from worker.gguf_import import resolve_model_path

    out = args.out or WorkerConfig().cache_path / "bench" / "models" / args.shape
    tokenizer_dir = resolve_model_path("default", WorkerConfig().cache_path)
    made: dict[str, Path] = {}
    started = time.perf_counter()
    made["hf"] = write_checkpoint(args.shape, out / "hf", tokenizer_dir, args.seed)
    print(f"checkpoint {made['hf']} ({time.perf_counter() - started:.0f} s)", flush=True)
    for qtype in types:
        started = time.perf_counter()
        made[qtype] = write_gguf(made["hf"], out / f"{args.shape}-{qtype}.gguf", qtype)
        print(f"{qtype}: {made[qtype]} ({made[qtype].stat().st_size / 1e9:.2f} GB, "
              f"{time.perf_counter() - started:.0f} s)", flush=True)
    for rank in (int(r) for r in args.ranks.split(",") if r):
        adapter = write_random_adapter(out / "adapters" / f"r{rank}", made["hf"], rank=rank,
                                       alpha=2.0 * rank, seed=args.seed + rank, std=0.02)
        made[f"r{rank}"] = adapter
        print(f"adapter r={rank}: {adapter}", flush=True)
        if args.llamacpp_loras:
            from bench.llamacpp.convert import convert_adapter

            made[f"r{rank}-gguf"] = convert_adapter(adapter, made["hf"], "f16",
                                                    out / "loras")
            print(f"  llama.cpp LoRA: {made[f'r{rank}-gguf']}", flush=True)
    return made


if __name__ == "__main__":
    main()
