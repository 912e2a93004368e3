"""How --weights int8 / int4 hold a weight (quantized_weights builds its layers on these):
quantized (int8: one scale per row; int4: per group of GROUP_SIZE, GGUF's Q4_1 form, or exactly
Q4_0's where a weight already is) and laid out in tiles of TILE rows, as the C++ kernels read them
(csrc/q4_matmul.cpp, q8_matmul.cpp). Torch only; a vocabulary table is read and quantized by row
blocks, so no temporary is the size of the table."""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

GROUP_SIZE = 32          # int4 weights per (scale, min), as GGUF's 4-bit blocks
INT4_RUN = 64            # int4 in-features must be runs of this (the kernel's two groups)
TILE = 16                # output rows held together (int4 and int8): the C++ kernels' 16 lanes
COMPUTE_DTYPE = torch.bfloat16
QUANTIZE_ROWS = 4096     # rows quantized at once
Q4_0_ZERO = 8  # Q4_0's form: w = scale * (q - Q4_0_ZERO), so min = -Q4_0_ZERO * scale


class StoredRows(Protocol):
    """A weight read by row blocks (worker.loader.StoredTensor: a vocabulary table in a file)."""

    shape: torch.Size

    def __getitem__(self, rows: slice) -> torch.Tensor: ...


@torch.no_grad()  # also a model built in place, whose parameters require grad
def quantize_int8(weight: torch.Tensor, scale_dtype: torch.dtype = COMPUTE_DTYPE
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] -> (int8 [out, in], scales [out] in scale_dtype): symmetric, per row, 127 = the
    row's largest magnitude (also --int8-small-steps' copies, worker.kernels.int8_weights)."""
    q = torch.empty(weight.shape, dtype=torch.int8)
    scales = torch.empty(weight.shape[0])
    for start in range(0, weight.shape[0], QUANTIZE_ROWS):  # bounded temporaries (a vocab head)
        w = weight[start:start + QUANTIZE_ROWS].float()
        s = scales[start:start + QUANTIZE_ROWS]
        torch.div(w.abs().amax(dim=1).clamp_(min=1e-12), 127, out=s)
        q[start:start + QUANTIZE_ROWS] = (w / s[:, None]).round_().clamp_(-127, 127)
    return q, scales.to(scale_dtype)


@torch.no_grad()
def quantize_int4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[out, in] -> (q int32 [out, in] in 0..15, scales, mins [out, in / GROUP_SIZE] float32):
    each group's range in 16 steps from its least weight, w = q * scale + min (GGUF's Q4_1)."""
    out_features, in_features = weight.shape
    w = weight.float().view(out_features, -1, GROUP_SIZE)
    low, high = w.amin(dim=2, keepdim=True), w.amax(dim=2, keepdim=True)
    scales = ((high - low) / 15).clamp_(min=1e-12)
    q = ((w - low) / scales).round_().clamp_(0, 15).to(torch.int32)
    return (q.view(out_features, in_features), scales.view(out_features, -1),
            low.view(out_features, -1))


@torch.no_grad()
def quantize_q4_0(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] -> (q int32 [out, in] in 0..15, scales [out, in / GROUP_SIZE] float32) in
    GGUF's Q4_0 form, as llama.cpp quantizes it: each group's largest-magnitude weight (the first,
    with its sign) is q = 0, w = scale * (q - 8)."""
    out_features, in_features = weight.shape
    w = weight.float().view(out_features, -1, GROUP_SIZE)
    extreme = w.gather(2, w.abs().argmax(dim=2, keepdim=True))
    scales = extreme / -Q4_0_ZERO
    inverse = torch.where(scales == 0, 0.0, 1 / scales)
    q = (w * inverse + Q4_0_ZERO).round_().clamp_(0, 15).to(torch.int32)
    return q.view(out_features, in_features), scales.view(out_features, -1)


class NotQ4_0(ValueError):
    """Int4Linear(symmetric=True) of a weight the Q4_0 form does not hold exactly."""


def _exact_q4_0(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Rows w [n, in] -> (q, fp16 scales) in Q4_0 form when every group is exactly fp16 scale *
    (q - 8) (the weights a GGUF Q4_0 file dequantizes to), else None."""
    q, scales = quantize_q4_0(w)
    scales = scales.half()
    rebuilt = (q.view(len(w), -1, GROUP_SIZE) - Q4_0_ZERO) * scales.float()[:, :, None]
    return (q, scales) if torch.equal(rebuilt.view_as(w), w.float()) else None


