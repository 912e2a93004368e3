"""Weight-only int8 copies of the model's matmul weights, for the steps too small to be anything
but a stream of weights from memory (--int8-small-steps).

A step of a token or a few reads every weight once and does little else: on a CPU it runs at
memory bandwidth, and int8 weights (one scale per output row) halve the bytes. Past a few tokens
the dequantizing matmul (torch's _weight_int8pack_mm, as gpt-fast uses) falls behind the bf16
AMX one, so larger steps keep the model's own weights; the copies cost half their size again.
"""

from __future__ import annotations

import torch

from worker.kernels.weight_packing import quantize_int8
from worker.model import LlamaModel

# Steps of at most this many tokens take the int8 copies: bench/engine_throughput.py --int8 gave
# 1.78x the bf16 decode at 1 token a step, 1.52x at 4, and 1.03x at 8 (threshold raised).
SMALL_STEP_TOKENS = 4
# The matmul's CPU kernel reads 16 weights at a time: other widths crashed it.
IN_FEATURES_MULTIPLE = 16


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] -> (int8 [out, in], scales [out] in weight's dtype): symmetric, per row."""
    return quantize_int8(weight, weight.dtype)


class Int8Weights:
    """int8 copies of every projection and of the output head of `model` (CPU)."""

    def __init__(self, model: LlamaModel) -> None:
        head = model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
        if head.device.type != "cpu" or head.dtype != torch.bfloat16:
            # float32 and float16 activations take slow paths of the int8 matmul, slower than
            # their own dense matmuls even at one token (measured on this CPU)
            raise ValueError("--int8-small-steps is for CPU workers in bfloat16 (--dtype)")
        self.layers: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = []
        for layer in model.layers:
            linears = {"qkv_proj": layer.self_attn.qkv_proj, "o_proj": layer.self_attn.o_proj,
                       "gate_up_proj": layer.mlp.gate_up_proj, "down_proj": layer.mlp.down_proj}
            self.layers.append({name: quantize(linear.weight) for name, linear in linears.items()})
        if any(w.shape[1] % IN_FEATURES_MULTIPLE for layer in self.layers
               for w, _ in layer.values()) or head.shape[1] % IN_FEATURES_MULTIPLE:
            raise ValueError(f"--int8-small-steps needs in-features divisible by "
                             f"{IN_FEATURES_MULTIPLE}")
        self.head = quantize(head)

    @property
    def nbytes(self) -> int:
        pairs = [*(p for layer in self.layers for p in layer.values()), self.head]
        return sum(q.nbytes + s.nbytes for q, s in pairs)

    def linear(self, layer: int, name: str, x: torch.Tensor,
               bias: torch.Tensor | None) -> torch.Tensor:
        """x [T, in] @ the int8 copy of projection `name` of `layer`ᵀ (+ bias)."""
        q, scales = self.layers[layer][name]
        y = torch._weight_int8pack_mm(x, q, scales)
        return y if bias is None else y + bias

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LlamaModel.compute_logits on the int8 head: [rows, hidden] -> [rows, vocab] float32."""
        return torch._weight_int8pack_mm(hidden, *self.head).float()

