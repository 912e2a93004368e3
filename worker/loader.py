"""Loads an HF Llama-family checkpoint directory into worker.model; resolves 'default' to the cache.

Maps HF tensor names to ours (q/k/v and gate/up fused at load time). Never runs a forward pass.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import re
from collections.abc import Callable
from pathlib import Path

import torch

from worker.kernels.quantized_weights import (
    QUANTIZED,
    quantize_model,
    require_cpu_bf16,
    weight_bytes,
)
from worker.model import LlamaModel, ModelConfig, token_ids

log = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
# quantized straight from the file, rows at a time: a 128k-token vocabulary's float32 table is 1 GB
ROW_READ = ("embed_tokens.weight", "lm_head.weight")
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
        extra = token_ids(json.loads(gen_file.read_text()).get("eos_token_id"))
        ids = tuple(dict.fromkeys([*cfg.eos_token_ids, *extra]))
        cfg = dataclasses.replace(cfg, eos_token_ids=ids)
    return cfg


Source = Callable[[], torch.Tensor]  # reads one tensor (of ours) when called


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
           "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
           "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def _tensor_sources(path: Path) -> dict[str, Source]:
    """Every tensor of the checkpoint by HF name, read only when called: the loader converts
    (or quantizes) one tensor at a time instead of holding the whole file beside the model.

    Read with plain file reads, not safetensors' memory map: the pages of a mapped file count in
    the process's resident memory as long as it stays mapped, so a float32 checkpoint of a 1B
    model would show as 5 GB resident while the quantized model holds 0.7 GB."""
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors weights found")
    sources: dict[str, Source] = {}
    for file in files:
        size = file.stat().st_size
        with file.open("rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            if not 2 <= header_len <= min(size - 8, 100 << 20):
                raise ValueError(f"{file}: not a safetensors file")
            header = json.loads(f.read(header_len))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype, shape = _DTYPES.get(info["dtype"]), [int(d) for d in info["shape"]]
            begin, end = (8 + header_len + int(o) for o in info["data_offsets"])
            if dtype is None or not 0 <= begin <= end <= size or \
                    end - begin != math.prod(shape) * dtype.itemsize:
                raise ValueError(f"{file}: tensor {name!r} is malformed ({info})")
            sources[name] = StoredTensor(file, begin, dtype, shape)
    return sources


class StoredTensor:
    """A tensor in a checkpoint file: called, the whole of it; sliced by rows, those rows only
    (what the quantizer of a vocabulary-sized table reads at a time)."""

    def __init__(self, file: Path, begin: int, dtype: torch.dtype, shape: list[int]) -> None:
        self.file, self.begin, self.dtype, self.shape = file, begin, dtype, torch.Size(shape)

    def __call__(self) -> torch.Tensor:
        return self[:]

    def __getitem__(self, rows: slice) -> torch.Tensor:
        start, stop, _ = rows.indices(self.shape[0] if self.shape else 1)
        row_bytes = math.prod(self.shape[1:]) * self.dtype.itemsize
        data = torch.empty((stop - start) * row_bytes, dtype=torch.uint8)
        with self.file.open("rb") as f:
            f.seek(self.begin + start * row_bytes)
            if f.readinto(data.numpy()) != data.numel():
                raise ValueError(f"{self.file}: truncated")
        return data.view(self.dtype).view(-1, *self.shape[1:]) if self.shape else \
            data.view(self.dtype).view(())


def _concatenated(parts: list[Source]) -> torch.Tensor:
    return torch.cat([read() for read in parts])


def _to_our_names(hf: dict[str, Source]) -> dict[str, Source]:
    ours: dict[str, Source] = {}
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
                    ours[f"layers.{i}.{fused}.{suffix}"] = functools.partial(
                        _concatenated, [ours.pop(n) for n in names])
    return ours


def load_model(path: Path, device: torch.device, dtype: torch.dtype,
               weights: str = "auto") -> LlamaModel:
    """Builds the model from config.json + safetensors; names every missing or unexpected tensor.

    weights: 'int8' / 'int4' keep the projections, output head and embedding quantized
    (worker.kernels.quantized_weights; CPU, bfloat16), each quantized as it is read."""
    cfg = read_model_config(path)
    sources = _to_our_names(_tensor_sources(path))
    if cfg.tie_word_embeddings:
        sources.pop("lm_head.weight", None)
    with torch.device("meta"):
        model = LlamaModel(cfg)
    expected = set(model.state_dict().keys())
    missing, unexpected = expected - set(sources), set(sources) - expected
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match the config: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    if weights in QUANTIZED:
        require_cpu_bf16(weights, device, dtype)

        def take(name: str) -> torch.Tensor | StoredTensor | None:
            read = sources.pop(name, None)
            if isinstance(read, StoredTensor) and name in ROW_READ:
                return read  # read by rows as it is quantized
            return None if read is None else read()

        quantize_model(model, weights, take)
    model.load_state_dict({k: read().to(dtype) for k, read in sources.items()}, assign=True)
    model = model.to(device).eval().requires_grad_(False)
    log.info("loaded %s: %d layers, hidden %d, weights %s: %.0f MiB", path, cfg.num_layers,
             cfg.hidden_size, weights if weights in QUANTIZED else str(dtype).removeprefix(
                 "torch."), weight_bytes(model) / 2**20)
    return model