def tiles_of(rows: int) -> int:
    return -(-rows // TILE)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q [n, in] in 0..15 -> our tiled layout [tiles, in / GROUP_SIZE, 256] uint8 (Int4Linear)."""
    n, in_features = q.shape
    q = F.pad(q.to(torch.uint8), (0, 0, 0, tiles_of(n) * TILE - n))
    # [tile, lane, group, half, k, i] -> [tile, group, half, k, lane, i]
    t = q.view(-1, TILE, in_features // GROUP_SIZE, 2, 4, 4).permute(0, 2, 3, 4, 1, 5)
    return (t[:, :, 0] | (t[:, :, 1] << 4)).reshape(len(t), -1, TILE * GROUP_SIZE // 2)


def pack_int8(q: torch.Tensor) -> torch.Tensor:
    """int8 q [n, in] (in: runs of GROUP_SIZE) -> Int8Linear's tiles [tiles, in / 32, 512]."""
    n, in_features = q.shape
    q = F.pad(q, (0, 0, 0, tiles_of(n) * TILE - n))
    # [tile, lane, group, k, i] -> [tile, group, k, lane, i]
    t = q.view(-1, TILE, in_features // GROUP_SIZE, GROUP_SIZE // 4, 4).permute(0, 2, 3, 1, 4)
    return t.reshape(len(t), -1, TILE * GROUP_SIZE)


def unpack_int8(packed: torch.Tensor) -> torch.Tensor:
    """_pack8's inverse: [tiles, groups, 512] -> q [tiles, TILE, groups * GROUP_SIZE] int8."""
    tiles, groups, _ = packed.shape
    t = packed.view(tiles, groups, GROUP_SIZE // 4, TILE, 4).permute(0, 3, 1, 2, 4)
    return t.reshape(tiles, TILE, groups * GROUP_SIZE)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """_pack's inverse: [tiles, groups, 256] -> q [tiles, TILE, groups * GROUP_SIZE] uint8."""
    blocks = packed.view(len(packed), -1, 4, TILE, 4)  # [tile, group, k, lane, i]
    q = torch.stack([blocks & 0xF, blocks >> 4], dim=2)  # [tile, group, half, k, lane, i]
    return q.permute(0, 4, 1, 2, 3, 5).reshape(len(packed), TILE, -1)


def tile_rows(values: torch.Tensor) -> torch.Tensor:
    """Per-row, per-group values [n, groups] -> [tiles, groups, TILE] (padded with zeros)."""
    values = F.pad(values, (0, 0, 0, tiles_of(len(values)) * TILE - len(values)))
    return values.view(-1, TILE, values.shape[1]).transpose(1, 2).contiguous()


@torch.no_grad()
def pack_q4_0(weight: torch.Tensor | StoredRows) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(packed, fp16 scales) of `weight` in the Q4_0 form, by row blocks (bounded temporaries: a
    vocabulary table), or None at the first block that form does not hold exactly."""
    out_features, in_features = weight.shape
    if in_features % INT4_RUN:
        return None
    packed, scales = _empty_tiled(out_features, in_features)
    for start in range(0, out_features, QUANTIZE_ROWS):
        exact = _exact_q4_0(weight[start:start + QUANTIZE_ROWS])
        if exact is None:
            return None
        tiles = slice(start // TILE, tiles_of(start + len(exact[0])))
        packed[tiles], scales[tiles] = pack_int4(exact[0]), tile_rows(exact[1])
    return packed, scales


@torch.no_grad()
def pack_q4_1(weight: torch.Tensor | StoredRows) -> tuple[torch.Tensor, torch.Tensor,
                                                          torch.Tensor]:
    """(packed, fp16 scales, fp16 mins) of `weight` in the Q4_1 form (quantize_int4), by row
    blocks."""
    out_features, in_features = weight.shape
    packed, scales = _empty_tiled(out_features, in_features)
    mins = torch.empty_like(scales)
    for start in range(0, out_features, QUANTIZE_ROWS):
        q, block_scales, block_mins = quantize_int4(weight[start:start + QUANTIZE_ROWS])
        tiles = slice(start // TILE, tiles_of(start + len(q)))
        packed[tiles] = pack_int4(q)
        scales[tiles], mins[tiles] = tile_rows(block_scales), tile_rows(block_mins)
    return packed, scales, mins


def _empty_tiled(out_features: int, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed, fp16 scales) of an int4 weight, uninitialized, in Int4Linear's layout."""
    groups = in_features // GROUP_SIZE
    return (torch.empty(tiles_of(out_features), groups, TILE * GROUP_SIZE // 2, dtype=torch.uint8),
            torch.empty(tiles_of(out_features), groups, TILE, dtype=torch.float16))
