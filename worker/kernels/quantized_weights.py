"""Weights kept quantized for every step (--weights int8 / int4): no full-precision copy.

On a CPU a step of a few tokens is a stream of weights from memory, so fewer bytes per weight is
the speed, and on an edge box the same bytes are most of the process's memory. Formats:
  - int8: symmetric, one scale per output row (the output head's rows are the embedding's rows,
    so a tied embedding reads its tokens' rows from the same bytes);
  - int4: groups of GROUP_SIZE weights along the input, each group's range in 16 steps,
    w = q * scale + min, which is GGUF's Q4_1. Asymmetric because on SmolLM2-135M the symmetric
    form (Q4_0's) agreed with bf16's next token at 68% of positions, this one at 98%
    (bench/weights_accuracy.py); the output head and a tied embedding stay int8 (HEAD_FORMAT).
    A weight that is already 4-bit symmetric, every group exactly scale * (q - 8) (what a GGUF
    Q4_0 file holds), is kept in that form instead, head included: 4.5 bits a weight rather
    than 5 (8 for the head), and the file's own weights, not a rounding of them.
Steps take our C++ kernels (kernels/csrc/q4_matmul.cpp, q8_matmul.cpp: activations quantized
per group of 32 to int8, as llama.cpp's, integer dot products with AVX-512 VNNI where present, a
portable loop otherwise), reading 1 or ~0.6 byte per weight. Both formats are laid out in tiles
of 16 rows so that one instruction multiplies 16 rows at once; with that, the kernels beat
dequantizing + bf16 GEMM at every step size measured on a CPU without AMX. With AMX, torch's bf16
GEMM runs on its tiles and wins from AMX_DEQUANTIZED_FROM rows (KERNEL_VS_DEQUANTIZED): such
steps, and every step without the C++ kernels (no compiler), dequantize DEQUANT_BYTES of W at a
time into a small buffer and multiply in bfloat16, so no layer is ever held in full precision.

LoRA deltas are added to these projections' outputs in the activation dtype, as on full weights
(worker.model.ForwardBatch.project): exact on top of the quantized base.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from worker.kernels import cpu as cpu_kernels
from worker.kernels.weight_packing import (
    COMPUTE_DTYPE,
    GROUP_SIZE,
    INT4_RUN,
    Q4_0_ZERO,
    QUANTIZE_ROWS,
    TILE,
    NotQ4_0,
    StoredRows,
    pack_int8,
    pack_q4_0,
    pack_q4_1,
    quantize_int8,
    tiles_of,
    unpack_int4,
    unpack_int8,
)
from worker.model import LlamaModel

log = logging.getLogger(__name__)
# KERNEL_VS_DEQUANTIZED: a step's time in the C++ kernel / dequantizing row blocks (C++) +
# bf16 GEMM, ms, best of 3, 2 threads (int4 in the Q4_0 form). AMD EPYC (Zen 4: AVX-512 VNNI
# and BF16, no AMX; dequantized in blocks of 256 rows):
#   rows                    16           128           512          2048
#   int4 8192x2048           -    6.47 / 13.0  26.7 / 43.3   120 / 188
#   int4 2048x8192           -    7.63 / 12.2  28.0 / 44.9   144 / 176
#   int8 8192x2048   1.34 / 6.27  8.96 / 16.9  35.5 / 59.6   161 / 205
#   int8 2048x8192   1.23 / 5.25  7.72 / 13.8  38.6 / 55.3   215 / 192
# Intel Xeon with AMX (torch's bf16 GEMM runs on its tiles; blocks of DEQUANT_BYTES):
#   rows                    32            64            96           128           512
#   int4 8192x2048   2.46 / 3.05   4.59 / 4.73   6.52 / 5.77   8.42 / 6.34   34.1 / 11.6
#   int4 2048x8192   2.53 / 3.35   4.65 / 4.71   6.94 / 5.01   9.80 / 5.45   43.5 / 11.8
#   int8 8192x2048   3.74 / 4.44   7.45 / 6.21   11.4 / 6.79   14.8 / 7.62   68.2 / 12.7
#   int8 2048x8192   3.70 / 5.25   7.47 / 6.47   10.9 / 6.58   15.3 / 7.47   74.6 / 12.9
# So without AMX every step takes the kernels (int8 at 2048 rows of an 8192-wide input, the one
# loss, is past --max-num-batched-tokens' default 512), and with AMX steps of AMX_DEQUANTIZED_FROM
# rows or more dequantize (prompt chunks, large batches: 3-6x faster at 512 rows).
AMX_DEQUANTIZED_FROM = 64
GATHER_ROWS = 16         # tokens up to which an embedding lookup is a C++ call a token
# bf16 bytes of W dequantized at once by dequantized_step: blocks of 256 rows of a 2048-wide input
# (1 MiB) ran a 512-row step of an 8192x2048 weight 6.5x slower than blocks of 1024 (oneDNN on a
# 256-column output slice), 4 MiB blocks within 3% of one whole GEMM at every shape measured.
DEQUANT_BYTES = 4 << 20
QUANTIZED = ("int8", "int4")
# The output head (and a tied embedding) of an int4 model in int8, as llama.cpp keeps its 4-bit
# models' output in 6-8 bits: the logits are where rounding reaches the sampled token directly
# (unless the file's head is 4-bit already: quantized_table).
HEAD_FORMAT = {"int8": "int8", "int4": "int8"}
_NO_MINS = torch.empty(0, dtype=torch.float16)


@functools.cache
def dequantized_from_rows() -> int | None:
    """Rows from which a step dequantizes W and runs torch's bf16 GEMM rather than our kernels:
    AMX_DEQUANTIZED_FROM on a CPU with AMX tiles, else None (never; KERNEL_VS_DEQUANTIZED).
    Each row's result then depends on the step's size: --batch-invariant's calibration sees
    that and feeds these projections fixed tiles of fewer rows (worker.batch_invariant)."""
    has_amx = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private: absent in some torch
    return AMX_DEQUANTIZED_FROM if has_amx is not None and has_amx() else None


class QuantizedLinear(nn.Module):
    """A projection y = x Wᵀ (+ bias) whose W is held quantized. Subclasses: the formats."""

    def __init__(self, out_features: int, in_features: int, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = out_features, in_features
        self.padded_in = in_features  # columns as stored (int8 pads to whole groups)
        # not persistent: a quantized model is made from a checkpoint, never saved
        self.register_buffer("bias", None if bias is None else bias.to(COMPUTE_DTYPE),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernels = cpu_kernels.load()
        from_rows = dequantized_from_rows()
        if kernels is None or (from_rows is not None and x.shape[0] >= from_rows):
            y = self.dequantized_step(x)
        else:
            y = self.kernel_step(kernels, x)
        return y if self.bias is None else y + self.bias

    def kernel_step(self, kernels: ModuleType, x: torch.Tensor) -> torch.Tensor:
        """x [rows, in] bf16 @ Wᵀ in the C++ kernel."""
        raise NotImplementedError

    def columns(self, start: int, end: int) -> torch.Tensor:
        """(W[start:end])ᵀ dequantized, [in, end - start]: what dequantized_step multiplies by."""
        return self.rows(start, end).T

    def dequantized_step(self, x: torch.Tensor) -> torch.Tensor:
        """x @ Wᵀ in torch's bf16 GEMM, W dequantized DEQUANT_BYTES at a time."""
        out = x.new_empty(x.shape[0], self.out_features)
        block = max(TILE, DEQUANT_BYTES // (COMPUTE_DTYPE.itemsize * self.padded_in) // TILE * TILE)
        for start in range(0, self.out_features, block):
            end = min(start + block, self.out_features)
            torch.mm(x, self.columns(start, end), out=out[:, start:end])
        return out

    def gather(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of W dequantized (an embedding lookup in a tied head): [n, in]. A decode
        step's few tokens: a C++ call each, where torch's path dispatches ~12 ops."""
        kernels = cpu_kernels.load()
        if kernels is None or len(ids) > GATHER_ROWS:
            return self._dequantize(ids)
        out = torch.empty(len(ids), self.padded_in, dtype=COMPUTE_DTYPE)
        for i, row in enumerate(ids.tolist()):
            self.dequantize_rows(kernels, out[i:i + 1], row)
        return out[:, :self.in_features].contiguous()

    # the formats' row reads: in C++ (into `out`, of padded_in columns) and in torch's ops
    def dequantize_rows(self, kernels: ModuleType, out: torch.Tensor, start: int) -> None:
        raise NotImplementedError

    def _dequantize(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` in torch's ops, as the C++ kernel rounds them: [n, in]."""
        raise NotImplementedError

    def rows(self, start: int, end: int) -> torch.Tensor:
        """Output rows [start, end) of W, dequantized: [end - start, in] in COMPUTE_DTYPE."""
        kernels = cpu_kernels.load()
        if kernels is None:
            return self._dequantize(torch.arange(start, end))
        out = torch.empty(end - start, self.padded_in, dtype=COMPUTE_DTYPE)
        self.dequantize_rows(kernels, out, start)
        return out[:, :self.in_features]

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buffers())


class Int8Linear(QuantizedLinear):
    """int8 weights, symmetric, one scale per output row (quantize_int8), in Int4Linear's tiles
    with whole bytes (csrc/q8_matmul.cpp): packed [tiles, in' / GROUP_SIZE, 512] int8, byte
    64 k + 4 l + i of block (tile, group) holding weight 4 k + i of the group in the tile's row l;
    in' = in rounded up to GROUP_SIZE, zero weights past in; scales [out] bf16.

    weight: a tensor, or a StoredRows (a vocabulary table, read and quantized by row blocks)."""

    def __init__(self, weight: torch.Tensor | StoredRows, bias: torch.Tensor | None = None) -> None:
        out_features, in_features = weight.shape
        super().__init__(out_features, in_features, bias)
        self.padded_in = -(-in_features // GROUP_SIZE) * GROUP_SIZE
        packed = torch.empty(tiles_of(out_features), self.padded_in // GROUP_SIZE,
                             TILE * GROUP_SIZE, dtype=torch.int8)
        scales = torch.empty(out_features, dtype=COMPUTE_DTYPE)
        for start in range(0, out_features, QUANTIZE_ROWS):  # QUANTIZE_ROWS: whole tiles
            q, scales[start:start + QUANTIZE_ROWS] = quantize_int8(
                weight[start:start + QUANTIZE_ROWS])
            packed[start // TILE:tiles_of(start + len(q))] = pack_int8(
                F.pad(q, (0, self.padded_in - in_features)))
        self.register_buffer("packed", packed, persistent=False)
        self.register_buffer("scales", scales, persistent=False)

    def kernel_step(self, kernels: ModuleType, x: torch.Tensor) -> torch.Tensor:
        if self.padded_in != self.in_features:
            x = F.pad(x, (0, self.padded_in - self.in_features))
        return kernels.q8_matmul(x.contiguous(), self.packed, self.scales)

    def dequantize_rows(self, kernels: ModuleType, out: torch.Tensor, start: int) -> None:
        kernels.dequantize_int8_(out, self.packed, self.scales, start)

    def _dequantize(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` in torch's ops: q * scale rounded once to bf16 (as the C++ kernel)."""
        # each tile unpacked once, not once a row (a block of rows shares 16 a tile)
        tiles, tile_of_row = torch.unique(ids // TILE, return_inverse=True)
        q = unpack_int8(self.packed.index_select(0, tiles))[tile_of_row, ids % TILE]
        return q[:, :self.in_features].to(COMPUTE_DTYPE).mul_(
            self.scales.index_select(0, ids)[:, None])


class Int4Linear(QuantizedLinear):
    """Our int4 layout (csrc/q4_matmul.cpp): the output rows in tiles of TILE (the last padded
    with zero rows), each tile's weights by group of GROUP_SIZE inputs in 256 bytes: packed
    [tiles, in / GROUP_SIZE, 256] uint8, byte 64 k + 4 l + i holding weight 4 k + i of the
    group in row l of the tile in its low nibble and weight 16 + 4 k + i in its high one;
    scales and mins [tiles, in / GROUP_SIZE, TILE] fp16; w = q * scale + min. `mins` is None in
    the symmetric form (min = -8 * scale), kept for a weight that is exactly in it (pack_q4_0).

    weight: a tensor, or a StoredTensor (a vocabulary table, read and quantized by row blocks)."""

    def __init__(self, weight: torch.Tensor | StoredRows, bias: torch.Tensor | None = None,
                 symmetric: bool | None = None) -> None:
        """symmetric: None = the Q4_0 form where it holds `weight` exactly, else Q4_1's; True =
        the Q4_0 form or NotQ4_0; False = Q4_1's."""
        out_features, in_features = weight.shape
        super().__init__(out_features, in_features, bias)
        held = None if symmetric is False else pack_q4_0(weight)
        if held is None and symmetric:
            raise NotQ4_0("the weight is not exactly in Q4_0 form")
        packed, scales, mins = (*held, None) if held is not None else pack_q4_1(weight)
        self.register_buffer("packed", packed, persistent=False)
        self.register_buffer("scales", scales, persistent=False)
        self.register_buffer("mins", mins, persistent=False)

    def kernel_step(self, kernels: ModuleType, x: torch.Tensor) -> torch.Tensor:
        return kernels.q4_matmul(x.contiguous(), self.packed, self.scales, self._mins(),
                                 self.out_features)

    def dequantize_rows(self, kernels: ModuleType, out: torch.Tensor, start: int) -> None:
        kernels.dequantize_q4_(out, self.packed, self.scales, self._mins(), start)

    def _mins(self) -> torch.Tensor:
        """The kernels' mins argument: empty for the symmetric form."""
        return _NO_MINS if self.mins is None else self.mins

    def _dequantize(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids`: q * scale + min in float32, rounded once to bf16 (as the C++ kernel)."""
        tiles, lanes, rows = ids // TILE, ids % TILE, torch.arange(len(ids))

        def of_rows(tiled: torch.Tensor) -> torch.Tensor:  # [tiles, groups, TILE] -> [n, groups]
            return tiled.index_select(0, tiles)[rows, :, lanes].float()

        q = unpack_int4(self.packed.index_select(0, tiles))[rows, lanes]  # [n, in]
        scales = of_rows(self.scales)
        mins = -Q4_0_ZERO * scales if self.mins is None else of_rows(self.mins)
        w = torch.addcmul(mins[:, :, None], q.view(len(ids), -1, GROUP_SIZE).float(),
                          scales[:, :, None])
        return w.view(len(ids), self.in_features).to(COMPUTE_DTYPE)


class QuantizedEmbedding(nn.Module):
    """Token embeddings read from a quantized table (the tied output head's, or its own)."""

    def __init__(self, table: QuantizedLinear) -> None:
        super().__init__()
        self.table = table

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table.gather(ids)


def quantized_linear(fmt: str, weight: torch.Tensor,
                     bias: torch.Tensor | None = None) -> QuantizedLinear:
    """`weight` [out, in] held in `fmt`; int4 falls back to int8 where its runs of 64 do not fit
    the in-features (int8 pads any width to its groups)."""
    if fmt == "int4" and weight.shape[1] % INT4_RUN == 0:
        return Int4Linear(weight, bias)
    return Int8Linear(weight, bias)


def quantized_table(fmt: str, weight: torch.Tensor | StoredRows) -> QuantizedLinear:
    """The output head or embedding in HEAD_FORMAT[fmt], or in int4 where it is 4-bit already
    (a Q4_0 file's): re-quantizing those to int8 would spend 8 bits on 4 bits' worth."""
    if fmt == "int4":
        try:
            return Int4Linear(weight, symmetric=True)
        except NotQ4_0:
            pass
    return quantized_linear(HEAD_FORMAT[fmt], weight)


def require_cpu_bf16(fmt: str, device: torch.device, dtype: torch.dtype) -> None:
    """Quantized weights run on the CPU kernels, with activations in COMPUTE_DTYPE."""
    if device.type != "cpu" or dtype != COMPUTE_DTYPE:
        raise ValueError(f"--weights {fmt} is for CPU workers computing in bfloat16 (this one: "
                         f"{device.type}, {str(dtype).removeprefix('torch.')})")


def quantize_model(model: LlamaModel, fmt: str,
                   take: Callable[[str], torch.Tensor | None] | None = None) -> None:
    """Replaces the projections, the output head and the embedding of `model` by their `fmt`
    forms (the head and a tied embedding: one HEAD_FORMAT table), freeing the originals.

    take(name): a weight or bias by state-dict name (None: absent), to quantize each straight
    from the checkpoint into a model still on the meta device (the loader: no full-precision copy
    of the model in between); default: the model's own, which must be on the CPU in bf16."""
    if fmt not in QUANTIZED:
        raise ValueError(f"unknown quantized format {fmt!r}")
    if take is None:
        require_cpu_bf16(fmt, model.device, model.dtype)
    take = take or dict(model.named_parameters()).get
    for i, layer in enumerate(model.layers):
        for kind, parent, name in (("self_attn", layer.self_attn, "qkv_proj"),
                                   ("self_attn", layer.self_attn, "o_proj"),
                                   ("mlp", layer.mlp, "gate_up_proj"),
                                   ("mlp", layer.mlp, "down_proj")):
            prefix = f"layers.{i}.{kind}.{name}"
            setattr(parent, name, quantized_linear(fmt, take(f"{prefix}.weight"),
                                                   take(f"{prefix}.bias")))
    tied = model.lm_head is None
    head = quantized_table(fmt, take("embed_tokens.weight" if tied else "lm_head.weight"))
    embedding = head if tied else quantized_table(fmt, take("embed_tokens.weight"))
    model.embed_tokens = QuantizedEmbedding(embedding)
    model.lm_head = head


def weight_bytes(model: LlamaModel) -> int:
    """Bytes of the model's weights as held (quantized or not), a tied table once."""
    seen: set[int] = set()
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) not in seen and tensor.device.type != "meta":
            seen.add(id(tensor))
            total += tensor.nbytes
    return total
