"""The worker's C++ CPU kernels (csrc/), compiled on the machine that runs them, once.

- paged_decode_attention (csrc/paged_attention.cpp): decode attention read straight from the
  paged KV cache. torch's path gathers each row's K and V into padded tensors first, then runs
  SDPA; on CPU that copy costs about as much as the attention.
- lora_delta_ (csrc/lora_delta.cpp): every segment's LoRA delta of one projection in one call,
  reading each used slot once (worker.lora, DeltaPath.KERNEL).
- q8_matmul and dequantize_int8_ (csrc/q8_matmul.cpp), q4_matmul and dequantize_q4_
  (csrc/q4_matmul.cpp), their activations in csrc/quantized_rows.h: quantized weights' matmul,
  and a block of their rows to bf16 in one pass (worker.kernels.quantized_weights).
- the layers' small ops, one call each where torch dispatches several (worker.model.LayerKernels):
  rms_norm and add_rms_norm (csrc/rms_norm.cpp: the norm's casts and arithmetic, ~8 torch ops,
  and the residual add before it), silu_mul (csrc/activation.cpp) and paged_decode_step
  (csrc/paged_attention.cpp: a decode step's rope, KV-cache writes and attention, ~15 ops);
- argmax_rows (csrc/argmax.cpp): greedy sampling's argmax of each row of the logits
  (worker.sampler), 2 vectorised passes where torch's reduction walks a row element by element.

Built with the machine's C++ compiler on first use (~30 s; torch caches the build under
$TORCH_EXTENSIONS_DIR, and `make setup` does it ahead of time). Without a compiler, or with
EDGELORA_CPU_KERNELS=0, the worker keeps torch's paths; the reason is logged.

The build is named after this checkout's csrc/ folder: two checkouts on one machine (a clone
beside the working tree) would otherwise share one build folder and rebuild it for each other.
torch waits on a build's lock file forever; a lock older than any build (a build killed
midway) is removed first.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import time
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)
CSRC = Path(__file__).with_name("csrc")
SOURCES = ("module.cpp", "paged_attention.cpp", "lora_delta.cpp", "q8_matmul.cpp",
           "q4_matmul.cpp", "rms_norm.cpp", "activation.cpp", "argmax.cpp")
STALE_LOCK_S = 600  # a build takes ~30-60 s: a lock this old was left by a killed one
NAME = "edgelora_cpu_kernels_" + hashlib.sha256(str(CSRC.resolve()).encode()).hexdigest()[:8]


def _drop_stale_lock() -> None:
    try:  # where load() builds NAME ($TORCH_EXTENSIONS_DIR or torch's default)
        from torch.utils.cpp_extension import _get_build_directory
    except ImportError:  # a torch without it: its own wait, as before
        return
    lock = Path(_get_build_directory(NAME, verbose=False)) / "lock"
    try:
        if time.time() - lock.stat().st_mtime > STALE_LOCK_S:
            log.warning("removing %s, left by a build that never finished", lock)
            lock.unlink()
    except FileNotFoundError:
        pass


@functools.cache
def load() -> ModuleType | None:
    """The compiled module, or None (disabled, or it failed to build: the reason is logged)."""
    if os.environ.get("EDGELORA_CPU_KERNELS", "1") == "0":
        return None
    from torch.utils.cpp_extension import load as build

    try:
        _drop_stale_lock()
        module = build(NAME, [str(CSRC / s) for s in SOURCES],
                       extra_cflags=["-O3", "-march=native", "-fopenmp"],
                       extra_ldflags=["-fopenmp"], extra_include_paths=[str(CSRC)])
    except Exception as exc:  # no compiler, no headers: serve on torch's paths
        log.warning("CPU kernels unavailable, using torch's paths: %s", exc)
        return None
    module.set_weight_prefetch(prefetch_weights())
    return module


def prefetch_weights() -> bool:
    """Whether the quantized matmuls ask for their weights ahead of the hardware prefetcher
    (EDGELORA_WEIGHT_PREFETCH=1/0 says so; else by CPU). On an AMD EPYC (Zen 4) asking lifted a
    1B decode step's stream from 27 to 32 GB/s; on an Intel Xeon with AMX the hardware prefetcher
    alone was faster at every step size (1B shapes, cold weights, ms: int4 1 row 0.66 -> 0.54,
    32 rows 2.38 -> 1.83; int8 2 rows 1.57 -> 0.85, 32 rows 3.94 -> 2.28). So not on Intel."""
    told = os.environ.get("EDGELORA_WEIGHT_PREFETCH")
    if told in ("0", "1"):
        return told == "1"
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: as measured on AMD
        return True
    return "GenuineIntel" not in info


if __name__ == "__main__":  # `make setup` builds them ahead of the first worker start
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print("CPU kernels:", "ready" if load() is not None else "unavailable")
