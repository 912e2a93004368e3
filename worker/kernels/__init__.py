"""Device code: what runs the worker's hot loops on each device, apart from the request path.

- cpu (C++ sources in csrc/, compiled on the machine that runs them): paged decode attention,
  the multi-LoRA delta, int4/int8 weight matmuls and dequantization, the layers' small ops;
- paged_attention: the decode attention kernels' signature and torch reference;
- paged_attention_triton, lora_triton: the CUDA kernels (Triton), each checked on its GPU;
- self_check: the start-up comparison of a kernel with its reference;
- quantized_weights (--weights int8 / int4 layers, on weight_packing's tiles) and int8_weights
  (int8 copies for small steps): weights held in the forms the C++ kernels read;
- device_kernels, layer_kernels (here): which of them a device gets.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # worker.lora imports this package's modules
    from worker.kernels.paged_attention import DecodeAttention
    from worker.lora import LoraKernel
    from worker.model import LayerKernels

log = logging.getLogger(__name__)


def device_kernels(device: torch.device,
                   dtype: torch.dtype) -> tuple[DecodeAttention | None, LoraKernel | None]:
    """The decode attention and LoRA kernels for the device: C++ on CPU (worker.kernels.cpu),
    Triton on CUDA once each passed its check on this GPU. None for one that is missing (the
    reason is logged): its work then takes torch's paths."""
    if device.type == "cpu":
        from worker.kernels import cpu  # not at import: `python -m worker.kernels.cpu` builds

        kernels = cpu.load()
        return ((kernels.paged_decode_attention, kernels.lora_delta_) if kernels is not None
                else (None, None))
    if device.type != "cuda":
        return None, None
    try:
        from worker.kernels import lora_triton, paged_attention_triton
    except ImportError as exc:  # CUDA builds of torch bring Triton
        log.warning("no Triton (%s): decode attention and LoRA deltas on torch's paths", exc)
        return None, None
    return (paged_attention_triton.checked_kernel(device, dtype),
            lora_triton.checked_kernel(device, dtype))


def layer_kernels(device: torch.device) -> LayerKernels | None:
    """The layers' norms, activation and decode attention in one call each
    (worker.model.LayerKernels): the C++ ones on CPU; None elsewhere (on CUDA torch's ops run on
    the GPU, where their dispatch overlaps the device's work)."""
    if device.type != "cpu":
        return None
    from worker.kernels import cpu

    return cpu.load()
