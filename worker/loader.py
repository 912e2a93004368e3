"""Loads an HF Llama-family checkpoint directory into worker.model; resolves 'default' to the cache.

Maps HF tensor names to ours (q/k/v and gate/up fused at load time). Never runs a forward pass.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from safetensors import safe_open

from worker.model import LlamaModel, ModelConfig, rope_inv_freq

log = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_FUSED = {  # our fused name -> HF parts, concatenated along the output dimension
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}


def read_model_config(path: Path) -> ModelConfig:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint directory: config.json is missing")
    hf = json.loads(config_file.read_text())
    archs = hf.get("architectures") or []
    if archs and not set(archs) & set(SUPPORTED_ARCHITECTURES):
        raise ValueError(f"{path}: architecture {archs} is not supported "
                         f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    gen_file = path / "generation_config.json"
    cfg = ModelConfig.from_hf(hf)
    if gen_file.is_file():
        eos = json.loads(gen_file.read_text()).get("eos_token_id")
        extra = eos if isinstance(eos, list) else ([] if eos is None else [eos])
        ids = tuple(dict.fromkeys([*cfg.eos_token_ids, *extra]))
        cfg = ModelConfig(**{**cfg.__dict__, "eos_token_ids": ids})
    return cfg


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors weights found")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                tensors[name] = f.get_tensor(name)
    return tensors


def _to_our_names(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    ours: dict[str, torch.Tensor] = {}
    for name, tensor in hf.items():
        name = name.removeprefix("model.") if not _LAYER.match(name) else name
        ours[name] = tensor
    for key in [k for k in ours if _LAYER.match(k)]:
        layer, rest = _LAYER.match(key).groups()
        ours[f"layers.{layer}.{rest}"] = ours.pop(key)
    for fused, parts in _FUSED.items():
        for suffix in ("weight", "bias"):
            layer_ids = {k.split(".")[1] for k in ours if k.endswith(f"{parts[0]}.{suffix}")}
            for i in layer_ids:
                names = [f"layers.{i}.{p}.{suffix}" for p in parts]
                if all(n in ours for n in names):  # else left as is: load_model names the gap
                    ours[f"layers.{i}.{fused}.{suffix}"] = torch.cat([ours.pop(n) for n in names])
    return ours


def load_model(path: Path, device: torch.device, dtype: torch.dtype) -> LlamaModel:
    """Builds the model from config.json + safetensors; names every missing or unexpected tensor."""
    cfg = read_model_config(path)
    weights = _to_our_names(_read_tensors(path))
    if cfg.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    with torch.device("meta"):
        model = LlamaModel(cfg)
    expected = set(model.state_dict().keys())
    missing, unexpected = expected - set(weights), set(weights) - expected
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match the config: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    model.load_state_dict({k: v.to(dtype) for k, v in weights.items()}, assign=True)
    # inv_freq is a non-persistent buffer: rebuild it for real (meta init left it empty).
    model.inv_freq = rope_inv_freq(cfg)
    log.info("loaded %s: %d layers, hidden %d, %.1f M parameters", path, cfg.num_layers,
             cfg.hidden_size, sum(p.numel() for p in model.parameters()) / 1e6)
    return model.to(device).eval().requires_grad_(False)
