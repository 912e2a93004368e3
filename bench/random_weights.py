"""Random weights for tests and benchmarks: a tiny Llama with the SmolLM2 tokenizer, and PEFT LoRA
adapters with random A and B for any checkpoint. Deterministic per seed. Benchmarks import them
from here (not from tests/), so a bench run does not pick up the test suite's settings."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def write_tiny_llama(target: Path, tokenizer_dir: Path, seed: int = 0, **overrides) -> Path:
    """A 2-layer random Llama (~3 M parameters) with the SmolLM2 tokenizer, saved as an HF dir."""
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = {"vocab_size": 49152, "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
              "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2}
    fields.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**fields)).eval()
    with torch.no_grad():  # random init is near-uniform; sharpen it so greedy choices are clear
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    model.save_pretrained(target, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, target / name)
    return target


ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")


def write_random_adapter(target: Path, base_dir: Path, rank: int = 8, alpha: float = 16.0,
                         modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj",
                                                     "gate_proj", "up_proj", "down_proj"),
                         seed: int = 0, dtype: torch.dtype = torch.float32,
                         use_rslora: bool = False, std: float = 0.2) -> Path:
    """A PEFT-format LoRA adapter with random A and B (B is zero in a fresh PEFT adapter, which
    would test nothing) for the checkpoint in base_dir."""
    import json

    from safetensors.torch import save_file

    from worker.loader import read_model_config
    from worker.lora import module_shapes

    cfg = read_model_config(base_dir)
    shapes = module_shapes(cfg)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(cfg.num_layers):
        for module in modules:
            fan_in, fan_out = shapes[module]
            kind = "self_attn" if module in ATTN_MODULES else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{kind}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = (torch.randn(rank, fan_in, generator=gen)
                                                  * std).to(dtype)
            tensors[f"{prefix}.lora_B.weight"] = (torch.randn(fan_out, rank, generator=gen)
                                                  * std).to(dtype)
    target.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(target / "adapter_model.safetensors"))
    (target / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": list(modules),
        "lora_dropout": 0.0, "bias": "none", "use_rslora": use_rslora,
        "base_model_name_or_path": str(base_dir), "task_type": "CAUSAL_LM"}))
    return target
