"""The PEFT LoRA adapter format (adapter_config.json + adapter_model.safetensors), read and checked.

Adapter directories come from tenants, so every byte is hostile input: nothing in them may block,
crash or poison the process. Every problem becomes an InvalidArgument naming the file, tensor or
field; an I/O failure that may pass becomes Unavailable. Never touches a device. Opening files
safely: common/untrusted_files.py; target_modules regexes: common/target_modules.py.
"""

from __future__ import annotations

import json
import math
import re
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, NamedTuple

import torch

from common.errors import InvalidArgument, Unavailable
from common.target_modules import LORA_MODULES, targets
from common.untrusted_files import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    human_size,
    open_checked,
    read_exact,
    stat_checked,
)

__all__ = ["CONFIG_FILE", "LORA_MODULES", "MAX_WEIGHTS_BYTES", "WEIGHTS_FILE", "AdapterSpec",
           "check_adapter_shapes", "read_adapter_spec", "read_adapter_weights",
           "validate_adapter_weights"]
MAX_CONFIG_BYTES = 64 << 10
MAX_WEIGHTS_BYTES = 512 << 20  # the default of every max_weights_bytes (--max-adapter-mb)
MAX_RANK = 4096
_WEIGHTS_LIMIT = "this server accepts adapter files up to {} (--max-adapter-mb)"
_MAX_LAYERS = 256  # layer indices tried when matching a target_modules regex
# A 256-layer adapter's header is ~0.5 MiB; json.loads of safetensors' own 100 MB limit can take
# a GB of Python objects.
_MAX_HEADER_BYTES = 8 << 20
_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}
# \d{1,9}: int() of over 4300 digits raises ValueError, not our InvalidArgument
_KEY = re.compile(r"layers\.(\d{1,9})\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.[\w-]+)?\.weight$")


@dataclass(frozen=True)
class AdapterSpec:
    """What adapter_config.json says: cheap to hold for thousands of registered adapters."""

    adapter_id: str
    path: str
    rank: int
    lora_alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...]
    digest: str = ""  # content in a BlobStore, checked again at every read from disk

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


