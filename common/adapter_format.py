"""The PEFT LoRA adapter format (adapter_config.json + adapter_model.safetensors), read and checked.

Every problem becomes an InvalidArgument naming the file, tensor or field; never touches a device.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from common.errors import InvalidArgument

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_MAX_LAYERS = 256  # layer indices tried when matching a target_modules regex
_KEY = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.[\w-]+)?\.weight$")


@dataclass(frozen=True)
class AdapterSpec:
    """What adapter_config.json says: cheap to hold for thousands of registered adapters."""

    adapter_id: str
    path: str
    rank: int
    lora_alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...]

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


def _regex_targets(pattern: str, where: Path) -> list[str]:
    """PEFT full-matches a regex against full module names ("model.layers.3.self_attn.q_proj");
    a bare search of the short name ("q_proj|v_proj") is accepted too."""
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise InvalidArgument(f"{where}: target_modules {pattern!r} is not a valid regex "
                              f"({exc})") from exc

    def full_names(module: str) -> list[str]:
        kind = "self_attn" if module in LORA_MODULES[:4] else "mlp"
        return [f"model.layers.{i}.{kind}.{module}" for i in range(_MAX_LAYERS)]

    return [m for m in LORA_MODULES
            if regex.search(m) or any(regex.fullmatch(n) for n in full_names(m))]


def _targets(raw: object, where: Path) -> tuple[str, ...]:
    if isinstance(raw, str):  # PEFT allows a regex or "all-linear"
        raw = LORA_MODULES if raw == "all-linear" else _regex_targets(raw, where)
    if raw is not None and not isinstance(raw, list | tuple):
        raise InvalidArgument(f"{where}: target_modules must be a list of module names or a "
                              f"regex string, got {raw!r}")
    names = tuple(sorted({str(m).rsplit(".", 1)[-1] for m in raw or ()}))
    unsupported = [m for m in names if m not in LORA_MODULES]
    if unsupported or not names:
        raise InvalidArgument(f"{where}: target_modules {list(names)} not supported; LoRA can "
                              f"target {', '.join(LORA_MODULES)}")
    return names


def read_adapter_spec(adapter_id: str, path: str | Path) -> AdapterSpec:
    """Reads and checks adapter_config.json; the weights file must exist but is not read."""
    root = Path(path).expanduser()
    config_file, weights_file = root / CONFIG_FILE, root / WEIGHTS_FILE
    for file in (config_file, weights_file):
        if not file.is_file():
            raise InvalidArgument(f"adapter {adapter_id!r}: {file} is missing (a PEFT adapter "
                                  f"directory holds {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidArgument(f"{config_file}: not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise InvalidArgument(f"{config_file}: expected a JSON object, got {type(config).__name__}")
    if config.get("peft_type", "LORA") != "LORA":
        raise InvalidArgument(f"{config_file}: peft_type {config['peft_type']!r} is not LORA")
    for feature in ("use_dora", "modules_to_save", "rank_pattern", "alpha_pattern"):
        if config.get(feature):
            raise InvalidArgument(f"{config_file}: {feature} is not supported")
    if config.get("bias", "none") != "none":
        raise InvalidArgument(f"{config_file}: bias={config['bias']!r} is not supported")
    rank = config.get("r")
    if not isinstance(rank, int) or rank < 1:
        raise InvalidArgument(f"{config_file}: r must be a positive integer, got {rank!r}")
    return AdapterSpec(adapter_id, str(root), rank, float(config.get("lora_alpha", rank)),
                       bool(config.get("use_rslora", False)),
                       _targets(config.get("target_modules"), config_file))


def _open(spec: AdapterSpec):
    try:
        return safe_open(str(Path(spec.path) / WEIGHTS_FILE), framework="pt")
    except (SafetensorError, OSError, ValueError) as exc:
        raise InvalidArgument(f"adapter {spec.adapter_id!r}: {WEIGHTS_FILE} is not a readable "
                              f"safetensors file ({exc})") from exc


def check_adapter_shapes(spec: AdapterSpec, shapes: dict[str, tuple[int, int]],
                         num_layers: int) -> None:
    """Checks every tensor's name and shape from the safetensors header, without reading data.

    shapes[module] = (in_features, out_features) of the base projection.
    """
    with _open(spec) as f:
        names = list(f.keys())
        if not names:
            raise InvalidArgument(f"adapter {spec.adapter_id!r}: {WEIGHTS_FILE} holds no tensors")
        for name in names:
            _check(spec, name, tuple(f.get_slice(name).get_shape()), shapes, num_layers)


def _check(spec: AdapterSpec, name: str, shape: tuple[int, ...],
           shapes: dict[str, tuple[int, int]], num_layers: int) -> tuple[int, str, str]:
    match = _KEY.search(name)
    if match is None:
        raise InvalidArgument(f"adapter {spec.adapter_id!r}: tensor {name!r} is not a LoRA A/B "
                              "weight of a decoder layer projection")
    layer, module, which = int(match[1]), match[2], match[3]
    if module not in shapes:
        raise InvalidArgument(f"adapter {spec.adapter_id!r}: {name}: module {module!r} is not "
                              f"supported ({', '.join(shapes)})")
    if layer >= num_layers:
        raise InvalidArgument(f"adapter {spec.adapter_id!r}: {name}: layer {layer} does not exist "
                              f"in this {num_layers}-layer base model")
    fan_in, fan_out = shapes[module]
    expected = (spec.rank, fan_in) if which == "A" else (fan_out, spec.rank)
    if shape != expected:
        raise InvalidArgument(f"adapter {spec.adapter_id!r}: {name} has shape {list(shape)}, "
                              f"this base model needs {list(expected)} (r={spec.rank}): was it "
                              "trained for another base model?")
    return layer, module, which


def read_adapter_weights(spec: AdapterSpec, shapes: dict[str, tuple[int, int]], num_layers: int
                         ) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    """-> {(layer, module): (A [r, in], B [out, r] times the scaling)} in float32."""
    halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    try:
        with _open(spec) as f:
            for name in f.keys():  # noqa: SIM118
                tensor = f.get_tensor(name)
                layer, module, which = _check(spec, name, tuple(tensor.shape), shapes, num_layers)
                halves.setdefault((layer, module), {})[which] = tensor.float()
    except SafetensorError as exc:
        raise InvalidArgument(f"adapter {spec.adapter_id!r}: {WEIGHTS_FILE} is corrupt ({exc})") \
            from exc
    weights = {}
    for key, pair in halves.items():
        if set(pair) != {"A", "B"}:
            raise InvalidArgument(f"adapter {spec.adapter_id!r}: layer {key[0]} {key[1]} has "
                                  f"lora_{next(iter(pair))} without its pair")
        if not (torch.isfinite(pair["A"]).all() and torch.isfinite(pair["B"]).all()):
            raise InvalidArgument(f"adapter {spec.adapter_id!r}: layer {key[0]} {key[1]} holds "
                                  "NaN or infinite values")
        weights[key] = (pair["A"], pair["B"] * spec.scaling)
    return weights
