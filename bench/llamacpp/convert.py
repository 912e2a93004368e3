"""PEFT adapter directories -> GGUF LoRAs with llama.cpp's own converter (vendored in the sdist).

The converter needs only the base model's config.json (`--base`, e.g. the converted default model
at ~/.cache/edgelora/models/SmolLM2-135M-Instruct). Each result is cached under
<llamacpp_root>/loras/ by a hash of the adapter files, the base config and the output type, so a
rerun with the same (seeded) random adapters converts nothing.

    .venv/bin/python -m bench.llamacpp.convert adapters/demo/* --base DIR   # prints GGUF paths
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

from bench.llamacpp import llamacpp_root, vendor_dir

_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def adapter_digest(peft_dir: Path, base_dir: Path, outtype: str) -> str:
    digest = hashlib.sha256(outtype.encode())
    for path in [peft_dir / name for name in _ADAPTER_FILES] + [base_dir / "config.json"]:
        digest.update(path.name.encode())
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def convert_adapter(peft_dir: Path, base_dir: Path, outtype: str = "f32",
                    cache_dir: Path | None = None) -> Path:
    """The GGUF LoRA for peft_dir (converted once, then served from the cache)."""
    peft_dir, base_dir = Path(peft_dir), Path(base_dir)
    for name in _ADAPTER_FILES:
        if not (peft_dir / name).is_file():
            raise FileNotFoundError(f"{peft_dir} is not a PEFT adapter: {name} is missing")
    cache_dir = Path(cache_dir) if cache_dir else llamacpp_root() / "loras"
    target = cache_dir / f"{peft_dir.name}-{adapter_digest(peft_dir, base_dir, outtype)}.gguf"
    if target.is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    script = vendor_dir() / "convert_lora_to_gguf.py"
    result = subprocess.run(
        [sys.executable, str(script), "--base", str(base_dir), "--outtype", outtype,
         "--outfile", str(partial), str(peft_dir)],
        capture_output=True, text=True, check=False)
    if result.returncode != 0 or not partial.is_file():
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"convert_lora_to_gguf.py failed on {peft_dir} "
                           f"(exit {result.returncode}):\n{result.stderr[-2000:]}")
    partial.rename(target)  # a crash mid-write never leaves a cache hit behind
    return target


def convert_adapters(peft_dirs: Iterable[Path], base_dir: Path, outtype: str = "f32",
                     cache_dir: Path | None = None) -> list[Path]:
    return [convert_adapter(d, base_dir, outtype, cache_dir) for d in peft_dirs]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("adapters", nargs="+", type=Path, help="PEFT adapter directories")
    p.add_argument("--base", type=Path, required=True, help="directory with the base config.json")
    p.add_argument("--outtype", default="f32", choices=("f32", "f16", "bf16", "q8_0"))
    p.add_argument("--cache-dir", type=Path, default=None, help="default <llama.cpp dir>/loras")
    args = p.parse_args(argv)
    for path in convert_adapters(args.adapters, args.base, args.outtype, args.cache_dir):
        print(path)


if __name__ == "__main__":
    main()