class _Entry(NamedTuple):
    """One tensor of a safetensors header; start/end are byte offsets into the data section."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


# --- adapter_config.json -------------------------------------------------------------------------


def _read_config(adapter_id: str, file: Path) -> dict:
    with open_checked(adapter_id, file, MAX_CONFIG_BYTES, "{} at most") as (f, _):
        data = f.read(MAX_CONFIG_BYTES + 1)  # bounded: the file may have grown since fstat
    if len(data) > MAX_CONFIG_BYTES:
        raise InvalidArgument(f"adapter {adapter_id!r}: {file} is over "
                              f"{human_size(MAX_CONFIG_BYTES)}")
    try:
        config = json.loads(data)
    except (ValueError, RecursionError) as exc:  # RecursionError: "[[[[..." nested too deeply
        raise InvalidArgument(f"{file}: not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise InvalidArgument(f"{file}: expected a JSON object, got {type(config).__name__}")
    return config


def _check_features(config: dict, where: Path) -> None:
    if config.get("peft_type", "LORA") != "LORA":
        raise InvalidArgument(f"{where}: peft_type {config['peft_type']!r} is not LORA")
    for feature in ("use_dora", "modules_to_save", "rank_pattern", "alpha_pattern"):
        if config.get(feature):
            raise InvalidArgument(f"{where}: {feature} is not supported")
    if config.get("bias", "none") != "none":
        raise InvalidArgument(f"{where}: bias={config['bias']!r} is not supported")


def _rank(config: dict, where: Path) -> int:
    rank = config.get("r")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= MAX_RANK:
        raise InvalidArgument(f"{where}: r must be a positive integer up to {MAX_RANK}, "
                              f"got {rank!r}")
    return rank


def _alpha(config: dict, rank: int, where: Path) -> float:
    alpha = config.get("lora_alpha", rank)
    if not isinstance(alpha, bool) and isinstance(alpha, int | float):
        try:
            if math.isfinite(value := float(alpha)):  # json.loads accepts NaN and Infinity
                return value
        except OverflowError:  # an integer beyond float's range
            pass
    raise InvalidArgument(f"{where}: lora_alpha must be a finite number, got {alpha!r}")


def _use_rslora(config: dict, where: Path) -> bool:
    value = config.get("use_rslora")
    if value is not None and not isinstance(value, bool):
        raise InvalidArgument(f"{where}: use_rslora must be true or false, got {value!r}")
    return bool(value)


def read_adapter_spec(adapter_id: str, path: str | Path, num_layers: int = _MAX_LAYERS,
                      max_weights_bytes: int = MAX_WEIGHTS_BYTES) -> AdapterSpec:
    """Reads and checks adapter_config.json; the weights file must be a regular file of at most
    max_weights_bytes but is not read. num_layers: the base model's, for a target_modules regex.
    Up to REGEX_BUDGET_S of CPU (a regex): call it off the event loop."""
    root = Path(path).expanduser()
    config_file = root / CONFIG_FILE
    config = _read_config(adapter_id, config_file)
    stat_checked(adapter_id, root / WEIGHTS_FILE, max_weights_bytes, _WEIGHTS_LIMIT)
    _check_features(config, config_file)
    rank = _rank(config, config_file)
    spec = AdapterSpec(adapter_id, str(root), rank, _alpha(config, rank, config_file),
                       _use_rslora(config, config_file),
                       targets(config.get("target_modules"), config_file, num_layers))
    if not math.isfinite(spec.scaling):
        raise InvalidArgument(f"{config_file}: lora_alpha / r is not a finite scaling")
    return spec


# --- adapter_model.safetensors -------------------------------------------------------------------


def _open_weights(spec: AdapterSpec, max_weights_bytes: int
                  ) -> AbstractContextManager[tuple[BinaryIO, int]]:
    return open_checked(spec.adapter_id, Path(spec.path) / WEIGHTS_FILE, max_weights_bytes,
                         _WEIGHTS_LIMIT)


def _unreadable(spec: AdapterSpec, why: str) -> InvalidArgument:
    return InvalidArgument(f"adapter {spec.adapter_id!r}: {WEIGHTS_FILE} is not a readable "
                           f"safetensors file ({why})")


def _entry(spec: AdapterSpec, name: str, raw: object, data_bytes: int) -> _Entry:
    try:
        start, end = raw["data_offsets"]
        entry = _Entry(raw["dtype"], tuple(raw["shape"]), start, end)
    except (TypeError, KeyError, ValueError) as exc:
        raise _unreadable(spec, f"tensor {name!r}: malformed header entry") from exc
    if not (isinstance(entry.dtype, str) and all(type(d) is int and d >= 0 for d in entry.shape)
            and type(start) is int and type(end) is int and 0 <= start <= end <= data_bytes):
        raise _unreadable(spec, f"tensor {name!r}: malformed header entry")
    return entry


def _read_header(spec: AdapterSpec, f: BinaryIO, size: int) -> tuple[dict[str, _Entry], int]:
    """-> (tensor name -> entry, bytes before the data section), from the header alone."""
    prefix = f.read(8)
    header_bytes = int.from_bytes(prefix, "little") if len(prefix) == 8 else 0
    if not 2 <= header_bytes <= min(size - 8, _MAX_HEADER_BYTES):
        raise _unreadable(spec, f"a {header_bytes}-byte header in a {size}-byte file")
    raw = f.read(header_bytes)
    if len(raw) != header_bytes:
        raise Unavailable(f"adapter {spec.adapter_id!r}: {WEIGHTS_FILE} shrank while being read")
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise _unreadable(spec, f"header is not JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise _unreadable(spec, "header is not a JSON object")
    header.pop("__metadata__", None)
    data_bytes = size - 8 - header_bytes
    return ({name: _entry(spec, name, value, data_bytes) for name, value in header.items()},
            8 + header_bytes)


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


def _check_dtype(spec: AdapterSpec, name: str, entry: _Entry) -> None:
    dtype = _DTYPES.get(entry.dtype)
    if dtype is None:
        raise InvalidArgument(f"adapter {spec.adapter_id!r}: {name} is {entry.dtype}; LoRA "
                              f"weights must be {', '.join(_DTYPES)}")
    if entry.end - entry.start != math.prod(entry.shape) * dtype.itemsize:
        raise _unreadable(spec, f"tensor {name!r}: its byte range does not fit its shape")


def _pairs(spec: AdapterSpec, entries: dict[str, _Entry], shapes: dict[str, tuple[int, int]],
           num_layers: int) -> dict[tuple[int, str], dict[str, str]]:
    """-> {(layer, module): {"A": name, "B": name}}, after every check the header allows."""
    if not entries:
        raise InvalidArgument(f"adapter {spec.adapter_id!r}: {WEIGHTS_FILE} holds no tensors")
    pairs: dict[tuple[int, str], dict[str, str]] = {}
    for name, entry in entries.items():
        layer, module, which = _check(spec, name, entry.shape, shapes, num_layers)
        _check_dtype(spec, name, entry)
        first = pairs.setdefault((layer, module), {}).setdefault(which, name)
        if first != name:  # e.g. "...lora_A.weight" and "...lora_A.default.weight"
            raise InvalidArgument(f"adapter {spec.adapter_id!r}: {first} and {name} are both "
                                  f"lora_{which} of layer {layer} {module}")
    for (layer, module), pair in pairs.items():
        if len(pair) != 2:
            raise InvalidArgument(f"adapter {spec.adapter_id!r}: layer {layer} {module} has "
                                  f"lora_{next(iter(pair))} without its pair")
    return pairs


def check_adapter_shapes(spec: AdapterSpec, shapes: dict[str, tuple[int, int]], num_layers: int,
                         max_weights_bytes: int = MAX_WEIGHTS_BYTES) -> None:
    """Checks every tensor's name, shape and dtype, and that A and B come in unique pairs, from
    the safetensors header alone.

    shapes[module] = (in_features, out_features) of the base projection.
    """
    with _open_weights(spec, max_weights_bytes) as (f, size):
        entries, _ = _read_header(spec, f, size)
    _pairs(spec, entries, shapes, num_layers)


def _tensor(data: bytearray, entry: _Entry) -> torch.Tensor:
    dtype = _DTYPES[entry.dtype]
    if entry.start % dtype.itemsize:  # a misaligned view would trip vectorized kernels
        data, start = data[entry.start:entry.end], 0  # a bytearray slice is a copy
    else:
        start = entry.start
    return torch.frombuffer(data, dtype=dtype, count=math.prod(entry.shape),
                            offset=start).view(entry.shape)


def _scaled_pair(spec: AdapterSpec, key: tuple[int, str], a: torch.Tensor,
                 b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (A, B * scaling) in float32, all finite: a NaN in one slot would reach every sequence
    that shares a step with it (the pool path masks slots by multiplying by 0)."""
    a, scaled_b = a.float(), b.float() * spec.scaling
    # scaled_b is non-finite wherever b is (scaling is finite): one check covers both
    if torch.isfinite(a).all() and torch.isfinite(scaled_b).all():
        return a, scaled_b
    where = f"adapter {spec.adapter_id!r}: layer {key[0]} {key[1]}"
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise InvalidArgument(f"{where} holds NaN or infinite values")
    raise InvalidArgument(f"{where}: lora_B times the scaling {spec.scaling:g} overflows "
                          "float32 (lora_alpha too large?)")


