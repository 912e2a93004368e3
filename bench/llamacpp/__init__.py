"""The llama.cpp baseline: build its server from the llama-cpp-python sdist (build.sh), convert
PEFT adapters to GGUF LoRAs (convert.py), launch llama-server with them (server.py) and talk to
its HTTP API (http_client.py)."""

from __future__ import annotations

import os
from pathlib import Path

LLAMA_CPP_PYTHON_VERSION = "0.3.36"


def llamacpp_root() -> Path:
    """Where build.sh puts the sdist, the source, the build and bin/ (EDGELORA_LLAMACPP_DIR)."""
    default = Path.home() / ".cache" / "edgelora" / "llama.cpp"
    return Path(os.environ.get("EDGELORA_LLAMACPP_DIR") or default)


def vendor_dir() -> Path:
    """The vendored llama.cpp source tree unpacked from the sdist."""
    path = (llamacpp_root() / "src" / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}" / "vendor"
            / "llama.cpp")
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is missing: run bench/llamacpp/build.sh first")
    return path


def binary(name: str) -> Path:
    """bin/llama-server or bin/llama-bench as build.sh leaves them."""
    path = llamacpp_root() / "bin" / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run bench/llamacpp/build.sh first "
                                "(about 13 minutes on 2 cores)")
    return path