def read_adapter_weights(spec: AdapterSpec, shapes: dict[str, tuple[int, int]], num_layers: int,
                         max_weights_bytes: int = MAX_WEIGHTS_BYTES
                         ) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    """-> {(layer, module): (A [r, in], B [out, r] times the scaling)} in float32, all finite.

    Reads the file with read(), not safetensors' mmap: a file truncated while mapped kills the
    process with SIGBUS. The header is checked (check_adapter_shapes) before any data is read.
    """
    with _open_weights(spec, max_weights_bytes) as (f, size):
        entries, data_start = _read_header(spec, f, size)
        pairs = _pairs(spec, entries, shapes, num_layers)
        data = read_exact(spec.adapter_id, Path(spec.path) / WEIGHTS_FILE, f, size - data_start)
    return {key: _scaled_pair(spec, key, _tensor(data, entries[names["A"]]),
                              _tensor(data, entries[names["B"]]))
            for key, names in pairs.items()}


def validate_adapter_weights(spec: AdapterSpec, shapes: dict[str, tuple[int, int]],
                             num_layers: int, max_weights_bytes: int = MAX_WEIGHTS_BYTES) -> None:
    """Every check read_adapter_weights makes (it reads all the data), keeping nothing."""
    read_adapter_weights(spec, shapes, num_layers, max_weights_bytes)
